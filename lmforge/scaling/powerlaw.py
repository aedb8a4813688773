"""Single-variable power laws (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", eqs. 1.1-1.3):

    L(N) = (N_c / N)^alpha_N,   L(D) = (D_c / D)^alpha_D,   L(C) = (C_c / C)^alpha_C

each a straight line in log-log space, fitted by least squares on log L. With `irreducible=True` an
entropy floor E is added, L(x) = E + (x_c / x)^alpha (Henighan et al. 2020), fitted by nonlinear least
squares on log L from a grid of starting floors; a fit that does not converge raises FitError.
`fit_loglinear` fits y = k x^a, used for the compute-optimal frontiers N_opt(C) and D_opt(C).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.errors import LmforgeError


class FitError(LmforgeError):
    """A scaling-law fit that did not converge or whose data cannot determine it."""


def _check_xy(x, y, k: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise FitError(f"{what}: x and y must be 1-D arrays of one length, got {x.shape} and {y.shape}")
    if len(x) < k:
        raise FitError(f"{what} needs at least {k} points, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all() and (x > 0).all() and (y > 0).all()):
        raise FitError(f"{what}: all values must be finite and > 0 (losses and sizes are positive)")
    if np.ptp(np.log(x)) == 0:
        raise FitError(f"{what}: all x are equal ({x[0]:g}); a power law needs a range of sizes")
    return x, y


def fit_loglinear(x, y, what: str = "power law") -> tuple[float, float]:
    """(k, a) of y = k x^a by least squares in log-log space."""
    x, y = _check_xy(x, y, 2, what)
    a, logk = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(logk)), float(a)


@dataclass(frozen=True)
class PowerLaw:
    """L(x) = e + (x_c / x)^alpha; e = 0 is Kaplan's pure form."""

    x_c: float
    alpha: float
    e: float = 0.0
    variable: str = "x"

    def predict(self, x) -> np.ndarray:
        return self.e + (self.x_c / np.asarray(x, dtype=np.float64)) ** self.alpha

    def __str__(self) -> str:
        floor = f"{self.e:.4g} + " if self.e else ""
        return f"L({self.variable}) = {floor}({self.x_c:.4g} / {self.variable})^{self.alpha:.4g}"


def fit_power_law(x, loss, irreducible: bool = False, variable: str = "x") -> PowerLaw:
    """Fit L(x) = (x_c/x)^alpha, or E + (x_c/x)^alpha with `irreducible`."""
    x, loss = _check_xy(x, loss, 4 if irreducible else 2, f"L({variable}) fit")
    k, a = fit_loglinear(x, loss)
    if a >= 0:
        raise FitError(f"L({variable}): loss does not fall with {variable} (log-log slope {a:.3g} >= 0)")
    pure = PowerLaw(x_c=k ** (-1 / a), alpha=-a, variable=variable)
    if not irreducible:
        return pure
    return _fit_with_floor(x, loss, pure)


def _fit_with_floor(x: np.ndarray, loss: np.ndarray, pure: PowerLaw) -> PowerLaw:
    from scipy.optimize import least_squares

    lx, ly = np.log(x), np.log(loss)

    def resid(th):  # th = (log E, log x_c, alpha)
        return np.logaddexp(th[0], th[2] * (th[1] - lx)) - ly

    best = None
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
        th0 = np.array([np.log(frac * loss.min()), np.log(pure.x_c), pure.alpha])
        res = least_squares(resid, th0, method="lm")
        if res.success and (best is None or res.cost < best.cost):
            best = res
    if best is None:
        raise FitError("L(x) with an irreducible term did not converge from any start")
    e, xc, alpha = float(np.exp(best.x[0])), float(np.exp(best.x[1])), float(best.x[2])
    return PowerLaw(x_c=xc, alpha=alpha, e=e, variable=pure.variable)
