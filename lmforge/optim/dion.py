"""Dion (Ahn, Xu, Abreu & Langford 2025, "Dion: Distributed Orthonormalized Updates", Algorithm 1).

Muon orthonormalises the full m x n momentum each step; Dion orthonormalises a rank-r approximation
found by one warm-started power iteration, and feeds the part it left out back into the momentum:
    B = M + G                                  momentum buffer plus the new gradient
    P = orth(B Q)                              m x r, orthonormal columns (QR), Q from the last step
    R = B^T P                                  n x r
    M <- B - (1 - mu) P R^T                    error feedback: what the rank-r step did not use stays
    Q <- R / ||R||_col                         column-normalised, warm start for the next step
    W <- W (1 - lr wd) - lr sqrt(m / n) P Q^T
P Q^T has orthonormal columns on one side and unit columns on the other, so its scale is fixed like Muon's
while costing O((m + n) r) per step beyond the matmuls. Non-matrix params use AdamW (use_dion=False).
"""

from __future__ import annotations

from typing import Iterable

import torch

from lmforge.optim.adam_core import adamw_step_
from lmforge.optim.base import PerParamOptimizer, apply_step_


def column_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x / (x.norm(dim=0, keepdim=True) + eps)


def dion_update(b: torch.Tensor, q: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Dion step on buffer B = M + G with warm start Q: returns (update P Q^T, new M, new Q)."""
    p, _ = torch.linalg.qr(b @ q)  # (m, r)
    r = b.T @ p  # (n, r)
    new_m = b - (1 - mu) * (p @ r.T)
    new_q = column_normalize(r)
    return p @ new_q.T, new_m, new_q


class Dion(PerParamOptimizer):
    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, rank: int = 16,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 seed: int = 0):
        if lr < 0 or not 0 <= momentum < 1 or rank < 1 or weight_decay < 0:
            raise ValueError(f"invalid Dion hyper-parameters lr={lr} momentum={momentum} rank={rank}")
        self._seed = seed
        super().__init__(params, dict(lr=lr, momentum=momentum, rank=rank, weight_decay=weight_decay,
                                      betas=betas, eps=eps, use_dion=True))

    def _init_state(self, p: torch.Tensor, rank: int) -> dict:
        m, n = p.shape[0], p[0].numel()
        r = min(rank, m, n)
        gen = torch.Generator().manual_seed(self._seed + m * 7919 + n)
        q0 = torch.randn(n, r, generator=gen, dtype=torch.float32).to(device=p.device, dtype=p.dtype)
        return {"momentum_buffer": torch.zeros(m, n, dtype=p.dtype, device=p.device), "q": column_normalize(q0)}

    def _dion_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state.update(self._init_state(p, group["rank"]))
        g = p.grad.reshape(p.shape[0], -1)
        update, state["momentum_buffer"], state["q"] = dion_update(
            state["momentum_buffer"] + g, state["q"], group["momentum"])
        apply_step_(p, update.reshape(p.shape) * (g.shape[0] / g.shape[1]) ** 0.5, group["lr"], group["weight_decay"])

    def update(self, p: torch.Tensor, group: dict) -> None:
        if group["use_dion"] and p.dim() >= 2:
            self._dion_step(p, group)
        else:
            adamw_step_(p, self.state[p], group["lr"], group["betas"], group["eps"], group["weight_decay"])
