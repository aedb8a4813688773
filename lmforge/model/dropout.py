"""Setting a built model's dropout from outside, without touching its config: post-training switches it off for
the objectives TRL's trainers do (`disable_dropout`), while the checkpoints keep the model's own `dropout`."""

from __future__ import annotations

import dataclasses

from torch import nn

from lmforge.model.layers.attention import AttnSpec


def set_dropout(model: nn.Module, p: float) -> int:
    """Set every dropout of `model` to probability `p`: the nn.Dropout modules (embeddings, sublayer outputs, LoRA's
    input dropout, a wrapped HF model's) and the dropout attention applies to its weights, which is no module but the
    `dropout` of the layer's training AttnSpec (Attention, MLA: any layer holding a `train_spec`). The layer's own
    `dropout` is set too, as Attention rebuilds its specs from it when its parameters are replaced (FSDP2).
    Returns how many dropouts had another probability."""
    changed = 0
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            changed += m.p != p
            m.p = p
        spec = getattr(m, "train_spec", None)
        if isinstance(spec, AttnSpec):
            changed += spec.dropout != p
            m.dropout, m.train_spec = p, dataclasses.replace(spec, dropout=p)
    return changed
