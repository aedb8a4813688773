"""Optimizers and learning-rate schedules, selected by name from small registries.

`build_optimizer(model, cfg)` splits parameters into groups (matrices get weight decay; norms, biases
and other vectors do not) and builds the optimizer named by `cfg.name`; `lr_multiplier(cfg, step,
total)` is the schedule.
"""

from __future__ import annotations

from typing import Callable

import torch

from lmforge.optim import schedules
from lmforge.optim.adamw import AdamW


def _adamw(groups: list[dict], cfg) -> torch.optim.Optimizer:
    return AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def _torch_adamw(groups: list[dict], cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=torch.cuda.is_available() or None)


# name -> builder(param_groups, OptimConfig)
OPTIMIZERS: dict[str, Callable] = {"adamw": _adamw, "torch_adamw": _torch_adamw}

SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": schedules.constant,
    "linear": schedules.linear,
    "cosine": schedules.cosine,
    "wsd": schedules.wsd,
}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices (dim >= 2: linear weights, embeddings) decay; vectors (norm gains, biases) do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return groups


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    opt = OPTIMIZERS[cfg.name](param_groups(model, cfg.weight_decay), cfg)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt


def lr_multiplier(cfg, step: int, total: int) -> float:
    return SCHEDULES[cfg.schedule](step, total, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_fraction)
