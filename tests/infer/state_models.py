"""Tiny models with recurrent-state layers for the state-cache tests (fp32, CPU): a Mamba-1-like mixer
written as a plain loop, a language model of those alone, and a hybrid that puts lmforge's own attention
block between them. Both honour the one model interface, `forward(ids, positions=None, cache=None,
meta=None) -> logits`, and describe their cache with cache_spec(); without a cache they recompute every
token from zero states (the reference the engine is tested against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.cache import CacheSpec, LayerCacheSpec, recur
from lmforge.model.config import ModelConfig
from lmforge.model.layers.block import Block
from lmforge.model.layers.norm import RMSNorm
from lmforge.model.layers.rope import RotaryEmbedding
from lmforge.model.transformer import attention_cache_spec


class SelectiveRecurrence(nn.Module):
    """Mamba-1's mixer (Gu & Dao 2023, §3.4 Algorithm 2 and Fig. 3), small and looped, as the reference:
        u, z = in_proj(x)                          (E each)
        u = silu(causal depthwise conv_k(u))       the conv state is the last k - 1 inputs u, (E, k - 1)
        dt = softplus(dt_proj(u)); B_t, C_t = proj(u)   (selection: all depend on the token, §3.2)
        h_t = exp(dt_t A) * h_{t-1} + dt_t B_t u_t  (diagonal A < 0, zero-order-hold-like discretisation, eq. 4;
                                                   the ssm state is h, (E, n))
        y_t = <C_t, h_t> + D u_t;  out = out_proj(y * silu(z))"""

    def __init__(self, layer: int, d_model: int, d_inner: int, d_state: int, d_conv: int):
        super().__init__()
        self.layer, self.E, self.n, self.k = layer, d_inner, d_state, d_conv
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv_w = nn.Parameter(torch.randn(d_inner, d_conv) * 0.5)
        self.conv_b = nn.Parameter(torch.zeros(d_inner))
        self.dt_proj = nn.Linear(d_inner, d_inner)
        self.bc_proj = nn.Linear(d_inner, 2 * d_state, bias=False)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float()).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def state_shapes(self) -> tuple[tuple[int, ...], ...]:
        return (self.E, self.k - 1), (self.E, self.n)

    def forward(self, x: torch.Tensor, cache=None, meta=None) -> torch.Tensor:
        return recur(cache, self.layer, self.scan, x, meta)

    def scan(self, x: torch.Tensor, states) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x (R, T, d_model) from states ((R, E, k - 1), (R, E, n)) or None (zeros) -> y, final states."""
        R, T, _ = x.shape
        if states is None:
            states = (x.new_zeros(R, self.E, self.k - 1), x.new_zeros(R, self.E, self.n))
        conv, h = states
        u, z = self.in_proj(x).chunk(2, dim=-1)
        full = torch.cat((conv, u.transpose(1, 2)), dim=-1)  # (R, E, k - 1 + T): the past inputs, then these
        u = torch.stack([(full[:, :, t:t + self.k] * self.conv_w).sum(-1) for t in range(T)], dim=1)
        u = F.silu(u + self.conv_b)  # (R, T, E)
        dt = F.softplus(self.dt_proj(u))  # (R, T, E)
        B, C = self.bc_proj(u).chunk(2, dim=-1)  # (R, T, n) each
        A = -torch.exp(self.A_log)  # (E, n)
        ys = []
        for t in range(T):
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t, :, None] * B[:, t, None, :]) * u[:, t, :, None]
            ys.append((h * C[:, t, None, :]).sum(-1) + self.D * u[:, t])
        y = torch.stack(ys, dim=1) * F.silu(z)
        return self.out_proj(y), (full[:, :, T:], h)


class _LM(nn.Module):
    """Shared trunk: embeddings, the layers (each a residual block), final norm, head over meta.logits_indices."""

    def __init__(self, vocab_size: int, d_model: int, max_seq_len: int):
        super().__init__()
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len
        self.emb = nn.Embedding(vocab_size, d_model)
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def cache_spec(self) -> CacheSpec:
        return CacheSpec(layers=tuple(self.layer_specs()), dtype=self.emb.weight.dtype, max_seq_len=self.max_seq_len,
                         vocab_size=self.vocab_size)

    def logits(self, h: torch.Tensor, meta) -> torch.Tensor:
        if meta is not None and meta.logits_indices is not None:
            h = h.flatten(0, 1)[meta.logits_indices][None]
        return self.head(self.norm(h))


class SSMLM(_LM):
    """Recurrent layers only (a tiny Mamba): (pre-norm, mixer) residual blocks."""

    def __init__(self, vocab_size: int = 257, d_model: int = 32, n_layers: int = 2, d_state: int = 4,
                 d_conv: int = 3, max_seq_len: int = 96):
        super().__init__(vocab_size, d_model, max_seq_len)
        self.norms = nn.ModuleList(RMSNorm(d_model) for _ in range(n_layers))
        self.mixers = nn.ModuleList(SelectiveRecurrence(i, d_model, 2 * d_model, d_state, d_conv)
                                    for i in range(n_layers))

    def layer_specs(self):
        return [LayerCacheSpec(kind="state", state_shapes=m.state_shapes()) for m in self.mixers]

    def forward(self, ids: torch.Tensor, positions=None, cache=None, meta=None) -> torch.Tensor:
        x = self.emb(ids)
        for norm, mixer in zip(self.norms, self.mixers):
            x = x + mixer(norm(x), cache, meta)
        return self.logits(x, meta)


class HybridLM(_LM):
    """Recurrent layers with lmforge's own attention blocks (RoPE, GQA, SwiGLU MLP) between them (Jamba /
    Zamba style): layer i is attention where pattern[i] == 'a', a recurrent mixer where it is 's'."""

    def __init__(self, vocab_size: int = 257, d_model: int = 32, pattern: str = "sas", d_state: int = 4,
                 d_conv: int = 4, max_seq_len: int = 96):
        super().__init__(vocab_size, d_model, max_seq_len)
        self.pattern = pattern
        self.cfg = ModelConfig(vocab_size=vocab_size, d_model=d_model, n_layers=len(pattern), n_heads=4,
                               n_kv_heads=2, max_seq_len=max_seq_len, pos_emb="rope", norm="rmsnorm",
                               activation="swiglu")
        self.rope = RotaryEmbedding(self.cfg.rope_dim, self.cfg.rope_theta, max_seq_len=max_seq_len)
        self.layers = nn.ModuleList(
            Block(self.cfg, i) if kind == "a" else SelectiveRecurrence(i, d_model, 2 * d_model, d_state, d_conv)
            for i, kind in enumerate(pattern))
        self.norms = nn.ModuleList(RMSNorm(d_model) for _ in pattern)

    def layer_specs(self):
        return [attention_cache_spec(self.cfg, i) if isinstance(layer, Block)
                else LayerCacheSpec(kind="state", state_shapes=layer.state_shapes())
                for i, layer in enumerate(self.layers)]

    def forward(self, ids: torch.Tensor, positions=None, cache=None, meta=None) -> torch.Tensor:
        B, T = ids.shape
        if positions is None:
            positions = meta.positions if meta is not None and meta.positions is not None else \
                torch.arange(T, device=ids.device).expand(B, T)
        rope = self.rope.cos_sin(positions)
        x = self.emb(ids)
        for norm, layer in zip(self.norms, self.layers):
            x = layer(x, rope, None, cache, meta) if isinstance(layer, Block) else x + layer(norm(x), cache, meta)
        return self.logits(x, meta)


def tiny_state_model(kind: str, seed: int = 0, **kw) -> _LM:
    torch.manual_seed(seed)
    model = {"ssm": SSMLM, "hybrid": HybridLM}[kind](**kw)
    with torch.no_grad():  # weights large enough that greedy choices are clear (no near-ties)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "A_log" not in name:
                p.normal_(0, 0.3)
    return model.eval()
