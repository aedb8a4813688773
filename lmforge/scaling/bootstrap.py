"""Bootstrap confidence intervals for scaling-law fits (Efron 1979; as used for Chinchilla's approach 3
by Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt").

Runs are resampled with replacement (within each budget, so IsoFLOP curves keep their shape), the fit is
repeated, and percentile intervals of each reported quantity are returned. Resamples on which the fit
fails (e.g. a degenerate parabola) are counted and skipped; if more than half fail, FitError is raised.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from lmforge.scaling.powerlaw import FitError
from lmforge.scaling.table import Runs


def _resample(runs: Runs, rng: np.random.Generator, by_budget: bool) -> Runs:
    if not by_budget:
        return runs.take(rng.integers(0, len(runs), len(runs)))
    idx = []
    for c in np.unique(runs.budget):
        members = np.flatnonzero(runs.budget == c)
        idx.append(rng.choice(members, len(members), replace=True))
    return runs.take(np.concatenate(idx))


def bootstrap(runs: Runs, fit: Callable[[Runs], dict[str, float]], n: int = 200, level: float = 0.9,
              seed: int = 0, by_budget: bool = True, progress: str = "") -> dict[str, tuple[float, float]]:
    """{quantity: (lo, hi)} percentile intervals at `level` of `fit(resampled runs)`'s dict values. A non-empty
    `progress` shows a bar of that name over the resamples (approach 3's take seconds each: minutes in all)."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {}
    failed = 0
    for _ in tqdm(range(n), desc=progress, disable=not progress, unit="resample", leave=False):
        try:
            out = fit(_resample(runs, rng, by_budget))
        except FitError:
            failed += 1
            continue
        for k, v in out.items():
            samples.setdefault(k, []).append(float(v))
    if failed > n / 2:
        raise FitError(f"bootstrap: the fit failed on {failed} of {n} resamples; the fit is not stable")
    q = (1 - level) / 2
    return {k: (float(np.quantile(v, q)), float(np.quantile(v, 1 - q))) for k, v in samples.items()}
