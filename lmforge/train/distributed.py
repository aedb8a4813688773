"""Data-parallel pretraining: the pieces the one Trainer needs when `lmforge train` runs on N processes
(`lmforge train --nproc N`, or torchrun directly).

Every rank builds the same model from the same seed, lmforge.parallel applies the layout (FSDP2 over
parallel.dp_shard, DDP over parallel.dp_replicate), and every rank walks the same global batch stream
and keeps its own contiguous rows of it (RankRows): the data state is the single-process state, so a
run resumes on any number of ranks and the loss curve equals one process on the same global batch.
Checkpoints are ordinary lmforge checkpoints: the full weights and optimizer state are gathered to
rank 0, which writes them (LLM.load opens them; a 1-process run resumes from them), and every rank
reads them back into its own shards.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.errors import ConfigError
from lmforge.parallel.config import ParallelConfig
from lmforge.utils import pick_device


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def check_trainer_layout(par: ParallelConfig) -> None:
    if par.tp > 1 or par.pp > 1 or par.cp > 1:
        raise ConfigError(f"parallel.tp={par.tp}, pp={par.pp}, cp={par.cp}: the trainer runs data-parallel layouts "
                          "only for now; use parallel.dp_shard (FSDP2) and/or parallel.dp_replicate (DDP)")


def join(par: ParallelConfig) -> ParallelConfig | None:
    """Join the process group when launched by torchrun or asked for > 1 process; None = single process.
    Launched on N ranks with no [parallel] layout, FSDP2 over all of them (dp_shard = N)."""
    if par.world_size == 1 and "RANK" not in os.environ:
        return None
    from lmforge.parallel.launch import init_distributed

    _, world = init_distributed(expected_world=None if par.world_size == 1 else par.world_size)
    if par.world_size == 1 and world > 1:
        par = dataclasses.replace(par, dp_shard=world)
    check_trainer_layout(par)
    return par if world > 1 else None


def train_device(device: str) -> torch.device:
    """cuda:LOCAL_RANK for each rank of a multi-GPU launch, else what pick_device chooses."""
    d = torch.device(pick_device(device))
    if d.type == "cuda" and d.index is None and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return d


class RankRows:
    """A DataSource wrapper: the wrapped source yields the global batch (identically on every rank, same
    seed); rank r of N keeps rows [r·B/N, (r+1)·B/N). State is the wrapped source's (global) state."""

    def __init__(self, source, rank: int, world: int, batch_size: int):
        if batch_size % world:
            raise ConfigError(f"data.batch_size={batch_size} must be divisible by the data-parallel size {world}")
        self.source, self.rank, self.per = source, rank, batch_size // world

    def next_batch(self) -> dict[str, torch.Tensor]:
        lo = self.rank * self.per
        return {k: v[lo:lo + self.per] for k, v in self.source.next_batch().items()}

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def __getattr__(self, name: str):  # log_stats and the like of the wrapped source
        return getattr(self.source, name)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: index i of a plain optimizer.state_dict() is names[i]."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def gather_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state) as full CPU tensors on rank 0 (empty elsewhere; call on all ranks). The
    optimizer state is keyed like a single-process optimizer.state_dict() (integer ids)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from lmforge.parallel.checkpoint import gather_full_state_dict

    weights = gather_full_state_dict(model)
    full = get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    ids = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    plain = optimizer.state_dict()
    plain["state"] = {ids[n]: s for n, s in full.get("state", {}).items()}
    return weights, plain


def load_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict,
                opt_state: dict | None) -> None:
    """Load full weights (and a single-process-format optimizer state) into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, weights, options=opts)
    if optimizer is None or opt_state is None:
        return
    names = _param_names(model, optimizer)
    named = {"state": {names[i]: s for i, s in opt_state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=opts)


class Gathered:
    """What lmforge.checkpoint.save_checkpoint reads of a model (cfg, state_dict), over gathered weights."""

    def __init__(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]):
        self.cfg, self._weights = getattr(model, "cfg", None), weights

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._weights


class NullLog:
    """MetricsLog of the ranks other than 0 (only rank 0 writes metrics)."""

    path = None

    def log(self, row: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"
