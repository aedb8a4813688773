"""Multi-token prediction: besides token t+1, predict t+2 .. t+1+D (ModelConfig.mtp).

sequential  DeepSeek-V3 §2.2 (eq. 21-25): module k keeps the causal chain. Its input at position i is
            h'_i = W_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))], then one Transformer block and the
            shared output head predict t_{i+k+1}. h^0 is the trunk's last hidden state.
parallel    Gloeckle et al. 2024: D independent one-block heads on the shared trunk; head k predicts
            t_{i+k+1}. Both share the token embedding and the output head with the main model.

`heads(trunk_hidden, input_ids, embed)` returns D hidden-state tensors; depth k (1-based) has T-k
positions for 'sequential' (it needs t_{i+k}) and T for 'parallel'. The caller applies the final norm
and head. Extra predictions feed speculative decoding (draft tokens) or an auxiliary training loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.layers.block import Block
from lmforge.model.layers.norm import RMSNorm, build_norm


class MTPModule(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.h_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.e_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg, cfg.n_layers - 1)

    def forward(self, h: torch.Tensor, emb_next: torch.Tensor, rope) -> torch.Tensor:
        x = self.proj(torch.cat((self.h_norm(h), self.e_norm(emb_next)), dim=-1))
        return self.block(x, rope, "causal")


class MTP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.kind, self.depth, self.loss_weight = cfg.mtp.kind, cfg.mtp.depth, cfg.mtp.loss_weight
        if self.kind == "sequential":
            self.modules_ = nn.ModuleList(MTPModule(cfg) for _ in range(self.depth))
        else:
            self.modules_ = nn.ModuleList(Block(cfg, cfg.n_layers - 1) for _ in range(self.depth))
        # each depth's own final norm before the shared head (DeepSeek-V3's shared_head.norm)
        self.norms = nn.ModuleList(build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) for _ in range(self.depth))

    def heads(self, h: torch.Tensor, input_ids: torch.Tensor, embed, rope) -> list[torch.Tensor]:
        """h (B, T, d) trunk output -> D hidden states; rope: (cos, sin) for positions 0..T-1 or None."""
        out, prev = [], h
        T = h.shape[1]
        for k, mod in enumerate(self.modules_, start=1):
            if self.kind == "parallel":
                out.append(self.norms[k - 1](mod(h, rope, "causal")))
                continue
            if T - k <= 0:
                break
            r = None if rope is None else (rope[0][:, : T - k], rope[1][:, : T - k])
            prev = mod(prev[:, : T - k], embed(input_ids[:, k:]), r)
            out.append(self.norms[k - 1](prev))
        return out

    def loss(self, logits: list[torch.Tensor], input_ids: torch.Tensor) -> torch.Tensor:
        """Mean over depths of the cross-entropy of depth k's prediction of t_{i+k+1} (the targets that lie
        inside `input_ids`), times loss_weight (DeepSeek-V3 eq. 25: λ/D Σ_k L_k)."""
        total = logits[0].new_zeros((), dtype=torch.float32)
        for k, lg in enumerate(logits, start=1):
            n = input_ids.shape[1] - k - 1  # positions whose target t_{i+k+1} is known
            if n <= 0:
                continue
            total = total + F.cross_entropy(lg[:, :n].reshape(-1, lg.shape[-1]).float(),
                                            input_ids[:, k + 1: k + 1 + n].reshape(-1))
        return self.loss_weight * total / max(len(logits), 1)
