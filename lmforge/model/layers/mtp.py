"""Multi-token prediction: besides token t+1, predict t+2 .. t+1+D (ModelConfig.mtp).

sequential  DeepSeek-V3 §2.2 (eq. 21-25): module k keeps the causal chain. Its input at position i is
            h'_i = W_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))], then one Transformer block and the
            shared output head predict t_{i+k+1}. h^0 is the trunk's last hidden state.
parallel    Gloeckle et al. 2024: D independent one-block heads on the shared trunk; head k predicts
            t_{i+k+1}. Both share the token embedding and the output head with the main model.

`heads(trunk_hidden, input_ids, embed, rope, doc_ids)` returns D hidden-state tensors; depth k (1-based) has
T-k positions for 'sequential' (it needs t_{i+k}) and T for 'parallel'. The caller applies the final norm
and head. Extra predictions feed speculative decoding (draft tokens) or an auxiliary training loss.

The loss reads the main next-token targets (B, T), targets[i] = t_{i+1}, -100 = none: depth k's target at
position i is t_{i+k+1} = targets[i+k], so a target the main loss ignores (padding, prompt tokens) is ignored
at every depth. In packed rows (doc_ids) the MTP blocks attend within documents as the trunk does, and
position i has no depth-k target where i+k lies in another document.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.layers.block import Block
from lmforge.model.layers.norm import RMSNorm, model_norm
from lmforge.model.meta import AttnMetadata


def next_token_targets(input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) targets[i] = input_ids[i+1]; -100 at the last position and where the next token starts another
    document (the MTP loss's targets where the caller gives none)."""
    targets = F.pad(input_ids[:, 1:], (0, 1), value=-100)
    if doc_ids is not None:
        targets[:, :-1].masked_fill_(doc_ids[:, 1:] != doc_ids[:, :-1], -100)
    return targets


def depth_targets(targets: torch.Tensor, k: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T-k) depth k's targets: position i predicts t_{i+k+1} = targets[i+k], -100 where the main
    targets ignore it or i+k lies in another document than i."""
    out = targets[:, k:]
    return out if doc_ids is None else out.masked_fill(doc_ids[:, k:] != doc_ids[:, :-k], -100)


def _doc_meta(doc_ids: torch.Tensor | None, n: int) -> AttnMetadata | None:
    """Packed-row metadata of the first n positions (attention within documents), None for plain rows."""
    return None if doc_ids is None else AttnMetadata.packed(doc_ids[:, :n])


class MTPModule(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.e_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg, cfg.n_layers - 1)

    def forward(self, h: torch.Tensor, emb_next: torch.Tensor, rope, meta: AttnMetadata | None = None
                ) -> torch.Tensor:
        x = self.proj(torch.cat((self.h_norm(h), self.e_norm(emb_next)), dim=-1))
        return self.block(x, rope, "causal", None, meta)


class MTP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kind, self.depth, self.loss_weight = cfg.mtp.kind, cfg.mtp.depth, cfg.mtp.loss_weight
        if self.kind == "sequential":
            self.modules_ = nn.ModuleList(MTPModule(cfg) for _ in range(self.depth))
        else:
            self.modules_ = nn.ModuleList(Block(cfg, cfg.n_layers - 1) for _ in range(self.depth))
        # each depth's own final norm before the shared head (DeepSeek-V3's shared_head.norm)
        self.norms = nn.ModuleList(model_norm(cfg) for _ in range(self.depth))

    def heads(self, h: torch.Tensor, input_ids: torch.Tensor, embed, rope, doc_ids: torch.Tensor | None = None
              ) -> list[torch.Tensor]:
        """h (B, T, d) trunk output -> D hidden states; rope: (cos, sin) for positions 0..T-1 or None;
        doc_ids (B, T): packed rows' documents (the trunk's meta.doc_ids), None = one document per row."""
        out, prev = [], h
        T = h.shape[1]
        for k, mod in enumerate(self.modules_, start=1):
            if self.kind == "parallel":
                out.append(self.norms[k - 1](mod(h, rope, "causal", None, _doc_meta(doc_ids, T))))
                continue
            if T - k <= 0:
                break
            r = None if rope is None else (rope[0][:, : T - k], rope[1][:, : T - k])
            prev = mod(prev[:, : T - k], embed(input_ids[:, k:]), r, _doc_meta(doc_ids, T - k))
            out.append(self.norms[k - 1](prev))
        return out

    def loss(self, logits: list[torch.Tensor], targets: torch.Tensor, doc_ids: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Mean over depths of the cross-entropy of depth k's prediction of t_{i+k+1} = targets[i+k] (module
        docstring), times loss_weight (DeepSeek-V3 eq. 25: λ/D Σ_k L_k). A depth none of whose targets count
        (rows of at most k+1 tokens) adds no term and is left out of the mean; no host sync decides it."""
        total = logits[0].new_zeros((), dtype=torch.float32)
        depths = logits[0].new_zeros((), dtype=torch.float32)  # depths with at least one target
        for k, lg in enumerate(logits, start=1):
            tgt = depth_targets(targets, k, doc_ids).reshape(-1)
            if not len(tgt):
                continue
            n = (tgt != -100).sum()
            nll = F.cross_entropy(lg[:, : targets.shape[1] - k].reshape(-1, lg.shape[-1]).float(), tgt,
                                  ignore_index=-100, reduction="sum")
            total = total + nll / n.clamp(min=1)
            depths = depths + (n > 0).float()
        return self.loss_weight * total / depths.clamp(min=1)
