"""A HF `transformers` causal LM behind lmforge's model interface, so the engine can run it.

    llm = LLM(HFCausalLM(AutoModelForCausalLM.from_pretrained(path)), tokenizer)

The wrapper has no `cache_spec()`, so the engine runs it on the plain recompute path (every sampled
sequence is run from scratch each step: correct, slow; lmforge's own Transformer is the fast path and
loads the same checkpoints with Transformer.from_pretrained).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.hf import eos_token_ids
from lmforge.model.transformer import tap_layers


class HFCausalLM(nn.Module):
    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        cfg = hf_model.config
        self.vocab_size = int(cfg.vocab_size)
        self.max_seq_len = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions"))
        self.n_layers = int(getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0))
        # the ids that end a sample, as HF's generate() and lmforge's own loader read them
        self.eos_token_ids = eos_token_ids(getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None),
                                           getattr(cfg, "eos_token_id", None))

    def get_input_embeddings(self) -> nn.Module:
        """The HF model's token embedding (what NEFTune adds its noise to, as TRL does on a HF model)."""
        return self.hf.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None, meta=None, *,
                return_hidden: bool | tuple[int, ...] = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, T) ids -> logits (B, T, V); no cache (full recompute), positions default to 0..T-1.
        return_hidden as lmforge's Transformer.forward: True = HF's last hidden state (after the final norm),
        a tuple of layer indices = those decoder layers' outputs concatenated (HF's hidden_states[i + 1])."""
        if cache is not None:
            raise TypeError("HFCausalLM runs without an lmforge cache (the engine's recompute path)")
        layers = tap_layers(return_hidden, self.n_layers)
        if self.n_layers - 1 in layers:
            raise ConfigError(f"HF models give the last layer's output only after their final norm; ask for "
                              f"return_hidden=True for it, or layers below {self.n_layers - 1}, not {return_hidden!r}")
        kw = {} if positions is None else {"position_ids": positions.expand_as(input_ids)}
        out = self.hf(input_ids=input_ids, use_cache=False, output_hidden_states=bool(return_hidden), **kw)
        logits = out.logits
        states = torch.cat([out.hidden_states[i + 1] for i in layers], -1) if layers else (
            out.hidden_states[-1] if return_hidden else None)
        if meta is not None and meta.logits_indices is not None:
            logits = logits.flatten(0, 1)[meta.logits_indices][None]
        where = None if meta is None else meta.hidden_indices if meta.hidden_indices is not None else meta.logits_indices
        if states is not None and where is not None:
            states = states.flatten(0, 1)[where][None]
        return logits if states is None else (logits, states)
