"""Optimizers and learning-rate schedules, selected by name from small registries.

`build_optimizer(model, cfg)` splits parameters into groups by role (see `lmforge.optim.groups`: matrices,
embeddings and the head get weight decay; norms, biases and other vectors do not; each role may have its
own learning rate) and builds the optimizer named by `cfg.name`. Every group gets `base_lr`; the trainer
sets `lr = base_lr * lr_multiplier(cfg, step, total)` each step, so per-role rates follow the schedule.
Muon and Dion update "matrix" params their own way and the other roles with AdamW at `adam_lr`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from lmforge import lazy_attribute
from lmforge.errors import ConfigError
from lmforge.optim import schedules

if TYPE_CHECKING:
    import torch

__all__ = ["OPTIMIZERS", "SCHEDULES", "AdamW", "Lion", "Adafactor", "Shampoo", "SOAP", "Muon", "Dion",
           "newton_schulz", "param_groups", "param_roles", "build_optimizer", "lr_multiplier"]

# The optimizer classes (and torch) are imported on first use, so that the registries' names are at hand without
# torch: `lmforge train --help` lists them, and OptimConfig checks a name against them. name -> defining module.
_LAZY = {
    "AdamW": "lmforge.optim.adamw", "Lion": "lmforge.optim.lion", "Adafactor": "lmforge.optim.adafactor",
    "Shampoo": "lmforge.optim.shampoo", "SOAP": "lmforge.optim.soap", "Muon": "lmforge.optim.muon",
    "newton_schulz": "lmforge.optim.muon", "Dion": "lmforge.optim.dion", "param_roles": "lmforge.optim.groups",
}


def __getattr__(name: str) -> Any:
    return lazy_attribute(globals(), _LAZY, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def _adamw(groups: list[dict], cfg) -> torch.optim.Optimizer:
    from lmforge.optim.adamw import AdamW

    return AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def _torch_adamw(groups: list[dict], cfg) -> torch.optim.Optimizer:
    import torch

    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=torch.cuda.is_available() or None)


def _lion(groups: list[dict], cfg) -> torch.optim.Optimizer:
    from lmforge.optim.lion import Lion

    return Lion(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def _adafactor(groups: list[dict], cfg) -> torch.optim.Optimizer:
    from lmforge.optim.adafactor import Adafactor

    return Adafactor(groups, lr=cfg.lr, beta1=cfg.betas[0], decay_rate=cfg.adafactor_decay,
                     clip_threshold=cfg.clip_threshold, weight_decay=cfg.weight_decay)


def _shampoo(groups: list[dict], cfg) -> torch.optim.Optimizer:
    from lmforge.optim.shampoo import Shampoo

    return Shampoo(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                   precond_beta=cfg.precond_beta, precond_eps=cfg.precond_eps,
                   precondition_frequency=cfg.precondition_frequency, block_size=cfg.block_size, graft=cfg.graft)


def _soap(groups: list[dict], cfg) -> torch.optim.Optimizer:
    from lmforge.optim.soap import SOAP

    return SOAP(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                precond_beta=cfg.precond_beta, precondition_frequency=cfg.precondition_frequency,
                block_size=cfg.block_size)


def _hybrid(groups: list[dict], cfg, flag: str) -> list[dict]:
    """Matrices go to the orthonormalising rule at cfg.lr; other roles to AdamW at adam_lr (or lr)."""
    for g in groups:
        g[flag] = g["role"] == "matrix"
        if g["role"] != "matrix":
            g.setdefault("lr", cfg.adam_lr or cfg.lr)
    return groups


def _muon(groups: list[dict], cfg) -> torch.optim.Optimizer:
    from lmforge.optim.muon import Muon

    return Muon(_hybrid(groups, cfg, "use_muon"), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                ns_steps=cfg.ns_steps, scale=cfg.muon_scale, weight_decay=cfg.weight_decay,
                betas=tuple(cfg.betas), eps=cfg.eps, qk_clip_tau=cfg.qk_clip_tau)


def _dion(groups: list[dict], cfg) -> torch.optim.Optimizer:
    from lmforge.optim.dion import Dion

    return Dion(_hybrid(groups, cfg, "use_dion"), lr=cfg.lr, momentum=cfg.momentum, rank=cfg.rank,
                weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)


# name -> builder(param_groups, OptimConfig)
OPTIMIZERS: dict[str, Callable] = {
    "adamw": _adamw, "torch_adamw": _torch_adamw, "lion": _lion, "adafactor": _adafactor,
    "shampoo": _shampoo, "soap": _soap, "muon": _muon, "dion": _dion,
}

SCHEDULES: dict[str, Callable[..., float]] = {
    "constant": schedules.constant,
    "linear": schedules.linear,
    "cosine": schedules.cosine,
    "wsd": schedules.wsd,
    "inverse_sqrt": schedules.inverse_sqrt,
}


def param_groups(model: torch.nn.Module, weight_decay: float, cfg=None) -> list[dict]:
    """One group per parameter role; with `cfg`, roles get embed_lr / head_lr / vector_lr / value_lr when set."""
    from lmforge.optim.groups import role_groups

    lrs = None
    if cfg is not None:
        lrs = {"embedding": cfg.embed_lr, "head": cfg.head_lr, "vector": cfg.vector_lr, "value": cfg.value_lr}
    return role_groups(model, weight_decay, lrs)


# optimizers whose update of a parameter needs all of it at once (factored or preconditioned statistics)
WHOLE_PARAMETER = ("adafactor", "shampoo", "soap")


def check_sharding(name: str, sharded: bool, tensor_parallel: bool) -> None:
    """One-line refusal of an optimizer that cannot step on sharded parameters (FSDP's dp_shard - the
    default layout of --nproc N - tensor or context parallel). Element-wise optimizers step on each shard;
    Muon's matrix products run on the shards as DTensors; Dion runs in its distributed form on FSDP's row
    shards (lmforge.parallel.matrix_optim.ShardedDion), not on tensor-parallel column shards."""
    if sharded and name in WHOLE_PARAMETER:
        raise ConfigError(f"optim.name={name!r} does not run on sharded parameters (parallel dp_shard, tp or cp; "
                          "dp_shard is --nproc's default): use parallel.dp_replicate (DDP) or pp, or optim.name "
                          "adamw, lion, muon or dion")
    if name == "dion" and tensor_parallel:
        raise ConfigError("optim.name='dion' runs on FSDP's row shards, not tensor-parallel ones: set parallel.tp=1, "
                          "or use muon")


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    from torch.distributed.tensor import DTensor

    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    check_sharding(cfg.name, sharded, tensor_parallel=False)
    opt = OPTIMIZERS[cfg.name](param_groups(model, cfg.weight_decay, cfg), cfg)
    if sharded and cfg.name == "dion":  # Dion's distributed form: rank-r factors travel, not whole matrices
        from lmforge.parallel.matrix_optim import ShardedDion

        opt = ShardedDion.from_optimizer(opt)
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt


def lr_multiplier(cfg, step: int, total: int) -> float:
    fn = SCHEDULES[cfg.schedule]
    if cfg.schedule == "wsd":
        return fn(step, total, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_fraction, cfg.decay_shape)
    return fn(step, total, cfg.warmup_steps, cfg.min_lr_ratio, cfg.decay_fraction)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer state tensors (moments, factors, bases), for memory-per-parameter reports."""
    import torch

    total = 0

    def add(v) -> None:
        nonlocal total
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size() if v.dim() > 0 else 0
        elif isinstance(v, (list, tuple)):
            for x in v:
                add(x)

    for state in opt.state.values():
        for v in state.values():
            add(v)
    return total
