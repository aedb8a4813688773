"""ORPO (Hong et al. 2024): SFT on the chosen completion plus an odds-ratio term, no reference model.

    loss = NLL(chosen tokens, mean over tokens) + lambda * mean_b[-log sigmoid(log odds_c - log odds_r)]

Batch keys as DPO (chosen_* / rejected_*). The odds use per-token MEAN log-probs (the paper's eq. 4 on
length-normalised likelihoods, as TRL). Metrics as TRL's ORPOTrainer: rewards = lambda * mean log-prob,
nll_loss, log_odds_ratio (mean log sigmoid), log_odds_chosen (mean log odds ratio). An MoE or MTP model's
auxiliary losses are added (lmforge.align.logprobs.ModelAux): metrics loss (ORPO's alone), aux_loss, moe/*.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.align.dpo import PAIR
from lmforge.align.config import ORPOConfig
from lmforge.align.logprobs import ModelAux, batch_logps, masked_mean
from lmforge.align.losses import orpo_log_odds, preference_metrics
from lmforge.train.objective import Stateless


class ORPOObjective(Stateless):
    Config = ORPOConfig

    def __init__(self, cfg: ORPOConfig | None = None):
        self.cfg = cfg or ORPOConfig()

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lam = self.cfg.beta
        aux = ModelAux(model)
        (avg_c, avg_r), (tok_c, _), (mask_c, _) = batch_logps(model, batch, PAIR, average=True, aux=aux)
        nll = -masked_mean(tok_c, mask_c)
        log_odds = orpo_log_odds(avg_c, avg_r)
        ratio = F.logsigmoid(log_odds)
        metrics = preference_metrics(lam * avg_c, lam * avg_r, avg_c, avg_r)
        metrics.update({"nll_loss": nll.detach(), "log_odds_ratio": ratio.detach().mean(),
                        "log_odds_chosen": log_odds.detach().mean()})
        return aux.add(nll - lam * ratio.mean(), metrics)
