"""Rotary position embedding (RoFormer, Su et al. 2021) and its context-extension variants.

Each pair of channels of a query/key head is rotated by angle pos·θ_i, θ_i = base^(-2i/d), so the
dot product of a rotated query and key depends only on their relative position. Two layouts exist in
the wild and both are supported:
  'half'        pairs (i, i + d/2)   - GPT-NeoX, Llama, HF transformers
  'interleaved' pairs (2i, 2i + 1)   - RoFormer, GPT-J, Meta's original Llama code

Context extension by a factor s = new context / original context L (RopeScaling.kind):
  linear    position interpolation (Chen et al. 2023): θ_i / s
  ntk       NTK-aware base change (bloc97): base · s^(d/(d-2)), high frequencies barely move
  dynamic   NTK with s recomputed from the current length once it exceeds max_seq_len (emozilla; L is
            max_seq_len here, as in transformers)
  yarn      NTK-by-parts (Peng et al. 2023): frequencies with fewer than beta_slow rotations over L
            are interpolated, more than beta_fast kept, a linear ramp between; plus a softmax
            temperature folded into cos/sin: attention factor 0.1·ln s + 1
  longrope  per-frequency rescale factors found by search (Ding et al. 2024), the 'short' set up to L
            and the 'long' set beyond; attention factor sqrt(1 + ln s / ln L)
  llama3    Llama 3.1: low frequencies (wavelength > L/low_freq_factor) divided by s, high ones kept,
            smooth interpolation between

dynamic and longrope depend on the context length, which each token takes from its own sequence: the length
transformers' generate gives it (a prompt's tokens the prompt's length, a decoded token its position + 1), never
the longest sequence of a batch or the last position of a chunk (`RotaryEmbedding.cos_sin`'s `lengths`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """θ_i = theta^(-2i/d) for i in [0, d/2): shape (d/2,), fp32 as transformers computes it."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, theta: float, sc, orig_len: int) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023, eq. 17-20): blend interpolated and original frequencies by a ramp over
    the dimension index, bounded where a frequency makes beta_fast / beta_slow rotations over orig_len."""
    s = sc.factor

    def dim_of(rotations: float) -> float:  # inverse of rotations(i) = orig_len·θ_i / 2π
        return dim * math.log(orig_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(sc.beta_fast), dim_of(sc.beta_slow)
    if sc.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    base = rope_inv_freq(dim, theta)
    keep = 1 - ramp  # 1 = extrapolate (original frequency), 0 = interpolate (divide by s)
    inv = base / s * (1 - keep) + base * keep
    if sc.attention_factor is not None:
        attn = sc.attention_factor
    elif sc.mscale and sc.mscale_all_dim:
        attn = _yarn_mscale(s, sc.mscale) / _yarn_mscale(s, sc.mscale_all_dim)
    else:
        attn = _yarn_mscale(s)
    return inv, float(attn)


def llama3_inv_freq(dim: int, theta: float, sc, orig_len: int) -> torch.Tensor:
    base = rope_inv_freq(dim, theta)
    wavelen = 2 * math.pi / base
    low_wl, high_wl = orig_len / sc.low_freq_factor, orig_len / sc.high_freq_factor
    smooth = (orig_len / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    mid = (1 - smooth) * base / sc.factor + smooth * base
    return torch.where(wavelen > low_wl, base / sc.factor, torch.where(wavelen < high_wl, base, mid))


def scaled_inv_freq(dim: int, theta: float, sc, max_seq_len: int, seq_len: int | None = None
                    ) -> tuple[torch.Tensor, float]:
    """(inv_freq (dim/2,), attention factor) for RopeScaling `sc` (None: plain RoPE). `seq_len` is the
    current context for the length-dependent kinds (dynamic, longrope)."""
    if sc is None:
        return rope_inv_freq(dim, theta), 1.0
    orig = sc.original_max_seq_len or max_seq_len
    kind, s = sc.kind, sc.factor
    if kind == "linear":
        return rope_inv_freq(dim, theta) / s, 1.0
    if kind == "ntk":
        return rope_inv_freq(dim, theta * s ** (dim / (dim - 2))), 1.0
    if kind == "dynamic":  # measured against max_seq_len, not an original context (transformers does the same)
        L = max(seq_len or max_seq_len, max_seq_len)
        return rope_inv_freq(dim, theta * (s * L / max_seq_len - (s - 1)) ** (dim / (dim - 2))), 1.0
    if kind == "yarn":
        return yarn_inv_freq(dim, theta, sc, orig)
    if kind == "llama3":
        return llama3_inv_freq(dim, theta, sc, orig), 1.0
    # longrope (a Phi-3 config.json without a factor means max_seq_len / orig: hf_families.rope_from_hf resolves it)
    attn = sc.attention_factor
    if attn is None:
        attn = 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(orig))
    ext = sc.long_factor if seq_len is not None and seq_len > orig else sc.short_factor
    inv = 1.0 / (torch.tensor(ext, dtype=torch.float32) * theta ** (torch.arange(0, dim, 2).float() / dim))
    return inv, float(attn)


class RotaryEmbedding(nn.Module):
    """cos/sin of pos·θ_i for the positions of a forward. Unless the scaling depends on the current length
    (dynamic NTK, LongRoPE), they are looked up in tables of all max_seq_len positions built once: computing
    sin/cos inside every fused RoPE kernel (forward and backward of each layer) made those kernels
    compute-bound - 8% of an H100 training step at 304M params."""

    def __init__(self, head_dim: int, theta: float = 10000.0, layout: str = "half", scaling=None,
                 max_seq_len: int = 2048):
        super().__init__()
        self.head_dim, self.layout, self.theta = head_dim, layout, theta
        self.scaling, self.max_seq_len = scaling, max_seq_len
        self._seq_dependent = scaling is not None and scaling.kind in ("dynamic", "longrope")
        n = 0 if self._seq_dependent else max_seq_len
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        # LongRoPE's long-factor frequencies (the short ones are inv_freq); the other kinds: a copy of inv_freq, unused
        self.register_buffer("inv_freq_long", torch.empty(head_dim // 2), persistent=False)
        self.register_buffer("cos_table", torch.empty(n, head_dim // 2), persistent=False)
        self.register_buffer("sin_table", torch.empty(n, head_dim // 2), persistent=False)
        self.reset_tables()

    @torch.no_grad()
    def reset_tables(self, n_positions: int | None = None) -> None:
        """(Re)compute inv_freq and the cos/sin tables (n_positions rows, default as many as they have, at
        least max_seq_len) on the buffers' device; also after to_empty()."""
        inv, self.attention_scale = scaled_inv_freq(self.head_dim, self.theta, self.scaling, self.max_seq_len)
        self.inv_freq = inv.float().to(self.inv_freq.device)  # attention_scale: YaRN/LongRoPE temperature
        if self.scaling is not None and self.scaling.kind == "longrope":
            orig = self.scaling.original_max_seq_len or self.max_seq_len
            long, _ = scaled_inv_freq(self.head_dim, self.theta, self.scaling, self.max_seq_len, orig + 1)
            self.inv_freq_long = long.float().to(self.inv_freq.device)
        else:  # (unread: written so that it holds no uninitialised bits, which compared unequal at times as NaN)
            self.inv_freq_long = self.inv_freq.clone()
        if not self._seq_dependent and self.cos_table.device.type != "meta":
            n = n_positions or max(self.cos_table.shape[0], self.max_seq_len)
            angles = torch.arange(n, device=self.inv_freq.device).float()[:, None] * self.inv_freq
            self.cos_table = angles.cos() * self.attention_scale
            self.sin_table = angles.sin() * self.attention_scale

    def reserve(self, n_positions: int) -> None:
        """Make the tables cover positions < n_positions (they grow by doubling)."""
        if not self._seq_dependent and n_positions > self.cos_table.shape[0]:
            self.reset_tables(max(n_positions, 2 * self.cos_table.shape[0]))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:  # model.to(bf16) must not round the angles or the tables
            self.inv_freq = self.inv_freq.float()
            self.reset_tables()
        return self

    @property
    def length_dependent(self) -> bool:
        """The frequencies depend on each token's context length (dynamic NTK, LongRoPE): cos_sin reads `lengths`."""
        return self._seq_dependent

    def _inv_freq_for(self, positions: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """(..., d/2) inverse frequencies of each token, from its context length: computed on the device, no sync."""
        if lengths is None:  # each row's own context (a forward without a cache, or a row decoding one sequence)
            lengths = positions.amax(dim=-1, keepdim=True) + 1
        lengths, sc = lengths.to(positions.device), self.scaling
        if sc.kind == "longrope":  # the long factors once the context passes the original one
            orig = sc.original_max_seq_len or self.max_seq_len
            return torch.where((lengths > orig)[..., None], self.inv_freq_long, self.inv_freq)
        # dynamic NTK: base theta·(s·L/max_seq_len - (s - 1))^(d/(d-2)), L = max(length, max_seq_len); fp32 in
        # transformers' order of operations
        d, s = self.head_dim, sc.factor
        L = lengths.clamp(min=self.max_seq_len)
        base = self.theta * ((s * L / self.max_seq_len) - (s - 1)) ** (d / (d - 2))
        exps = torch.arange(0, d, 2, dtype=torch.int64, device=positions.device).float() / d
        return 1.0 / (base[..., None] ** exps)

    def cos_sin(self, positions: torch.Tensor, n_positions: int | None = None, lengths: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int >= 0 -> cos, sin of shape (B, T, head_dim/2), in fp32. `n_positions` is a
        bound (max position + 1) the caller knows on the host; the tables grow to cover it. Without one,
        CPU positions are checked here, and GPU positions must lie below the tables' length (max_seq_len
        or more): checking them would stall the GPU at every forward.
        lengths (B, T) or broadcastable to it, int: the context length of each token's sequence, read by the
        length-dependent kinds only (length_dependent); None = each row's last position + 1."""
        if not self._seq_dependent:
            if n_positions is None and positions.device.type == "cpu" and positions.numel():
                n_positions = int(positions.max()) + 1
            if n_positions is not None:
                self.reserve(n_positions)
            return self.cos_table[positions], self.sin_table[positions]
        angles = positions.to(torch.float32)[..., None] * self._inv_freq_for(positions, lengths)
        return angles.cos() * self.attention_scale, angles.sin() * self.attention_scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (B, T, hd/2). Rotates channel pairs; computed in fp32."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd/2): broadcast over heads
    xf = x.float()
    if layout == "half":
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)


def rotate_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """x (M, ..., d) keys already rotated, each turned further by delta[m] positions (a pure rotation: angles
    delta·θ_i, no attention scale): rotations compose, so a key computed at position p then turned by delta acts
    as if computed at p + delta. For KV policies that re-assign positions within the cache
    (lmforge.infer.kv.policy, StreamingLLM(positions="cache"))."""
    M, d = x.shape[0], x.shape[-1]
    angles = delta.to(torch.float32)[:, None] * inv_freq.to(x.device)  # (M, d/2)
    x4 = x.reshape(M, -1, d).transpose(0, 1)[None]  # (1, heads, M, d)
    out = apply_rope(x4, angles.cos()[None], angles.sin()[None], layout)
    return out[0].transpose(0, 1).reshape(x.shape)

