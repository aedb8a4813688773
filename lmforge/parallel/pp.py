"""Pipeline parallelism with torch.distributed.pipelining: the blocks are split into `pp` consecutive
stages, one per rank; a batch is cut into m micro-batches that flow through the stages.

  GPipe (Huang et al. 2019)   all m forwards, then all m backwards: activations of m micro-batches live
  1F1B  (Narayanan et al. 2021, PipeDream-Flush)  after a warm-up of p - 1 forwards each stage alternates
                              one forward, one backward: at most p micro-batches' activations live
Both idle for the same bubble: a fraction (p - 1) / (m + p - 1) of each stage's time (GPipe sec. 2.2).

A stage keeps the original parameter names (blocks.<i>..., tok_emb, lm_head), so a distributed
checkpoint written by a pipelined run loads into any other layout.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.transformer import TrunkFront, embed_scales


def bubble_fraction(stages: int, microbatches: int) -> float:
    """Idle fraction of a GPipe/1F1B step: (p - 1) / (m + p - 1)."""
    return (stages - 1) / (microbatches + stages - 1)


class StageModule(TrunkFront, nn.Module):
    """Blocks [lo, hi) of a Transformer; the first stage also embeds, the last normalises and projects. Every
    stage starts from the Transformer's own front (TrunkFront.block_inputs: the first stage's embedding, the
    residual dtype, each stage's RoPE tables). Training layout only: causal attention over positions 0..T-1,
    no cache (MoE/MTP auxiliary losses are not carried between stages)."""

    def __init__(self, model: nn.Module, lo: int, hi: int):
        super().__init__()
        self.cfg, self.first, self.last = model.cfg, lo == 0, hi == len(model.blocks)
        self.tok_emb = model.tok_emb if self.first else None
        self._embed_scales = embed_scales(self.cfg.embed_scale)
        self.residual_dtype = model.residual_dtype
        self.pos_emb = model.pos_emb if self.first else None
        self.drop = model.drop
        self.rope = model.rope
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in range(lo, hi)})
        self.final_norm = model.final_norm if self.last else None
        self.lm_head = model.lm_head if self.last else None
        self.seq_shards = 1  # tensor parallel sets tp: a later stage receives 1/tp of the sequence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The first stage takes (B, T) ids, a later one the previous stage's (B, T / seq_shards, d)."""
        from lmforge.model.transformer import Transformer

        x, rope = self.block_inputs(x, length=None if self.first else x.shape[1] * self.seq_shards)
        for block in self.blocks.values():
            x = block(x, rope, "causal", None)
        if self.last:
            x = Transformer.logits(self, self.final_norm(x) if self.final_norm is not None else x)
        return x


def split_stage(model: nn.Module, stage: int, stages: int) -> StageModule:
    n = len(model.blocks)
    if n % stages:
        raise ConfigError(f"parallel.pp={stages} must divide n_layers={n}")
    if model.cfg.tie_embeddings and stages > 1:
        raise ConfigError("parallel.pp > 1 with model.tie_embeddings: the embedding and head live on different "
                          "stages; untie them (tie_embeddings=false)")
    per = n // stages
    return StageModule(model, stage * per, (stage + 1) * per)


def build_schedule(stage_module: nn.Module, stage: int, stages: int, pp_group, microbatches: int,
                   kind: str, loss_fn, device):
    """The torch pipelining schedule for this rank's stage. step(x) on the first stage,
    step(target=y, losses=list) on the last, step() in between."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    schedules = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if kind not in schedules:
        raise ConfigError(f"parallel.pp_schedule={kind!r}; choose one of {sorted(schedules)}")
    pstage = PipelineStage(stage_module, stage, stages, device, group=pp_group)
    # the schedule's own gradient scaling divides all of .grad by n_microbatches after each step, so with
    # gradient accumulation the earlier micro-steps' gradients were divided again: the caller scales the loss
    extra = {"scale_grads": False} if schedule_scales_grads() else {}
    return schedules[kind](pstage, n_microbatches=microbatches, loss_fn=loss_fn, **extra)


@functools.lru_cache(maxsize=None)
def schedule_scales_grads() -> bool:
    """Whether this torch's pipelining schedules take scale_grads (torch >= 2.6): build_schedule turns it off and
    the loss is divided by the micro-batch count instead; older ones always divide (accumulation is then refused)."""
    import inspect

    from torch.distributed.pipelining import ScheduleGPipe

    return "scale_grads" in inspect.signature(ScheduleGPipe.__init__).parameters
