"""Checkpoints: directories written atomically and refused rather than half-loaded.

    RUN_DIR/checkpoints/step_000500/
        config.json          model config + lmforge version + git hash + step
        model.safetensors    weights (tied tensors stored once)
        train_state.pt       optimizer, data-sampler and RNG state (loaded with weights_only=True)
        lmforge_tokenizer.json
        manifest.json        byte size of every file above, written last

A checkpoint is built in a hidden temporary directory and renamed into place, so a crash never leaves
a partial `step_*`; on load the manifest sizes are checked, so a truncated file is detected.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lmforge.config import from_dict, to_dict
from lmforge.errors import CheckpointError, ConfigError
from lmforge.utils import run_metadata

_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "manifest.json").is_file()]


def _state_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with tied tensors kept once (safetensors refuses shared storage)."""
    seen: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, *, train_state: dict | None = None,
                    tokenizer=None, keep_last: int | None = None, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp_step_{step:06d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        meta = {"step": step, "model": to_dict(model.cfg), **run_metadata(), **(extra or {})}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        save_file(_state_for_save(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        if tokenizer is not None:
            tokenizer.save(tmp)
        sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
        (tmp / "manifest.json").write_text(json.dumps({"files": sizes}, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _verify(ckpt: Path) -> dict[str, Any]:
    man = ckpt / "manifest.json"
    if not man.is_file():
        raise CheckpointError(f"{ckpt} is incomplete (no manifest.json); it was not fully written")
    try:
        sizes = json.loads(man.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{man} is corrupt: {e}") from e
    for name, size in sizes.items():
        p = ckpt / name
        if not p.is_file() or p.stat().st_size != size:
            got = p.stat().st_size if p.is_file() else "missing"
            raise CheckpointError(f"{p} is truncated or damaged ({got} bytes, expected {size}); "
                                  "use an earlier checkpoint")
    return json.loads((ckpt / "config.json").read_text())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / "manifest.json").is_file() or (path / "model.safetensors").is_file():
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise CheckpointError(f"no checkpoint found in {path} (expected {path}/checkpoints/step_*/)")
    return found[-1]


def model_config_of(ckpt: Path):
    from lmforge.model.config import ModelConfig

    meta = _verify(ckpt)
    return from_dict(ModelConfig, meta["model"], "model"), meta


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load weights, refusing missing/unexpected/mis-shaped tensors (nothing is half-loaded)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(ckpt / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {ckpt / 'model.safetensors'}: {e}") from e
    own = model.state_dict()
    shared = {n for n in own if n not in state and any(own[n].data_ptr() == own[m].data_ptr()
                                                      for m in state if m in own)}
    missing = sorted(set(own) - set(state) - shared)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{ckpt} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, t in state.items():
        if t.shape != own[name].shape:
            raise CheckpointError(f"{ckpt}: tensor {name} has shape {tuple(t.shape)}, model expects "
                                  f"{tuple(own[name].shape)}")
    model.load_state_dict(state, strict=False)


def check_same_model(saved: dict, current) -> None:
    cur = to_dict(current)
    diff = [k for k in sorted(set(saved) | set(cur)) if saved.get(k) != cur.get(k)]
    if diff:
        k = diff[0]
        raise ConfigError(f"checkpoint was made with model.{k}={saved.get(k)!r} but the config says "
                          f"{cur.get(k)!r}; use the same model config or a new run_dir")


def load_train_state(ckpt: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged pickles
        raise CheckpointError(f"cannot read {ckpt / 'train_state.pt'}: {e}") from e


def load_model(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a checkpoint or run directory; tokenizer is None if none was saved."""
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.byte import FILE_NAME
    from lmforge.tokenizer.load import load_tokenizer

    ckpt = resolve_checkpoint(path)
    cfg, _ = model_config_of(ckpt)
    model = Transformer(cfg)
    load_weights(model, ckpt)
    tok = load_tokenizer(ckpt) if (ckpt / FILE_NAME).is_file() else None
    return model.to(device).eval(), tok
