"""Causal self-attention with MHA / GQA / MQA (n_kv_heads), optional QK-norm (Dehghani et al. 2023),
attention-logit soft-capping (Gemma 2), RoPE, and a KV cache.

Two implementations compute the same function:
  sdpa  torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels)
  math  the plain formula softmax(q kᵀ / sqrt(d) + mask) v in fp32 - the reference
Masks are either the string "causal" (query i sees keys <= i), None (every key visible: one-token
decode), or a bool tensor broadcastable to (B, H, T, S), True = attend.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.layers.norm import RMSNorm
from lmforge.model.layers.rope import apply_rope

Mask = torch.Tensor | str | None


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *, scale: float,
                   softcap: float = 0.0, dropout_p: float = 0.0) -> torch.Tensor:
    """Reference attention. q (B, H, T, hd); k, v (B, KV, S, hd) with H a multiple of KV."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)  # (B, H, S, hd): each kv head serves `rep` query heads
    v = v.repeat_interleave(rep, dim=1)
    s = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, T, S)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if isinstance(mask, str):
        T, S = s.shape[-2:]
        # query i sits at absolute position S - T + i and sees keys at positions <= that
        allowed = torch.ones(T, S, dtype=torch.bool, device=s.device).tril(diagonal=S - T)
        s = s.masked_fill(~allowed, float("-inf"))
    elif mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return (p @ v.float()).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *, scale: float,
              softcap: float = 0.0, dropout_p: float = 0.0, impl: str = "sdpa") -> torch.Tensor:
    if impl == "math" or softcap > 0:  # SDPA has no soft-capping: use the reference formula
        return math_attention(q, k, v, mask, scale=scale, softcap=softcap, dropout_p=dropout_p)
    causal = isinstance(mask, str)
    if causal and q.shape[2] != k.shape[2]:  # SDPA's is_causal aligns top-left; we need bottom-right
        T, S = q.shape[2], k.shape[2]
        mask, causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T), False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if causal else mask, is_causal=causal, dropout_p=dropout_p, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.hd
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.hd, bias=cfg.bias)
        self.wk = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.bias)
        self.wv = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.bias)
        self.wo = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=cfg.bias)
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.rope_layout = cfg.rope_layout
        self.softcap, self.impl, self.dropout = cfg.attn_softcap, cfg.attn_impl, cfg.dropout
        self.scale = 1.0 / math.sqrt(self.hd)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: Mask,
                cache=None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, KV, T, hd)
        v = self.wv(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope, self.rope_layout), apply_rope(k, *rope, self.rope_layout)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, hd): all keys so far
        out = attention(q, k, v, mask, scale=self.scale, softcap=self.softcap,
                        dropout_p=self.dropout if self.training else 0.0, impl=self.impl)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)))
