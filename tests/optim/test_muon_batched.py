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
