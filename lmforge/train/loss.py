"""The language-modelling loss: mean next-token cross-entropy, plus PaLM's z-loss
z · mean(logsumexp(logits)²) (Chowdhery et al. 2022, sec. 5), which keeps the softmax normaliser near
1 and the logits from drifting. `LMObjective` is pretraining's Objective (lmforge.train.objective):
this loss plus the model's own auxiliary losses (MoE balancing and router z-losses, MTP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.train.objective import Stateless


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0, ignore_index: int = -100
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), targets (B, T) -> (loss to optimise, plain cross-entropy), both scalars."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    tgt = targets.reshape(-1)
    ce = F.cross_entropy(flat, tgt, ignore_index=ignore_index)
    if z_loss <= 0:
        return ce, ce
    keep = tgt != ignore_index
    # over the counted positions, as a masked sum (flat[keep] has a data-dependent shape: a graph break)
    lse = torch.logsumexp(flat, dim=-1)
    return ce + z_loss * torch.where(keep, lse.square(), 0).sum() / keep.sum(), ce


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (B, T), in nats."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           reduction="none").view(targets.shape)


def summed_nats(losses: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) per-token nats -> (2,) float64: their sum, and their sum over the targets whose id `counted` ((V,)
    bools) marks (ignored targets, < 0, never; None: all). Bits per byte divides the second by the bytes of the
    counted tokens: a special token (an end-of-text separator) stands for no bytes, so its loss is left out of
    the numerator too, as nanochat's evaluate_bpb does; val_loss keeps every token."""
    losses = losses.double()
    if counted is None:
        return losses.sum().repeat(2)
    keep = counted.to(targets.device)[targets.clamp(min=0)] & (targets >= 0)
    return torch.stack([losses.sum(), torch.where(keep, losses, 0).sum()])


def with_aux(model: torch.nn.Module, loss: torch.Tensor, ce: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(loss + the model's aux losses, metrics) after a forward: MoE balancing and MTP losses when the model
    has them (aux_loss), and an MoE model's expert loads and dropped tokens (moe_stats) to watch balancing."""
    got = model_aux(model)
    if got is None:
        return loss, {"loss": ce}
    aux, stats = got
    return loss + aux, {"loss": ce, "aux_loss": aux.detach(), **stats}


def model_aux(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """(aux loss, MoE stats) of the model's last forward - model.aux_loss() and model.moe_stats() where it has
    them -, or None for a model without aux losses (read by with_aux and lmforge.align.logprobs.ModelAux)."""
    aux_fn = getattr(model, "aux_loss", None)
    aux = aux_fn() if callable(aux_fn) else None
    if aux is None:
        return None
    stats_fn = getattr(model, "moe_stats", None)
    return aux, stats_fn() if callable(stats_fn) else {}


class LMObjective(Stateless):
    """Next-token cross-entropy (+ z-loss) of model(input_ids) against targets, plus model.aux_loss()
    when the model has one. Metrics: loss = the plain cross-entropy (what the golden curve and the
    validation loss measure), aux_loss when there is one, and an MoE model's moe_stats() (expert loads,
    dropped fraction, the balancing part of aux_loss). A model with MTP heads gets the targets too, so its
    MTP loss skips what the main loss skips. Stateless."""

    def __init__(self, z_loss: float = 0.0):
        self.z_loss = z_loss

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mtp = getattr(model, "mtp", None) is not None
        logits = model(batch["input_ids"], targets=batch["targets"]) if mtp else model(batch["input_ids"])
        loss, ce = lm_loss(logits, batch["targets"], self.z_loss)
        return with_aux(model, loss, ce)

    def batch_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """The trained tokens (targets other than -100) the loss averages over: the Trainer weighs accumulated
        micro-batches by them, so grad_accum micro-batches give the gradient of one batch of all their rows."""
        return int((batch["targets"] != -100).sum())
