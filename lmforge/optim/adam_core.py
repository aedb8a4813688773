"""The single-tensor Adam direction, shared by the optimizers that fall back to or graft onto Adam
(Muon and Dion for non-matrix params; Shampoo's grafting; SOAP in its rotated basis).

    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  d = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
(Kingma & Ba 2015, Algorithm 1). Decoupled weight decay and the step itself are left to the caller.
"""

from __future__ import annotations

import math

import torch

from lmforge.errors import ConfigError
from lmforge.optim.base import PerParamOptimizer, apply_step_


def adam_direction(grad: torch.Tensor, state: dict, betas: tuple[float, float], eps: float,
                   prefix: str = "") -> torch.Tensor:
    """Update the moments stored in `state` (keys prefixed by `prefix`) and return Adam's direction."""
    b1, b2 = betas
    m_key, v_key, t_key = f"{prefix}exp_avg", f"{prefix}exp_avg_sq", f"{prefix}step"
    if m_key not in state:
        state[m_key] = torch.zeros_like(grad)
        state[v_key] = torch.zeros_like(grad)
        state[t_key] = torch.tensor(0.0)
    state[t_key] += 1
    t = int(state[t_key].item())
    m, v = state[m_key], state[v_key]
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    denom = (v / (1 - b2**t)).sqrt_().add_(eps)
    return (m / (1 - b1**t)) / denom


def adamw_step_(p: torch.Tensor, state: dict, lr: float, betas: tuple[float, float], eps: float,
                weight_decay: float) -> None:
    """One AdamW step on one parameter (used for the non-matrix params of hybrid optimizers)."""
    apply_step_(p, adam_direction(p.grad, state, betas, eps), lr, weight_decay)


def layout_error(name: str, saved: tuple | None, expected: tuple | None, weight: torch.Size,
                 why: str = "it was saved with another block size, or by lmforge before each expert of a stacked "
                             "MoE weight was its own matrix (2026-12-05)") -> ConfigError:
    """The error for a saved statistic `name` of shape `saved` where this weight needs `expected`: by default
    saved with another block size, or by lmforge before 2026-12-05, when Shampoo, SOAP and Adafactor viewed a
    stacked (E, m, n) MoE weight as one (E, m * n) matrix (each expert is its own matrix now); `why` says
    otherwise. None: no such statistic."""
    shape = lambda s: "none" if s is None else str(tuple(s))  # noqa: E731
    return ConfigError(f"this optimizer state holds {name} of shape {shape(saved)} for a weight of shape "
                       f"{tuple(weight)}, which needs {shape(expected)}: {why}; resume with reset_optimizer = true "
                       "(weights, data position and step are kept)")


def rms(x: torch.Tensor) -> float:
    return float(x.norm()) / math.sqrt(max(1, x.numel()))


class MatrixPreconditioner(PerParamOptimizer):
    """Matrices (dim >= 2) step along `self.direction(p, state, group)`; vectors (and a group of role "vector",
    e.g. MoE's (E, d) expert biases) take Adam's step. Leading dims of a matrix are a batch: a stacked (E, m, n)
    MoE weight is E matrices, each preconditioned on its own (as Muon and Dion do)."""

    def direction(self, p: torch.Tensor, state: dict, group: dict) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def update(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if p.dim() >= 2 and group.get("role") != "vector":
            d = self.direction(p, state, group)
        else:
            d = adam_direction(p.grad, state, group["betas"], group["eps"])
        apply_step_(p, d, group["lr"], group["weight_decay"])
