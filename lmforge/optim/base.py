"""PerParamOptimizer: the loop every lmforge optimizer but AdamW shares.

`step()` evaluates the optional closure, then calls `self.update(p, group)` for each parameter that has
a gradient. Subclasses implement `update`; the (decoupled) weight decay and step are `apply_step_`.
`check_hyperparams` is the constructors' one check of their hyper-parameters (as torch.optim's are checked).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from lmforge.errors import ConfigError

HYPERPARAMS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: 0 <= v < math.inf, ">= 0 and finite, e.g. 3e-4"),
    "betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "two values in [0, 1), e.g. (0.9, 0.95)"),
    "eps": (lambda v: 0 < v < math.inf, "> 0 (it keeps the division by the second moment finite), e.g. 1e-8"),
    "weight_decay": (lambda v: 0 <= v < math.inf, ">= 0 (0 = none), e.g. 0.1"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.95"),
    "beta1": (lambda v: 0 <= v < 1, "in [0, 1) (0 = no momentum), e.g. 0.9"),
    "decay_rate": (lambda v: 0 < v <= 1, "in (0, 1] (Adafactor's second-moment decay exponent), e.g. 0.8"),
    "eps1": (lambda v: 0 < v < math.inf, "> 0, e.g. 1e-30"),
    "clip_threshold": (lambda v: 0 < v < math.inf, "> 0, e.g. 1.0"),
    "precond_beta": (lambda v: 0 < v <= 1, "in (0, 1] (1 = a plain sum of the factors), e.g. 0.95"),
    "precond_eps": (lambda v: 0 < v < math.inf, "> 0, e.g. 1e-6"),
    "qk_clip_tau": (lambda v: 0 <= v < math.inf, ">= 0 (0 = no QK-clip), e.g. 100"),
    "ns_steps": (lambda v: v >= 1, ">= 1, e.g. 5"),
    "rank": (lambda v: v >= 1, ">= 1, e.g. 16"),
    "precondition_frequency": (lambda v: v >= 1, ">= 1, e.g. 10"),
    "block_size": (lambda v: v >= 1, ">= 1, e.g. 256"),
    "graft": (lambda v: v in ("adam", "none"), "'adam' (each block's step takes Adam's norm) or 'none'"),
}
"""hyper-parameter name -> (test of a valid value, what a valid value is); the names are the constructors' arguments
(and OptimConfig's fields). A NaN fails every test, as its comparisons are all False."""


def check_hyperparams(optimizer: str, **values: Any) -> None:
    """Refuse, in one line naming it, the first of `values` (keyword = a HYPERPARAMS name) outside its range: a
    beta of 1 or a NaN learning rate would otherwise only show as a NaN or frozen loss steps later."""
    for name, value in values.items():
        valid, want = HYPERPARAMS[name]
        try:
            ok = bool(valid(value))
        except TypeError:  # a number where betas' pair belongs, a string for a number
            ok = False
        if not ok:
            raise ConfigError(f"{optimizer}: {name}={value!r} must be {want}")


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
