"""Apply a ParallelConfig to a model from outside, in torchtitan's order:
tensor parallelism -> activation checkpointing -> torch.compile per block -> FSDP2 (or DDP: torch's composable
DDP for whole models, FSDP2's replicate over tensor-parallel shards, an all-reduce after the schedule for
pipeline stages).

TP first, because FSDP shards the TP-local DTensors again along the data-parallel dims (2-D
parameters: Shard(0) over dp_shard, column/row shards over tp); AC and compile wrap the blocks before
FSDP's per-block units are formed, so each unit gathers its weights once per (re)computation.
Pipeline stages are cut before this (lmforge.parallel.pp.split_stage) and each stage is parallelised
the same way over the mesh without its "pp" dim.
"""

from __future__ import annotations

from torch import nn

from lmforge.errors import ConfigError
from lmforge.parallel.ac import apply_ac
from lmforge.parallel.config import ParallelConfig, submesh
from lmforge.parallel.ddp import broadcast_module_
from lmforge.parallel.fsdp import apply_fsdp, blocks_of, mixed_precision
from lmforge.parallel.tp import apply_tp


def data_parallel_mesh(mesh):
    """The mesh FSDP shards over: dp_shard and cp flattened (context-parallel ranks hold different tokens,
    so they shard parameters too), with dp_replicate in front for HSDP; None without data parallelism."""
    names = mesh.mesh_dim_names or ()
    shard = [n for n in ("dp_shard", "cp") if n in names]
    replicate = ["dp_replicate"] if "dp_replicate" in names else []
    if not shard:
        return submesh(mesh, *replicate) if replicate else None
    if len(shard) == 2:  # a flattened dim is reachable from the root mesh by its new name
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        shard = ["dp_shard_cp"]
    return mesh[tuple(replicate + shard)] if replicate else mesh[shard[0]]


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh) -> nn.Module:
    """Parallelise `model` (a Transformer or a pipeline stage) in place over `mesh` and return it. mesh=None
    (a pipeline stage with no other dims) applies only activation checkpointing and compile."""
    tp_mesh = submesh(mesh, "tp") if mesh is not None else None
    if tp_mesh is not None:
        apply_tp(model, tp_mesh, sequence_parallel=cfg.sequence_parallel, loss_parallel=cfg.loss_parallel)
    if cfg.activation_checkpoint != "none":
        apply_ac(model, cfg.activation_checkpoint, cfg.ac_every)
    if cfg.compile:
        for block in blocks_of(model):
            block.compile()
    dp_mesh = data_parallel_mesh(mesh) if mesh is not None else None
    names = dp_mesh.mesh_dim_names if dp_mesh is not None else ()
    if dp_mesh is not None and names != ("dp_replicate",):
        apply_fsdp(model, dp_mesh, param_dtype=cfg.param_dtype, reduce_dtype=cfg.reduce_dtype,
                   reshard_after_forward=cfg.reshard_after_forward)
    elif dp_mesh is not None and cfg.tp == 1 and cfg.pp == 1:  # replicas only: DDP (torch's composable replicate)
        from torch.distributed._composable import replicate

        replicate(model, device_mesh=dp_mesh)
    elif (replicas := stage_replicas(cfg, mesh)) is not None:  # whole pipeline stages: the runner averages their
        broadcast_module_(model, group=replicas)  # gradients; they start equal
    elif dp_mesh is not None:  # replicas of TP shards: FSDP2's replicate
        replicate_fsdp(model, dp_mesh, cfg)
    return model


def stage_replicas(cfg: ParallelConfig, mesh):
    """The process group of a pipeline stage's whole replicas (pp and dp_replicate only), else None. Their gradients
    are averaged by ParallelRunner after each schedule step (ddp.average_gradients): the composable DDP's hooks
    never averaged them under the pipeline schedule (each replica stepped on its own rows), and FSDP2's replicate
    would make the weights DTensors, which Shampoo, SOAP and Adafactor refuse."""
    if mesh is None or cfg.pp == 1 or mesh.mesh_dim_names != ("dp_replicate",):  # (mesh: the stage's, without pp)
        return None
    return mesh.get_group()


def replicate_fsdp(model: nn.Module, dp_mesh, cfg: ParallelConfig) -> None:
    """DDP built on FSDP2 (a shard group of one) for replicas of tensor-parallel shards: the composable DDP fails on
    TP's DTensor weights ("Tensor list must have at least one tensor"); FSDP2's replicate composes with TP as
    fully_shard does. Like apply_fsdp, every block is a unit of its own (its gradients are all-reduced as soon as
    its backward is done, overlapping the backward of the blocks before it), then the root, all under the
    mixed-precision policy of param_dtype / reduce_dtype."""
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate
    except ImportError:  # older torch
        import torch

        raise ConfigError(f"parallel.dp_replicate={cfg.dp_replicate} with tp={cfg.tp} needs FSDP2's replicate (a newer "
                          f"torch than {torch.__version__}); use dp_shard instead") from None
    mp = mixed_precision(cfg.param_dtype, cfg.reduce_dtype)
    for block in blocks_of(model):
        replicate(block, mesh=dp_mesh, mp_policy=mp)
    replicate(model, mesh=dp_mesh, mp_policy=mp)


def dp_rank_and_size(mesh) -> tuple[int, int]:
    """This rank's index among the data-parallel replicas (which slice of the batch it reads)."""
    rank, size = 0, 1
    for name in ("dp_replicate", "dp_shard"):
        if name in (mesh.mesh_dim_names or ()):
            rank, size = rank * mesh[name].size() + mesh[name].get_local_rank(), size * mesh[name].size()
    return rank, size


__all__ = ["parallelize", "data_parallel_mesh", "dp_rank_and_size", "stage_replicas"]
