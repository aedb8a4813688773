"""Token-level knowledge distillation: match the teacher's next-token distribution at every response token.

    obj = DistillObjective(DistillConfig(divergence="forward_kl", temperature=2.0), teacher=big_model)

Divergences per position, with p_T = softmax(teacher / tau), p_S = softmax(student / tau), summed over the
vocabulary and averaged over the counted tokens (loss_mask, targets != -100):
  forward_kl   KL(p_T || p_S)                        (Hinton et al. 2015; mode-covering)
  reverse_kl   KL(p_S || p_T)                        (MiniLLM, Gu et al. 2024; mode-seeking)
  jsd          beta KL(p_T || M) + (1-beta) KL(p_S || M),  M = beta p_T + (1-beta) p_S
               (GKD's generalised JSD, Agarwal et al. 2024, eq. 1; beta -> 0 / 1 is forward / reverse KL
               up to scale, so those endpoints are plain KLs as in TRL)
No tau^2 factor (as TRL's GKD): with tau > 1 scale the learning rate or `weight` instead.
`sft_weight` > 0 adds that much of the usual cross-entropy on the data's own targets. A student with MoE or MTP
layers gets its auxiliary losses added (lmforge.align.logprobs.ModelAux; never the teacher's): metrics loss
(the distillation loss alone), aux_loss, moe/*.

Batch keys: input_ids / targets / loss_mask (B, T), optional teacher_logits (B, T, V) precomputed.
Sequence-level distillation (training on the teacher's generations) is data: lmforge.align.sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.align.dpo import ReferenceHolder
from lmforge.align.frozen import Frozen, held
from lmforge.align.logprobs import ModelAux, masked_mean, model_logits, response_mask, token_logprobs
from lmforge.config import coerce_fields
from lmforge.errors import ConfigError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """(..., V) log-probs -> (...) KL(p || q) = sum p (log p - log q) (torch's kl_div takes q first)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "forward_kl",
                     beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """(B, T, V) logits -> (B, T) divergence per position, in fp32. Logits may be -inf (a top-k teacher's):
    their log-probs are clamped to the lowest float, so p log p = 0 there (not 0 * -inf = NaN, which would
    also poison the mean at masked positions) and gradients stay finite (p_S - p_T for forward KL); one truly
    infinite (reverse KL onto a token the teacher rules out) comes out huge (~1e38) rather than inf."""
    lowest = torch.finfo(torch.float32).min
    log_s = F.log_softmax(student_logits.float() / temperature, -1).clamp(min=lowest)
    log_t = F.log_softmax(teacher_logits.float() / temperature, -1).clamp(min=lowest)
    if kind == "forward_kl":
        return _kl(log_t, log_s)
    if kind == "reverse_kl":
        return _kl(log_s, log_t)
    # log M = logsumexp(log beta + log p_T, log(1-beta) + log p_S)
    log_m = torch.logaddexp(log_t + torch.log(torch.tensor(beta)), log_s + torch.log1p(torch.tensor(-beta)))
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    divergence: str = "forward_kl"
    """forward_kl | reverse_kl | jsd"""
    beta: float = 0.5
    """jsd interpolation (0 < beta < 1)"""
    temperature: float = 1.0
    weight: float = 1.0
    """weight of the divergence term"""
    sft_weight: float = 0.0
    """weight of the cross-entropy on the data's targets (0 = pure distillation)"""
    teacher_device: str | None = None

    def __post_init__(self):
        coerce_fields(self, "distill")  # each field's type, named when wrong
        if self.divergence not in DIVERGENCES:
            raise ConfigError(f"divergence={self.divergence!r} is not one of {DIVERGENCES}")
        if self.divergence == "jsd" and not 0 < self.beta < 1:
            raise ConfigError(f"beta={self.beta} must be in (0, 1) for jsd; use forward_kl (beta 0) or "
                              f"reverse_kl (beta 1) for the endpoints")
        if not self.temperature > 0:
            raise ConfigError(f"temperature={self.temperature} must be > 0, e.g. 1.0 or 2.0")
        if self.weight < 0 or self.sft_weight < 0 or self.weight + self.sft_weight == 0:
            raise ConfigError(f"weight={self.weight} and sft_weight={self.sft_weight} must be >= 0, not both 0")


class DistillObjective(ReferenceHolder):
    Config = DistillConfig

    def __init__(self, cfg: DistillConfig | None = None, *, teacher: torch.nn.Module | Frozen | None = None,
                 teacher_path: str | None = None):
        self.cfg = cfg = cfg or DistillConfig()
        self.ref = held(teacher, role="teacher", device=cfg.teacher_device, path=teacher_path)

    def batch_weight(self, batch: dict) -> int:
        """The response tokens the loss averages over: accumulated micro-batches are weighed by them, so
        grad_accum x B rows equal one batch of grad_accum * B rows (as TRL's token-level normalisation)."""
        return int(response_mask(batch).sum())

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check(model)
        cfg = self.cfg
        aux = ModelAux(model)  # read at the student's forward, before a teacher (a BaseReference) reruns its layers
        logits = model_logits(model, batch, aux=aux)
        teacher = batch.get("teacher_logits")
        if teacher is None:
            if self.ref is None:
                raise ConfigError("DistillObjective needs teacher= or precomputed teacher_logits in the batch")
            teacher = self.ref.logits(batch)
        if teacher.shape[-1] != logits.shape[-1]:
            raise ConfigError(f"teacher logits have vocab {teacher.shape[-1]} but the student's have "
                              f"{logits.shape[-1]}; distil between models sharing one tokenizer")
        mask = response_mask(batch)
        div = masked_mean(token_divergence(logits, teacher, kind=cfg.divergence, beta=cfg.beta,
                                           temperature=cfg.temperature), mask)
        ce = -masked_mean(token_logprobs(logits, batch["targets"]), mask)
        loss = cfg.weight * div + (cfg.sft_weight * ce if cfg.sft_weight else 0.0)
        return aux.add(loss, {"distill/divergence": div.detach(), "distill/ce": ce.detach()})
