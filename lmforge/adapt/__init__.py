"""Adaptation: parameter-efficient fine-tuning applied to a model from outside (the model code knows
nothing of adapters). LoRA (lmforge.adapt.lora) is the adapter; training runs through the one Trainer
with any objective, since only parameters that require grad reach the optimizer."""

from lmforge.adapt.lora import (LoRAConfig, LoRALinear, ParamCount, adapters_disabled, apply_lora, load_lora,
                                lora_state_dict, merge_lora, trainable_parameters)

__all__ = ["LoRAConfig", "LoRALinear", "ParamCount", "adapters_disabled", "apply_lora", "load_lora", "lora_state_dict",
           "merge_lora", "trainable_parameters"]
