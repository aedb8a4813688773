"""SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", Algorithm 3).

Shampoo with exponent 1/2 is, up to a scalar, Adafactor run in the eigenbasis of its preconditioner; SOAP
runs full Adam in that basis instead. For a matrix parameter with gradient G (m x n; leading dims are a batch of
matrices, so each expert of a stacked (E, m, n) MoE weight has its own factors and basis):
    L <- b L + (1 - b) G G^T,  R <- b R + (1 - b) G^T G          Shampoo's factors
    Q_L, Q_R = eigenvectors(L), eigenvectors(R)                  refreshed every `precondition_frequency` steps
    G' = Q_L^T G Q_R                                             gradient in the eigenbasis
    m <- b1 m + (1 - b1) G            (kept in the original space, rotated when used)
    v <- b2 v + (1 - b2) G'^2         (kept in the rotated space)
    N' = (Q_L^T m Q_R / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    W <- W (1 - lr wd) - lr Q_L N' Q_R^T
Sides longer than block_size are left unrotated (identity), as SOAP does for its max_precond_dim; with
both sides unrotated SOAP is exactly Adam. The paper refreshes the basis with one power-iteration + QR
step; here `torch.linalg.eigh` recomputes it exactly (same fixed point, simpler; costlier at large sizes).
Vectors take Adam's step.
"""

from __future__ import annotations

from typing import Iterable

import torch

from lmforge.optim.adam_core import MatrixPreconditioner, layout_error
from lmforge.optim.base import check_hyperparams


def _eigvecs(mat: torch.Tensor) -> torch.Tensor:
    _, vecs = torch.linalg.eigh(mat.double())  # leading dims: a batch
    return vecs.flip(-1).to(mat.dtype)  # descending eigenvalue order, as SOAP sorts them


class SOAP(MatrixPreconditioner):
    def __init__(self, params: Iterable, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, precond_beta: float = 0.95,
                 precondition_frequency: int = 10, block_size: int = 1024):
        check_hyperparams("SOAP", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, precond_beta=precond_beta,
                          precondition_frequency=precondition_frequency, block_size=block_size)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      precond_beta=precond_beta, precondition_frequency=precondition_frequency,
                                      block_size=block_size))

    @staticmethod
    def _rotate(x: torch.Tensor, ql: torch.Tensor | None, qr: torch.Tensor | None, back: bool = False):
        if ql is not None:
            x = (ql @ x) if back else (ql.mT @ x)
        if qr is not None:
            x = (x @ qr.mT) if back else (x @ qr)
        return x

    def direction(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        g = p.grad
        (b1, b2), beta = group["betas"], group["precond_beta"]
        sides = {side: tuple(g.shape[:-2]) + (dim, dim)
                 for side, dim in (("L", g.shape[-2]), ("R", g.shape[-1])) if dim <= group["block_size"]}
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
            for side, shape in sides.items():
                state[side] = torch.zeros(shape, dtype=g.dtype, device=g.device)
                state["Q" + side] = torch.eye(shape[-1], dtype=g.dtype, device=g.device).expand(shape).clone()
        for name, want in (("exp_avg", tuple(g.shape)), ("L", sides.get("L")), ("R", sides.get("R"))):
            saved = tuple(state[name].shape) if name in state else None
            if saved != want:
                raise layout_error(f"SOAP's {name}", saved, want, p.shape)
        state["step"] += 1
        t = int(state["step"].item())
        w = 1.0 if beta == 1 else 1 - beta
        if "L" in state:
            state["L"].mul_(beta).add_(g @ g.mT, alpha=w)
        if "R" in state:
            state["R"].mul_(beta).add_(g.mT @ g, alpha=w)
        if t == 1 or t % group["precondition_frequency"] == 0:
            for side in ("L", "R"):
                if side in state:
                    state["Q" + side] = _eigvecs(state[side])
        ql, qr = state.get("QL"), state.get("QR")
        state["exp_avg"].lerp_(g, 1 - b1)
        g_rot = self._rotate(g, ql, qr)
        state["exp_avg_sq"].mul_(b2).addcmul_(g_rot, g_rot, value=1 - b2)
        m_rot = self._rotate(state["exp_avg"], ql, qr) / (1 - b1**t)
        n_rot = m_rot / ((state["exp_avg_sq"] / (1 - b2**t)).sqrt() + group["eps"])
        return self._rotate(n_rot, ql, qr, back=True)
