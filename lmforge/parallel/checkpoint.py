"""Distributed checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shards
of the model and optimizer state, with the global shape and offset of each, in parallel; on load
each rank reads the pieces it needs for *its* layout. So a run saved on 2 ranks with FSDP resumes
on 4 ranks with FSDP + TP, on a pipeline, or on 1 process (keys are the model's parameter names,
which none of lmforge.parallel's transforms change).

    PATH/   .metadata + __<rank>_0.distcp files

The Trainer does not write these: its checkpoints under `--nproc N` are ordinary ones, the full state gathered on
rank 0 (lmforge.train.distributed.gather_states), which resume on any layout as well.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None, flat: bool = True):
    """The model's and optimizer's state dicts for DCP. flat: the optimizer's group settings (lr, betas, role, ...)
    are stored per parameter name, not per group index: a pipeline stage's optimizer has fewer groups than a
    whole model's (no embedding or head group), so the indices differ between layouts while the names do not."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(strict=False, flatten_optimizer_state_dict=flat)  # a stage holds only some keys
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=opts), None
    return get_state_dict(model, optimizer, options=opts)


def save_distributed(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     extra: dict | None = None) -> Path:
    """Write model (and optimizer) state from every rank (call on all ranks). `extra`: small tensors
    or numbers (step, sampler position), stored once."""
    import torch.distributed.checkpoint as dcp

    msd, osd = _states(model, optimizer)
    state = {"model": msd, **({"optim": osd} if osd is not None else {}), **({"extra": extra} if extra else {})}
    dcp.save(state, checkpoint_id=str(path))
    return Path(path)


def load_distributed(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                     extra: dict | None = None) -> dict | None:
    """Load into `model` / `optimizer` in whatever layout they are now (call on all ranks). `extra` is a
    template of the values to read back (same keys as saved); the filled dict is returned."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from lmforge.errors import CheckpointError

    if not (Path(path) / ".metadata").is_file():
        raise CheckpointError(f"{path} is not a distributed checkpoint (no .metadata); write one with save_distributed")
    flat = not _indexed_groups(path)
    msd, osd = _states(model, optimizer, flat)
    state = {"model": msd, **({"optim": osd} if osd is not None else {}), **({"extra": extra} if extra else {})}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state.get("optim") or {},
                   options=StateDictOptions(strict=False, flatten_optimizer_state_dict=flat))
    return state.get("extra")


def _indexed_groups(path: str | Path) -> bool:
    """Whether the checkpoint keeps optimizer group settings by group index (written before 2026-12-05; such a
    checkpoint resumes only where the optimizer has the same groups)."""
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return any(k.startswith("optim.param_groups.0.") for k in keys)


def gather_full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors on rank 0 ({} elsewhere; call on all ranks): what
    rank 0 writes as an ordinary lmforge/HF checkpoint (model.safetensors) for inference. One pipeline
    stage holds only its own blocks: gather each stage's and merge them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
