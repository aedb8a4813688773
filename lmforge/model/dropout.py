"""Setting a built model's dropout from outside, without touching its config: post-training switches it off for
the objectives TRL's trainers do (`disable_dropout`), while the checkpoints keep the model's own `dropout`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterator

from torch import nn

from lmforge.model.layers.attention import AttnSpec


def dropout_sites(model: nn.Module) -> Iterator[tuple[float, Callable[[float], None]]]:
    """Every place `model` applies dropout: its probability and a setter of it. The nn.Dropout modules (embeddings,
    sublayer outputs, LoRA's input dropout, a wrapped HF model's), and the layers whose training AttnSpec
    (`train_spec`: Attention, MLA) drops attention weights, which is no module: its setter sets the layer's own
    `dropout` with it, as Attention rebuilds its specs from that when its parameters are replaced (FSDP2). The one
    walk set_dropout and activation checkpointing's draws_random share: a site added here is known to both."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            yield m.p, functools.partial(setattr, m, "p")
        spec = getattr(m, "train_spec", None)
        if isinstance(spec, AttnSpec):
            yield spec.dropout, functools.partial(_set_attention_dropout, m)


def _set_attention_dropout(layer: nn.Module, p: float) -> None:
    layer.dropout, layer.train_spec = p, dataclasses.replace(layer.train_spec, dropout=p)


def set_dropout(model: nn.Module, p: float) -> int:
    """Set every dropout of `model` (dropout_sites) to probability `p`; how many had another probability."""
    changed = 0
    for was, set_to in list(dropout_sites(model)):
        changed += was != p
        set_to(p)
    return changed
