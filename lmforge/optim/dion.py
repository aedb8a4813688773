"""Dion (Ahn, Xu, Abreu & Langford 2025, "Dion: Distributed Orthonormalized Updates", Algorithm 1).

Muon orthonormalises the full m x n momentum each step; Dion orthonormalises a rank-r approximation
found by one warm-started power iteration, and feeds the part it left out back into the momentum:
    B = M + G                                  momentum buffer plus the new gradient
    P = orth(B Q)                              m x r, orthonormal columns (QR), Q from the last step
    R = B^T P                                  n x r
    M <- B - (1 - mu) P R^T                    error feedback: what the rank-r step did not use stays
    Q <- R / ||R||_col                         column-normalised, warm start for the next step
    W <- W (1 - lr wd) - lr sqrt(m / n) P Q^T
(`next_q`: a zero column of R, which adds nothing to the update, keeps its old column of Q as the warm start.)
P Q^T has orthonormal columns on one side and unit columns on the other, so its scale is fixed like Muon's
while costing O((m + n) r) per step beyond the matmuls. Non-matrix params use AdamW (use_dion=False). A stacked
(E, m, n) MoE weight runs one Dion per expert (batched QR and matmuls, a Q per expert), as Muon does.
"""

from __future__ import annotations

from typing import Iterable

import torch

from lmforge.errors import ConfigError
from lmforge.optim.adam_core import adamw_step_
from lmforge.optim.base import PerParamOptimizer, apply_step_, check_hyperparams


def column_normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return x / (x.norm(dim=-2, keepdim=True) + eps)


def orthonormal_columns(x: torch.Tensor) -> torch.Tensor:
    """Q of the reduced QR of x (leading dims a batch): orthonormal columns spanning x's. torch.linalg.qr takes
    no bf16/fp16 (on CPU or CUDA), so a half-precision x is factored in fp32 and Q cast back."""
    half = x.dtype in (torch.bfloat16, torch.float16)
    q, _ = torch.linalg.qr(x.float() if half else x)
    return q.to(x.dtype)


def next_q(r: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R column-normalised, the right factor of this step's update; the next step's warm start Q). A zero column
    of R keeps its column of Q: a zero buffer B (an expert no token has reached yet, a LoRA A while B = 0) gave a
    zero Q, so the next step's B Q was zero and its P the QR of a zero matrix, the first r rows of the identity: an
    update of those r rows of the weight only, whatever the gradient."""
    r_normed = column_normalize(r)
    return r_normed, torch.where(r.norm(dim=-2, keepdim=True) > 0, r_normed, q)


def dion_update(b: torch.Tensor, q: torch.Tensor, mu: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Dion step on buffer B = M + G with warm start Q: returns (update P Q^T, new M, new Q). Leading dims
    are a batch (stacked experts: B (E, m, n), Q (E, n, r))."""
    p = orthonormal_columns(b @ q)  # (m, r)
    r = b.mT @ p  # (n, r)
    new_m = b - (1 - mu) * (p @ r.mT)
    r_normed, new_q = next_q(r, q)
    return p @ r_normed.mT, new_m, new_q


def initial_q(shape: torch.Size, rank: int, seed: int) -> torch.Tensor:
    """Dion's column-normalised random warm start for a weight of `shape` ((m, n), or stacked (E, m, n): one Q
    per expert), fp32 on the CPU, drawn from the seed and the matrix shape so every process draws the same."""
    m, n = shape[-2], shape[-1]
    gen = torch.Generator().manual_seed(seed + m * 7919 + n)
    return column_normalize(torch.randn(*shape[:-2], n, min(rank, m, n), generator=gen, dtype=torch.float32))


def check_q(q: torch.Tensor, shape: torch.Size) -> None:
    """Refuse a saved Q that does not fit the weight `shape` (one Q per matrix or per expert): lmforge before
    2026-12-05 kept one Q over a stacked (E, m, n) weight flattened to (E, m * n)."""
    if q.dim() != len(shape) or q.shape[:-2] != shape[:-2] or q.shape[-2] != shape[-1]:
        raise ConfigError(f"this Dion state holds Q {tuple(q.shape)} for a weight of shape {tuple(shape)}: it was "
                          "saved by lmforge before Dion ran one Q per expert (2026-12-05); resume with "
                          "reset_optimizer = true (weights, data position and step are kept)")


def q_at_rank(q: torch.Tensor, shape: torch.Size, rank: int, seed: int, rows=None) -> torch.Tensor:
    """Q with the columns `rank` asks for a weight of `shape` (min(rank, m, n)). A resume with another optim.rank
    keeps the saved columns it still needs and draws the ones it adds as a fresh start would: Q only warm-starts
    the power iteration (it kept the saved rank, whatever the config said). `rows`: maps the fresh Q of the whole
    weight to the part `q` is (a rank's experts of a stack sharded by expert)."""
    r = min(rank, shape[-2], shape[-1])
    if q.shape[-1] == r:
        return q
    fresh = initial_q(shape, rank, seed).to(q)
    return torch.cat([q[..., :r], (rows(fresh) if rows else fresh)[..., q.shape[-1]:]], dim=-1)


class Dion(PerParamOptimizer):
    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, rank: int = 16,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 seed: int = 0):
        check_hyperparams("Dion", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum, rank=rank)
        self._seed = seed
        super().__init__(params, dict(lr=lr, momentum=momentum, rank=rank, weight_decay=weight_decay,
                                      betas=betas, eps=eps, use_dion=True))

    def _dion_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
            state["q"] = initial_q(p.shape, group["rank"], self._seed).to(device=p.device, dtype=p.dtype)
        check_q(state["q"], p.shape)
        state["q"] = q_at_rank(state["q"], p.shape, group["rank"], self._seed)
        update, state["momentum_buffer"], state["q"] = dion_update(
            state["momentum_buffer"] + p.grad, state["q"], group["momentum"])
        apply_step_(p, update * (p.shape[-2] / p.shape[-1]) ** 0.5, group["lr"], group["weight_decay"])

    def update(self, p: torch.Tensor, group: dict) -> None:
        if group["use_dion"] and p.dim() >= 2:
            self._dion_step(p, group)
        else:
            adamw_step_(p, self.state[p], group["lr"], group["betas"], group["eps"], group["weight_decay"])
