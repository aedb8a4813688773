"""Learning-rate schedules as multipliers of the peak rate: f(step) in [0, 1].

All share a linear warmup over `warmup` steps. WSD (warmup-stable-decay; Hu et al. 2024, MiniCPM)
holds the peak and decays over the last `decay_fraction` of the run, so a run can be extended from a
stable-phase checkpoint and cooled down at any point.
"""

from __future__ import annotations

import math
from typing import Callable


def _warm(step: int, warmup: int) -> float | None:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return None


def constant(step: int, total: int, warmup: int = 0, min_ratio: float = 0.0, decay_fraction: float = 0.0) -> float:
    w = _warm(step, warmup)
    return 1.0 if w is None else w


def linear(step: int, total: int, warmup: int = 0, min_ratio: float = 0.0, decay_fraction: float = 0.0) -> float:
    w = _warm(step, warmup)
    if w is not None:
        return w
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - (1.0 - min_ratio) * frac


def cosine(step: int, total: int, warmup: int = 0, min_ratio: float = 0.0, decay_fraction: float = 0.0) -> float:
    w = _warm(step, warmup)
    if w is not None:
        return w
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def wsd(step: int, total: int, warmup: int = 0, min_ratio: float = 0.0, decay_fraction: float = 0.2) -> float:
    w = _warm(step, warmup)
    if w is not None:
        return w
    decay_steps = max(1, int(round(total * decay_fraction)))
    start = total - decay_steps
    if step < start:
        return 1.0
    frac = min(1.0, (step - start) / decay_steps)
    return 1.0 - (1.0 - min_ratio) * frac


Schedule = Callable[..., float]
