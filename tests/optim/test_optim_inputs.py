"""Inputs beyond dense real fp32 gradients: complex and bf16 parameters, sparse gradients."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.optim import SOAP, Adafactor, AdamW, Dion, Lion, Muon, Shampoo

ALL = (AdamW, Lion, Adafactor, Shampoo, SOAP, Muon, Dion)


@pytest.mark.parametrize("fused", [None, True])
def test_adamw_steps_complex_parameters_as_torch_does(fused):
    """torch.optim.AdamW steps a complex parameter as its real view (a second moment per real and imaginary
    part); g * g of the complex gradient gave other numbers (1e-3 apart after 5 steps)."""
    torch.manual_seed(0)
    z = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    w = torch.nn.Parameter(torch.randn(3))
    z_ref, w_ref = (torch.nn.Parameter(p.detach().clone()) for p in (z, w))
    ours = AdamW([z, w], lr=1e-2, weight_decay=0.1, fused=fused)
    ref = torch.optim.AdamW([z_ref, w_ref], lr=1e-2, weight_decay=0.1, foreach=True)
    for _ in range(5):
        for p, q in ((z, z_ref), (w, w_ref)):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0 if fused is None else 1e-7)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
    assert ours.state[z]["exp_avg_sq"].dtype == torch.complex64  # state_dict-compatible with torch's


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_sparse_gradients_are_refused_in_one_line(cls):
    """An nn.Embedding(sparse=True) failed deep inside a moment update ('Could not run aten::lerp_ with
    arguments from the SparseCPU backend'), or (Dion) stepped on."""
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(ConfigError, match=rf"{cls.__name__} takes dense gradients only.*shape \(10, 4\).*sparse=False"):
        cls(emb.parameters()).step()
    assert torch.equal(emb.weight, before)


@pytest.mark.parametrize("cls", [c for c in ALL if c is not AdamW], ids=lambda c: c.__name__)
def test_complex_parameters_are_refused_where_the_rule_is_real(cls):
    """Signs, squared gradients, Newton-Schulz and eigen-bases of a complex matrix were computed as if it were
    real (Shampoo, SOAP, Muon, Dion stepped silently) or failed inside torch (Lion's sign, Adafactor's clamp)."""
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    p.grad = torch.randn_like(p)
    with pytest.raises(ConfigError, match=rf"{cls.__name__} does not take complex parameters.*view_as_real"):
        cls([p]).step()


def test_dion_steps_bf16_parameters_like_fp32():
    """torch.linalg.qr has no bf16 kernel ('geqrf_cpu' / 'geqrf_cuda' not implemented for 'BFloat16'): Dion
    crashed on its first step of a bf16 weight. The QR runs in fp32 now; the step matches fp32 Dion's."""
    torch.manual_seed(0)
    w32 = torch.nn.Parameter(torch.randn(16, 8))
    w16 = torch.nn.Parameter(w32.detach().to(torch.bfloat16))
    # a large rate, so the steps dwarf bf16's rounding of the weights (~0.004 of each)
    opt32, opt16 = Dion([w32], lr=1.0, rank=4), Dion([w16], lr=1.0, rank=4)
    start32, start16 = w32.detach().clone(), w16.detach().float()
    for _ in range(3):
        w32.grad = torch.randn_like(w32)
        w16.grad = w32.grad.to(torch.bfloat16)
        opt32.step()
        opt16.step()
    assert opt16.state[w16]["q"].dtype == torch.bfloat16
    moved32, moved16 = w32.detach() - start32, w16.detach().float() - start16
    assert moved32.norm() > 1.0
    assert (moved16 - moved32).norm() < 0.05 * moved32.norm()


@pytest.mark.parametrize("shape", [(16, 8), (2, 16, 8)], ids=["matrix", "expert stack"])
def test_dion_after_a_zero_gradient_steps_from_its_warm_start(shape):
    """A zero buffer (a first gradient of zero: a LoRA A while B = 0, an expert no token reached) normalised R to a
    zero Q; the next step's B Q was zero, its P the QR of a zero matrix (the identity's first r columns), and the
    update moved only those 2 of the 16 rows. A zero step keeps the warm start: the next one is Dion's from it."""
    from lmforge.optim.dion import dion_update, initial_q

    gen = torch.Generator().manual_seed(4)
    w = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=gen))
    w0, g = w.detach().clone(), torch.randn(shape, dtype=torch.float64, generator=gen)
    opt = Dion([w], lr=0.1, rank=2, momentum=0.9)
    first = g.clone()
    first[-1] = 0  # the matrix's last row / the stack's last expert ...
    if len(shape) == 2:
        first.zero_()  # ... for a matrix, all of it
    for grad in (first, g):
        w.grad = grad.clone()
        opt.step()
    q0 = initial_q(torch.Size(shape), 2, seed=0).double()
    for e in range(shape[0] if len(shape) == 3 else 1):  # each expert (or the matrix) by Dion's equations
        pick = (lambda x: x[e]) if len(shape) == 3 else (lambda x: x)  # noqa: E731
        moved = torch.zeros_like(pick(w0))
        if pick(first).any():
            update, m, q = dion_update(pick(first), pick(q0), 0.9)
            moved += update
            moved += dion_update(m + pick(g), q, 0.9)[0]
        else:  # the zero step moved nothing and left Q at the warm start
            moved += dion_update(pick(g), pick(q0), 0.9)[0]
        torch.testing.assert_close(pick(w.detach()), pick(w0) - 0.1 * 2**0.5 * moved, rtol=0, atol=1e-12)
        assert (moved.abs().sum(-1) > 1e-9).all()  # every row moved


@pytest.mark.parametrize("shape", [(4, 3), (2, 4, 3)], ids=["matrix", "expert stack"])
def test_shampoo_steps_a_weight_whose_first_gradient_is_zero_by_its_momentum(shape):
    """A weight with no gradient on the refresh step 1 (a LoRA A while B = 0; an expert no token reached) had a zero
    factor, whose damped inverse root was (1e-30)^(-1/4) I: ungrafted, its next steps were ~1e15 too large (weights
    of 1e16). A zero factor preconditions with the identity until the next refresh: the step is Adam's momentum."""
    torch.manual_seed(0)
    lr, b1 = 1e-2, 0.9
    w = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float64))
    opt = Shampoo([w], lr=lr, betas=(b1, 0.95), graft="none", precondition_frequency=10)
    grads = [torch.randn(shape, dtype=torch.float64) for _ in range(3)]
    last = lambda x: x.view(-1, 4, 3)[-1]  # noqa: E731 - the matrix, or the stack's last expert
    last(grads[0]).zero_()  # no gradient on step 1
    m, want = torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64)
    for t, g in enumerate(grads, 1):
        w.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * last(g)
        want -= lr * m / (1 - b1**t)
    torch.testing.assert_close(last(w.detach()), want, rtol=1e-12, atol=1e-15)


def test_a_qk_clip_cap_that_is_not_positive_is_refused():
    """A negative tau (Muon(qk_clip_tau=-1), or qk_clip_ called with it) turned every clipped head's W_q, W_k into
    NaN (gamma = tau / S_max < 0, raised to the power 1/2); 0 zeroed them."""
    from lmforge.optim.qk_clip import qk_clip_

    with pytest.raises(ConfigError, match=r"^Muon: qk_clip_tau=-1.0 must be >= 0 \(0 = no QK-clip\)"):
        Muon([torch.nn.Parameter(torch.randn(4, 4))], qk_clip_tau=-1.0)
    wq, wk = torch.randn(4, 3), torch.randn(4, 3)
    for tau in (-1.0, 0.0):
        with pytest.raises(ValueError, match="tau must be > 0"):
            qk_clip_(wq, wk, torch.tensor([5.0, 0.5]), tau, head_dim=2)
    assert torch.isfinite(wq).all() and torch.isfinite(wk).all()
