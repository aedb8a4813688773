"""OptimConfig: which optimizer, its hyper-parameters, the schedule and the parameter-group rules."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import check


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    name: str = "adamw"
    """optimizer, a key of lmforge.optim.OPTIMIZERS"""
    lr: float = 3e-4
    """peak learning rate"""
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    """decoupled weight decay, applied to matrices only (not norms, biases)"""
    grad_clip: float = 1.0
    """global-norm gradient clipping threshold; 0 disables"""
    schedule: str = "cosine"
    """learning-rate schedule, a key of lmforge.optim.SCHEDULES"""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of the peak (cosine, linear, WSD)"""
    decay_fraction: float = 0.2
    """WSD: fraction of the run spent in the final decay"""

    def __post_init__(self) -> None:
        check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        check(all(0 <= b < 1 for b in self.betas), f"optim.betas must lie in [0, 1), got {self.betas}")
        check(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(0 <= self.min_lr_ratio <= 1, f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        check(0 <= self.decay_fraction <= 1, f"optim.decay_fraction must lie in [0, 1], got {self.decay_fraction}")
        from lmforge.optim import OPTIMIZERS, SCHEDULES

        check(self.name in OPTIMIZERS, f"optim.name={self.name!r} is unknown; choose one of {sorted(OPTIMIZERS)}")
        check(self.schedule in SCHEDULES,
              f"optim.schedule={self.schedule!r} is unknown; choose one of {sorted(SCHEDULES)}")
