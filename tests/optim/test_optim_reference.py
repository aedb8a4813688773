"""One optimizer step of each optimizer against the paper's equations written out in numpy/scipy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from lmforge.errors import ConfigError
from lmforge.optim import SOAP, Adafactor, AdamW, Dion, Lion, Muon, Shampoo
from lmforge.optim.dion import dion_update, initial_q
from lmforge.optim.muon import CUBIC_COEFFS, newton_schulz
from lmforge.optim.qk_clip import qk_clip_


def _param(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64))
    p.grad = torch.randn(*shape, generator=g, dtype=torch.float64)
    return p


def _polar(a: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return u @ vt


def test_lion_one_step_matches_sign_rule():
    p = _param((5, 7))
    w0, g = p.detach().numpy().copy(), p.grad.numpy().copy()
    opt = Lion([p], lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
    opt.step()
    # m0 = 0: c = (1 - b1) g, so the step is sign(g)
    np.testing.assert_allclose(p.detach().numpy(), w0 * (1 - 0.01 * 0.1) - 0.01 * np.sign(g), rtol=0, atol=1e-12)
    np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), 0.01 * g, atol=1e-12)


def test_adafactor_one_step_matches_factored_rule_with_sums():
    p = _param((6, 4))
    w0, g = p.detach().numpy().copy(), p.grad.numpy().copy()
    opt = Adafactor([p], lr=0.1, clip_threshold=1e9)
    opt.step()
    # t = 1: b2 = 1 - 1 = 0, so R = row sums of G^2, C = column sums; V = R C^T / (1^T R) (paper, Alg. 4)
    g2 = g**2 + 1e-30
    r, c = g2.sum(1), g2.sum(0)
    v = np.outer(r, c) / r.sum()
    np.testing.assert_allclose(p.detach().numpy(), w0 - 0.1 * g / np.sqrt(v), rtol=1e-10)
    assert set(opt.state[p]) == {"step", "exp_avg_sq_row", "exp_avg_sq_col"}  # n + m numbers, not n·m


def test_adafactor_takes_zero_and_tiny_fp32_gradients():
    """A matrix whose gradient is zero (a LoRA A beside its zero-initialised B, on the first step) or tiny: the
    rank-1 estimate R C^T is ~eps1^2 = 1e-60, below fp32's range, and was 0, so the update was 0/0 = NaN."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 6))
    opt = Adafactor([p], lr=0.1, clip_threshold=1e9)
    w0 = p.detach().clone()
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(p.detach(), w0)
    g = torch.randn(8, 6) * 1e-20
    p.grad = g.clone()
    opt.step()
    # the factored rule in float64 (t = 2), on the same statistics
    b2 = 1 - 2.0 ** -0.8
    g2_0, g2_1 = torch.full((8, 6), 1e-30, dtype=torch.float64), g.double() ** 2 + 1e-30
    r = b2 * g2_0.mean(1) + (1 - b2) * g2_1.mean(1)
    c = b2 * g2_0.mean(0) + (1 - b2) * g2_1.mean(0)
    v = torch.outer(r, c) / r.mean()
    expect = w0.double() - 0.1 * g.double() / v.sqrt()
    torch.testing.assert_close(p.detach().double(), expect, rtol=1e-5, atol=0)
    assert torch.isfinite(p).all()


def test_adafactor_update_clipping_caps_rms():
    p = _param((6, 4))
    w0 = p.detach().clone()
    Adafactor([p], lr=1.0, clip_threshold=0.5).step()
    step = (p.detach() - w0).numpy()
    assert np.sqrt((step**2).mean()) == pytest.approx(0.5, rel=1e-9)


def test_newton_schulz_cubic_converges_to_polar_factor():
    a = torch.randn(12, 20, dtype=torch.float64)
    out = newton_schulz(a, steps=60, coeffs=CUBIC_COEFFS)
    np.testing.assert_allclose(out.numpy(), _polar(a.numpy()), atol=1e-8)


@pytest.mark.parametrize("shape", [(16, 16), (32, 8), (8, 48)])
def test_newton_schulz_quintic_is_near_polar_factor(shape):
    a = torch.randn(*shape, dtype=torch.float64)
    out = newton_schulz(a, steps=5).numpy()
    u, _, vt = np.linalg.svd(a.numpy(), full_matrices=False)
    # NS5 keeps the singular vectors and maps singular values into roughly [0.7, 1.2] (Jordan et al. 2024)
    s_out = np.diag(u.T @ out @ vt.T)
    assert s_out.min() > 0.6 and s_out.max() < 1.25
    off = u.T @ out @ vt.T - np.diag(s_out)
    assert np.abs(off).max() < 1e-8
    assert np.linalg.norm(out - _polar(a.numpy()), 2) < 0.35


def test_muon_one_step():
    p = _param((8, 32))
    w0, g = p.detach().numpy().copy(), p.grad.numpy().copy()
    opt = Muon([p], lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.0)
    opt.step()
    # first step: buf = g, Nesterov update = g + 0.95 g; NS is scale-invariant, so this is ~ polar(g)
    expected = w0 - 0.02 * newton_schulz(torch.from_numpy(1.95 * g), 5).numpy()
    np.testing.assert_allclose(p.detach().numpy(), expected, atol=1e-12)
    assert np.linalg.norm((w0 - p.detach().numpy()) / 0.02 - _polar(g), 2) < 0.35


def test_muon_rms_scale_matches_adamw_rms():
    p = _param((64, 256))
    w0 = p.detach().clone()
    Muon([p], lr=1.0, scale="rms").step()
    rms = float((p.detach() - w0).pow(2).mean().sqrt())
    assert rms == pytest.approx(0.2, rel=0.2)  # Liu et al. 2025: 0.2·sqrt(max(m, n)) gives update RMS ~0.2


def test_dion_one_step_matches_numpy_algorithm():
    p = _param((10, 6))
    w0, g = p.detach().numpy().copy(), p.grad.numpy().copy()
    opt = Dion([p], lr=0.05, momentum=0.9, rank=3)
    q0 = initial_q(p.shape, 3, seed=0).double().numpy()
    opt.step()
    b = g  # M0 = 0
    pm, _ = np.linalg.qr(b @ q0)
    r = b.T @ pm
    q1 = r / (np.linalg.norm(r, axis=0, keepdims=True) + 1e-8)
    np.testing.assert_allclose(p.detach().numpy(), w0 - 0.05 * np.sqrt(10 / 6) * pm @ q1.T, atol=1e-10)
    # error feedback: the residual of the rank-3 step stays in the buffer
    np.testing.assert_allclose(opt.state[p]["momentum_buffer"].numpy(), b - 0.1 * pm @ r.T, atol=1e-10)


def test_dion_runs_one_dion_per_expert_of_a_stacked_weight():
    """A stacked (E, m, n) MoE weight: each expert steps as Dion on its own (m, n) matrix with its own Q (it was one
    Dion on the flattened (E, m * n) matrix), over three steps with error feedback."""
    gen = torch.Generator().manual_seed(3)
    w = torch.nn.Parameter(torch.randn(3, 10, 6, dtype=torch.float64, generator=gen))
    ref = [w.detach()[e].clone() for e in range(3)]
    q = initial_q(w.shape, 4, seed=0).double()
    bufs, qs = [torch.zeros(10, 6, dtype=torch.float64) for _ in range(3)], [q[e] for e in range(3)]
    opt = Dion([w], lr=0.05, momentum=0.9, rank=4)
    for _ in range(3):
        g = torch.randn(3, 10, 6, dtype=torch.float64, generator=gen)
        w.grad = g.clone()
        opt.step()
        for e in range(3):
            update, bufs[e], qs[e] = dion_update(bufs[e] + g[e], qs[e], 0.9)
            ref[e] -= 0.05 * (10 / 6) ** 0.5 * update
    for e in range(3):
        torch.testing.assert_close(w.detach()[e], ref[e])
    # a state saved before (one Q over the flattened (E, m * n) weight) is refused in one line, naming the way out
    opt.state[w]["q"] = torch.zeros(60, 4, dtype=torch.float64)
    with pytest.raises(ConfigError, match="resume with reset_optimizer = true"):
        opt.step()


def test_shampoo_one_step_matches_fractional_powers():
    p = _param((6, 5))
    w0, g = p.detach().numpy().copy(), p.grad.numpy().copy()
    Shampoo([p], lr=0.1, precond_beta=1.0, precond_eps=1e-3, graft="none").step()
    lf, rf = g @ g.T, g.T @ g
    lf = lf + 1e-3 * np.linalg.eigvalsh(lf).max() * np.eye(6)
    rf = rf + 1e-3 * np.linalg.eigvalsh(rf).max() * np.eye(5)
    d = scipy.linalg.fractional_matrix_power(lf, -0.25) @ g @ scipy.linalg.fractional_matrix_power(rf, -0.25)
    np.testing.assert_allclose(p.detach().numpy(), w0 - 0.1 * d.real, atol=1e-9)


def test_shampoo_blocks_and_adam_grafting():
    p = _param((6, 10))
    g = p.grad.numpy().copy()
    w0 = p.detach().numpy().copy()
    Shampoo([p], lr=0.1, block_size=4, graft="adam").step()
    step = (w0 - p.detach().numpy()) / 0.1
    adam = g / (np.abs(g) + 1e-8)  # Adam's first step
    for rs in (slice(0, 4), slice(4, 6)):
        for cs in (slice(0, 4), slice(4, 8), slice(8, 10)):
            assert np.linalg.norm(step[rs, cs]) == pytest.approx(np.linalg.norm(adam[rs, cs]), rel=1e-9)


def test_soap_one_step_is_adam_in_eigenbasis():
    p = _param((6, 5))
    w0, g = p.detach().numpy().copy(), p.grad.numpy().copy()
    SOAP([p], lr=0.1, betas=(0.9, 0.99), eps=1e-3, precond_beta=1.0).step()
    _, ql = np.linalg.eigh(g @ g.T)
    _, qr = np.linalg.eigh(g.T @ g)
    gr = ql.T @ g @ qr
    # Adam's first step is g / (|g| + eps) of the rotated grad (G's singular basis: gr is ~diagonal)
    expected = w0 - 0.1 * ql @ (gr / (np.abs(gr) + 1e-3)) @ qr.T
    np.testing.assert_allclose(p.detach().numpy(), expected, atol=1e-6)


def test_soap_without_rotation_is_adamw():
    a, b = _param((6, 5), seed=3), _param((6, 5), seed=3)
    soap = SOAP([a], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, block_size=1)
    adam = AdamW([b], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    for i in range(5):
        for opt, p in ((soap, a), (adam, b)):
            p.grad = torch.full_like(p, 0.1 * i) + torch.sin(p.detach())
            opt.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)


def _stack_steps_as_experts_alone(make, shape: tuple, seed: int):
    """Three steps of make([stacked weight]) and of make([expert e's slice]) per expert, on the same gradients
    (the experts' scales 1, 10 and 0.1 apart): each slice must end equal. Returns the stack and its optimizer."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64, generator=gen))
    alone = [torch.nn.Parameter(w.detach()[e].clone()) for e in range(shape[0])]
    stacked, per_expert = make([w]), [make([a]) for a in alone]
    scale = torch.tensor([1.0, 10.0, 0.1]).view(3, *[1] * (len(shape) - 1))
    for _ in range(3):
        g = torch.randn(*shape, dtype=torch.float64, generator=gen) * scale
        w.grad = g.clone()
        stacked.step()
        for e, (a, opt) in enumerate(zip(alone, per_expert)):
            a.grad = g[e].clone()
            opt.step()
    for e in range(shape[0]):
        torch.testing.assert_close(w.detach()[e], alone[e].detach(), rtol=1e-10, atol=1e-12)
    return w, stacked


@pytest.mark.parametrize("make, old_state", [
    (lambda ps: Shampoo(ps, lr=0.05, block_size=4, precondition_frequency=2),
     {"L": [torch.zeros(3, 3)], "R": [torch.zeros(70, 70)]}),
    (lambda ps: SOAP(ps, lr=0.05, block_size=6, precondition_frequency=2),
     {"step": torch.tensor(1.0), "exp_avg": torch.zeros(3, 70), "exp_avg_sq": torch.zeros(3, 70),
      "L": torch.zeros(3, 3), "QL": torch.eye(3)}),
    (lambda ps: Adafactor(ps, lr=0.05, beta1=0.9, clip_threshold=0.5),
     {"step": torch.tensor(1.0), "exp_avg_sq_row": torch.zeros(3), "exp_avg_sq_col": torch.zeros(70)}),
], ids=["shampoo", "soap", "adafactor"])
def test_matrix_optimizers_precondition_each_expert_of_a_stacked_weight_alone(make, old_state):
    """A stacked (E, m, n) MoE weight steps as E separate (m, n) matrices (their own factors, bases, row/column
    statistics, grafting norms and update clipping), as Muon and Dion do: the same three steps as one optimizer per
    expert. It was one (E, m * n) matrix. Shampoo's blocks (4) cut both sides; SOAP rotates the 5 rows only."""
    w, stacked = _stack_steps_as_experts_alone(make, (3, 5, 14), seed=5)
    # a state saved before (statistics of the flattened (3, 70) matrix) is refused in one line, naming the way out
    stacked.state[w] = {k: ([x.double() for x in v] if isinstance(v, list) else v.double())
                        for k, v in old_state.items()}
    with pytest.raises(ConfigError, match=r"of shape \(3, 5, 14\).*reset_optimizer = true"):
        stacked.step()


def test_adafactor_steps_a_stack_of_expert_biases_as_separate_vectors():
    """A role "vector" group's (E, d) MoE expert biases are E vectors: each its own full second moment and update
    clipping, as one Adafactor per expert's (d,) bias (they were factored as one (E, d) matrix)."""
    make = lambda ps: Adafactor([{"params": ps, "role": "vector"}], lr=0.05, beta1=0.9, clip_threshold=0.5)  # noqa: E731
    b, stacked = _stack_steps_as_experts_alone(make, (3, 6), seed=7)
    stacked.state[b] = {"step": torch.tensor(1.0), "exp_avg_sq_row": torch.zeros(3, dtype=torch.float64),
                        "exp_avg_sq_col": torch.zeros(6, dtype=torch.float64)}  # saved when factored
    with pytest.raises(ConfigError, match=r"of shape \(3, 6\).*reset_optimizer = true"):
        stacked.step()


@pytest.mark.parametrize("n_kv", [4, 2])
def test_qk_clip_caps_max_logit_at_tau(n_kv):
    hd, n_q, d = 8, 4, 16
    wq, wk = torch.randn(n_q * hd, d) * 2, torch.randn(n_kv * hd, d) * 2
    x = torch.randn(10, d)

    def max_logits():
        q = (x @ wq.T).view(10, n_q, hd).transpose(0, 1)
        k = (x @ wk.T).view(10, n_kv, hd).transpose(0, 1).repeat_interleave(n_q // n_kv, 0)
        return (q @ k.transpose(1, 2) / hd**0.5).amax(dim=(1, 2))

    before = max_logits()
    tau = float(before.median())
    gamma = qk_clip_(wq, wk, before, tau, hd)
    after = max_logits()
    clipped = before > tau
    torch.testing.assert_close(after[clipped], torch.full_like(after[clipped], tau), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after[~clipped], before[~clipped])
    assert bool((gamma[clipped] < 1).all())


def test_muon_clip_uses_configured_tau():
    from lmforge.optim import build_optimizer
    from lmforge.optim.config import OptimConfig

    attn = torch.nn.ModuleDict({"wq": torch.nn.Linear(8, 8, bias=False), "wk": torch.nn.Linear(8, 8, bias=False)})
    opt = build_optimizer(attn, OptimConfig(name="muon", lr=0.02, qk_clip_tau=10.0))
    wq0 = attn["wq"].weight.detach().clone()
    gammas = opt.clip_qk_([(attn["wq"].weight, attn["wk"].weight, torch.tensor([40.0, 5.0]), 4)])
    torch.testing.assert_close(gammas[0], torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(attn["wq"].weight[:4], wq0[:4] * 0.5)  # sqrt(gamma) on each side
    torch.testing.assert_close(attn["wq"].weight[4:], wq0[4:])
    assert build_optimizer(attn, OptimConfig(name="muon")).clip_qk_([]) == []


def _step_both(ours, a: torch.Tensor, ref, b: torch.Tensor, steps: int, seed: int) -> None:
    """`steps` steps of optimizer `ours` on a and `ref` on b, on the same fp64 random gradients."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        g = torch.randn(a.shape, generator=gen, dtype=torch.float64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()


@pytest.mark.parametrize("shape, nesterov, scale, adjust", [((16, 8), True, "shape", "original"),
                                                            ((8, 16), False, "rms", "match_rms_adamw")])
def test_muon_matches_torch_optim_muon(monkeypatch, shape, nesterov, scale, adjust):
    """20 steps of Muon = torch.optim.Muon (momentum, Nesterov, NS5, shape scale, decoupled decay), to 1e-8 in
    fp64. torch runs NS5 in bf16 always: its cast is lifted here so the comparison is not of bf16 rounding. torch
    keeps its buffer as an EMA (lerp) where Muon sums (Jordan et al.): the same direction, as NS5 normalises."""
    monkeypatch.setattr(torch.Tensor, "bfloat16", lambda self: self.clone())
    a = _param(shape, seed=5)
    b = torch.nn.Parameter(a.detach().clone())
    ours = Muon([a], lr=0.02, momentum=0.9, nesterov=nesterov, scale=scale, weight_decay=0.1)
    ref = torch.optim.Muon([b], lr=0.02, momentum=0.9, nesterov=nesterov, weight_decay=0.1, adjust_lr_fn=adjust)
    _step_both(ours, a, ref, b, steps=20, seed=6)
    assert (a.detach() - _param(shape, seed=5).detach()).abs().max() > 0.05  # it moved
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-8)


@pytest.mark.parametrize("shape, beta1", [((6, 5), 0.0), ((6, 5), 0.9), ((7,), 0.0)])
def test_adafactor_matches_transformers_adafactor(shape, beta1):
    """30 steps of Adafactor = transformers' Adafactor with an explicit lr (relative_step, scale_parameter and
    warmup_init off): factored second moment, eps1 = 1e-30, decay 1 - t^-0.8, update clipping at 1, optional
    momentum and decoupled decay. (On a stack of matrices transformers clips by the RMS of the whole stack, this
    Adafactor per matrix.)"""
    hf = pytest.importorskip("transformers.optimization")
    a = _param(shape, seed=7)
    b = torch.nn.Parameter(a.detach().clone())
    ours = Adafactor([a], lr=0.01, beta1=beta1, weight_decay=0.1)
    ref = hf.Adafactor([b], lr=0.01, beta1=beta1 or None, weight_decay=0.1, relative_step=False,
                       scale_parameter=False, warmup_init=False)
    _step_both(ours, a, ref, b, steps=30, seed=8)
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-12)
