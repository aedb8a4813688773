"""Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; Liu et al. 2025,
"Muon is Scalable for LLM Training").

For each 2-D "matrix" parameter W (m x n) with gradient G (each expert of a stacked (E, m, n) MoE weight alone):
    B <- mu B + G                                  momentum buffer
    M = G + mu B  (Nesterov)  or  M = B            the momentum update
    O = NS5(M) ~= U V^T  where M = U S V^T         orthogonalised update (all singular values ~ 1)
    W <- W (1 - lr wd) - lr s(m, n) O
with the shape factor s = sqrt(max(1, m / n)) (Jordan et al.) or s = 0.2 sqrt(max(m, n)), which gives
the update the RMS of a typical AdamW step so AdamW's lr and wd carry over (Liu et al., eq. 4).

NS5 is the quintic Newton–Schulz iteration X <- a X + (b A + c A^2) X, A = X X^T, started from
X = M / ||M||_F, with (a, b, c) = (3.4445, -4.7750, 2.0315) chosen to push small singular values up fast
rather than to converge: after 5 steps the singular values lie roughly in [0.7, 1.2], not at exactly 1.
Embeddings, the head and vectors (role != "matrix") are updated by AdamW inside the same optimizer
(groups with use_muon=False). MuonClip's QK-clip (`clip_qk_`, math in `lmforge.optim.qk_clip`) is on when
qk_clip_tau > 0.
"""

from __future__ import annotations

from typing import Iterable

import torch

from lmforge.optim.adam_core import adamw_step_
from lmforge.optim.base import PerParamOptimizer, apply_step_, check_hyperparams
from lmforge.optim.qk_clip import qk_clip_

NS5_COEFFS = (3.4445, -4.7750, 2.0315)
CUBIC_COEFFS = (1.5, -0.5, 0.0)
"""the classic cubic Newton–Schulz step X <- 1.5 X - 0.5 X X^T X, which converges to U V^T exactly"""


def newton_schulz(g: torch.Tensor, steps: int = 5, coeffs: tuple[float, float, float] = NS5_COEFFS,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate polar factor U V^T of a matrix by `steps` Newton–Schulz iterations. Leading dims are
    a batch: a stacked (experts, out, in) MoE weight is orthogonalised expert by expert."""
    if g.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix (or a batch of them), got shape {tuple(g.shape)}")
    a, b, c = coeffs
    x = g.to(dtype or g.dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the smaller Gram matrix X X^T
        x = x.mT
    # Frobenius norm >= spectral norm, so every singular value starts <= 1
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


def shape_scale(rows: int, cols: int, mode: str) -> float:
    if mode == "shape":
        return max(1.0, rows / cols) ** 0.5
    if mode == "rms":
        return 0.2 * max(rows, cols) ** 0.5
    raise ValueError(f"unknown Muon scale {mode!r}; choose 'shape' or 'rms'")


class Muon(PerParamOptimizer):
    """Muon for groups with use_muon=True (default), AdamW for groups with use_muon=False."""

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, scale: str = "shape", weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, qk_clip_tau: float = 0.0):
        check_hyperparams("Muon", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                          ns_steps=ns_steps, qk_clip_tau=qk_clip_tau)
        shape_scale(1, 1, scale)
        self.qk_clip_tau = qk_clip_tau
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      scale=scale, weight_decay=weight_decay, betas=betas, eps=eps,
                                      use_muon=True))

    def _muon_update(self, p: torch.Tensor, group: dict) -> None:
        g = p.grad  # (out, in), or stacked experts (E, out, in): each expert orthogonalised on its own
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(g)
        buf = state["momentum_buffer"] = state["momentum_buffer"].view(g.shape)  # (E, out * in) in old states
        buf.mul_(group["momentum"]).add_(g)
        m = g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        ns_dtype = torch.bfloat16 if p.is_cuda else None  # bf16 is stable for NS5 (Jordan et al.) and fast
        o = newton_schulz(m, group["ns_steps"], dtype=ns_dtype)
        scale = shape_scale(g.shape[-2], g.shape[-1], group["scale"])
        apply_step_(p, o.reshape(p.shape).mul_(scale), group["lr"], group["weight_decay"])

    def clip_qk_(self, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]) -> list[torch.Tensor]:
        """MuonClip: call after step() with [(W_q, W_k, max logit per query head, head_dim)] as measured in
        this step's forward pass; rescales W_q, W_k where a head's max logit exceeded qk_clip_tau.
        Returns the per-head factors gamma. No-op when qk_clip_tau = 0. (With QK-norm the logits do not
        depend on the scale of W_q, W_k, so MuonClip is for models without it, like Kimi K2's MLA.)"""
        if not self.qk_clip_tau:
            return []
        return [qk_clip_(wq, wk, m, self.qk_clip_tau, hd) for wq, wk, m, hd in layers]

    def update(self, p: torch.Tensor, group: dict) -> None:
        if group["use_muon"] and p.dim() >= 2:
            self._muon_update(p, group)
        else:
            adamw_step_(p, self.state[p], group["lr"], group["betas"], group["eps"], group["weight_decay"])
