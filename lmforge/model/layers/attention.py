"""Causal self-attention with MHA / GQA / MQA (n_kv_heads), optional QK-norm (Dehghani et al. 2023),
attention-logit soft-capping (Gemma 2), sliding windows (Mistral; alternating with full layers in
Gemma 2 / gpt-oss), learned attention sinks (gpt-oss), RoPE, and a KV cache.

Two implementations compute the same function:
  sdpa  torch.nn.functional.scaled_dot_product_attention (flash / memory-efficient kernels)
  math  the plain formula softmax(q kᵀ / sqrt(d) + mask) v in fp32 - the reference
Masks are either the string "causal" (query i sees keys <= i, bottom-right aligned: the queries are
the last T of the S keys), None (every key visible: one-token decode), or a bool tensor broadcastable to
(B, H, T, S), True = attend. Attention layers never build masks: they hand q, k, v and their `AttnSpec`
to the cache (`cache.attend`, lmforge.model.cache), the one place per cache kind that knows where its
queries and keys sit and turns that, the window and the metadata into a mask with `visible` (the one
rule: a query sees keys at positions <= its own, within the window), narrowed by `tree_visible` to a
token's ancestors when AttnMetadata.tree_parents lays candidate trees over the new tokens.
With attn_impl="triton", cache-free attention (training) runs the Triton FlashAttention-2 kernel
(lmforge.kernels.flash_attention), packed rows in its varlen form (cu_seqlens from meta.documents()).
Attention sinks (gpt-oss) add one learned logit per head to every softmax denominator, letting a head
put weight on "nothing"; the sink column is dropped after the softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dataclasses import dataclass
from typing import Callable

from lmforge.errors import ConfigError
from lmforge.model.layers.fused import fuse_linears
from lmforge.model.layers.norm import RMSNorm
from lmforge.model.layers.rope import apply_rope
from lmforge.model.meta import tree_ancestors, tree_depths

Mask = torch.Tensor | str | None


@dataclass(frozen=True, eq=False)
class AttnSpec:
    """What a cache needs to know about one attention layer, built once per layer."""

    scale: float
    window: int = 0
    """keys at position <= query position - window are hidden (0 = full attention)"""
    softcap: float = 0.0
    sinks: torch.Tensor | None = None
    """(H,) learned sink logits (the layer's Parameter, so it follows .to() and load_state_dict)"""
    impl: str = "sdpa"
    dropout: float = 0.0


def check_softcap_and_window(name: str, softcap: float, window: int = 0) -> None:
    """Refuses a negative softcap or window in one line: attention caps and windows only where the value is > 0,
    so a negative one ran silently as no capping or no window."""
    if softcap < 0:
        raise ConfigError(f"{name}: softcap={softcap} must be >= 0 (0 = no capping)")
    if window < 0:
        raise ConfigError(f"{name}: window={window} must be >= 0 (0 = no window)")


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int = 0) -> torch.Tensor:
    """The one mask rule: a query at position p sees keys at positions j <= p, and j > p - window when
    window > 0. q_pos (..., T), k_pos (..., S) -> bool (..., T, S)."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    return (diff >= 0) & (diff < window) if window > 0 else diff >= 0


def tree_visible(parents: torch.Tensor, n_keys: int, window: int = 0) -> torch.Tensor:
    """`visible` for a tree of T new tokens (lmforge.model.meta: parents (..., T), -1 = the context) that
    are the last T of n_keys keys in slot order: a new token sees every context key and its ancestors
    (itself included), the window measured on positions context + depth. -> bool (..., T, n_keys)."""
    T = parents.shape[-1]
    ctx = n_keys - T
    depth = tree_depths(parents)
    k_pos = torch.cat((torch.arange(ctx, device=parents.device).expand(*parents.shape[:-1], ctx), ctx + depth), -1)
    related = torch.cat((torch.ones(*parents.shape, ctx, dtype=torch.bool, device=parents.device),
                         tree_ancestors(parents)), -1)
    return visible(ctx + depth, k_pos, window) & related


def window_mask(mask: Mask, T: int, S: int, window: int, device) -> torch.Tensor:
    """Combine `mask` with a sliding window for queries that are the LAST T of S contiguous keys (query i
    at position S-T+i); caches whose queries sit elsewhere must call `visible` with their positions."""
    allowed = visible(torch.arange(S - T, S, device=device), torch.arange(S, device=device), window)
    if mask is not None and not isinstance(mask, str):
        allowed = allowed & mask
    return allowed


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *, scale: float,
                   softcap: float = 0.0, dropout_p: float = 0.0, sinks: torch.Tensor | None = None,
                   probs_hook: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Reference attention. q (B, H, T, hd); k, v (B, KV, S, hd) with H a multiple of KV.
    probs_hook receives the attention probabilities (B, H, T, S) (KV policies such as H2O read them)."""
    check_softcap_and_window("math_attention", softcap)
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
    if sinks is not None:  # (H,) -> an extra column per head, dropped after the softmax
        sink = sinks.float().view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        p = torch.softmax(torch.cat((s, sink), dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    if probs_hook is not None:
        probs_hook(p)
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    return (p @ v.float()).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, *, scale: float,
              softcap: float = 0.0, dropout_p: float = 0.0, impl: str = "sdpa", sinks: torch.Tensor | None = None,
              probs_hook: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    check_softcap_and_window("attention", softcap)  # (SDPA's path below would take a negative one as no capping)
    if impl == "triton":  # a cache's attention (queries other than the keys): the kernel serves training
        impl = "sdpa"
    if impl == "math" or softcap > 0 or sinks is not None or probs_hook is not None:  # SDPA has none of these
        return math_attention(q, k, v, mask, scale=scale, softcap=softcap, dropout_p=dropout_p, sinks=sinks,
                              probs_hook=probs_hook)
    causal = isinstance(mask, str)
    if causal and q.shape[2] != k.shape[2]:  # SDPA's is_causal aligns top-left; we need bottom-right
        T, S = q.shape[2], k.shape[2]
        mask, causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T), False
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=None if causal else mask, is_causal=causal, dropout_p=dropout_p, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])


def attend_with(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, spec: AttnSpec,
                probs_hook: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """`attention` with a layer's spec: what every cache kind calls once it has its keys and mask."""
    return attention(q, k, v, mask, scale=spec.scale, softcap=spec.softcap, dropout_p=spec.dropout,
                     impl=spec.impl, sinks=spec.sinks, probs_hook=probs_hook)


class DenseAttention:
    """The cache-free kind (training, full recompute): each row's T tokens attend causally among
    themselves, within their own document when meta.doc_ids packs several (lmforge.model.meta), and
    within the layer's window. Stateless; `DENSE` is the one instance layers use when cache is None."""

    def mask(self, T: int, spec: AttnSpec, meta, device) -> Mask:
        mask = meta.doc_mask() if meta is not None else None
        if meta is not None and meta.tree_parents is not None:  # the window is measured on tree depths
            tree = meta.derived(("tree", T, spec.window),
                                lambda: tree_visible(meta.parents_for(T).to(device), T, spec.window)[:, None])
            return tree if mask is None else mask & tree
        if spec.window > 0 and T > spec.window:
            pos = torch.arange(T, device=device)  # keys and queries are the same T tokens
            win = visible(pos, pos, spec.window)
            mask = win if mask is None else mask & win
        return "causal" if mask is None else mask

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec, meta=None
               ) -> torch.Tensor:
        if spec.impl == "triton" and (meta is None or meta.tree_parents is None):
            # FlashAttention-2 in Triton takes the window and packed documents (cu_seqlens) itself
            from lmforge.kernels.flash_attention import flash_attention_for_model

            return flash_attention_for_model(q, k, v, "causal", scale=spec.scale, softcap=spec.softcap,
                                             window=spec.window, documents=None if meta is None else meta.documents(),
                                             dropout_p=spec.dropout, sinks=spec.sinks,
                                             doc_mask=None if meta is None else meta.doc_mask)
        return attend_with(q, k, v, self.mask(q.shape[2], spec, meta, q.device), spec)

    def attend_latent(self, layer: int, mla, q_nope, q_rope, c_kv, k_rope, spec: AttnSpec, meta=None):
        """MLA without a cache: per-head keys and values expanded from the latents (mla.naive)."""
        if spec.impl == "triton":  # (the kernel takes one head dim for q, k and v; MLA's values have their own)
            from lmforge.kernels.decode import fallback_notice

            fallback_notice("attn_impl='triton' runs the FlashAttention kernel on mha/gqa layers, not on MLA's; "
                            "using attn_impl='sdpa' for these calls")
        return mla.naive(q_nope, q_rope, c_kv, k_rope, self.mask(q_nope.shape[2], spec, meta, q_nope.device), spec)


DENSE = DenseAttention()


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.kv_heads, cfg.hd
        qkv_bias = cfg.has_qkv_bias
        self.wq = nn.Linear(cfg.d_model, self.n_heads * self.hd, bias=qkv_bias)
        self.wk = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=qkv_bias)
        self.wv = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=qkv_bias)
        self.wo = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=cfg.has_o_bias)
        self.wqkv: nn.Linear | None = None  # set by fuse(): q, k, v in one matmul
        self.qkv_sizes: list[int] = []
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.rope_layout = cfg.rope_layout
        # RoPE models: lmforge.kernels.training swaps in the Triton kernel (same arguments)
        self.rope_fn = apply_rope if cfg.pos_emb == "rope" else None
        self.softcap, self.impl, self.dropout = cfg.attn_softcap, cfg.attn_impl, cfg.dropout
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(self.hd)
        self.window = cfg.sliding_window if cfg.layer_type(layer_idx) == "sliding" else 0
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if cfg.attn_sinks else None
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self._build_specs()

    def _build_specs(self) -> None:
        kw = dict(scale=self.scale, window=self.window, softcap=self.softcap, sinks=self.sinks, impl=self.impl)
        self.spec, self.train_spec = AttnSpec(**kw), AttnSpec(**kw, dropout=self.dropout)

    def current_spec(self) -> AttnSpec:
        if self.spec.sinks is not self.sinks:  # the Parameter was replaced (load_state_dict(assign=True), ...)
            self._build_specs()
        return self.train_spec if self.training else self.spec

    def fuse(self) -> None:
        """Compute q, k, v with one matmul (lmforge.model.layers.fused); checkpoints keep wq/wk/wv."""
        if self.wqkv is None:
            self.qkv_sizes = fuse_linears(self, "wqkv", ("wq", "wk", "wv"))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: Mask = None,
                cache=None, meta=None) -> torch.Tensor:
        """mask: only "causal"/None (callers from before the cache seam); the cache builds the real mask."""
        check_legacy_mask(mask)
        B, T, _ = x.shape
        if self.wqkv is not None:
            q, k, v = self.wqkv(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k = q.view(B, T, self.n_heads, self.hd), k.view(B, T, self.n_kv, self.hd)
        if self.q_norm is not None:  # over head_dim, before the head transpose (no transposed-view copy)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, hd), (B, KV, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if rope is not None:
            q, k = self.rope_fn(q, *rope, self.rope_layout), self.rope_fn(k, *rope, self.rope_layout)
        out = (cache if cache is not None else DENSE).attend(self.layer_idx, q, k, v, self.current_spec(), meta)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd)))


def check_legacy_mask(mask) -> None:
    if mask is not None and mask != "causal":
        raise ValueError("attention layers take no mask any more: pass a cache and AttnMetadata")
