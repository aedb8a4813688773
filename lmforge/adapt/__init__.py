"""Adaptation: parameter-efficient fine-tuning applied to a model from outside (the model code knows
nothing of adapters). LoRA (lmforge.adapt.lora) is the adapter, DoRA (lmforge.adapt.dora) its weight-decomposed
variant, and over a quantized base (lmforge.adapt.qlora: how checkpoints record and rebuild it) it is QLoRA;
training runs through the one Trainer with any objective, since only parameters that require grad reach the
optimizer."""

from lmforge.adapt.dora import DoRALinear
from lmforge.adapt.lora import (LoRAConfig, LoRALinear, ParamCount, adapters_disabled, apply_lora, load_lora,
                                lora_state_dict, merge_lora, trainable_parameters)
from lmforge.adapt.qlora import register_base_layer

__all__ = ["DoRALinear", "LoRAConfig", "LoRALinear", "ParamCount", "adapters_disabled", "apply_lora", "load_lora",
           "lora_state_dict", "merge_lora", "register_base_layer", "trainable_parameters"]
