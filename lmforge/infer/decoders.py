"""Single-batch decoders over the model-side caches: `PlainDecoder` (contiguous KVCache, eager) and the
helpers it shares with lmforge.infer.cuda_graph.GraphDecoder. They are not generation loops: the
engine (lmforge.infer.engine) is the one loop. They remain for the batch-1 Triton kernel step
(lmforge.infer.kernel_step) and its tests and bench/decode.py, until the runner's CUDA-graph backend
absorbs them.

A decoder owns the model and its cache and exposes prefill(ids, pad) -> last logits (B, V) and
step(tokens (B,)) -> logits (B, V).
"""

from __future__ import annotations

from typing import Protocol

import torch

from lmforge.errors import LmforgeError
from lmforge.model.cache import KVCache


def decode_attention():
    """Context for eager decoding, whose key length grows every step: SDPA may use flash, memory-efficient
    or math kernels, not cuDNN's, which builds an execution plan for each new key length (H100, 1.1B,
    batch 1: 10.8 -> 74 tok/s with this; bench/decode.py, 2026-11-23). The static-shape CUDA-graph path
    does not need it (one plan, built at capture)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class Decoder(Protocol):
    def prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor: ...
    def step(self, tokens: torch.Tensor) -> torch.Tensor: ...


def left_pad(prompts: list[list[int]], pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-align prompts in a (B, T) tensor; return it and pad (B,) = padding slots per row."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.as_tensor(p, dtype=torch.long)
    pad = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), pad.to(device)


def is_mla(model) -> bool:
    return getattr(model.cfg, "attention", "mha") == "mla"


def new_cache(model, batch_size: int, max_len: int):
    """The model's own cache kind: MLA's latent cache, else the contiguous KVCache (which also serves
    sliding-window layers: their window mask is applied by attention on top of the cache's mask)."""
    if is_mla(model):
        from lmforge.model.layers.mla import MLACache

        return MLACache.for_model(model, batch_size, max_len)
    return KVCache.for_model(model, batch_size, max_len)


def supports_padding(model) -> bool:
    """Whether rows of different prompt lengths can share a batch (the cache must mask padding)."""
    return not is_mla(model)


class PlainDecoder:
    """Reference decoder: eager forwards into a contiguous KVCache with per-row padding masks.
    A left-padded row's token in slot s has position s - pad (pad slots get position 0; never seen)."""

    def __init__(self, model, batch_size: int, max_len: int):
        self.model = model
        self.cache = new_cache(model, batch_size, max_len)

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        if hasattr(self.cache, "set_padding"):
            self.cache.set_padding(pad)
        elif bool((pad > 0).any()):
            raise LmforgeError(f"{type(self.cache).__name__} cannot mask padding: batch equal-length prompts")
        self.pad = pad
        positions = (torch.arange(ids.shape[1], device=ids.device)[None] - pad[:, None]).clamp(min=0)
        with decode_attention():
            return self.model(ids, positions, cache=self.cache)[:, -1]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = (self.cache.length - self.pad)[:, None]
        with decode_attention():
            return self.model(tokens[:, None], positions, cache=self.cache)[:, 0]
