"""The Transformer block and its variants (ModelConfig.norm_position / block):

  pre-norm   x += attn(norm1(x));  x += mlp(norm2(x))                      (GPT-2, Llama)
  post-norm  x = norm1(x + attn(x)); x = norm2(x + mlp(x))                  (Vaswani et al.; Xiong et al. 2020)
  sandwich   x += post1(attn(norm1(x))); x += post2(mlp(norm2(x)))          (Gemma 2; CogView)
  parallel   x += attn(norm1(x)) + mlp(norm1(x))                            (GPT-J, PaLM: one shared norm)

Attention ('mha' | 'mla') and MLP ('dense' | 'moe') come from small registries keyed by config strings.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from lmforge.model.layers.attention import Attention
from lmforge.model.layers.mla import MLA
from lmforge.model.layers.mlp import MLP
from lmforge.model.layers.moe import MoE
from lmforge.model.layers.norm import model_norm

# (cfg, layer_idx) -> module
ATTENTION: dict[str, Callable[..., nn.Module]] = {"mha": Attention, "mla": MLA}
MLPS: dict[str, Callable[..., nn.Module]] = {
    "dense": lambda cfg, i: MLP(cfg.d_model, cfg.ff, cfg.activation, cfg.bias, cfg.dropout),
    "moe": MoE,
}


class Block(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.kind = "parallel" if cfg.block == "parallel" else cfg.norm_position
        norm = lambda: model_norm(cfg)  # noqa: E731
        self.norm1 = norm()
        self.attn = ATTENTION[cfg.attention](cfg, layer_idx)
        self.norm2 = norm() if self.kind != "parallel" else None
        self.mlp = MLPS["moe" if cfg.is_moe_layer(layer_idx) else "dense"](cfg, layer_idx)
        sandwich = self.kind == "sandwich"
        self.post_attn_norm = norm() if sandwich else None
        self.post_mlp_norm = norm() if sandwich else None

    def forward(self, x: torch.Tensor, rope, mask=None, cache=None, meta=None) -> torch.Tensor:
        """cache / meta go to attention (lmforge.model.cache); mask is only "causal"/None (old callers)."""
        if self.kind == "post":
            x = self.norm1(x + self.attn(x, rope, mask, cache, meta))
            return self.norm2(x + self.mlp(x))
        if self.kind == "parallel":
            h = self.norm1(x)
            return x + self.attn(h, rope, mask, cache, meta) + self.mlp(h)
        a = self.attn(self.norm1(x), rope, mask, cache, meta)
        x = x + (self.post_attn_norm(a) if self.post_attn_norm is not None else a)
        m = self.mlp(self.norm2(x))
        return x + (self.post_mlp_norm(m) if self.post_mlp_norm is not None else m)
