"""Chinchilla approaches 1 and 2 (Hoffmann et al. 2022, sections 3.1 and 3.2).

Approach 1, the envelope of training curves: every run of size N traces loss against FLOPs C = 6 N D(t)
as it trains. At each C the smallest loss over all runs (the envelope) names the best model size N_opt(C)
and its tokens D_opt = C / (6 N_opt); power laws N_opt ∝ C^a, D_opt ∝ C^b are fitted to those points.

Approach 2, IsoFLOP profiles: for each fixed budget C, models of several sizes are trained for C/(6N)
tokens each; a parabola in log N through their final losses has its vertex at N_opt(C). Power laws are
then fitted to the vertices. A budget whose parabola opens downwards or is flat (no minimum) is an error
that names the budget: the sizes tried do not bracket the optimum, or the runs' losses barely differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from lmforge.scaling.powerlaw import FitError, fit_loglinear
from lmforge.scaling.table import Runs


@dataclass(frozen=True)
class Frontier:
    """Compute-optimal points and the power laws N_opt = n_coef C^a, D_opt = d_coef C^b through them."""

    flops: np.ndarray
    n_opt: np.ndarray
    d_opt: np.ndarray
    loss_opt: np.ndarray
    n_coef: float
    a: float
    d_coef: float
    b: float
    parabolas: dict = field(default_factory=dict)
    """approach 2: budget -> (c2, c1, c0) of loss = c2 x^2 + c1 x + c0, x = log N"""
    dropped: dict = field(default_factory=dict)
    """approach 2 with drop_unbracketed: budget -> why it was left out of the frontier"""

    def compute_optimal(self, flops) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(flops, dtype=np.float64)
        return self.n_coef * c**self.a, self.d_coef * c**self.b

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "n_coef": self.n_coef, "d_coef": self.d_coef,
                "dropped": {f"{c:.3g}": why for c, why in self.dropped.items()},
                "points": [{"C": float(c), "N_opt": float(n), "D_opt": float(d), "loss": float(l)}
                           for c, n, d, l in zip(self.flops, self.n_opt, self.d_opt, self.loss_opt)]}


def _frontier(flops, n_opt, loss_opt, parabolas=None) -> Frontier:
    flops, n_opt = np.asarray(flops, dtype=np.float64), np.asarray(n_opt, dtype=np.float64)
    if len(flops) < 2:
        raise FitError(f"the compute-optimal frontier needs at least 2 budgets, got {len(flops)}")
    d_opt = flops / (6 * n_opt)
    n_coef, a = fit_loglinear(flops, n_opt, "N_opt(C)")
    d_coef, b = fit_loglinear(flops, d_opt, "D_opt(C)")
    return Frontier(flops, n_opt, d_opt, np.asarray(loss_opt, dtype=np.float64), n_coef, a, d_coef, b,
                    parabolas or {})


def fit_envelope(curves: list[tuple[float, np.ndarray, np.ndarray]], n_points: int = 20) -> Frontier:
    """Approach 1 from training curves [(N, tokens seen, loss), ...] (loss at each eval of each run): at each of
    `n_points` budgets C (log-spaced over the curves' range) the lowest loss any run reached at C and its N; budgets
    in a gap that no run's curve covers (runs of budgets far apart, evaluated rarely) are left out."""
    if len(curves) < 2:
        raise FitError(f"approach 1 needs training curves of at least 2 model sizes, got {len(curves)}")
    logc, logl = [], []
    for n, tokens, loss in curves:
        tokens, loss = np.asarray(tokens, dtype=np.float64), np.asarray(loss, dtype=np.float64)
        bad = ~(np.isfinite(tokens) & np.isfinite(loss) & (tokens > 0) & (loss > 0))  # NaN: a diverged evaluation
        if len(tokens) < 2 or bad.any() or not (np.isfinite(n) and n > 0):
            at = f"; point {np.argmax(bad)} has tokens={tokens[bad][0]:g}, loss={loss[bad][0]:g}" if bad.any() else ""
            raise FitError(f"curve of N={n:g} needs N > 0 and >= 2 points with finite tokens > 0 and loss > 0{at}")
        order = np.argsort(tokens)
        logc.append(np.log(6 * n * tokens[order]))
        logl.append(np.log(loss[order]))
    lo, hi = min(c[0] for c in logc), max(c[-1] for c in logc)
    grid = np.linspace(lo, hi, n_points)
    # loss of every run at every C it reached (NaN where it did not), then the lower envelope
    table = np.array([np.where((grid >= c[0]) & (grid <= c[-1]), np.interp(grid, c, l), np.nan)
                      for c, l in zip(logc, logl)])
    reached = ~np.isnan(table).all(axis=0)  # budgets between runs' curves that no run covers have no envelope
    grid, table = grid[reached], table[:, reached]
    if len(grid) < 2:
        raise FitError("approach 1: the runs' curves cover fewer than 2 of the budgets between them; evaluate "
                       "each run more often or train budgets closer together")
    best = np.nanargmin(np.where(np.isnan(table), np.inf, table), axis=0)
    sizes = np.array([n for n, _, _ in curves], dtype=np.float64)
    n_opt = sizes[best]
    if len(np.unique(n_opt)) < 2:
        raise FitError(f"approach 1: one model size (N={n_opt[0]:g}) is best at every budget; "
                       "the curves do not cross, so no frontier can be fitted")
    return _frontier(np.exp(grid), n_opt, np.exp(table[best, np.arange(len(grid))]))


def _vertex(sel: Runs, c: float, extrapolate: bool) -> tuple[float, float, tuple[float, float, float]]:
    """(N_opt, loss at N_opt, parabola) of one budget's IsoFLOP profile, or FitError saying why not."""
    x = np.log(sel.n)
    c2, c1, c0 = np.polyfit(x, sel.loss, 2)
    # equal losses fit a parabola of rounding noise (c2 ~ ±1e-16) with a vertex anywhere: over the sizes
    # trained the curvature must change the loss by more than 1e-6 of it
    if abs(c2) * np.ptp(x) ** 2 <= 1e-6 * sel.loss.mean():
        raise FitError(f"IsoFLOP budget C={c:.3g}: loss vs log N has no minimum (the parabola is flat: the losses "
                       f"span only {np.ptp(sel.loss):.3g}); check that these runs trained, or train sizes further "
                       "apart")
    if c2 < 0:
        raise FitError(f"IsoFLOP budget C={c:.3g}: loss vs log N has no minimum (parabola opens down); "
                       "train smaller and larger models at this budget so they bracket the optimum")
    x_opt = -c1 / (2 * c2)
    if not extrapolate and not x.min() <= x_opt <= x.max():
        raise FitError(f"IsoFLOP budget C={c:.3g}: the fitted minimum N={np.exp(x_opt):.3g} lies outside the "
                       f"sizes trained ({sel.n.min():.3g}..{sel.n.max():.3g}); add sizes beyond it so they "
                       "bracket the optimum (or pass extrapolate=True)")
    return float(np.exp(x_opt)), float(c0 + c1 * x_opt + c2 * x_opt**2), (float(c2), float(c1), float(c0))


def fit_isoflop(runs: Runs, min_per_budget: int = 3, extrapolate: bool = False,
                drop_unbracketed: bool = False) -> Frontier:
    """Approach 2 on a run table grouped by its `budget` column (C = 6ND when absent).

    A budget whose vertex lies outside the sizes trained at it (or that has no vertex) is an error, unless
    `extrapolate` (trust the parabola outside) or `drop_unbracketed` (leave the budget out, recording why
    in `Frontier.dropped`; at least 2 budgets must remain)."""
    flops, n_opt, loss_opt, parabolas, dropped = [], [], [], {}, {}
    for c in np.unique(runs.budget):
        sel = runs.take(np.flatnonzero(runs.budget == c))
        if len(np.unique(sel.n)) < min_per_budget:
            dropped[float(c)] = f"only {len(np.unique(sel.n))} model sizes (< {min_per_budget})"
            continue
        try:
            n, loss, parabola = _vertex(sel, float(c), extrapolate)
        except FitError as e:
            if not drop_unbracketed:
                raise
            dropped[float(c)] = str(e)
            continue
        flops.append(float(c))
        n_opt.append(n)
        loss_opt.append(loss)
        parabolas[float(c)] = parabola
    if len(flops) < 2:
        raise FitError(f"approach 2 needs at least 2 budgets with >= {min_per_budget} model sizes bracketing "
                       f"their optimum; got {len(flops)}. Left out: {dropped}")
    return replace(_frontier(flops, n_opt, loss_opt, parabolas), dropped=dropped)
