"""The inference-aware compute optimum (Sardana et al. 2023, "Beyond Chinchilla-Optimal: Accounting for
Inference in Language Model Scaling Laws", eq. 2).

A model that will serve D_inf tokens costs 6 N D_tr FLOPs to train and 2 N D_inf to serve. For a target
loss l, the tokens a size N needs follow from the fitted L(N, D) = E + A/N^alpha + B/D^beta:
    D_tr(N) = (B / (l - E - A / N^alpha))^(1/beta),   defined for N > (A / (l - E))^(1/alpha)
and the optimum minimises 6 N D_tr(N) + 2 N D_inf over N. With D_inf = 0 it is the Chinchilla optimum for
that loss; larger D_inf moves it to smaller models trained on more tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.scaling.parametric import ParametricFit
from lmforge.scaling.powerlaw import FitError


@dataclass(frozen=True)
class InferenceOptimum:
    n: float
    d_train: float
    train_flops: float
    inference_flops: float

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.inference_flops


def tokens_for_loss(fit: ParametricFit, n: float, loss: float) -> float:
    gap = loss - fit.E - fit.A / n**fit.alpha
    return float("inf") if gap <= 0 else (fit.B / gap) ** (1 / fit.beta)


def inference_aware_optimum(fit: ParametricFit, target_loss: float, inference_tokens: float) -> InferenceOptimum:
    from scipy.optimize import minimize_scalar

    if target_loss <= fit.E:
        raise FitError(f"target loss {target_loss} is at or below the irreducible loss E={fit.E:.4g}")
    if inference_tokens < 0:
        raise FitError(f"inference_tokens must be >= 0, got {inference_tokens}")
    log_nmin = np.log(fit.A / (target_loss - fit.E)) / fit.alpha

    def total(log_n: float) -> float:
        n = np.exp(log_n)
        return np.log(6 * n * tokens_for_loss(fit, n, target_loss) + 2 * n * inference_tokens)

    res = minimize_scalar(total, bounds=(log_nmin + 1e-9, log_nmin + 40), method="bounded",
                          options=dict(xatol=1e-10))
    if not res.success or not np.isfinite(res.fun):
        raise FitError(f"inference-aware optimum did not converge: {res.message}")
    n = float(np.exp(res.x))
    d = tokens_for_loss(fit, n, target_loss)
    return InferenceOptimum(n=n, d_train=d, train_flops=6 * n * d, inference_flops=2 * n * inference_tokens)
