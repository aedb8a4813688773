"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019) with DTensor's parallelize_module, from outside.

Within a block, the first matmul of each pair is split by output columns and the second by input rows,
so a block needs one all-reduce forward and one backward (sec. 3):
    attention  wq, wk, wv  column-parallel: each rank computes n_heads / tp whole heads
               wo          row-parallel: partial sums of the heads, reduced
    MLP        up, gate    column-parallel;  down  row-parallel
Sequence parallelism (Korthikanti et al. 2022): between blocks the residual stream, the norms and
dropout are split along the sequence instead of replicated; the all-reduce becomes a reduce-scatter
after wo/down and an all-gather before wq/up (same bytes, activations 1/tp the size).
Loss parallelism: the head is column-parallel over the vocabulary and the cross-entropy reduces the
sharded logits' max and sum-exp across ranks, so the (tokens x vocab) logits are never gathered.

Heads are whole per rank, so each attention module's head counts are set to the local ones. Tied embeddings
stay tied: the embedding (row-parallel) and the head (column-parallel) both shard the one (vocab, d) matrix by
vocabulary rows.
"""

from __future__ import annotations

from torch import nn

from lmforge.errors import ConfigError
from lmforge.parallel.fsdp import blocks_of


def _plain_output(module: nn.Module, args, out):
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return out.clone() if isinstance(out, AsyncCollectiveTensor) else out


def apply_tp(model: nn.Module, tp_mesh, *, sequence_parallel: bool = True, loss_parallel: bool = False) -> nn.Module:
    """Shard an lmforge Transformer over the 1-D `tp_mesh` in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    tp = tp_mesh.size()
    cfg = model.cfg
    if cfg.n_heads % tp or cfg.kv_heads % tp:
        raise ConfigError(f"parallel.tp={tp} must divide n_heads={cfg.n_heads} and n_kv_heads={cfg.kv_heads}")
    seq = Shard(1) if sequence_parallel else Replicate()
    top = {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
        "lm_head": ColwiseParallel(input_layouts=seq, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                   use_local_output=not loss_parallel),
        "final_norm": SequenceParallel() if sequence_parallel else None,
    }
    # a pipeline stage lacks the embedding or the head
    present = {k: v for k, v in top.items() if v is not None and getattr(model, k, None) is not None}
    parallelize_module(model, tp_mesh, present)
    if "tok_emb" in present:  # its row-parallel output is an AsyncCollectiveTensor (a reduce not yet waited on):
        # fed to a compiled first block, the compiled backward returned no gradient for it (tp alone crashed in
        # DTensor's backward; with FSDP the embedding silently got none). A clone waits and keeps the autograd link
        model.tok_emb.register_forward_hook(_plain_output)
    if cfg.tie_embeddings and "tok_emb" in present and "lm_head" in present:
        # both plans shard the (vocab, d) matrix by vocabulary rows (Shard(0)), but each module got its own
        # DTensor copy: tie the head back to the embedding's, so one parameter gets both gradients (Megatron)
        model.lm_head.weight = model.tok_emb.weight
    if sequence_parallel and hasattr(model, "seq_shards"):  # a pipeline stage
        model.seq_shards = tp
    for block in blocks_of(model):
        plan = {
            "attn": PrepareModuleInput(input_layouts=(seq, None, None, None, None),
                                       desired_input_layouts=(Replicate(), None, None, None, None)),
            "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel(output_layouts=seq),
            "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel(output_layouts=seq),
        }
        if block.mlp.gate is not None:
            plan["mlp.gate"] = ColwiseParallel()
        if block.attn.q_norm is not None:  # QK-norm's weights are shared by every head: replicated, their
            # gradients summed over the ranks' heads, as a norm's over sequence shards (heads are dim 2)
            plan.update({f"attn.{n}": SequenceParallel(sequence_dim=2, use_local_output=True)
                         for n in ("q_norm", "k_norm")})
        if sequence_parallel:  # local outputs: post-norm and sandwich blocks add them to plain tensors
            norms = ("norm1", "norm2", "post_attn_norm", "post_mlp_norm")
            plan.update({n: SequenceParallel(use_local_output=True) for n in norms if getattr(block, n) is not None})
        parallelize_module(block, tp_mesh, plan)
        block.attn.n_heads //= tp  # the local heads: forward views q as (B, T, n_heads / tp, hd)
        block.attn.n_kv //= tp
    return model
