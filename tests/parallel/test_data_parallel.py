"""From-scratch DDP (per-parameter, bucketed + overlapped) and ZeRO-1/2/3 on 2 and 4 gloo processes:
the same parameters as one process on the full batch and as torch's DistributedDataParallel and FSDP2
(fully_shard), after 3 AdamW steps of a tiny tied-embedding Transformer in fp32.

Tolerance: 5e-5 absolute on every parameter. Only the order of the gradient sums differs (about 1e-7
relative), which Adam's normalised step can amplify where the second moment is tiny; measured 9e-6.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.parallel.launch import run_local
from lmforge.parallel.zero import partition, zero_memory
from tests.parallel import workers as w

ATOL = 5e-5
KINDS = ("naive", "bucketed", "bucketed_accum", "zero1", "zero2", "zero3", "zero2_accum", "zero3_accum", "torch_ddp",
         "fsdp2")


@pytest.fixture(scope="module")
def ref():
    return {"adamw": w.reference(w.OPT), "muon": w.reference(w.MUON), "dion": w.reference(w.DION)}


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def suite(request, ref):  # after ref: the ranks fork with what it imported (DTensor, dynamo) already loaded
    return request.param, run_local(w.data_parallel_suite, request.param, timeout=150, start_method="fork")


def _maxdiff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("kind", KINDS)
def test_same_parameters_as_one_process(suite, ref, kind):
    _, results = suite
    assert _maxdiff(results[0][kind], ref["adamw"]) < ATOL


@pytest.mark.parametrize("kind", ("naive", "bucketed", "zero1", "zero2", "zero3"))
def test_same_parameters_as_torch(suite, kind):
    _, results = suite
    assert _maxdiff(results[0][kind], results[0]["torch_ddp"]) < ATOL
    assert _maxdiff(results[0][kind], results[0]["fsdp2"]) < ATOL


def test_bucketed_all_reduces_start_during_backward(suite):
    """Every bucket (several: 0.01 MB each) was launched by a gradient hook before backward returned."""
    _, results = suite
    for kind in ("bucketed", "bucketed_accum"):
        for started, n in results[0][f"{kind}_launched"]:
            assert n > 3 and started == n


def test_zero_runs_matrix_optimizers_on_whole_matrices(suite, ref):
    """Muon and Dion need each matrix whole: ZeRO's per-tensor partition lets the owner step it."""
    _, results = suite
    assert _maxdiff(results[0]["zero2_muon"], ref["muon"]) < ATOL
    assert _maxdiff(results[0]["zero3_dion"], ref["dion"]) < ATOL


def test_zero3_keeps_frozen_parameters_whole(suite):
    """A frozen parameter (here the tied embedding and head) is in no partition, even when the optimizer was built
    over it: it is pruned from the optimizer's groups, and full_parameters() returns it as it is (both failed
    with a KeyError on the owner table)."""
    _, results = suite
    assert _maxdiff(results[0]["zero3_frozen"], w.reference(frozen=True)) < ATOL


@pytest.mark.parametrize("stage", (1, 2, 3))
def test_memory_accounting_matches_measured_bytes(suite, stage):
    """fp32 params (4 B), grads (4 B), AdamW m and v (8 B): measured per rank = zero_memory(n_owned)."""
    world, results = suite
    n = results[0]["n_params"]
    for r in range(world):
        got = results[r]["memory"][stage]
        want = zero_memory(n, world, stage, param=4, grad=4, optim=8, n_owned=got["n_owned"])
        assert {k: got[k] for k in ("param", "grad", "optim")} == {k: want[k] for k in ("param", "grad", "optim")}
    owned = [results[r]["memory"][stage]["n_owned"] for r in range(world)]
    assert sum(owned) == n
    # whole-tensor partitions are within one tensor (the 64x32 embedding) of the paper's Psi / N
    assert max(abs(o - n / world) for o in owned) <= 64 * 32


def test_memory_accounting_counts_frozen_parameters(suite):
    """A frozen parameter (the 64x32 tied embedding) is in no partition: whole on every rank under ZeRO-3, its
    bytes in the measured storage and in zero_memory's n_frozen (state_bytes skipped it: measured < held)."""
    world, results = suite
    frozen = 64 * 32
    for r in range(world):
        got = results[r]["memory_frozen"]
        want = zero_memory(results[r]["n_params"] - frozen, world, 3, param=4, grad=4, optim=8,
                           n_owned=got["n_owned"], n_frozen=frozen)
        assert {k: got[k] for k in ("param", "grad", "optim")} == {k: want[k] for k in ("param", "grad", "optim")}
        assert got["param"] == 4 * (got["n_owned"] + frozen)


def test_zero_memory_formula_paper_numbers():
    """Rajbhandari et al. 2020, Figure 1: Psi = 7.5B, N = 64, K = 12 -> 120 / 31.4 / 16.6 / 1.88 GB."""
    psi, n = 7.5e9, 64
    got = [zero_memory(int(psi), n, s)["total"] / 1e9 for s in (0, 1, 2, 3)]
    assert got == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.05)
    assert zero_memory(100, 1, 0)["total"] == 16 * 100  # 16 bytes per parameter for mixed-precision Adam


def test_partition_is_balanced_and_deterministic():
    ts = [torch.empty(n) for n in (10, 7, 5, 5, 3, 1)]
    owner = partition(ts, 2)
    assert owner == partition(ts, 2)
    loads = [sum(t.numel() for t, o in zip(ts, owner) if o == r) for r in range(2)]
    assert sorted(loads) == [15, 16]


def test_bad_stage_is_refused():
    with pytest.raises(ConfigError, match="stage=4"):
        zero_memory(10, 2, 4)


@pytest.fixture(scope="module", params=[2, 3], ids=["world2", "world3_uneven_rows"])
def sharded_matrix(request, ref):  # (after ref, as suite)
    return request.param, run_local(w.sharded_matrix_suite, request.param, timeout=120, start_method="fork")[0]


@pytest.mark.parametrize("name, cfg", [("muon", w.MUON), ("muon_owner", w.MUON), ("dion", w.DION), ("muon_moe", w.MUON),
                                       ("muon_owner_moe", w.MUON), ("dion_moe", w.DION)])
def test_matrix_optimizers_on_fsdp2_shards_match_one_process(sharded_matrix, name, cfg):
    """ShardedMuon gathers whole matrices (on every rank, or on one owner per matrix that scatters the
    rows back); ShardedDion moves only rank-r factors: all equal the unsharded step (MoE: expert by expert)."""
    world, got = sharded_matrix
    arch = w.moe_cfg() if name.endswith("moe") else w.CFG
    want = w.reference(cfg, b=2 * world, cfg=arch)
    if name == "dion_moe":  # Dion's QR of the 4-row routers' near-singular momentum turns the ranks' 1e-7 gradient
        # sums into ~1e-4 (on identical gradients sharded Dion equals Dion to 1e-16 in fp64, also with a rank holding
        # no rows); the stacked experts, each whole on one rank, are held to ATOL
        experts = [k for k in want if ".mlp.experts.w_" in k]
        assert _maxdiff({k: got[name][k] for k in experts}, {k: want[k] for k in experts}) < ATOL
        assert _maxdiff(got[name], want) < 5e-4
        return
    assert _maxdiff(got[name], want) < ATOL


def test_sharded_dion_resumed_with_another_rank_steps_at_it(sharded_matrix):
    """A resume with another optim.rank: ShardedDion keeps the saved Q's first columns, as Dion does (it kept the
    saved rank), on 2-D shards and on expert stacks sharded by expert."""
    world, got = sharded_matrix
    want = w.reference_reranked(w.DION, b=2 * world, new_rank=2)
    assert _maxdiff(got["dion_rerank"], want) < ATOL
    assert _maxdiff(got["dion_rerank"], got["dion"]) > 100 * ATOL  # the rank change changed the steps
    # stacked experts sharded by expert (each whole on one rank): held to ATOL as in the matrix test above
    want = w.reference_reranked(w.DION, b=2 * world, new_rank=2, arch=w.moe_cfg())
    experts = [k for k in want if ".mlp.experts.w_" in k]
    assert _maxdiff({k: got["dion_moe_rerank"][k] for k in experts}, {k: want[k] for k in experts}) < ATOL
    assert _maxdiff({k: got["dion_moe_rerank"][k] for k in experts}, {k: got["dion_moe"][k] for k in experts}) \
        > 100 * ATOL
