"""KV caches: objects the model writes keys and values into during generation.

The interface every cache keeps (the model calls nothing else):
  cache.length               tokens already stored (the next token's position for unpadded batches)
  cache.update(layer, k, v)  store this step's k, v (B, KV, T, hd); return all keys/values so far
  cache.mask(T, device)      the attention mask for T new queries ("causal", None or a bool tensor
                             broadcastable to (B, H, T, S), True = attend)
  cache.advance(T)           called once per forward, after every layer has written

Two layouts live here:
  KVCache        contiguous, grows by slicing; left-padded batches get per-row masks (`set_padding`),
                 and it can be rewound (speculative decoding) or have its rows reordered (beam search).
  StaticKVCache  fixed shapes for CUDA graphs: the write slot is a device tensor and attention always
                 spans max_len keys with a mask, so one captured decode step serves every position.
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError


def padded_causal_mask(pad: torch.Tensor, q_pos: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(B, 1, T, S) bool: query at slot q_pos[t] of row b sees key slots j with pad[b] <= j <= q_pos[t].

    Rows are left-padded: slots [0, pad[b]) hold no token. A query sitting on a pad slot would see no key
    at all (softmax of all -inf is NaN, and NaN values leak through 0-weights into later layers), so
    every query also sees its own slot; those rows' outputs are never used or attended to."""
    j = torch.arange(n_keys, device=q_pos.device)
    causal = j[None, :] <= q_pos[:, None]  # (T, S)
    real = j[None, :] >= pad[:, None]  # (B, S)
    own = j[None, :] == q_pos[:, None]
    return ((causal[None] & real[:, None]) | own[None])[:, None]


class KVCache:
    """Contiguous, pre-allocated cache: k and v of shape (n_layers, B, KV, max_len, hd)."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self.pad: torch.Tensor | None = None  # (B,) left-pad slots per row; None = no padding

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None
                  ) -> "KVCache":
        cfg = model.cfg
        p = next(model.parameters())
        return cls(cfg.n_layers, batch_size, cfg.kv_heads, cfg.hd, max_len or cfg.max_seq_len,
                   device=p.device, dtype=dtype or p.dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def set_padding(self, pad: torch.Tensor | list[int] | None) -> None:
        """Declare that row b's first pad[b] slots are padding (left-padded prompts)."""
        if pad is not None:
            pad = torch.as_tensor(pad, dtype=torch.long, device=self.k.device)
            if pad.shape != (self.batch_size,):
                raise LmforgeError(f"padding needs one length per row ({self.batch_size}), got {tuple(pad.shape)}")
            pad = pad if bool((pad > 0).any()) else None
        self.pad = pad

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise LmforgeError(f"KV cache is full: {end} tokens > max_len={self.max_len}; "
                               "allocate a longer cache or generate fewer tokens")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def mask(self, T: int, device: torch.device | None = None):
        if self.pad is not None:
            q_pos = torch.arange(self.length, self.length + T, device=self.k.device)
            return padded_causal_mask(self.pad, q_pos, self.length + T)
        if self.length == 0:
            return "causal"
        if T == 1:
            return None  # one new query sees every stored key
        return "causal"  # attention aligns the causal mask bottom-right (queries are the newest keys)

    def advance(self, T: int) -> None:
        self.length += T

    def reset(self) -> None:
        self.length = 0
        self.pad = None

    def rewind(self, length: int) -> None:
        """Forget every token after the first `length` (rejected speculative drafts)."""
        if not 0 <= length <= self.length:
            raise LmforgeError(f"cannot rewind a cache of {self.length} tokens to {length}")
        self.length = length

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (and reorder/duplicate) batch rows: beam search reorders beams, finished rows are dropped."""
        rows = rows.to(self.k.device)
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows)


class StaticKVCache:
    """Fixed-shape cache for CUDA-graph decoding (the gpt-fast / vLLM recipe).

    Every tensor a forward reads or writes keeps its address and shape: the write slot `pos` is a 0-d
    device tensor that `advance` bumps on the device, `update` writes with index_copy_ and returns all
    max_len keys, and `mask` hides the slots that are unwritten or padding. A captured decode graph thus
    stays valid for every position. `length` is a host-side mirror of `pos`; a graph replay runs no
    Python, so the graph runner advances it itself."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 repeat_kv: int = 1):
        # repeat_kv > 1 stores each kv head once per query head of its group, so attention sees plain MHA
        # and SDPA can use a fused kernel with a mask (its GQA mode falls back to unfused math with masks);
        # costs repeat_kv x the cache memory and reads - worthwhile at batch 1, not at large batches
        shape = (n_layers, batch_size, n_kv_heads * repeat_kv, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.repeat_kv = repeat_kv
        self.max_len = max_len
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._slots = torch.arange(max_len, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  repeat_kv: bool = False) -> "StaticKVCache":
        cfg = model.cfg
        p = next(model.parameters())
        return cls(cfg.n_layers, batch_size, cfg.kv_heads, cfg.hd, max_len or cfg.max_seq_len,
                   device=p.device, dtype=dtype or p.dtype,
                   repeat_kv=cfg.n_heads // cfg.kv_heads if repeat_kv else 1)

    def view(self, batch_size: int) -> "StaticKVCache":
        """The first batch_size rows as a cache of their own: same storage and write slot, so graphs
        captured for a smaller batch bucket read and write this cache's memory."""
        v = object.__new__(StaticKVCache)
        v.k, v.v, v.pad = self.k[:, :batch_size], self.v[:, :batch_size], self.pad[:batch_size]
        v.max_len, v.pos, v._slots, v.length, v.repeat_kv = self.max_len, self.pos, self._slots, 0, self.repeat_kv
        return v

    def start(self, pad: torch.Tensor | list[int] | None = None) -> None:
        """Begin a new batch: empty cache, rows left-padded by pad[b] slots."""
        self.pos.zero_()
        self.length = 0
        self.pad.zero_()
        if pad is not None:
            pad = torch.as_tensor(pad, dtype=torch.long)
            self.pad[: len(pad)].copy_(pad)

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) token positions of the next T slots: slot index minus the row's padding."""
        return (self.pos + self._slots[:T])[None, :] - self.pad[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.pos + self._slots[: k.shape[2]]
        if self.repeat_kv > 1:  # (B, KV, T, hd) -> (B, H, T, hd), heads in attention's group order
            k, v = k.repeat_interleave(self.repeat_kv, dim=1), v.repeat_interleave(self.repeat_kv, dim=1)
        self.k[layer].index_copy_(2, idx, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, idx, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def mask(self, T: int, device: torch.device | None = None) -> torch.Tensor:
        return padded_causal_mask(self.pad, self.pos + self._slots[:T], self.max_len)

    def advance(self, T: int) -> None:
        self.pos.add_(T)
        self.length += T
