"""Context parallelism for long sequences: each of cp ranks holds 1/cp of every sequence's tokens and
all of attention's queries for them; keys and values are all-gathered across the cp group in every
layer (the all-gather form Llama 3 used, Dubey et al. 2024 sec. 3.3.2, rather than ring attention's
pass-around: same result, simpler, the K/V of a GQA model being small next to the queries).

Load balance for causal attention: the sequence is cut into 2·cp chunks and rank r holds chunks r and
2cp-1-r (a query late in the sequence attends to many keys, an early one to few; pairing them gives
every rank the same work). Attention needs no reordering of the gathered keys: the mask compares the
global positions of queries and keys.

No model change: `ContextParallelKV` is a cache kind (`attend`, lmforge.model.layers.attention), so
attention hands it its q, k, v and it attends over every rank's keys; `apply_cp` passes it (and the positions) to the
model through a forward pre-hook, and `shard_batch` gives each rank its tokens of a batch. Training
layout only (causal, full attention: sliding windows, MLA, packed documents and multi-token prediction
are refused or skipped).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.layers.attention import attend_with
from lmforge.model.meta import AttnMetadata


class _GatherSequence(torch.autograd.Function):
    """(B, KV, T_local, hd) -> (B, KV, cp·T_local, hd) in rank order; backward sums every rank's gradient
    for these keys and keeps the local slice (a reduce-scatter; gloo lacks it, so all-reduce + slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.T = group, x.shape[2]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        r = dist.get_rank(ctx.group)
        return grad[:, :, r * ctx.T:(r + 1) * ctx.T], None


def load_balanced_positions(seq_len: int, rank: int, cp: int) -> torch.Tensor:
    """Global positions held by `rank`: chunks rank and 2cp-1-rank of 2cp equal chunks."""
    if seq_len % (2 * cp):
        raise ConfigError(f"seq_len={seq_len} must be divisible by 2·cp={2 * cp} for context parallelism")
    c = seq_len // (2 * cp)
    early, late = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat([torch.arange(early, early + c), torch.arange(late, late + c)])


class ContextParallelKV:
    """Stands where a KV cache would: gathers each layer's k, v over the cp group; the mask lets a query
    see the keys at global positions <= its own."""

    def __init__(self, positions: torch.Tensor, group):
        self.group, self.length = group, 0
        parts = [torch.empty_like(positions) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, positions.contiguous(), group=group)
        key_pos = torch.cat(parts)
        self._mask = key_pos[None, :] <= positions[:, None]  # (T_local, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _GatherSequence.apply(k, self.group), _GatherSequence.apply(v, self.group)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec, meta=None
               ) -> torch.Tensor:
        """The cache seam (lmforge.model.layers.attention): local queries over every rank's keys."""
        if spec.window > 0:
            raise ConfigError("context parallelism supports full-attention layers only (no sliding windows)")
        k, v = self.update(layer, k, v)
        return attend_with(q, k, v, self.mask(q.shape[2], q.device), spec)

    def mask(self, T: int, device=None) -> torch.Tensor:
        return self._mask.to(device) if device is not None else self._mask

    def advance(self, T: int) -> None:
        pass


def shard_batch(batch: dict[str, torch.Tensor], cp_mesh) -> dict[str, torch.Tensor]:
    """This rank's tokens of every (B, T) tensor of a training batch (input_ids, targets, loss_mask...),
    and their global positions as batch["positions"] (B, T/cp)."""
    if "doc_ids" in batch:
        raise ConfigError("context parallelism with packed documents (doc_ids) is not supported; "
                          "set parallel.cp=1 or train without packing")
    T = batch["input_ids"].shape[1]
    pos = load_balanced_positions(T, cp_mesh.get_local_rank(), cp_mesh.size()).to(batch["input_ids"].device)
    out = {k: v[:, pos] if v.dim() >= 2 and v.shape[1] == T else v for k, v in batch.items()}
    out["positions"] = pos.expand(batch["input_ids"].shape[0], -1)
    return out


def apply_cp(model: nn.Module, cp_mesh) -> nn.Module:
    """Make `model(local_ids)` context-parallel in training mode: a forward pre-hook turns a call on this
    rank's tokens into model(local_ids, positions=global positions, cache=ContextParallelKV; with a length-dependent
    RoPE also meta.rope_lengths = the whole sequence's length), so objectives
    that call model(batch["input_ids"]) run unchanged on shard_batch's output. Eval mode is untouched
    (evaluation sees whole sequences)."""
    group, rank, cp = cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size()

    def hook(module, args, kwargs):
        if not module.training or kwargs.get("cache") is not None:
            return None
        ids = args[0] if args else kwargs["input_ids"]
        pos = kwargs.get("positions")
        if pos is None:
            pos = load_balanced_positions(ids.shape[1] * cp, rank, cp).to(ids.device)
        pos = pos[0] if pos.dim() == 2 else pos  # every row of a batch holds the same positions
        extra = {}
        if getattr(getattr(module, "rope", None), "length_dependent", False):
            # dynamic NTK / LongRoPE follow the whole sequence's length, not this rank's last position
            meta = kwargs.get("meta") or AttnMetadata()
            extra["meta"] = dataclasses.replace(meta, rope_lengths=torch.full_like(pos, ids.shape[1] * cp))
        return args, {**kwargs, "positions": pos, "cache": ContextParallelKV(pos, group), **extra}

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return model
