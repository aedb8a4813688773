"""PerParamOptimizer: the loop every lmforge optimizer but AdamW shares.

`step()` evaluates the optional closure, then calls `self.update(p, group)` for each parameter that has
a gradient. Subclasses implement `update`; the (decoupled) weight decay and step are `apply_step_`.
"""

from __future__ import annotations

import torch

from lmforge.errors import ConfigError


def check_grad(p: torch.Tensor, optimizer: str, complex_ok: bool = False) -> None:
    """Refuse, in one line, a gradient the optimizer cannot take: a sparse one (an nn.Embedding(sparse=True)),
    which the dense moment updates fail on deep inside, and a complex parameter, for which the squared
    gradients, signs and matrix roots here would be silently wrong (AdamW takes it, as torch.optim.AdamW does)."""
    if p.grad.layout != torch.strided:  # sparse COO, CSR, ...
        raise ConfigError(f"{optimizer} takes dense gradients only, got a {p.grad.layout} one for a parameter of shape "
                          f"{tuple(p.shape)}: build the embedding with sparse=False")
    if p.is_complex() and not complex_ok:
        raise ConfigError(f"{optimizer} does not take complex parameters (shape {tuple(p.shape)}, {p.dtype}): store "
                          "the parameter as real and imaginary parts (torch.view_as_real), or use AdamW")


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
                    check_grad(p, type(self).__name__)
                    self.update(p, group)
        return loss
