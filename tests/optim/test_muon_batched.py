"""Muon on stacked MoE expert weights (E, out, in): each expert orthogonalised on its own."""

import torch

from lmforge.optim.muon import Muon, newton_schulz


def test_batched_newton_schulz_equals_per_matrix():
    g = torch.randn(3, 16, 8)
    batched = newton_schulz(g)
    for e in range(3):
        torch.testing.assert_close(batched[e], newton_schulz(g[e]), rtol=1e-5, atol=1e-5)


def test_muon_steps_a_3d_expert_weight():
    w = torch.nn.Parameter(torch.randn(4, 8, 6))
    before = w.detach().clone()
    opt = Muon([w], lr=0.02)
    w.grad = torch.randn_like(w)
    opt.step()
    assert not torch.equal(w, before) and torch.isfinite(w).all()


def test_muon_orthogonalises_each_expert_and_scales_by_its_shape():
    """The step of a stacked (E, out, in) weight is NS5 of each expert's momentum times the expert's shape
    factor (a flattened (E, out * in) matrix gave experts singular values 0.1-0.6 and the wrong factor)."""
    g = torch.randn(4, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w = torch.nn.Parameter(torch.zeros_like(g))
    w.grad = g.clone()
    Muon([w], lr=1.0, momentum=0.0, nesterov=False).step()
    for e in range(4):
        torch.testing.assert_close(-w.detach()[e], newton_schulz(g[e]) * (8 / 6) ** 0.5)
