"""AdamW (Loshchilov & Hutter, 2019), written from scratch.

Per parameter, with gradient g and step t (its own count of steps that had a gradient):
    p <- p * (1 - lr * wd)                      decoupled weight decay
    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
This is exactly torch.optim.AdamW's update (tests compare over 100 steps). The multi-tensor
`torch._foreach_*` ops do each line for all parameters of a group in a few kernel launches; that
path is the readable reference. `fused=True` (the default for CUDA parameters) runs all of it in one
kernel per tensor chunk with torch's fused AdamW op, reading and writing each state tensor once
(a test compares it with the foreach path). A complex parameter steps as its real view, as in torch.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from lmforge.optim.base import check_grad, check_hyperparams, run_closure


class AdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, fused: bool | None = None):
        check_hyperparams("AdamW", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused))

    @torch.no_grad()
    def step(self, closure=None):
        loss = run_closure(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                check_grad(p, "AdamW", complex_ok=True)
            for batch in _batches(params):
                self._update(group, batch)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        """One group's update of `params` (tensors one multi-tensor call can take together)."""
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        fused = group["fused"] if group["fused"] is not None else params[0].is_cuda
        for p in params:
            if not self.state[p]:
                # the fused kernel reads the step count on the device; the foreach path on the host
                step = torch.zeros((), device=p.device if fused else "cpu")
                self.state[p] = {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        states = [self.state[p] for p in params]
        # a complex parameter steps as its (..., 2) real view, as in torch.optim.AdamW: each of the real and
        # imaginary parts has its own second moment (g * g of a complex g would mix them, and be complex)
        real = lambda xs: [torch.view_as_real(x) if x.is_complex() else x for x in xs]  # noqa: E731
        grads = real([p.grad for p in params])
        m = real([s["exp_avg"] for s in states])
        v = real([s["exp_avg_sq"] for s in states])
        params = real(params)
        if fused:
            steps = [s["step"].to(p.device) for s, p in zip(states, params)]
            torch._foreach_add_(steps, 1)
            for s, t in zip(states, steps):
                s["step"] = t
            torch._fused_adamw_(params, grads, m, v, [], steps, lr=lr, beta1=b1, beta2=b2, weight_decay=wd,
                                eps=eps, amsgrad=False, maximize=False)
            return
        for s in states:
            s["step"] += 1
        # bias corrections use each parameter's own count: a parameter without a gradient on some steps (an
        # expert no token reached, a layer unfrozen later) is behind the others of its group
        by_step: dict[int, list[int]] = {}
        for i, s in enumerate(states):
            by_step.setdefault(int(s["step"].item()), []).append(i)
        for t, idx in by_step.items():
            pick = lambda xs: [xs[i] for i in idx]  # noqa: E731
            _foreach_adamw_(pick(params), pick(grads), pick(m), pick(v), t, lr, b1, b2, eps, wd)


def _foreach_adamw_(params, grads, m, v, t: int, lr: float, b1: float, b2: float, eps: float, wd: float) -> None:
    """The update of the module docstring on parameters that all take their t-th step."""
    if wd != 0:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_lerp_(m, grads, 1 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
    bc1, bc2_sqrt = 1 - b1**t, math.sqrt(1 - b2**t)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, value=-lr / bc1)


def _batches(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """params split into lists one multi-tensor call takes: one per (tensor type, device, dtype). A tensor-parallel
    model without sequence parallelism has plain replicated norms beside DTensor matrices (and biases) in a
    group, and a foreach op refuses to mix the two."""
    out: dict = {}
    for p in params:
        out.setdefault((type(p), p.device, p.dtype), []).append(p)
    return list(out.values())
