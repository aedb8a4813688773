"""KV caches: objects the model writes keys and values into during generation.

The interface every cache keeps (the model calls nothing else):
  cache.length               tokens already stored (the next token's position for unpadded batches)
  cache.update(layer, k, v)  store this step's k, v (B, KV, T, hd); return all keys/values so far
  cache.mask(T, device)      the attention mask for T new queries ("causal", None or a bool tensor)
  cache.advance(T)           called once per forward, after every layer has written
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError


class KVCache:
    """Contiguous, pre-allocated cache: k and v of shape (n_layers, B, KV, max_len, hd)."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None
                  ) -> "KVCache":
        cfg = model.cfg
        p = next(model.parameters())
        return cls(cfg.n_layers, batch_size, cfg.kv_heads, cfg.hd, max_len or cfg.max_seq_len,
                   device=p.device, dtype=dtype or p.dtype)

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
        if self.length == 0:
            return "causal"
        if T == 1:
            return None  # one new query sees every stored key
        return "causal"  # attention aligns the causal mask bottom-right (queries are the newest keys)

    def advance(self, T: int) -> None:
        self.length += T

    def reset(self) -> None:
        self.length = 0
