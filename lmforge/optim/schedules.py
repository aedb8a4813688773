"""Learning-rate schedules as multipliers of the peak rate: f(step) in [0, 1].

All share a linear warmup over `warmup` steps. WSD (warmup-stable-decay; Hu et al. 2024, MiniCPM)
holds the peak and decays over the last `decay_fraction` of the run, so a run can be extended from a
stable-phase checkpoint and cooled down at any point; its decay shape is configurable: linear, cosine,
"1-sqrt" (f = 1 - sqrt(x), which Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
Fixed Training Durations", found best) or exponential. The inverse-square-root schedule (Vaswani et al.
2017) decays as sqrt(warmup / step) after warmup and has no fixed end.
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


def _decay(frac: float, shape: str) -> float:
    """Fraction of the (peak - floor) gap still left after `frac` of the decay phase, by shape."""
    if shape == "linear":
        return 1.0 - frac
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(frac)
    if shape == "exp":  # geometric from 1 to 1e-3 of the gap, then snapped to 0 at the end
        return 0.0 if frac >= 1.0 else 1e-3**frac
    raise ValueError(f"unknown decay shape {shape!r}; choose linear, cosine, 1-sqrt or exp")


def wsd_decay_start(total: int, decay_fraction: float) -> int:
    """The step where WSD's final decay begins: the last round(total * decay_fraction) steps (at least one)."""
    return total - max(1, int(round(total * decay_fraction)))


def wsd(step: int, total: int, warmup: int = 0, min_ratio: float = 0.0, decay_fraction: float = 0.2,
        decay_shape: str = "linear") -> float:
    w = _warm(step, warmup)
    if w is not None:
        return w
    start = wsd_decay_start(total, decay_fraction)
    decay_steps = total - start
    if step < start:
        return 1.0
    frac = min(1.0, (step - start) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * _decay(frac, decay_shape)


def inverse_sqrt(step: int, total: int, warmup: int = 0, min_ratio: float = 0.0,
                 decay_fraction: float = 0.0) -> float:
    """1 at the end of warmup, then sqrt(warmup / (step + 1)) (Vaswani et al. 2017), floored at min_ratio."""
    w = _warm(step, warmup)
    if w is not None:
        return w
    return max(min_ratio, min(1.0, math.sqrt(max(1, warmup) / (step + 1))))


Schedule = Callable[..., float]
