"""Scaling-law figures (matplotlib, imported lazily; `pip install 'lmforge[plot]'`).

    isoflop_plot        loss vs N per budget, with each fitted parabola and its minimum (approach 2, where it fits)
    frontier_plot       N_opt(C) and D_opt(C) points with the fitted power laws (approaches 1/2/3)
    predicted_vs_observed   approach 3's L(N, D) against the measured losses, with the y = x line
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.errors import require
from lmforge.scaling.isoflop import Frontier
from lmforge.scaling.parametric import ParametricFit
from lmforge.scaling.table import Runs
from lmforge.utils import atomic_path


def _plt():
    mpl = require("matplotlib", "plot")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write `fig` to `path` atomically (a reader never sees half a figure) and close it, written or not."""
    path = Path(path)
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:  # the temporary name ends in .tmp: the format comes from `path`
            fig.savefig(tmp, dpi=120, format=path.suffix[1:] or "png")
    finally:
        _plt().close(fig)
    return path


def isoflop_plot(runs: Runs, frontier: Frontier | None, path: str | Path) -> Path:
    """The measured losses per budget; approach 2's parabolas and minima where it fitted (frontier None: where it
    did not, so a table too small to fit still shows why)."""
    plt = _plt()
    parabolas = frontier.parabolas if frontier is not None else {}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    budgets = np.unique(runs.budget)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    for c, color in zip(budgets, colors):
        sel = runs.budget == c
        # a budget is left out for too few sizes, no minimum, or one outside the sizes: fit.json says which
        note = "" if float(c) in parabolas else " (left out of the frontier)"
        ax.scatter(runs.n[sel], runs.loss[sel], color=color, s=18, label=f"C = {c:.2g}{note}")
        if float(c) in parabolas:
            c2, c1, c0 = parabolas[float(c)]
            x = np.linspace(np.log(runs.n[sel].min()), np.log(runs.n[sel].max()), 100)
            ax.plot(np.exp(x), c2 * x**2 + c1 * x + c0, color=color, lw=1)
    if frontier is not None:
        ax.scatter(frontier.n_opt, frontier.loss_opt, marker="*", s=120, color="red", zorder=3, label="fitted minima")
    title = "IsoFLOP profiles" + ("" if frontier is not None else " (approach 2 not fitted: fit.json says why)")
    ax.set(xscale="log", xlabel="parameters N", ylabel="final validation loss", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def frontier_plot(frontier: Frontier, path: str | Path, fit: ParametricFit | None = None) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    c = np.logspace(np.log10(frontier.flops.min()) - 0.5, np.log10(frontier.flops.max()) + 1, 50)
    n_fit, d_fit = frontier.compute_optimal(c)
    for ax, pts, line, name, exp in ((axes[0], frontier.n_opt, n_fit, "N_opt", frontier.a),
                                     (axes[1], frontier.d_opt, d_fit, "D_opt", frontier.b)):
        ax.scatter(frontier.flops, pts, color="red", zorder=3, label=f"{name} per budget")
        ax.plot(c, line, color="k", lw=1, label=f"{name} ∝ C^{exp:.2f}")
        if fit is not None:
            ax.plot(c, fit.compute_optimal(c)[0 if name == "N_opt" else 1], ls="--", lw=1,
                    label=f"approach 3: C^{fit.a if name == 'N_opt' else fit.b:.2f}")
        ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=name)
        ax.legend(fontsize=8)
    fig.suptitle("compute-optimal frontier")
    return _save(fig, path)


def predicted_vs_observed(runs: Runs, fit: ParametricFit, path: str | Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    pred = fit.predict(runs.n, runs.d)
    sc = ax.scatter(runs.loss, pred, c=np.log10(runs.c), s=18, cmap="viridis")
    lo, hi = min(runs.loss.min(), pred.min()), max(runs.loss.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1)
    fig.colorbar(sc, ax=ax, label="log10 C")
    ax.set(xlabel="observed loss", ylabel="predicted L(N, D)",
           title=f"E={fit.E:.2f}, α={fit.alpha:.2f}, β={fit.beta:.2f}")
    return _save(fig, path)
