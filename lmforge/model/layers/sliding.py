"""A KV cache for sliding-window layers (Mistral's rolling buffer): a layer with window W keeps only its
last W-1 keys/values, so its memory stays O(W) however long the generation; full-attention layers keep
everything. Same interface as lmforge.model.cache.KVCache (attend, advance).

Why it is exact: keys are stored after RoPE, so their positions travel with them; the returned keys are
contiguous and end with the T new ones, and attention only uses relative offsets (causal bottom-right
alignment and q_pos - k_pos < W), so dropping keys no query can see changes nothing.
"""

from __future__ import annotations

import torch

from lmforge.model.cache import CacheSpec, _Hooked, contiguous_mask, refuse_trees
from lmforge.model.layers.attention import AttnSpec, attend_with


class SlidingWindowCache(_Hooked):
    def __init__(self, windows: list[int]):
        """windows[i]: the window of layer i (0 = full attention, keep every key)."""
        self.windows = list(windows)
        self.k: list[torch.Tensor | None] = [None] * len(windows)
        self.v: list[torch.Tensor | None] = [None] * len(windows)
        self.length = 0

    @classmethod
    def for_model(cls, model) -> "SlidingWindowCache":
        return cls([layer.window for layer in CacheSpec.of(model).layers])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, KV, T, hd) -> all keys this step's queries may see: (B, KV, kept + T, hd)."""
        if self.k[layer] is not None:
            k, v = torch.cat((self.k[layer], k), dim=2), torch.cat((self.v[layer], v), dim=2)
        w = self.windows[layer]
        keep = k.shape[2] if w == 0 else min(w - 1, k.shape[2])  # the next query sees W-1 older keys
        self.k[layer], self.v[layer] = k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]
        return k, v

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec, meta=None
               ) -> torch.Tensor:
        refuse_trees(meta, "the sliding-window ring cache")
        k, v = self.update(layer, k, v)  # the queries are the last T of these keys
        mask = contiguous_mask(q.shape[2], k.shape[2], spec.window, q.device)
        return attend_with(q, k, v, mask, spec, self._probs_hook(layer))

    def advance(self, T: int) -> None:
        self.length += T

    def stored_tokens(self, layer: int) -> int:
        return 0 if self.k[layer] is None else self.k[layer].shape[2]
