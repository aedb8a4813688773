"""Shampoo (Gupta, Koren & Singer 2018, "Shampoo: Preconditioned Stochastic Tensor Optimization"), in the
blocked, grafted form used at scale (Anil et al. 2020, "Scalable Second Order Optimization for Deep
Learning"; Shi et al. 2023, "A Distributed Data-Parallel PyTorch Implementation of Distributed Shampoo").

A matrix parameter (m x n; leading dims are a batch of matrices, so a stacked (E, m, n) MoE weight is E matrices
each with its own factors) is cut into blocks of at most
block_size x block_size. For each block with gradient G_b the two Kronecker factors are
    L <- b L + (1 - b) G_b G_b^T   (rows x rows),   R <- b R + (1 - b) G_b^T G_b   (cols x cols)
(b = 1 gives the paper's running sums), and the step direction is (Gupta et al., Algorithm 1)
    D_b = L^(-1/4) M_b R^(-1/4)
where M is Adam's bias-corrected first moment of G (momentum) and the inverse 4th roots are computed by
an eigendecomposition of L + eps * lambda_max(L) I only every `precondition_frequency` steps.
Grafting (Agarwal et al. 2020, "Disentangling Adaptive Gradient Methods from Learning Rates"): D_b is
rescaled per block to the norm of Adam's step on the same block, so Shampoo picks the direction and Adam
the size, and Adam's learning rate carries over. Vectors take Adam's step.
"""

from __future__ import annotations

from typing import Iterable

import torch

from lmforge.optim.adam_core import MatrixPreconditioner, adam_direction, layout_error
from lmforge.optim.base import check_hyperparams


def inverse_root(mat: torch.Tensor, root: int, eps: float) -> torch.Tensor:
    """(mat + eps * lambda_max I)^(-1/root) of a symmetric PSD matrix via eigh (in float64 for accuracy); leading
    dims are a batch of matrices, each damped by its own largest eigenvalue. A zero matrix (the factor of a weight,
    or of one expert of a stack, that has had no gradient yet: a LoRA A while B = 0) holds no curvature and gets the
    identity (no preconditioning), not (1e-30)^(-1/root) I, which scaled the momentum steps until the next refresh
    by ~1e15."""
    vals, vecs = torch.linalg.eigh(mat.double())
    vals = vals.clamp_min(0.0)
    top = vals.amax(dim=-1, keepdim=True)
    damp = eps * top.clamp_min(1e-30)
    out = (vecs * (vals + damp).pow(-1.0 / root).unsqueeze(-2)) @ vecs.mT
    eye = torch.eye(mat.shape[-1], dtype=out.dtype, device=out.device)
    return torch.where(top.unsqueeze(-1) > 0, out, eye).to(mat.dtype)


def block_slices(rows: int, cols: int, size: int) -> list[tuple[slice, slice]]:
    return [(slice(i, min(i + size, rows)), slice(j, min(j + size, cols)))
            for i in range(0, rows, size) for j in range(0, cols, size)]


class Shampoo(MatrixPreconditioner):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, precond_beta: float = 0.95,
                 precond_eps: float = 1e-6, precondition_frequency: int = 10, block_size: int = 256,
                 graft: str = "adam"):
        check_hyperparams("Shampoo", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, precond_beta=precond_beta,
                          precond_eps=precond_eps, precondition_frequency=precondition_frequency,
                          block_size=block_size, graft=graft)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      precond_beta=precond_beta, precond_eps=precond_eps,
                                      precondition_frequency=precondition_frequency, block_size=block_size,
                                      graft=graft))

    @staticmethod
    def _factor_shapes(g: torch.Tensor, size: int) -> list[tuple[tuple, tuple]]:
        """The (L, R) shapes of each block: (*batch, rows, rows) and (*batch, cols, cols)."""
        lead = tuple(g.shape[:-2])
        return [(lead + (rs.stop - rs.start,) * 2, lead + (cs.stop - cs.start,) * 2)
                for rs, cs in block_slices(g.shape[-2], g.shape[-1], size)]

    def direction(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:
        g = p.grad
        shapes = self._factor_shapes(g, group["block_size"])
        if "L" not in state:
            for side, k in (("L", 0), ("R", 1)):
                state[side] = [torch.zeros(s[k], dtype=g.dtype, device=g.device) for s in shapes]
                state[side + "_inv"] = [torch.zeros_like(x) for x in state[side]]
        saved = [tuple(x.shape) for x in state["L"] + state["R"]]
        want = [s[0] for s in shapes] + [s[1] for s in shapes]
        if saved != want:
            i = next((i for i, (a, b) in enumerate(zip(saved, want)) if a != b), 0)
            raise layout_error("a Shampoo factor", saved[i], want[i], p.shape)
        adam = adam_direction(g, state, group["betas"], group["eps"])
        momentum = state["exp_avg"] / (1 - group["betas"][0] ** int(state["step"].item()))
        t, beta = int(state["step"].item()), group["precond_beta"]
        refresh = t == 1 or t % group["precondition_frequency"] == 0
        w = 1.0 if beta == 1 else 1 - beta
        out = torch.empty_like(g)
        for i, (rs, cs) in enumerate(block_slices(g.shape[-2], g.shape[-1], group["block_size"])):
            gb = g[..., rs, cs]
            state["L"][i].mul_(beta).add_(gb @ gb.mT, alpha=w)
            state["R"][i].mul_(beta).add_(gb.mT @ gb, alpha=w)
            if refresh:
                state["L_inv"][i] = inverse_root(state["L"][i], 4, group["precond_eps"])
                state["R_inv"][i] = inverse_root(state["R"][i], 4, group["precond_eps"])
            d = state["L_inv"][i] @ momentum[..., rs, cs] @ state["R_inv"][i]
            if group["graft"] == "adam":  # each block of each matrix takes the norm of Adam's step on it
                norm = lambda x: torch.linalg.matrix_norm(x, keepdim=True)  # noqa: E731
                d = d * (norm(adam[..., rs, cs]) / (norm(d) + 1e-30))
            out[..., rs, cs] = d
        return out
