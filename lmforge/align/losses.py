"""Preference and reward losses as pure functions of sequence log-probs (or scalar rewards).

Every function takes (B,) tensors and returns per-example losses (B,) (the objective averages them), so
each can be checked against its paper's equation and against TRL on the same inputs, loss and gradients.
Notation: pi_c, pi_r = policy log p(chosen|x), log p(rejected|x); ref_c, ref_r the reference's.

  DPO  (Rafailov et al. 2023, eq. 7)    -log sigmoid(beta * d),  d = (pi_c - ref_c) - (pi_r - ref_r)
  cDPO (label smoothing eps)            -(1-eps) log sigmoid(beta d) - eps log sigmoid(-beta d)
  IPO  (Azar et al. 2023, eq. 17)       (d - 1/(2 beta))^2 on per-token MEAN log-probs (TRL, confirmed
                                        with the IPO authors: the paper's results use the normalised form)
  SimPO (Meng et al. 2024, eq. 6)       -log sigmoid(beta (avg_c - avg_r) - gamma), no reference
  KTO  (Ethayarajh et al. 2024, eq. 7)  desirable:   w_d (1 - sigmoid(beta (r - z0)))
                                        undesirable: w_u (1 - sigmoid(beta (z0 - r))),  r = pi - ref,
                                        z0 = max(0, mean KL estimate), no gradient through z0
  ORPO (Hong et al. 2024, eq. 6-7)      NLL(chosen) - lambda * log sigmoid(log odds_c - log odds_r),
                                        log odds(y) = log p - log(1 - p) on per-token MEAN log-probs
  Bradley-Terry reward model            -log sigmoid(r_c - r_r - margin)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmforge.align.config import PAIR_LOSSES  # noqa: F401 (DPOConfig's table, re-exported here)


def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, *,
             beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (conservative DPO when label_smoothing > 0: the label is flipped with probability eps)."""
    d = (pi_c - ref_c) - (pi_r - ref_r)
    return -(1 - label_smoothing) * F.logsigmoid(beta * d) - label_smoothing * F.logsigmoid(-beta * d)


def ipo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, *,
             beta: float) -> torch.Tensor:
    """IPO: regress the log-ratio margin onto 1/(2 beta) (beta is the paper's tau). Pass MEAN log-probs."""
    d = (pi_c - ref_c) - (pi_r - ref_r)
    return (d - 1 / (2 * beta)) ** 2


def simpo_loss(avg_c: torch.Tensor, avg_r: torch.Tensor, *, beta: float, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO: length-normalised log-probs are the implicit reward; gamma is the target reward margin."""
    z = beta * (avg_c - avg_r) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, mean=torch.mean) -> torch.Tensor:
    """KTO's reference point z0: the batch-mean log-ratio on mismatched (prompt, completion) pairs,
    clamped at 0 and detached (the paper treats it as a constant; TRL does the same). `mean` reduces the
    rows (lmforge.align.kto.mean_over_ranks: over every data-parallel rank's rows)."""
    return mean(kl_logps - ref_kl_logps).detach().clamp(min=0)


def kto_loss(pi: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float, *,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """KTO on unpaired examples: desirable (B,) bool says which completions are good."""
    r = pi - ref
    good = desirable_weight * (1 - torch.sigmoid(beta * (r - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - r)))
    return torch.where(desirable.bool(), good, bad)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(avg_c: torch.Tensor, avg_r: torch.Tensor) -> torch.Tensor:
    """log(odds_c / odds_r), odds(y) = p / (1 - p) with p = exp(mean token log-prob)."""
    avg_c, avg_r = avg_c.float(), avg_r.float()
    return (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))


def orpo_ratio_loss(avg_c: torch.Tensor, avg_r: torch.Tensor) -> torch.Tensor:
    """ORPO's odds-ratio term -log sigmoid(log odds ratio) per example (weighted by lambda outside)."""
    return -F.logsigmoid(orpo_log_odds(avg_c, avg_r))


def bradley_terry_loss(r_c: torch.Tensor, r_r: torch.Tensor, margin: torch.Tensor | float | None = None
                       ) -> torch.Tensor:
    """Pairwise reward-model loss; an optional margin (B,) asks for a larger gap on clearer pairs
    (Llama 2, Touvron et al. 2023, eq. 2)."""
    d = r_c - r_r
    return -F.logsigmoid(d - margin if margin is not None else d)


def preference_metrics(rewards_c: torch.Tensor, rewards_r: torch.Tensor, logps_c: torch.Tensor,
                       logps_r: torch.Tensor) -> dict[str, torch.Tensor]:
    """The quantities TRL logs for preference objectives, as 0-d tensors (no host sync)."""
    rc, rr = rewards_c.detach(), rewards_r.detach()
    return {"rewards/chosen": rc.mean(), "rewards/rejected": rr.mean(), "rewards/margins": (rc - rr).mean(),
            "rewards/accuracies": (rc > rr).float().mean(),
            "logps/chosen": logps_c.detach().mean(), "logps/rejected": logps_r.detach().mean()}
