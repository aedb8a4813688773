"""ParallelConfig: how a training run is laid out over its processes, and the device mesh built from it.

The world is factored as  pp x dp_replicate x dp_shard x cp x tp  (outermost first, as torchtitan does:
tensor parallelism, the most communication-hungry, on the innermost and fastest links). Data-parallel
ranks are dp_replicate x dp_shard (HSDP when both > 1); context-parallel ranks also shard the FSDP
parameters (FSDP runs over the flattened dp_shard x cp dimension), since they see different tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lmforge.config import check, coerce_fields
from lmforge.errors import ConfigError

DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    dp_replicate: int = 1
    """replicated data-parallel groups (DDP across them; HSDP when dp_shard > 1 too)"""
    dp_shard: int = 1
    """FSDP2 shard group size (1 = no FSDP)"""
    tp: int = 1
    """tensor-parallel degree: attention heads and MLP width split across ranks (divides n_heads, n_kv_heads);
    pretraining only (lmforge train)"""
    pp: int = 1
    """pipeline stages (divides n_layers); pretraining only (lmforge train)"""
    cp: int = 1
    """context-parallel degree: each rank holds seq_len / cp tokens of every sequence; pretraining only
    (lmforge train)"""
    pp_schedule: Literal["gpipe", "1f1b"] = "1f1b"
    """pipeline schedule: 'gpipe' (all forwards, then all backwards) or '1f1b' (less activation memory);
    pretraining only (lmforge train)"""
    microbatches: int = 0
    """pipeline micro-batches per step; 0 = 2·pp; pretraining only (lmforge train)"""
    sequence_parallel: bool = True
    """with tp > 1: norms and residual stream sharded along the sequence (Korthikanti et al. 2022); pretraining
    only (lmforge train)"""
    loss_parallel: bool = False
    """with tp > 1: cross-entropy on vocabulary-sharded logits (the full logits never exist on one rank);
    pretraining only (lmforge train)"""
    param_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP2's mixed precision (layouts with FSDP2 units only: fsdp_units): the dtype weights are gathered and
    computed in"""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """FSDP2's mixed precision (fsdp_units only): the dtype gradients are reduced in"""
    reshard_after_forward: bool = True
    """FSDP2: free gathered block weights after forward and gather again for backward (ZeRO-3); false keeps them
    (one all-gather fewer per block, more memory)"""
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    """'full': recompute every block; 'selective': keep matmul/attention outputs, recompute the rest"""
    ac_every: int = 1
    """with 'full': checkpoint every n-th block only (layer-selective)"""
    compile: bool = False
    """torch.compile each block after parallelisation"""

    def __post_init__(self) -> None:
        coerce_fields(self, "parallel")  # each field's type, named when wrong
        for name in DIMS:
            check(getattr(self, name) >= 1, f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        check(self.pp_schedule in ("gpipe", "1f1b"), f"parallel.pp_schedule={self.pp_schedule!r}; choose gpipe or 1f1b")
        check(self.microbatches >= 0, f"parallel.microbatches must be >= 0, got {self.microbatches}")
        check(self.ac_every >= 1, f"parallel.ac_every must be >= 1, got {self.ac_every}")
        check(self.activation_checkpoint in ("none", "full", "selective"),
              f"parallel.activation_checkpoint={self.activation_checkpoint!r}; choose none, full or selective")
        check(not self.loss_parallel or self.tp > 1, "parallel.loss_parallel needs tp > 1")
        check(self.pp == 1 or self.cp == 1, f"parallel.cp={self.cp} with pp={self.pp}: pipeline stages do not carry "
                                            "context-parallel positions yet; use one of them")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    def for_world(self, world: int) -> "ParallelConfig":
        """The layout a launch of `world` processes runs: this one, or FSDP2 over all of them (dp_shard=world)
        where every size is 1 (`--nproc N` without a [parallel] layout)."""
        if self.world_size == 1 and world > 1:
            return dataclasses.replace(self, dp_shard=world)
        return self

    @property
    def sizes(self) -> str:
        """The layout's sizes above 1, for messages: 'dp_shard=2 x tp=2' ('all 1')."""
        return " x ".join(f"{d}={getattr(self, d)}" for d in DIMS if getattr(self, d) > 1) or "all 1"

    @property
    def fsdp_units(self) -> bool:
        """Whether parallelize wraps the model (or its stages) in FSDP2 units, which alone apply param_dtype and
        reduce_dtype: fully_shard over dp_shard and cp (or one process's size-1 mesh), FSDP2's replicate over the
        replicas of tensor-parallel shards. DDP, tp or pp alone and whole pipeline-stage replicas have none."""
        return self.dp_shard > 1 or self.cp > 1 or self.world_size == 1 or (self.dp_replicate > 1 and self.tp > 1)

    @property
    def n_microbatches(self) -> int:
        return self.microbatches or 2 * self.pp

    def validate(self, world_size: int, model_cfg=None, *, seq_len: int | None = None,
                 batch_size: int | None = None) -> None:
        """One-line errors for a layout that does not fit the launch or the model."""
        if self.world_size != world_size:
            raise ConfigError(f"the parallel layout ({self.sizes}) needs world_size={self.world_size} but the launch "
                              f"has {world_size} processes; make the product of the sizes equal the process count")
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) != "fp32" and not self.fsdp_units:
                raise ConfigError(f"parallel.{name}={getattr(self, name)!r} is FSDP2's mixed precision, and this "
                                  f"layout ({self.sizes}) has no FSDP2 units (dp_shard or cp > 1, or dp_replicate "
                                  "with tp > 1); leave it fp32 (bf16 compute: the run's dtype = 'bf16') or shard with "
                                  "dp_shard")
        if model_cfg is not None:
            heads, kv = model_cfg.n_heads, model_cfg.kv_heads
            if heads % self.tp or kv % self.tp:
                raise ConfigError(f"parallel.tp={self.tp} must divide n_heads={heads} and n_kv_heads={kv}")
            if model_cfg.n_layers % self.pp:
                raise ConfigError(f"parallel.pp={self.pp} must divide n_layers={model_cfg.n_layers}")
            if self.pp > 1 and model_cfg.tie_embeddings:
                raise ConfigError("parallel.pp > 1 with model.tie_embeddings: the embedding and head live on different "
                                  "stages; untie them (tie_embeddings=false)")
            if self.tp > 1 and (model_cfg.mlp != "dense" or model_cfg.attention != "mha" or model_cfg.attn_sinks
                                or model_cfg.fused_proj):
                raise ConfigError("parallel.tp > 1 supports dense MLPs and mha attention without sinks or fused "
                                  "projections; set tp=1 for this model")
            if self.tp > 1 and model_cfg.ff % self.tp:  # column shards of up/gate must match down's row shards
                raise ConfigError(f"parallel.tp={self.tp} must divide the MLP width d_ff={model_cfg.ff}; set "
                                  f"model.d_ff to a multiple of {self.tp}")
            if self.sequence_parallel and self.tp > 1 and model_cfg.pos_emb in ("learned", "sinusoidal"):
                raise ConfigError(f"parallel.sequence_parallel with pos_emb={model_cfg.pos_emb!r}: use rope or set "
                                  "sequence_parallel=false")
            # MTP heads shift the sequence by k tokens, across the ranks' chunks (cp: the loss came out silently off
            # one process's) or sequence shards (tp: a size mismatch in the first forward)
            if self.cp > 1 and model_cfg.mtp is not None:
                raise ConfigError(f"parallel.cp={self.cp} with [model.mtp]: the MTP heads read tokens k ahead, across "
                                  "the ranks' sequence chunks; use dp_shard, dp_replicate or tp (with "
                                  "sequence_parallel = false) for this model")
            if self.tp > 1 and self.sequence_parallel and model_cfg.mtp is not None:
                raise ConfigError("parallel.sequence_parallel with [model.mtp]: the MTP heads read tokens k ahead, "
                                  "across the ranks' sequence shards; set parallel.sequence_parallel = false")
            if self.cp > 1 and (model_cfg.attention != "mha" or model_cfg.sliding_window):
                raise ConfigError(f"parallel.cp={self.cp} supports full mha/gqa attention; this model has attention="
                                  f"{model_cfg.attention!r}, sliding_window={model_cfg.sliding_window}")
        if seq_len is not None:
            self.check_seq_len(seq_len)
        dp = self.dp_replicate * self.dp_shard
        unit = dp * (self.n_microbatches if self.pp > 1 else 1)
        if batch_size is not None and batch_size % unit:
            raise ConfigError(f"batch_size={batch_size} must be divisible by the data-parallel size {dp}"
                              + (f" x microbatches={self.n_microbatches}" if self.pp > 1 else "")
                              + f"; set data.batch_size (the global batch, split over the ranks) to a multiple of "
                              f"{unit}, e.g. {batch_size + unit - batch_size % unit}")


    def check_seq_len(self, seq_len: int) -> None:
        """A training sequence length the layout can split (validate, and ParallelRunner at each step)."""
        # context parallel: 2·cp load-balanced chunks; sequence parallel splits each rank's tokens by tp
        split = (2 * self.cp if self.cp > 1 else 1) * (self.tp if self.sequence_parallel else 1)
        if seq_len % split:
            raise ConfigError(f"seq_len={seq_len} must be divisible by {split} (" + " x ".join(
                ([f"2 x parallel.cp={self.cp}"] if self.cp > 1 else [])
                + ([f"tp={self.tp} for sequence parallelism"] if self.sequence_parallel and self.tp > 1 else []))
                + ")")


def build_mesh(cfg: ParallelConfig, device_type: str = "cpu"):
    """The named device mesh of the dims with size > 1 (a 1-D 'dp_shard' mesh of size 1 if none)."""
    from torch.distributed.device_mesh import init_device_mesh

    names = [d for d in DIMS if getattr(cfg, d) > 1]
    if not names:
        names = ["dp_shard"]
    mesh = init_device_mesh(device_type, tuple(getattr(cfg, d) for d in names), mesh_dim_names=tuple(names))
    return mesh


def submesh(mesh, *names: str):
    """mesh[names] restricted to the names present (None if none are)."""
    present = tuple(n for n in names if n in (mesh.mesh_dim_names or ()))
    if not present:
        return None
    return mesh[present] if len(present) > 1 else mesh[present[0]]


__all__ = ["ParallelConfig", "build_mesh", "submesh", "ConfigError", "DIMS"]
