"""Adaptation: parameter-efficient fine-tuning applied to a model from outside (the model code knows
nothing of adapters). LoRA (lmforge.adapt.lora) is the adapter, DoRA (lmforge.adapt.dora) its weight-decomposed
variant, and over a quantized base (lmforge.adapt.qlora: how checkpoints record and rebuild it) it is QLoRA;
training runs through the one Trainer with any objective, since only parameters that require grad reach the
optimizer."""

from __future__ import annotations

from typing import Any

from lmforge import lazy_attribute

# name -> defining module, imported on first use: LoRAConfig (lmforge.adapt.config) is read without torch by the
# post-training commands' --help, and importing it runs this package first
_LAZY = {
    "DoRALinear": "lmforge.adapt.dora", "LoRAConfig": "lmforge.adapt.config", "LoRALinear": "lmforge.adapt.lora",
    "ParamCount": "lmforge.adapt.lora", "adapters_disabled": "lmforge.adapt.lora", "apply_lora": "lmforge.adapt.lora",
    "load_lora": "lmforge.adapt.lora", "lora_state_dict": "lmforge.adapt.lora", "merge_lora": "lmforge.adapt.lora",
    "register_base_layer": "lmforge.model.surgery", "trainable_parameters": "lmforge.adapt.lora",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    return lazy_attribute(globals(), _LAZY, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
