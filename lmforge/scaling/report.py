"""`lmforge scaling fit`: every fit the table allows, predictions for chosen budgets, plots, one JSON.

Fits that the data cannot support (e.g. approach 2 without 3 sizes per budget, approach 3 on one budget or on
equal losses) are reported as skipped with their reason; a fit that runs but does not converge raises, as
everywhere in lmforge.scaling.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.config import check
from lmforge.errors import DataError
from lmforge.scaling.bootstrap import bootstrap
from lmforge.scaling.inference import inference_aware_optimum
from lmforge.scaling.isoflop import fit_envelope, fit_isoflop
from lmforge.scaling.parametric import fit_parametric
from lmforge.scaling.powerlaw import FitError, fit_power_law
from lmforge.scaling.table import Runs, load_curves, load_runs
from lmforge.utils import atomic_path, check_output_path


@dataclass(frozen=True, kw_only=True)
class FitConfig:
    table: str = "runs/scaling_sweep/runs.csv"
    """run table (CSV/JSON with columns N, D, loss[, C, budget]) written by `lmforge scaling sweep`"""
    curves: str = ""
    """curves.json for approach 1 ('' = curves.json beside the table, if present)"""
    predict: tuple[float, ...] = (1e12, 1e13)
    """FLOP budgets to predict the compute-optimal N, D and loss for"""
    inference_tokens: float = 0.0
    """if > 0, also the inference-aware optimum (Sardana et al.) at the loss of the largest predict budget"""
    bootstrap: int = 100
    """bootstrap resamples for confidence intervals (0 = none); approach 3 takes at most 50 (seconds each)"""
    out: str = ""
    """directory for fit.json and the plots ('' = beside the table)"""
    plots: bool = True
    """write isoflop.png (the measured losses, approach 2's parabolas where it fits), frontier.png (where approach 2
    fits) and predicted_vs_observed.png (where approach 3 fits) beside fit.json (needs matplotlib)"""
    extrapolate: bool = False
    """approach 2: accept IsoFLOP minima outside the sizes trained at a budget"""
    strict: bool = False
    """approach 2: a budget whose minimum is not bracketed fails approach 2 (its reason under fit.json's
    "skipped"; the other approaches still run and the command succeeds) instead of being left out (the default,
    its reason recorded under approach2.dropped)"""
    progress: bool = True
    """progress bars over the bootstrap resamples"""

    def __post_init__(self) -> None:
        check(all(math.isfinite(c) and c > 0 for c in self.predict),
              f"predict budgets must be finite and > 0, got {self.predict}")
        check(self.bootstrap >= 0, f"bootstrap must be >= 0, got {self.bootstrap}")
        check(math.isfinite(self.inference_tokens) and self.inference_tokens >= 0,
              f"inference_tokens must be finite and >= 0, got {self.inference_tokens}")
        check(len(self.predict) >= 1 or not self.inference_tokens,
              "inference_tokens needs a predict budget (its target is the loss at the largest): pass --predict")


def _try(report: dict, key: str, fn):
    try:
        return fn()
    except FitError as e:
        report.setdefault("skipped", {})[key] = str(e)
        return None


def _kaplan(runs: Runs) -> dict:
    """L(C) through the best run of each budget (Kaplan et al. eq. 1.3, the compute frontier). L(N) and L(D)
    need runs that are not limited by the other variable, which an IsoFLOP grid does not have; fit them
    with `fit_power_law` on such sweeps."""
    best = [runs.loss[runs.budget == c].min() for c in np.unique(runs.budget)]
    law = fit_power_law(np.unique(runs.budget), best, variable="C")
    return {"L(C)": str(law), "C_c": law.x_c, "alpha_C": law.alpha}


def _iso(runs: Runs, cfg: FitConfig):
    return fit_isoflop(runs, extrapolate=cfg.extrapolate, drop_unbracketed=not cfg.strict)


def _ab(frontier) -> dict[str, float]:
    return {"a": frontier.a, "b": frontier.b}


def out_dir(cfg: FitConfig) -> Path:
    """The directory fit.json and the plots go to (--out, else the table's); refused when it is a file, before the
    fits and their bootstrap minutes run."""
    out = Path(cfg.out) if cfg.out else Path(cfg.table).parent
    return check_output_path(out, "--out", want="a directory for fit.json and the plots (or leave --out out to "
                             "write beside the table)")


def run_fits(cfg: FitConfig) -> dict:
    out_dir(cfg)
    runs = load_runs(cfg.table)
    report: dict = {"table": cfg.table, "n_runs": len(runs)}
    report["kaplan"] = _try(report, "kaplan", lambda: _kaplan(runs))
    iso = _try(report, "approach2", lambda: _iso(runs, cfg))
    par = _try(report, "approach3", lambda: fit_parametric(runs))
    curves_path = Path(cfg.curves) if cfg.curves else Path(cfg.table).with_name("curves.json")
    if cfg.curves and not curves_path.is_file():
        raise DataError(f"curves file not found: {curves_path} (--curves; leave it out to use curves.json beside "
                        "the table, if any)")
    env = None
    if curves_path.is_file():
        curves = load_curves(curves_path)
        env = _try(report, "approach1", lambda: fit_envelope(curves))
    preds = {}
    for name, fit in (("approach1", env), ("approach2", iso), ("approach3", par)):
        if fit is not None:
            report[name] = fit.as_dict()
            n_opt, d_opt = fit.compute_optimal(np.array(cfg.predict))
            preds[name] = [{"C": c, "N_opt": float(n), "D_opt": float(d)} for c, n, d in zip(cfg.predict, n_opt, d_opt)]
    if par is not None:
        for p in preds["approach3"]:
            p["loss"] = float(par.predict(p["N_opt"], p["D_opt"]))
    report["predictions"] = preds
    if cfg.bootstrap:
        if iso is not None:
            report["approach2_ci90"] = _try(report, "bootstrap2", lambda: bootstrap(
                runs, lambda r: _ab(_iso(r, cfg)), n=cfg.bootstrap,
                progress="bootstrap approach 2" if cfg.progress else ""))
        if par is not None:
            report["approach3_ci90"] = _try(report, "bootstrap3", lambda: bootstrap(
                runs, lambda r: {k: v for k, v in fit_parametric(r, n_starts=2).as_dict().items()
                                 if k in ("E", "alpha", "beta", "a")}, n=min(cfg.bootstrap, 50), by_budget=False,
                progress="bootstrap approach 3" if cfg.progress else ""))
    if par is not None and cfg.inference_tokens:
        target = max(preds["approach3"], key=lambda p: p["C"])["loss"]
        opt = _try(report, "inference", lambda: inference_aware_optimum(par, target, cfg.inference_tokens))
        if opt is not None:
            report["inference_aware"] = {"target_loss": target, "N": opt.n, "D_train": opt.d_train,
                                         "train_flops": opt.train_flops, "total_flops": opt.total_flops}
    report["_objects"] = (runs, iso, par)
    return report


def write_report(cfg: FitConfig, report: dict) -> Path:
    from lmforge.scaling.plots import frontier_plot, isoflop_plot, predicted_vs_observed

    runs, iso, par = report.pop("_objects")
    out = out_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.plots:  # the measured losses always: a table no approach fits is plotted too, to show why
        report["plots"] = [str(isoflop_plot(runs, iso, out / "isoflop.png"))]
        if iso is not None:
            report["plots"].append(str(frontier_plot(iso, out / "frontier.png", par)))
        if par is not None:
            report.setdefault("plots", []).append(
                str(predicted_vs_observed(runs, par, out / "predicted_vs_observed.png")))
    path = out / "fit.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report, indent=1, default=float))
    return path
