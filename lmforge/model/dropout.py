"""Setting a built model's dropout from outside, without touching its config: post-training switches it off for
the objectives TRL's trainers do (`disable_dropout`), while the checkpoints keep the model's own `dropout`."""

from __future__ import annotations

import dataclasses
from typing import Iterator

from torch import nn

from lmforge.model.layers.attention import AttnSpec


def dropout_sites(model: nn.Module) -> Iterator[tuple[nn.Module, float]]:
    """Every place `model` applies dropout, with its probability: the nn.Dropout modules (embeddings, sublayer
    outputs, LoRA's input dropout, a wrapped HF model's) and the layers whose training AttnSpec (`train_spec`:
    Attention, MLA) drops attention weights, which is no module. The one walk set_dropout and activation
    checkpointing's draws_random share: a dropout site added here is known to both."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            yield m, m.p
        spec = getattr(m, "train_spec", None)
        if isinstance(spec, AttnSpec):
            yield m, spec.dropout


def set_dropout(model: nn.Module, p: float) -> int:
    """Set every dropout of `model` (dropout_sites) to probability `p`. An attention layer's own `dropout` is set
    with its training AttnSpec, as Attention rebuilds its specs from it when its parameters are replaced (FSDP2).
    Returns how many dropouts had another probability."""
    changed = 0
    for m, was in list(dropout_sites(model)):
        changed += was != p
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = p
        elif isinstance(getattr(m, "train_spec", None), AttnSpec):
            m.dropout, m.train_spec = p, dataclasses.replace(m.train_spec, dropout=p)
        else:  # a kind of site dropout_sites learnt and this function did not
            raise TypeError(f"set_dropout does not know how to set the dropout of a {type(m).__name__}")
    return changed
