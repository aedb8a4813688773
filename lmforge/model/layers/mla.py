"""Multi-head latent attention, MLA (DeepSeek-V2 §2.1, eq. 9-19; DeepSeek-V3).

Keys and values of all heads come from one low-rank latent per token, and RoPE lives on a separate,
small "decoupled" part of each head with a single key shared by all heads:

    c_kv = RMSNorm(x W_dkv)            (B, T, r)          the only per-token state besides k_rope
    k_rope = RoPE(x W_kr)              (B, T, d_r)        one rope key shared across heads
    [k_nope | v] = c_kv W_ukv          (B, T, H, d_n + d_v)
    q = (RMSNorm(x W_dq)) W_uq  or  x W_q,   split into [q_nope | q_rope], q_rope = RoPE(q_rope)
    score_h = (q_nope·k_nope + q_rope·k_rope) · scale

Naive path: materialise k, v per head (training, prefill without a cache). Absorbed path (inference,
MLACache): since q_nope·k_nope = (q_nope W_uk,hᵀ)·c_kv, the key up-projection folds into the query and
the value up-projection into the output: attention runs directly over the cached latents, and the
cache holds r + d_r numbers per token and layer instead of 2·H·head_dim.
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.cache import CacheSpec, _Hooked, contiguous_mask, refuse_trees
from lmforge.model.layers.attention import AttnSpec, Mask, attend_with, check_legacy_mask, DENSE
from lmforge.model.layers.fused import plain_linear
from lmforge.model.layers.norm import RMSNorm
from lmforge.model.layers.rope import _yarn_mscale, apply_rope


class MLA(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        m = cfg.mla_cfg
        self.layer_idx, self.H = layer_idx, cfg.n_heads
        self.r, self.d_nope, self.d_rope, self.d_v = (m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim,
                                                      m.v_head_dim)
        d, H, qk = cfg.d_model, cfg.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank > 0:
            self.wq_a = nn.Linear(d, m.q_lora_rank, bias=cfg.bias)
            self.q_norm = RMSNorm(m.q_lora_rank, m.norm_eps or cfg.norm_eps)
            self.wq_b = nn.Linear(m.q_lora_rank, H * qk, bias=False)
            self.wq = None
        else:
            self.wq = nn.Linear(d, H * qk, bias=cfg.bias)
        self.wkv_a = nn.Linear(d, self.r + self.d_rope, bias=cfg.bias)  # latent and shared rope key
        self.kv_norm = RMSNorm(self.r, m.norm_eps or cfg.norm_eps)
        self.wkv_b = nn.Linear(self.r, H * (self.d_nope + self.d_v), bias=False)
        self.wo = nn.Linear(H * self.d_v, d, bias=cfg.has_o_bias)
        self.rope_layout, self.softcap = cfg.rope_layout, cfg.attn_softcap
        self.impl, self.dropout = cfg.attn_impl, cfg.dropout
        self.window = cfg.sliding_window if cfg.layer_type(layer_idx) == "sliding" else 0
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else self._default_scale(cfg, qk)
        self.absorb_max_tokens = 1  # with a cache, steps of at most this many new tokens use the absorbed path
        self.spec = AttnSpec(scale=self.scale, window=self.window, softcap=self.softcap, impl=self.impl)
        self.train_spec = AttnSpec(scale=self.scale, window=self.window, softcap=self.softcap, impl=self.impl,
                                   dropout=cfg.dropout)

    @staticmethod
    def _default_scale(cfg, qk: int) -> float:
        scale = 1.0 / math.sqrt(qk)
        sc = cfg.rope_scaling
        # DeepSeek-V2: softmax scale · mscale², under any RoPE scaling (transformers' yarn_apply_mscale)
        if sc is not None and sc.mscale_all_dim:
            scale *= _yarn_mscale(sc.factor, sc.mscale_all_dim) ** 2
        return scale

    def _queries(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, self.H, self.d_nope + self.d_rope).transpose(1, 2)  # (B, H, T, d_n + d_r)
        q_nope, q_rope = q.split([self.d_nope, self.d_rope], dim=-1)
        if rope is not None:
            q_rope = apply_rope(q_rope, *rope, self.rope_layout)
        return q_nope, q_rope

    def _latents(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d) -> c_kv (B, T, r) normalised latent, k_rope (B, 1, T, d_r) rotated shared key."""
        c, k_rope = self.wkv_a(x).split([self.r, self.d_rope], dim=-1)
        k_rope = k_rope[:, None]
        if rope is not None:
            k_rope = apply_rope(k_rope, *rope, self.rope_layout)
        return self.kv_norm(c), k_rope

    def forward(self, x: torch.Tensor, rope, mask: Mask = None, cache=None, meta=None) -> torch.Tensor:
        """The cache (or DENSE without one) gets the latents and attends through `naive` / `absorbed`."""
        check_legacy_mask(mask)
        B, T, _ = x.shape
        q_nope, q_rope = self._queries(x, rope)
        c_kv, k_rope = self._latents(x, rope)
        if cache is not None and not hasattr(cache, "attend_latent"):
            raise TypeError(f"attention='mla' needs a latent cache (MLACache or the engine's), got "
                            f"{type(cache).__name__}")
        spec = self.train_spec if self.training else self.spec
        out = (cache if cache is not None else DENSE).attend_latent(self.layer_idx, self, q_nope, q_rope, c_kv,
                                                                     k_rope, spec, meta)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.H * self.d_v))

    def naive(self, q_nope, q_rope, c_kv, k_rope, mask: Mask, spec: AttnSpec, probs_hook=None) -> torch.Tensor:
        """Materialise per-head keys/values from the latents: (B, H, T, d_v). c_kv (B, S, r), k_rope
        (B, 1, S, d_r); `mask` is the cache's, for these S keys; probs_hook: the cache's score hook."""
        B, S, _ = c_kv.shape
        kv = self.wkv_b(c_kv).view(B, S, self.H, self.d_nope + self.d_v).transpose(1, 2)
        k_nope, v = kv.split([self.d_nope, self.d_v], dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(B, self.H, S, self.d_rope)), dim=-1)
        return attend_with(q, k, v, mask, spec, probs_hook)

    def absorbed(self, q_nope, q_rope, c_kv, k_rope, mask: Mask, spec: AttnSpec, probs_hook=None) -> torch.Tensor:
        """Attention over the cached latents: W_uk absorbed into the query, W_uv into the output (the matrices
        from `_up_weights`). A wkv_b whose matrix cannot be read off (not linear-like, or with a bias) takes the
        naive path, which calls the module."""
        if not self.absorbable():
            return self.naive(q_nope, q_rope, c_kv, k_rope, mask, spec, probs_hook)
        w_uk, w_uv = self._up_weights(q_nope)
        q_lat = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        # one "head" of width r + d_r shared by all H query heads (MQA over latents)
        q = torch.cat((q_lat, q_rope), dim=-1)
        k = torch.cat((c_kv, k_rope[:, 0]), dim=-1)  # (B, S, r + d_r)
        out_lat = _shared_kv_attention(q, k, c_kv, mask, spec.scale, spec.softcap, probs_hook)  # (B, H, T, r)
        return torch.einsum("bhtr,hvr->bhtv", out_lat, w_uv)

    def absorbable(self) -> bool:
        """Whether W_uk / W_uv can be read off wkv_b: a bare nn.Linear, or a bias-free linear-like layer (integer
        in_features / out_features of wkv_b's shape: a quantized Linear, a LoRA adapter, one over the other)."""
        m = self.wkv_b
        return plain_linear(m) or (getattr(m, "in_features", None) == self.r and getattr(m, "bias", None) is None
                                   and getattr(m, "out_features", None) == self.H * (self.d_nope + self.d_v))

    def _up_weights(self, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk (H, d_n, r) and W_uv (H, d_v, r). A bare nn.Linear's weight is read as it is. Any other absorbable
        wkv_b is applied to the r x r identity, in the dtype and on the device of `like` (the activations it
        meets; default: kv_norm's weight): the rows are the matrix the layer computes with - a quantized layer's
        dequantized weight, W + s·B A under LoRA, both stacked - whatever its storage, with no protocol asked of the
        layer (a weight-only quantizer's `dequantize()` would not cover LoRA over it, nor packed tensor subclasses).
        A read costs r·|wkv_b| multiply-adds, so the matrix is kept (`_UpWeightsMemo`, one dequantized copy of wkv_b:
        32 MiB a layer at DeepSeek-V3's sizes in bf16) until wkv_b changes. Under torch.compile or CUDA-graph
        capture nothing is kept: the read is recorded and redone at each replay, so in-place weight updates
        (Engine.update_weights) reach the graphs as they do for plain weights."""
        if plain_linear(self.wkv_b):
            w = self.wkv_b.weight
        else:
            p = like if like is not None else self.kv_norm.weight
            w = self._up_memo.read(self.wkv_b, self.r, p.dtype, p.device)
        return w.view(self.H, self.d_nope + self.d_v, self.r).split([self.d_nope, self.d_v], dim=1)

    @property
    def _up_memo(self) -> "_UpWeightsMemo":
        memo = self.__dict__.get("_up_weights_memo")
        if memo is None:  # (not built in __init__: modules unpickled from older files lack it too)
            memo = self.__dict__["_up_weights_memo"] = _UpWeightsMemo()
        return memo

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_up_weights_memo", None)  # weak references do not pickle; copies read the matrix again
        return state

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """(..., H, d_n) -> (..., H, r): q_nope W_uk per head, the query that scores latents directly."""
        return torch.einsum("...hn,hnr->...hr", q_nope, self._up_weights(q_nope)[0])

    def expand_latent(self, out_lat: torch.Tensor) -> torch.Tensor:
        """(..., H, r) -> (..., H, d_v): attention's output over latents through W_uv per head."""
        return torch.einsum("...hr,hvr->...hv", out_lat, self._up_weights(out_lat)[1])


class _UpWeightsMemo:
    """wkv_b's matrix read off the module (MLA._up_weights), kept until the module changes, so decode steps do
    not read it again at every step and layer. Changed means: a parameter or buffer replaced, moved, cast or
    written in place (each tensor's identity, storage, dtype and version counter: optimizer steps, copy_,
    load_state_dict, Engine.update_weights all bump or replace them), or a submodule's plain attribute changed (a
    LoRA layer's `enabled` or `scale`, train/eval mode). The tensors are held by weak references: a memo keeps
    neither the old weights nor a replaced layer alive."""

    def __init__(self):
        self.refs: list[weakref.ref] = []
        self.state: tuple = ()
        self.w: torch.Tensor | None = None

    def read(self, module: nn.Module, r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(out, r): module applied to the r x r identity, transposed."""
        tensors = [*module.parameters(), *module.buffers()]
        if not self._keepable(tensors, device):  # read afresh, under the caller's modes, and not kept
            return module(torch.eye(r, dtype=dtype, device=device)).t()
        state = (dtype, device, tuple((t._version, t.data_ptr(), t.dtype, t.device, t.shape) for t in tensors),
                 tuple(_plain_attributes(m) for m in module.modules()))
        if (self.w is not None and state == self.state and len(self.refs) == len(tensors)
                and all(ref() is t for ref, t in zip(self.refs, tensors))):
            return self.w
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: usable in and out of inference mode
            self.w = module(torch.eye(r, dtype=dtype, device=device)).t().contiguous()
        self.refs, self.state = [weakref.ref(t) for t in tensors], state
        return self.w

    @staticmethod
    def _keepable(tensors: list[torch.Tensor], device: torch.device) -> bool:
        """Not while torch.compile traces or a CUDA graph is captured (the recorded read must replay against the
        current weights), nor while gradients must reach wkv_b, nor over inference tensors (no version counter)."""
        if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return False
        return not any(t.is_inference() for t in tensors)


def _plain_attributes(module: nn.Module) -> tuple:
    """A module's own attributes that are plain values (flags, scales, sizes), with its class: what, besides its
    tensors, decides what it computes."""
    return (type(module), tuple((k, v) for k, v in vars(module).items()
                                if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))))


def _shared_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float, softcap: float,
                         probs_hook=None) -> torch.Tensor:
    """q (B, H, T, d); one key/value head shared by all query heads: k (B, S, d), v (B, S, dv).
    Heads fold into the query axis, (B, H·T, d) @ (B, d, S), so the shared latents are never copied per head."""
    B, H, T, d = q.shape
    S = k.shape[1]
    s = torch.bmm(q.reshape(B, H * T, d), k.transpose(1, 2)).view(B, H, T, S).float() * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if isinstance(mask, str):
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1)
    if probs_hook is not None:
        probs_hook(p)
    return torch.bmm(p.to(v.dtype).view(B, H * T, S), v).view(B, H, T, v.shape[-1])


class MLACache(_Hooked):
    """Latent cache for MLA: per layer c_kv (B, max_len, r) and the shared rope key (B, 1, max_len, d_r),
    contiguous (the queries are the newest latents). Same interface as lmforge.model.cache.KVCache."""

    def __init__(self, n_layers: int, batch_size: int, kv_lora_rank: int, rope_dim: int, max_len: int, *,
                 device=None, dtype: torch.dtype = torch.float32):
        self.c = torch.zeros(n_layers, batch_size, max_len, kv_lora_rank, device=device, dtype=dtype)
        self.k_rope = torch.zeros(n_layers, batch_size, 1, max_len, rope_dim, device=device, dtype=dtype)
        self.max_len, self.length = max_len, 0

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None, *, dtype=None) -> "MLACache":
        spec, p = CacheSpec.of(model), next(model.parameters())
        layer = spec.layers[0]
        return cls(len(spec.layers), batch_size, layer.latent_rank, layer.rope_dim, max_len or spec.max_seq_len,
                   device=p.device, dtype=dtype or spec.dtype)

    @staticmethod
    def bytes_per_token(cfg, dtype_bytes: int = 2) -> int:
        m = cfg.mla_cfg
        return cfg.n_layers * (m.kv_lora_rank + m.qk_rope_head_dim) * dtype_bytes

    def update(self, layer: int, c: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = c.shape[1]
        end = self.length + T
        if end > self.max_len:
            raise LmforgeError(f"MLA cache is full: {end} tokens > max_len={self.max_len}")
        self.c[layer, :, self.length:end] = c
        self.k_rope[layer, :, :, self.length:end] = k_rope
        return self.c[layer, :, :end], self.k_rope[layer, :, :, :end]

    def attend_latent(self, layer: int, mla: MLA, q_nope, q_rope, c_kv, k_rope, spec: AttnSpec, meta=None
                      ) -> torch.Tensor:
        refuse_trees(meta, "the contiguous MLA latent cache")
        T = c_kv.shape[1]
        c_kv, k_rope = self.update(layer, c_kv, k_rope)
        mask = contiguous_mask(T, c_kv.shape[1], spec.window, c_kv.device)
        # decode steps attend over the latents directly; a long prefill is cheaper expanded per head
        # (r + d_rope numbers per score instead of d_nope + d_rope), as DeepSeek's inference does
        run = mla.absorbed if T <= mla.absorb_max_tokens else mla.naive
        return run(q_nope, q_rope, c_kv, k_rope, mask, spec, self._probs_hook(layer))

    def advance(self, T: int) -> None:
        self.length += T

    def reset(self) -> None:
        self.length = 0
