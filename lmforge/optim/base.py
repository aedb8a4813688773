"""PerParamOptimizer: the loop every lmforge optimizer but AdamW shares.

`step()` evaluates the optional closure, then calls `self.update(p, group)` for each parameter that has
a gradient. Subclasses implement `update`; the (decoupled) weight decay and step are `apply_step_`.
"""

from __future__ import annotations

import torch


def apply_step_(p: torch.Tensor, direction: torch.Tensor, lr: float, weight_decay: float) -> None:
    """p <- p (1 - lr wd) - lr d  (decoupled weight decay, Loshchilov & Hutter 2019)."""
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.add_(direction, alpha=-lr)


def run_closure(closure) -> torch.Tensor | None:
    """Re-evaluate the loss with gradients enabled, as torch.optim's step(closure) contract asks."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class PerParamOptimizer(torch.optim.Optimizer):
    def update(self, p: torch.Tensor, group: dict) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p, group)
        return loss
