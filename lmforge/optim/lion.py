"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2).

Per parameter, with gradient g:
    c = b1 m + (1 - b1) g                 interpolation used for the update
    p <- p (1 - lr wd) - lr sign(c)       every coordinate moves by exactly lr
    m <- b2 m + (1 - b2) g                momentum tracked with the slower b2
One state tensor per parameter (Adam keeps two); because |sign| = 1 the paper recommends a learning rate
3-10x smaller and weight decay 3-10x larger than AdamW's.
"""

from __future__ import annotations

from typing import Iterable

import torch

from lmforge.optim.base import PerParamOptimizer, apply_step_, check_hyperparams


class Lion(PerParamOptimizer):
    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        check_hyperparams("Lion", lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    def update(self, p: torch.Tensor, group: dict) -> None:
        (b1, b2) = group["betas"]
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
        m = state["exp_avg"]
        c = m.mul(b1).add_(p.grad, alpha=1 - b1)
        apply_step_(p, c.sign_(), group["lr"], group["weight_decay"])
        m.lerp_(p.grad, 1 - b2)
