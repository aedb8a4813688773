"""FSDP2 (torch.distributed.fsdp.fully_shard) applied to an lmforge Transformer from outside.

Each block becomes one FSDP unit: its parameters are DTensors sharded along dim 0 over the mesh's
data-parallel dimension, all-gathered just before the block's forward (and backward), gradients
reduce-scattered after its backward (Zhao et al. 2023, "PyTorch FSDP"; FSDP2 = per-parameter DTensor
sharding). The root unit holds the embedding, final norm and head (tied or not, they share one unit).

reshard_after_forward:
  True   free gathered block weights after forward, gather again for backward (ZeRO-3 memory)
  False  keep them until backward (ZeRO-2-like: one fewer all-gather per block, more memory)
  int n  keep them resharded over a group of n ranks (e.g. the GPUs of one node: intra-node re-gather)
The root is never resharded after forward (its backward comes first anyway).
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError

def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: a Transformer's ModuleList, a pipeline stage's ModuleDict, or those of a
    wrapped Transformer's `.backbone` (a reward model's SequenceHead)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None and hasattr(model, "backbone"):
        blocks = getattr(model.backbone, "blocks", None)
    if blocks is None:
        raise ConfigError("parallelism needs a model with .blocks (an lmforge Transformer), "
                          f"got {type(model).__name__}")
    return list(blocks.values()) if isinstance(blocks, nn.ModuleDict) else list(blocks)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def mixed_precision(param_dtype: str, reduce_dtype: str):
    """FSDP2's MixedPrecisionPolicy for ParallelConfig's param_dtype / reduce_dtype names (fully_shard and
    replicate both take it): weights gathered and computed in param_dtype, gradients reduced in reduce_dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])


def apply_fsdp(model: nn.Module, mesh, *, param_dtype: str = "fp32", reduce_dtype: str = "fp32",
               reshard_after_forward: bool | int = True) -> nn.Module:
    """Shard `model` in place: every block, then the root. `mesh` is 1-D (FSDP) or 2-D ("dp_replicate",
    "dp_shard": HSDP, replicated across the first dim and sharded across the second)."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision(param_dtype, reduce_dtype)
    for block in blocks_of(model):
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=False)
    return model
