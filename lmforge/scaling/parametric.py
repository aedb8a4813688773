"""Chinchilla approach 3 (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models", sec. 3.3):
the parametric loss

    L(N, D) = E + A / N^alpha + B / D^beta                                     (eq. 2)

fitted by minimising the Huber loss (delta = 1e-3) of the log-loss residuals

    min_{a, b, e, alpha, beta} sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i )

with A = exp(a), B = exp(b), E = exp(e) and L-BFGS started from a grid of initialisations (the paper's
grid: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -.5, ..., 1}, a, b in {0, 5, ..., 25}). The objective is
evaluated on the whole grid and L-BFGS runs from the best `n_starts` points, and from as many points of a
profile: for fixed exponents L is linear in (E, A, B), so on a fine (alpha, beta) grid (steps of 0.02) the
three are solved by least squares on relative residuals, and the best such points start L-BFGS too (the
paper grid's best points alone ended in a local optimum for ~8% of noise-free synthetic tables, predicting
their own points 0.2-4% off); the best converged optimum with exponents in (0, 3] is kept (the grid spans
[0, 2]; beyond 3 a fit chases noise, e.g. beta ~ 30 through 5 runs). FitError when no L-BFGS run converged, or
none converged to such exponents, and when the data cannot determine the law: fewer runs than 6 (more than
the 5 parameters), runs of one FLOP budget only (there log D = log(C/6) - log N, so the N and D terms cannot
be told apart), a fit whose N or D term is negligible across the table (equal losses), or one that puts E
at its lower bound 0 (losses that fall as a pure power law over the table: it cannot identify E).

The compute-optimal allocation under C = 6ND follows in closed form (eq. 4):
    N_opt(C) = G (C/6)^a,  D_opt(C) = G^-1 (C/6)^b,  G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta / (alpha + beta),  b = alpha / (alpha + beta).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from lmforge.scaling.powerlaw import FitError
from lmforge.scaling.table import BUDGET_SPREAD, Runs

MAX_EXPONENT = 3.0
"""a fitted alpha or beta must lie in (0, MAX_EXPONENT]: a decreasing loss needs positive exponents, and beyond 3
(the paper's grid spans 0..2) a fit chases noise (5 runs of one budget fitted beta ~ 30, B ~ 1e278)"""
MIN_E_SHARE = 1e-3
"""a fitted E below this fraction of the smallest loss is E's lower bound 0 (see fit_parametric's E check). On small
tables of Chinchilla's law at 1% noise, fits at that bound ended at E of 1e-8 to 1e-11 times the smallest loss,
the others at 0.1 times or more"""
PAPER_GRID = dict(alpha=np.arange(0, 2.01, 0.5), beta=np.arange(0, 2.01, 0.5), e=np.arange(-1, 1.01, 0.5),
                  a=np.arange(0, 25.1, 5), b=np.arange(0, 25.1, 5))


@dataclass(frozen=True)
class ParametricFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float
    """the minimised mean Huber loss"""
    n_runs: int

    def predict(self, n, d) -> np.ndarray:
        n, d = np.asarray(n, dtype=np.float64), np.asarray(d, dtype=np.float64)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def a(self) -> float:
        """exponent of N_opt ∝ C^a"""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """exponent of D_opt ∝ C^b"""
        return self.alpha / (self.alpha + self.beta)

    def compute_optimal(self, flops) -> tuple[np.ndarray, np.ndarray]:
        """(N_opt, D_opt) for FLOP budget(s) C under C = 6ND (eq. 4)."""
        c = np.asarray(flops, dtype=np.float64)
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        return g * (c / 6) ** self.a, (c / 6) ** self.b / g

    def as_dict(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
                "a": self.a, "b": self.b, "objective": self.objective, "n_runs": self.n_runs}


def _objective(th: np.ndarray, ln: np.ndarray, ld: np.ndarray, ly: np.ndarray, delta: float):
    """Mean Huber loss of log-residuals and its gradient; th = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = th
    terms = np.stack([a - alpha * ln, b - beta * ld, np.full_like(ln, e)])  # (3, n)
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    s = w.sum(axis=0)
    r = top + np.log(s) - ly
    w /= s  # softmax weights = d LSE / d term
    loss = _huber(r, delta)
    dr = np.clip(r, -delta, delta) / len(r)
    grad = np.array([(dr * w[0]).sum(), (dr * w[1]).sum(), (dr * w[2]).sum(),
                     -(dr * w[0] * ln).sum(), -(dr * w[1] * ld).sum()])
    return loss, grad


def _grid_values(grid: dict, ln, ld, ly, delta) -> tuple[np.ndarray, np.ndarray]:
    """The objective at every grid point at once: (P, 5) points, (P,) values."""
    pts = np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])))
    return pts, _values(pts, ln, ld, ly, delta)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    absr = np.abs(r)
    return np.where(absr <= delta, 0.5 * r**2, delta * (absr - 0.5 * delta)).mean(axis=-1)


def _values(pts: np.ndarray, ln, ld, ly, delta) -> np.ndarray:
    """The objective at (P, 5) points (a, b, e, alpha, beta) at once: (P,)."""
    a, b, e, alpha, beta = (pts[:, i : i + 1] for i in range(5))
    return _huber(np.logaddexp(np.logaddexp(a - alpha * ln, b - beta * ld), e) - ly, delta)


def _profile_points(ln, ld, ly, step: float = 0.02) -> np.ndarray:
    """For every (alpha, beta) on a grid of `step`, the (E, A, B) minimising sum ((L_hat - L) / L)^2 (linear
    least squares: 3x3 normal equations, solved for all pairs at once); the (P, 5) points (a, b, e, alpha,
    beta) whose three are all positive."""
    ex = np.arange(step, 2 + 1e-9, step)
    w = np.exp(-ly)  # rows divided by L: relative residuals
    xn, xd = np.exp(-ex[:, None] * ln) * w, np.exp(-ex[:, None] * ld) * w  # (exponents, runs)
    k = len(ex)
    gram, rhs = np.empty((k, k, 3, 3)), np.empty((k, k, 3))
    gram[..., 0, 0] = w @ w
    gram[..., 0, 1] = gram[..., 1, 0] = (xn @ w)[:, None]
    gram[..., 0, 2] = gram[..., 2, 0] = (xd @ w)[None, :]
    gram[..., 1, 1] = (xn * xn).sum(1)[:, None]
    gram[..., 2, 2] = (xd * xd).sum(1)[None, :]
    gram[..., 1, 2] = gram[..., 2, 1] = xn @ xd.T
    rhs[..., 0], rhs[..., 1], rhs[..., 2] = w.sum(), xn.sum(1)[:, None], xd.sum(1)[None, :]
    with np.errstate(all="ignore"):
        sol = np.linalg.pinv(gram) @ rhs[..., None]  # (k, k, 3, 1): E, A, B (pinv: singular pairs stay finite)
    e_, a_, b_ = sol[..., 0, 0], sol[..., 1, 0], sol[..., 2, 0]
    ia, ib = np.nonzero((e_ > 0) & (a_ > 0) & (b_ > 0))
    return np.stack([np.log(a_[ia, ib]), np.log(b_[ia, ib]), np.log(e_[ia, ib]), ex[ia], ex[ib]], axis=1)


def fit_parametric(runs: Runs, delta: float = 1e-3, n_starts: int = 8, grid: dict | None = None,
                   gtol: float = 1e-10) -> ParametricFit:
    """Chinchilla approach 3 on a run table (at least 6 runs, of several N and D and at least 2 budgets)."""
    from scipy.optimize import minimize

    if len(runs) <= 5:  # a FitError: the report skips this approach (with the reason) and keeps the others
        raise FitError(f"the parametric L(N, D) fit (approach 3) needs more runs than its 5 parameters (at least 6), "
                       f"got {len(runs)}; train more models first")
    if len(np.unique(runs.n)) < 2 or len(np.unique(runs.d)) < 2:
        raise FitError("approach 3 needs runs at several model sizes N and several token counts D")
    if len(np.unique(runs.budget)) < 2:
        raise FitError(f"approach 3 needs runs at 2 or more FLOP budgets, got one (C={runs.budget[0]:.3g}): at one "
                       "budget log D = log(C/6) - log N, so the N and D terms cannot be told apart; train another "
                       f"budget (a table without a budget column counts runs within {BUDGET_SPREAD:g}x in C as one)")
    ln, ld, ly = np.log(runs.n), np.log(runs.d), np.log(runs.loss)
    pts, vals = _grid_values(grid or PAPER_GRID, ln, ld, ly, delta)
    profile = _profile_points(ln, ld, ly)
    starts = np.concatenate([pts[np.argsort(vals)[:n_starts]],
                             profile[np.argsort(_values(profile, ln, ld, ly, delta))[:n_starts]]])
    best, rejected, failures = None, None, []
    for start in starts:
        res = minimize(_objective, start, args=(ln, ld, ly, delta), jac=True, method="L-BFGS-B",
                       options=dict(maxiter=5000, gtol=gtol, ftol=1e-15))
        converged = res.success or np.abs(res.jac).max() < 1e-7
        if not converged:
            failures.append(res.message)
        elif not 0 < min(res.x[3:]) <= max(res.x[3:]) <= MAX_EXPONENT:  # not a law (see MAX_EXPONENT)
            rejected = res if rejected is None or res.fun < rejected.fun else rejected
        elif best is None or res.fun < best.fun:
            best = res
    if best is None and rejected is not None:
        raise FitError(f"approach 3: fitted exponents must lie in (0, {MAX_EXPONENT:g}], got "
                       f"alpha={rejected.x[3]:.3g}, beta={rejected.x[4]:.3g}; the runs do not span enough N and D")
    if best is None:
        raise FitError(f"approach 3: L-BFGS did not converge from any of {len(starts)} starts "
                       f"(last message: {failures[-1] if failures else 'none'})")
    a, b, e, alpha, beta = best.x
    fit = ParametricFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                        beta=float(beta), objective=float(best.fun), n_runs=len(runs))
    # equal losses fit E alone, with A, B ~ 1e-8: exponents (and so N_opt) that nothing in the data decides
    for var, name, term in (("N", "A/N^alpha", fit.A / runs.n**fit.alpha), ("D", "B/D^beta", fit.B / runs.d**fit.beta)):
        if np.ptp(term) <= 1e-6 * runs.loss.mean():
            raise FitError(f"approach 3: the fitted {name} varies by only {np.ptp(term):.3g} across the runs "
                           f"(losses {runs.loss.min():.4g}..{runs.loss.max():.4g}): the losses do not depend on "
                           f"{var}, so N_opt and D_opt are undetermined; check that the runs trained")
    # E = exp(e) > 0 has no optimum at E = 0: where the table's losses fall as a pure power law (no floor within
    # the N and D trained; small tables), L-BFGS walks e towards -inf until the gradient vanishes and returns an E
    # of ~1e-9 that nothing in the data decides, and predictions that fall towards 0 loss beyond the table
    if fit.E < MIN_E_SHARE * runs.loss.min():
        raise FitError(f"approach 3: the fit puts E at its lower bound 0 (E = {fit.E:.3g}, under {MIN_E_SHARE:g} of "
                       f"the smallest loss {runs.loss.min():.4g}): the table cannot identify the irreducible loss; "
                       "train more runs over a wider range of N and D (larger budgets)")
    return fit
