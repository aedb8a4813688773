"""Parameters some ranks do not use (a conditional branch, an MoE expert none of a rank's tokens chose) and
parameters no rank uses, under the from-scratch DDP and ZeRO on 2 gloo processes: the same parameters as one
process on the whole batch and as torch's DDP(find_unused_parameters=True). A parameter used on some ranks gets
the mean gradient with zeros from the others; one no rank used keeps grad None, so AdamW's weight decay leaves
it untouched. Before, NaiveDDP and ZeRO-2/3 issued per-parameter collectives only for the parameters each rank
used, so the ranks' collectives no longer lined up (mixed-up gradients or a hang: the time limit fails the test),
and BucketedDDP and ZeRO-1 gave the unused parameter a zero gradient, which AdamW decayed."""

from __future__ import annotations

import pytest
import torch

from lmforge.parallel.launch import run_local
from tests.parallel import workers as w

ATOL = 1e-6
RUNS = [("naive", 1, "skip0"), ("bucketed", 1, "skip0"), ("zero1", 1, "skip0"), ("zero2", 1, "skip0"),
        ("zero2", 2, "alternate"), ("zero3", 1, "all"), ("zero3", 2, "all"), ("torch_ddp", 1, "skip0"),
        ("torch_ddp", 2, "alternate")]


@pytest.fixture(scope="module")
def results():
    return run_local(w.branch_suite, 2, RUNS, timeout=60, start_method="fork")[0]


@pytest.mark.parametrize("run", RUNS, ids=["-".join(map(str, r)) for r in RUNS])
def test_same_parameters_as_one_process(results, run):
    _, accum, pattern = run
    want = w.branch_reference(2, accum, pattern)
    got = results[run]
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=ATOL, rtol=0, msg=k)


@pytest.mark.parametrize("run", RUNS, ids=["-".join(map(str, r)) for r in RUNS])
def test_parameter_no_rank_used_is_untouched(results, run):
    init = w.params_of(w.Branchy())
    for k in ("unused.weight", "unused.bias"):
        assert torch.equal(results[run][k], init[k])
