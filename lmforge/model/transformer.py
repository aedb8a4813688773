"""The decoder-only Transformer LM: GPT-2- and Llama-style models from one ModelConfig.

    input_ids (B, T) -> token embedding [+ absolute positions] -> n_layers x Block -> final norm
    -> lm_head -> logits (B, T, V)

Block (pre-norm):  x += attn(norm1(x)); x += mlp(norm2(x))
Block (post-norm): x = norm1(x + attn(x)); x = norm2(x + mlp(x))    (Vaswani et al.; Xiong et al. 2020)
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig
from lmforge.model.layers.attention import Attention
from lmforge.model.layers.mlp import MLP
from lmforge.model.layers.norm import build_norm
from lmforge.model.layers.position import LearnedPositions, SinusoidalPositions
from lmforge.model.layers.rope import RotaryEmbedding

# Small registries so configs stay plain strings: (cfg, layer_idx) -> module
ATTENTION: dict[str, Callable[[ModelConfig, int], nn.Module]] = {"mha": Attention}
MLPS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "dense": lambda cfg, i: MLP(cfg.d_model, cfg.ff, cfg.activation, cfg.bias, cfg.dropout)}


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.norm1 = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = ATTENTION["mha"](cfg, layer_idx)
        self.norm2 = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.mlp = MLPS["dense"](cfg, layer_idx)

    def forward(self, x: torch.Tensor, rope, mask, cache=None) -> torch.Tensor:
        if self.post_norm:
            x = self.norm1(x + self.attn(x, rope, mask, cache))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x), rope, mask, cache)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ConfigError(f"Transformer needs a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = {"learned": LearnedPositions, "sinusoidal": SinusoidalPositions}.get(cfg.pos_emb)
        self.pos_emb = self.pos_emb(cfg.max_seq_len, cfg.d_model) if self.pos_emb else None
        self.rope = RotaryEmbedding(cfg.hd, cfg.rope_theta, cfg.rope_layout) if cfg.pos_emb == "rope" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.final_norm else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.reset_parameters()

    # --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) for matrices; residual output projections (attn.wo, mlp.down) get
        init_std / sqrt(2·n_layers) so the residual stream's variance does not grow with depth (GPT-2)."""
        cfg = self.cfg
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_residual_init else cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                is_resid = name.endswith(("attn.wo.weight", "mlp.down.weight"))
                nn.init.normal_(p, 0.0, resid_std if is_resid else cfg.init_std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.ones_(p)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None
                ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). positions (B, T) or (T,) default to
        cache.length + arange(T); `cache` (lmforge.model.cache) is written in place."""
        B, T = input_ids.shape
        offset = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
        elif positions.dim() == 1:
            positions = positions.expand(B, T)
        x = self.tok_emb(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions).to(x.dtype)
        x = self.drop(x)
        rope = self.rope.cos_sin(positions) if self.rope is not None else None
        mask = cache.mask(T, input_ids.device) if cache is not None else "causal"
        for block in self.blocks:
            x = block(x, rope, mask, cache)
        if cache is not None:
            cache.advance(T)
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.lm_head(x)
        if self.cfg.logit_softcap > 0:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)
        return logits

    # accounting ----------------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without token/position embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if isinstance(self.pos_emb, LearnedPositions):
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token at context `seq_len`: 2 per multiply-add of every Linear (lm_head
        included, tied or not) plus attention scores and their weighted sum, 2·2·H·hd·seq_len per layer
        (the full, un-halved causal count of PaLM's appendix B and nanochat). Training = 3x forward
        (backward costs twice the forward). Norms, biases and softmax are ignored (< 1%)."""
        linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attn = sum(4 * b.attn.n_heads * b.attn.hd * seq_len for b in self.blocks)
        forward = 2 * linear + attn
        return float(3 * forward if training else forward)

    def param_roles(self) -> dict[str, str]:
        """name -> 'embedding' | 'head' | 'matrix' | 'vector', for optimizers' parameter-group rules."""
        roles = {}
        for name, p in self.named_parameters():
            if name.startswith(("tok_emb.", "pos_emb.")):
                roles[name] = "embedding"
            elif name.startswith("lm_head."):
                roles[name] = "head"
            else:
                roles[name] = "matrix" if p.dim() >= 2 else "vector"
        return roles
