"""Expert parallelism (experts split over ranks, all-to-all dispatch) on 2 gloo processes: after 3
AdamW steps each rank's expert slice and the replicated weights equal one process's full-batch training
of the same MoE model (tolerance 5e-5, as for data parallelism)."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.optim import build_optimizer
from lmforge.parallel.launch import run_local
from tests.parallel import workers as w


def _reference(starve: bool = False) -> dict[str, torch.Tensor]:
    m = w.starved_moe(w.model(w.moe_cfg(router_bias=True, top_k=1))) if starve else w.model(w.moe_cfg())
    opt = build_optimizer(m, w.OPT)
    for x, y in w.batches():
        w.loss_of(m, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return w.params_of(m)


@pytest.mark.parametrize("starve", [False, True])
def test_expert_parallel_matches_one_process(starve):
    """starve: every token routed to expert 0, so rank 1's experts get no rows (an empty grouped matmul returned
    a tensor outside the autograd graph: rank 1 skipped the backward all-to-all and the collectives crashed)."""
    world = 2
    results = run_local(w.expert_parallel_suite, world, starve, timeout=120, start_method="fork")
    ref = _reference(starve)
    per = 4 // world
    for rank, res in enumerate(results):
        for name, p in res["params"].items():
            if ".experts." in name:  # blocks.i.mlp.experts.w_up holds experts [rank*per, (rank+1)*per)
                want = ref[name.replace("mlp.experts.", "mlp.")][rank * per:(rank + 1) * per]
            else:
                want = ref[name.replace("mlp.moe.", "mlp.")]
            assert (p - want).abs().max() < 5e-5, name


def test_expert_parallel_refuses_an_uneven_split():
    from lmforge.parallel.ep import expert_range

    assert [expert_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ConfigError, match="expert parallel size 3 must divide model.moe.n_experts=4"):
        expert_range(4, 3, 0)
