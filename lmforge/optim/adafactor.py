"""Adafactor (Shazeer & Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost").

For a matrix gradient G (n x m; leading dims are a batch of matrices, as in torch.optim.Adafactor and
transformers' Adafactor, so each expert of a stacked (E, n, m) MoE weight has its own statistics), Algorithm 4 keeps
only row and column statistics of the second moment instead of the full n x m tensor:
    b2_t = 1 - t^(-c)                                          (eq. 7, c = 0.8: a decay that warms up)
    R <- b2_t R + (1 - b2_t) mean_j (G^2 + eps1)                row means, n numbers
    C <- b2_t C + (1 - b2_t) mean_i (G^2 + eps1)                column means, m numbers
    V = R C^T / mean(R)                                         rank-1 estimate of E[G^2]
    U = G / sqrt(V);  U <- U / max(1, RMS(U) / d)               update clipping (section 6), per matrix
Vectors keep a full (unfactored) second moment and clip by their own RMS; a group of role "vector" holds
vectors whatever their dims (an (E, d) stack of MoE expert biases is E vectors, each clipped alone). With
b1 > 0 a first moment of U is kept (the paper's optional momentum, used by most modern recipes); the step is
p <- p (1 - lr wd) - lr U. The learning
rate is given explicitly (no relative step size), so it slots into the same schedules as the others.
"""

from __future__ import annotations

from typing import Iterable

import torch

from lmforge.optim.adam_core import layout_error, rms
from lmforge.optim.base import PerParamOptimizer, apply_step_, check_hyperparams


class Adafactor(PerParamOptimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, beta1: float = 0.0, decay_rate: float = 0.8,
                 eps1: float = 1e-30, clip_threshold: float = 1.0, weight_decay: float = 0.0):
        check_hyperparams("Adafactor", lr=lr, beta1=beta1, decay_rate=decay_rate, eps1=eps1,
                          clip_threshold=clip_threshold, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, beta1=beta1, decay_rate=decay_rate, eps1=eps1,
                                      clip_threshold=clip_threshold, weight_decay=weight_decay))

    def _scaled_grad(self, g: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        """U = G / sqrt(V_hat) with the factored (matrices) or full (vectors) second moment, then clipped."""
        state["step"] += 1
        b2 = 1.0 - float(state["step"]) ** (-group["decay_rate"])
        g2 = g.square().add_(group["eps1"])
        if _factored(g, group):
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(b2).add_(g2.mean(dim=-1), alpha=1 - b2)
            col.mul_(b2).add_(g2.mean(dim=-2), alpha=1 - b2)
            # 1/sqrt(V) = rsqrt(R / mean(R)) rsqrt(C)^T: the row ratio is near 1 and the column term carries the
            # scale, where R C^T itself underflows fp32 for tiny or zero gradients (eps1^2 = 1e-60: 0/0 = NaN)
            u = g * row.div(row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1) * col.rsqrt().unsqueeze(-2)
            clip = u.square().mean(dim=(-2, -1), keepdim=True).sqrt_().div_(group["clip_threshold"]).clamp_min_(1.0)
            return u.div_(clip)
        v = state["exp_avg_sq"]
        v.mul_(b2).add_(g2, alpha=1 - b2)
        u = g / v.sqrt()
        if u.dim() == 0:
            return u.div_(max(1.0, rms(u) / group["clip_threshold"]))
        # each vector (each expert's of a stack) by its own RMS
        return u.div_(u.square().mean(dim=-1, keepdim=True).sqrt_().div_(group["clip_threshold"]).clamp_min_(1.0))

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state: dict = {"step": torch.tensor(0.0)}
        if _factored(p, group):
            state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], dtype=p.dtype, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], dtype=p.dtype, device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state

    def update(self, p: torch.Tensor, group: dict) -> None:
        if not self.state[p]:
            self.state[p] = self._init_state(p, group)
        state = self.state[p]
        saved = state.get("exp_avg_sq_row")
        if _factored(p, group) and (saved is None or tuple(saved.shape) != tuple(p.shape[:-1])):
            raise layout_error("Adafactor's row statistics", None if saved is None else tuple(saved.shape),
                               tuple(p.shape[:-1]), p.shape)
        if not _factored(p, group) and saved is not None:  # saved before a stack of vectors was vectors
            raise layout_error("Adafactor's row statistics", tuple(saved.shape), None, p.shape,
                               why="it was saved by lmforge before a stack of expert biases was E vectors (2026-12-05)")
        u = self._scaled_grad(p.grad, state, group)
        if group["beta1"] > 0:
            if "exp_avg" not in state:  # made at the first step with momentum: a resume may turn beta1 on
                state["exp_avg"] = torch.zeros_like(p)
            u = state["exp_avg"].lerp_(u, 1 - group["beta1"])
        apply_step_(p, u, group["lr"], group["weight_decay"])


def _factored(p: torch.Tensor, group: dict) -> bool:
    """Row and column statistics for a matrix (or a stack of them); a full second moment for a vector, for a
    scalar and for any tensor of a role "vector" group (MoE's (E, d) expert biases: E vectors)."""
    return p.dim() >= 2 and group.get("role") != "vector"
