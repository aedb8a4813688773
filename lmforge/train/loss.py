"""The language-modelling loss: mean next-token cross-entropy, plus PaLM's z-loss
z · mean(logsumexp(logits)²) (Chowdhery et al. 2022, sec. 5), which keeps the softmax normaliser near
1 and the logits from drifting."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0, ignore_index: int = -100
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, T, V), targets (B, T) -> (loss to optimise, plain cross-entropy), both scalars."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    tgt = targets.reshape(-1)
    ce = F.cross_entropy(flat, tgt, ignore_index=ignore_index)
    if z_loss <= 0:
        return ce, ce
    keep = tgt != ignore_index
    lse = torch.logsumexp(flat[keep], dim=-1)
    return ce + z_loss * lse.square().mean(), ce


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (B, T), in nats."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           reduction="none").view(targets.shape)
