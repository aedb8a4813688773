"""Expert parallelism (experts split over ranks, all-to-all dispatch) on 2 gloo processes: after 3
AdamW steps each rank's expert slice and the replicated weights equal one process's full-batch training
of the same MoE model (tolerance 5e-5, as for data parallelism)."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.layers.moe import update_expert_biases
from lmforge.optim import build_optimizer
from lmforge.parallel.launch import run_local
from tests.parallel import workers as w


def _reference(starve: bool = False, biased: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    m = (w.starved_moe(w.model(w.moe_cfg(router_bias=True, top_k=1))) if starve
         else w.model(w.moe_cfg(**w.BIASED)) if biased else w.model(w.moe_cfg()))
    opt = build_optimizer(m, w.OPT)
    for x, y in w.batches():
        w.loss_of(m, x, y).backward()
        opt.step()
        update_expert_biases(m)
        opt.zero_grad(set_to_none=True)
    return w.params_of(m), {k: v.clone() for k, v in m.named_buffers() if k.endswith("e_bias")}


@pytest.mark.parametrize("starve,biased", [(False, False), (True, False), (False, True)])
def test_expert_parallel_matches_one_process(starve, biased):
    """starve: every token routed to expert 0, so rank 1's experts get no rows (an empty grouped matmul returned
    a tensor outside the autograd graph: rank 1 skipped the backward all-to-all and the collectives crashed).
    biased: aux-loss-free balancing; every rank's bias moves by the load of the whole global batch (each rank
    moved it by its own tokens before, so the replicas routed with different biases)."""
    world = 2
    results = run_local(w.expert_parallel_suite, world, starve, biased, timeout=120, start_method="fork")
    ref, ref_biases = _reference(starve, biased)
    for res in results:
        biases = {k.replace("mlp.moe.", "mlp."): b for k, b in res["biases"].items()}
        assert biases.keys() == ref_biases.keys()
        for name, b in biases.items():
            torch.testing.assert_close(b, ref_biases[name], rtol=0, atol=0)
        if biased:
            assert any(b.abs().sum() > 0 for b in res["biases"].values())
    per = 4 // world
    for rank, res in enumerate(results):
        for name, p in res["params"].items():
            if ".experts." in name:  # blocks.i.mlp.experts.w_up holds experts [rank*per, (rank+1)*per)
                want = ref[name][rank * per:(rank + 1) * per]
            else:
                want = ref[name.replace("mlp.moe.", "mlp.")]
            assert (p - want).abs().max() < 5e-5, name


def test_expert_parallel_refuses_an_uneven_split():
    from lmforge.parallel.ep import expert_range

    assert [expert_range(8, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    with pytest.raises(ConfigError, match="expert parallel size 3 must divide model.moe.n_experts=4"):
        expert_range(4, 3, 0)


def test_aux_free_bias_of_pipeline_stages_sums_each_layer_over_its_own_ranks():
    results = run_local(w.stage_bias_suite, 4, timeout=120, start_method="fork")
    rate = w.BIASED["bias_update_rate"]
    for rank, res in enumerate(results):
        assert res["updated"] == 1
        (name, bias), = res["biases"].items()
        assert name == f"blocks.{rank // 2}.mlp.e_bias"
        # ranks 2s and 2s + 1 hold stage s: loads [9, 0, 0, 0] or [0, 0, 0, 30] + (2s + 2)·[1, 2, 3, 4] (a sum
        # over all four ranks would give stage 0 another sign)
        first = [9.0, 0.0, 0.0, 0.0] if rank < 2 else [0.0, 0.0, 0.0, 30.0]
        n = torch.tensor(first) + torch.tensor([1.0, 2.0, 3.0, 4.0]) * (2 * (rank // 2) + 2)
        assert torch.equal(bias, rate * torch.sign(n.mean() - n))


def test_sync_gradients_leaves_only_the_ranks_expert_slices_unreduced(monkeypatch):
    """The experts split over ranks are the ExpertParallelMoE layers' slices; an MoE left whole (an MTP module's,
    which apply_ep does not split) is replicated and its experts' gradients are all-reduced like the rest.
    In one process: the collectives are stand-ins recording what they reduce."""
    import dataclasses

    from lmforge.model.config import MTPConfig
    from lmforge.parallel import ep

    monkeypatch.setattr(ep.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(ep.dist, "get_rank", lambda group=None: 1)
    reduced = []
    monkeypatch.setattr(ep.dist, "all_reduce", lambda t, group=None: reduced.append(t))
    m = ep.apply_ep(w.model(dataclasses.replace(w.moe_cfg(), mtp=MTPConfig(depth=1))))
    assert m.blocks[0].mlp.experts.w_up.shape[0] == 2 and m.mtp.modules_[0].block.mlp.experts.w_up.shape[0] == 4
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    ep.sync_gradients(m)
    sliced = {id(p) for b in m.blocks for p in b.mlp.experts.parameters()}
    assert {id(g) for g in reduced} == {id(p.grad) for p in m.parameters() if id(p) not in sliced}
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in m.parameters())
