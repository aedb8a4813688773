"""The routed experts as a replaceable submodule (MoE.experts): every dispatch reaches them through one call
with the routed rows sorted by expert and the per-expert counts, so a replacement is used and a hook sees each
expert's inputs; an older lmforge checkpoint (experts as MoE's own mlp.w_up, ...) still loads."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.model.layers.moe import Experts, MoE, upgrade_expert_keys
from lmforge.model.transformer import Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, mlp="moe",
                  moe=MoEConfig(n_experts=4, top_k=2, d_expert=16, n_shared=1, expert_bias=True))


def _moe(seed: int = 0, **moe) -> MoE:
    torch.manual_seed(seed)
    m = MoE(dataclasses.replace(CFG, moe=dataclasses.replace(CFG.moe, **moe)), 0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


class Recorded(nn.Module):
    """A stand-in for a quantizer's or adapter's experts: the forward contract only (rows sorted by expert,
    counts), computed by a copy of the original experts' per-expert reference, every call recorded."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.inner = copy.deepcopy(experts)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, counts: torch.Tensor, **_) -> torch.Tensor:
        self.calls.append((x.detach().clone(), counts.clone()))
        return torch.cat([self.inner.expert(xe, e) for e, xe in enumerate(x.split(counts.tolist()))])


@pytest.mark.parametrize("dispatch,capacity", [("grouped", 0.0), ("loop", 0.0), ("grouped", 1.0), ("loop", 1.0)])
def test_replaced_experts_run_in_every_dispatch_on_each_experts_routed_rows(dispatch, capacity):
    m = _moe(capacity_factor=capacity).train()
    m.dispatch = dispatch
    x = torch.randn(2, 9, 32)
    want = m(x)
    m.experts = Recorded(m.experts)
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-5)
    (rows, counts), = m.experts.calls
    # what the experts saw: expert e's rows are the tokens routed to it (and kept), in token order
    flat = x.reshape(-1, 32)
    idx = m.route(flat)[0]
    keep = m._keep_mask(idx)
    for e, got in enumerate(rows.split(counts.tolist())):
        tok = torch.where(idx == e if keep is None else (idx == e) & keep)[0]
        torch.testing.assert_close(got, flat[tok], rtol=0, atol=0)
    assert counts.sum() == (idx.numel() if keep is None else keep.sum())


def test_a_forward_pre_hook_on_the_experts_sees_rows_and_counts():
    m = _moe().eval()
    seen = []
    m.experts.register_forward_pre_hook(lambda mod, args: seen.append((args[0].shape, args[1].tolist())))
    m(torch.randn(1, 5, 32))
    (shape, counts), = seen
    assert shape == (5 * 2, 32) and sum(counts) == 10 and len(counts) == 4


def test_experts_slice_is_those_experts():
    m = _moe()
    part = m.experts.slice(1, 3)
    assert isinstance(part, Experts) and part.E == 2
    for name, p in part.named_parameters():
        assert torch.equal(p, getattr(m.experts, name)[1:3]) and p.data_ptr() != getattr(m.experts, name).data_ptr()
    x = torch.randn(6, 32)
    counts = torch.tensor([2, 4])
    torch.testing.assert_close(part(x, counts), m.experts(x, torch.tensor([0, 2, 4, 0])))


def _old_layout(state: dict) -> dict:
    return {k.replace("mlp.experts.", "mlp."): v for k, v in state.items()}


def test_a_checkpoint_in_the_old_layout_loads():
    torch.manual_seed(0)
    saved = Transformer(CFG)
    old = _old_layout(saved.state_dict())
    assert "blocks.0.mlp.w_up" in old and "blocks.0.mlp.b_down" in old
    torch.manual_seed(1)
    model = Transformer(CFG)
    model.load_state_dict(old)  # strict: every old name found its new place
    for name, t in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name
    ids = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(model.eval()(ids), saved.eval()(ids), rtol=0, atol=0)
    # for loaders that compare names first (lmforge.checkpoint.load_weights)
    assert upgrade_expert_keys(model, old).keys() == saved.state_dict().keys()


def test_parameter_order_and_names_keep_the_old_initialisation():
    """The experts' parameters come first in the MoE, as when they were its own: a seeded model initialises
    the same weights as before the move (reset_parameters draws in parameter order)."""
    names = [n for n, _ in Transformer(CFG).blocks[0].mlp.named_parameters()]
    assert names[:6] == [f"experts.{w}" for w in ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")]
    assert names[6] == "router.weight"


def test_expert_down_projections_get_the_residual_init():
    """GPT-2's scaled init of residual outputs reaches the experts' down projections under their new name."""
    e = Transformer(CFG).blocks[0].mlp.experts
    std = CFG.init_std
    assert e.w_up.std().item() == pytest.approx(std, rel=0.1)
    assert e.w_down.std().item() == pytest.approx(std / (2 * CFG.n_layers) ** 0.5, rel=0.1)
