"""LoRAConfig: the options of LoRA adapters (lmforge.adapt.lora), importable without torch, so a command's
`--help` and a config file's check (`lmforge sft --lora.r 16`) do not wait for it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lmforge.config import coerce_fields, names_field
from lmforge.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    r: int = 8
    """rank of the update BA"""
    alpha: float = 16.0
    """the update is scaled by alpha / r (alpha / sqrt(r) with rslora)"""
    dropout: float = 0.0
    """dropout on the adapter's input (PEFT's lora_dropout)"""
    targets: tuple[str, ...] = names_field(("wq", "wk", "wv", "wo"))
    """module-name patterns of the nn.Linear layers to adapt (on the command line `--lora.targets wq wv` or
    `wq,wv`)"""
    trainable: tuple[str, ...] = names_field(())
    """module-name patterns of modules kept fully trainable, beside the model's own task head (a reward model's
    "head", a critic's "value_head": always trained in full, as PEFT does for a sequence classifier)"""
    rslora: bool = False
    """rank-stabilised scale alpha / sqrt(r)"""
    dora: bool = False
    """weight-decomposed LoRA (DoRA, lmforge.adapt.dora): a trained per-row magnitude over the adapted weight's
    direction; over nn.Linear bases only (PEFT's use_dora)"""
    save: Literal["adapters", "full"] = "adapters"
    """what a post-training run's checkpoints hold: 'adapters' (what trains, plus the base checkpoint's path
    and checksum: megabytes, opened with that base) or 'full' (every weight: opens without the base)"""

    def __post_init__(self):
        coerce_fields(self, "lora")  # each field's type, named when wrong
        if self.r < 1:  # (an int: coerce_fields)
            raise ConfigError(f"r={self.r!r} must be a positive integer (the adapter rank, e.g. 8)")
        if not (math.isfinite(self.alpha) and self.alpha > 0):  # an infinite scale makes the first step's loss NaN
            raise ConfigError(f"alpha={self.alpha} must be a finite number > 0 (e.g. 2 * r)")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("targets", "trainable"):
            v = getattr(self, name)
            if not all(p for p in v):  # (types checked above: a tuple of strings)
                raise ConfigError(f"{name}={v!r} must be a tuple of module-name patterns, e.g. ('wq', 'wv')")
        if not self.targets:
            raise ConfigError("targets=() adapts nothing; name the Linear layers, e.g. ('wq', 'wk', 'wv', 'wo')")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)
