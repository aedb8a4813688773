"""A HF `transformers` causal LM behind lmforge's model interface, so the engine can run it.

    llm = LLM(HFCausalLM(AutoModelForCausalLM.from_pretrained(path)), tokenizer)

The wrapper has no `cache_spec()`, so the engine runs it on the plain recompute path (every sampled
sequence is run from scratch each step: correct, slow; lmforge's own Transformer is the fast path and
loads the same checkpoints with Transformer.from_pretrained).
"""

from __future__ import annotations

import torch
from torch import nn


class HFCausalLM(nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        cfg = hf_model.config
        self.vocab_size = int(cfg.vocab_size)
        self.max_seq_len = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions"))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None, meta=None
                ) -> torch.Tensor:
        """(B, T) ids -> logits (B, T, V); no cache (full recompute), positions default to 0..T-1."""
        if cache is not None:
            raise TypeError("HFCausalLM runs without an lmforge cache (the engine's recompute path)")
        kw = {} if positions is None else {"position_ids": positions.expand_as(input_ids)}
        logits = self.hf(input_ids=input_ids, use_cache=False, **kw).logits
        if meta is not None and meta.logits_indices is not None:
            logits = logits.flatten(0, 1)[meta.logits_indices][None]
        return logits
