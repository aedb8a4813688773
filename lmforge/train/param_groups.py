"""The optimizer a Trainer is given, seen through its param_groups (moved out of lmforge.train.trainer, which
calls these when it is built): `check_optimizer_params` refuses an optimizer that does not hold exactly the
model's trainable parameters; each group keeps its starting settings under GROUP_START (`group_start`); and a
resume (lmforge.train.resume) calls `keep_group_settings` after loading a checkpoint's optimizer state, so the
new run's settings apply while the optimizer's own counters carry on. `optimizer_name` is how a checkpoint
names the optimizer, so a resume with another one is refused."""

from __future__ import annotations

from typing import Any

import torch

from lmforge.errors import ConfigError
from lmforge.train.config import LoopConfig


def optimizer_name(optimizer: torch.optim.Optimizer, cfg: LoopConfig) -> str:
    return f"{cfg.optim.name}/{type(optimizer).__name__}"


def check_optimizer_params(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every parameter the optimizer updates must be the model's: checkpoints save the model's parameters
    (and name the optimizer state by them), so one held elsewhere would be trained, then lost or refused. And
    every trainable parameter of the model must be the optimizer's: one it lacks (an optimizer built before
    apply_lora or before a head was added) would get gradients that nothing applies."""
    mine = {id(p) for p in model.parameters()}
    held = set()
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in mine:
                raise ConfigError(f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not in the "
                                  f"model, so checkpoints would not save it; make the module that owns it (a value "
                                  f"head, a reward head...) a submodule of the trained model")
            held.add(id(p))
    lacking = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if lacking:
        names = ", ".join(lacking[:3]) + (", ..." if len(lacking) > 3 else "")
        raise ConfigError(f"the optimizer lacks {len(lacking)} of the model's trainable parameters ({names}), which "
                          "would never be updated; build the optimizer after apply_lora / freezing / adding heads "
                          "(from the model as it trains), or set requires_grad=False on those meant to stay fixed")


GROUP_COUNTERS = ("step",)
"""Keys of an optimizer's param_groups that count what the optimizer has done (a per-group step count, where an
optimizer keeps one there): a resume keeps them from the checkpoint, also one saved before GROUP_START was."""
GROUP_START = "start_settings"
"""The key under which each param_group keeps its other keys as they were when the run's Trainer was built (its
settings, and the counters an optimizer keeps in its groups at their initial values): saved with the group, so
a resume can tell the keys that the run moved (counters such as schedule-free's k and weight_sum or Prodigy's
d, which those optimizers also list among their constructor defaults) from the settings."""
GROUP_SCHEDULED = ("lr",)
"""Keys the Trainer itself sets at every step (lr from base_lr and the schedule): settings, never counters."""


def group_start(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in group.items()
            if k not in ("params", GROUP_START)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.equal(b)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def keep_group_settings(optimizer: torch.optim.Optimizer, settings: list[dict[str, Any]]) -> None:
    """After optimizer.load_state_dict (which also restores the saved param_groups' lr, base_lr, weight_decay,
    betas...): each group's settings back to those this run's optimizer was built with, so a resume with a new
    optim.lr or weight_decay trains with them, as its 'settings changed' line says. Groups are matched by
    position: loading maps the checkpoint's groups onto this optimizer's own, in its order (by the parameters'
    names under a ParallelRunner). The per-parameter state and keys only the checkpoint's groups hold (ones an
    optimizer adds as it steps) stay as loaded, and so do the group's counters: GROUP_COUNTERS, and every key the
    checkpoint's run moved away from its start (GROUP_START) that this run starts at the same value (a key whose
    start the config changed takes the config's value; lr is the Trainer's own, GROUP_SCHEDULED)."""
    for group, mine in zip(optimizer.param_groups, settings, strict=True):
        start = group.get(GROUP_START)  # the checkpoint's run's; None in a checkpoint saved before it was kept

        def counter(k: str) -> bool:
            if k not in group:
                return False
            if k in GROUP_COUNTERS:
                return True
            return (isinstance(start, dict) and k in start and k not in GROUP_SCHEDULED and k != GROUP_START
                    and _same(mine[k], start[k]) and not _same(group[k], start[k]))

        group.update({k: v for k, v in mine.items() if not counter(k)})

