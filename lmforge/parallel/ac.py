"""Activation checkpointing applied from outside: recompute a block's activations in backward instead
of keeping them (Chen et al. 2016), trading ~1/3 more compute for activation memory.

  full       every `every`-th block is recomputed whole (layer-selective when every > 1)
  selective  operator-level (Korthikanti et al. 2022, sec. 5): inside every block, outputs of the
             expensive ops (matmuls, attention) are saved and only the cheap element-wise ones (norms,
             activations, rope) are recomputed - most of the memory back for a few percent of compute

A model that draws random numbers in its blocks' training forward (dropout > 0, noisy MoE gating) has the
RNG state saved with each checkpoint and restored for the recompute, so backward sees the forward's own
dropout masks and gating noise; otherwise the recompute would draw new ones and the gradients would belong
to another forward than the loss. Models without randomness skip it (torchtitan's default): nothing to
restore, and one RNG-state copy per block and device less.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError


def _save_expensive_ops():
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    keep = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default,
            aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_cudnn_attention.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def draws_random(model: nn.Module) -> bool:
    """Whether the model's training forward draws random numbers: noisy MoE gating, or a dropout its modules hold
    at p > 0 (an nn.Dropout: residual, MLP and embedding outputs, LoRA's adapter dropout applied from outside; or
    attention's dropout on its weights, the `dropout` of a layer's training AttnSpec). The modules, not
    model.cfg.dropout: post-training's drop_dropout sets them to 0 and keeps the config's (set_dropout). True for
    a model without an lmforge ModelConfig."""
    from lmforge.model.dropout import dropout_sites

    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(cfg, "dropout"):
        return True
    return (cfg.mlp == "moe" and cfg.moe_cfg.noisy) or any(p > 0 for p, _ in dropout_sites(model))


def apply_ac(model: nn.Module, mode: str, every: int = 1) -> nn.Module:
    """Wrap model.blocks in place ('full' every n-th block, or 'selective' in every block) with torch's
    checkpoint_wrapper, as torchtitan does: FSDP's hooks then sit outside the recomputed region.
    Parameter names gain a `_checkpoint_wrapped_module.` part, which torch.distributed.checkpoint's
    state-dict functions remove, so distributed checkpoints keep the plain names. The RNG state is
    preserved for the recompute where the model draws random numbers (draws_random)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode not in ("full", "selective"):
        raise ConfigError(f"activation_checkpoint={mode!r}; choose full or selective")
    rng = draws_random(model)
    blocks = model.blocks
    keys = list(blocks.keys()) if isinstance(blocks, nn.ModuleDict) else range(len(blocks))
    for i, key in enumerate(keys):
        if mode == "selective":
            blocks[key] = checkpoint_wrapper(blocks[key], context_fn=_save_expensive_ops, preserve_rng_state=rng)
        elif i % every == 0:
            blocks[key] = checkpoint_wrapper(blocks[key], preserve_rng_state=rng)
    return model
