"""Checkpoint directories on disk: the step_N names and the leftovers of killed writers (`checkpoint_dirs`,
`clean_partial`), the manifest written last and checked at load (`_seal`, `_verify`), and which directory a path
names (`resolve_checkpoint`: a checkpoint, a run's newest, a HF model directory). The format itself is
lmforge.checkpoint's docstring; save.py writes into it, load.py reads from it."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from lmforge.errors import CheckpointError
from lmforge.utils import honour_umask, process_tag, sha256_file

_STEP_DIR = re.compile(r"^step_(\d+)$")
# what a killed writer leaves beside step_N (utils.atomic_dir's names): `.step_N.writing-PID-TAG`, the checkpoint
# being written, and `.step_N.replaced-PID-TAG`, the step's earlier checkpoint, moved aside for the new one to be
# renamed in (TAG: utils.process_tag, absent from lmforge's names before 2026-12-07); `.tmp_step_N_PID` is what
# lmforge before 2026-12 wrote into
_TMP_DIR = re.compile(r"^\.(?:tmp_step_\d+_|step_\d+\.writing-)(?P<pid>\d+)(?:-(?P<tag>[0-9a-f]{8}))?$")
_REPLACED_DIR = re.compile(r"^\.(step_\d+)\.replaced-(?P<pid>\d+)(?:-(?P<tag>[0-9a-f]{8}))?$")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "manifest.json").is_file()]


def _writer_alive(pid: int, tag: str | None) -> bool:
    """Whether the writer a leftover's name records is still running: a live process with its PID that is the
    same process (its process_tag; a name without one, written before tags, trusts the PID). This process is
    not writing while it cleans."""
    if pid == os.getpid():
        return False
    now = process_tag(pid)
    return now is not None and (tag is None or now == tag)


def clean_partial(run_dir: str | Path) -> list[Path]:
    """Remove the directories left by checkpoint writers that were killed (their pid is gone, or is this
    process): partial checkpoints, and earlier checkpoints moved aside for a rewrite of their step; one of
    these whose step has no checkpoint (the writer died between the two renames) is put back instead. A live
    writer's directories are left alone; a writer is known by its PID and process_tag, so a process that has
    reused a killed writer's PID does not keep its leftovers (nor an only checkpoint moved aside) forever.
    Returns what was removed."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    for p in sorted(root.iterdir()) if root.is_dir() else ():
        m = _TMP_DIR.match(p.name) or _REPLACED_DIR.match(p.name)
        if m is None or _writer_alive(int(m["pid"]), m["tag"]):
            continue
        if m.re is _REPLACED_DIR and not (root / m.group(1)).exists():
            os.replace(p, root / m.group(1))
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _seal(folder: Path) -> None:
    """Write manifest.json (every other file's size and SHA-256) and give the files their umask modes."""
    files = sorted(p for p in folder.iterdir() if p.name != "manifest.json")
    manifest = {"files": {p.name: p.stat().st_size for p in files},
                "sha256": {p.name: sha256_file(p) for p in files}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    honour_umask(folder)


EARLIER = ("use an earlier checkpoint: give its directory to a command that loads one, or, to resume a run from the "
           "one before, move this one out of checkpoints/ (a run resumes from the newest it finds)")


def _verify(ckpt: Path, checksums: bool = True) -> dict[str, Any]:
    """Check every manifest file's size and (when recorded) SHA-256; return config.json."""
    man = ckpt / "manifest.json"
    if not man.is_file():
        raise CheckpointError(_no_manifest(ckpt))
    try:
        manifest = json.loads(man.read_text())
        sizes, sums = manifest["files"], manifest.get("sha256", {})
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{man} is corrupt: {e}") from e
    for name, size in sizes.items():
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing (manifest.json lists it: {size} bytes); restore it, or {EARLIER}")
        if p.stat().st_size != size:
            raise CheckpointError(f"{p} is truncated or damaged ({p.stat().st_size} bytes, expected {size}); {EARLIER}")
        if checksums and name in sums and sha256_file(p) != sums[name]:
            raise CheckpointError(f"{p} is corrupted (SHA-256 differs from manifest.json); {EARLIER}")
    return json.loads((ckpt / "config.json").read_text())


def _no_manifest(ckpt: Path) -> str:
    """Why a directory of weights without manifest.json does not load: an lmforge checkpoint (its config.json
    records the step) was not fully written; anything else is taken for a HF-format directory whose config.json
    is missing or names no model (is_hf_dir), not for an unfinished lmforge one."""
    f = ckpt / "config.json"
    try:
        meta = json.loads(f.read_text())
    except (OSError, ValueError):
        meta = None
    if isinstance(meta, dict) and "step" in meta:
        return f"{ckpt} is incomplete (no manifest.json); it was not fully written"
    what = ("has no config.json" if not f.is_file() else
            "has a config.json that names no model_type or architectures" if isinstance(meta, dict) else
            "has a config.json that is not a JSON object")
    return (f"{ckpt} {what}: a HF-format model directory needs the config.json published with its weights "
            "(model_type, sizes) beside them; fetch it again (an lmforge checkpoint has manifest.json, written last)")


def is_hf_dir(path: Path) -> bool:
    """A HF-format model directory: config.json naming a model_type/architecture, no lmforge manifest."""
    f = path / "config.json"
    if not f.is_file() or (path / "manifest.json").exists():
        return False
    try:
        cfg = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (lmforge's or HF's), or the newest checkpoint of a run directory."""
    from lmforge.adapt.peft_format import is_peft_dir, refuse_pickled

    path = Path(path)
    if (path / "manifest.json").is_file() or (path / "model.safetensors").is_file() or is_hf_dir(path) \
            or is_peft_dir(path):
        return path
    found = checkpoint_dirs(path)
    if not found:
        refuse_pickled(path)  # a PEFT directory of adapter_model.bin: said so, with the conversion
        raise CheckpointError(f"no checkpoint found in {path} (expected {path}/checkpoints/step_*/ "
                              f"or a HF model directory with config.json){_path_hint(path)}")
    return found[-1]


def _path_hint(path: Path) -> str:
    """What to give instead of a path holding no checkpoint: the directory of a file given (a model's config.json),
    the run directory of a run's checkpoints/ folder, the model directory inside a HF hub cache folder
    (models--org--name/snapshots/<revision>/, the revision refs/main names, else the newest), the file a PEFT
    adapter directory lacks where it holds the other; '' for any other folder."""
    if path.is_file():
        return f"; {path} is a file: give the directory holding it, {path.parent}"
    if not path.exists():
        return f"; {path} does not exist"
    from lmforge.adapt.peft_format import CONFIG, WEIGHTS

    halves = [(path / name).is_file() for name in (CONFIG, WEIGHTS)]
    if any(halves):  # one file of a PEFT adapter directory (an unfinished copy or download)
        have, lacks = (CONFIG, WEIGHTS) if halves[0] else (WEIGHTS, CONFIG)
        return f"; {path} holds {have} but not {lacks}: a PEFT adapter directory needs both, fetch {lacks} too"
    if path.name == "checkpoints" and checkpoint_dirs(path.parent):
        return (f"; {path} is a run's checkpoints folder: give the run directory, {path.parent} (its newest "
                f"checkpoint), or one checkpoint, {checkpoint_dirs(path.parent)[-1]}")
    snapshots = sorted((p for p in path.glob("snapshots/*") if (p / "config.json").is_file()),
                       key=lambda p: p.stat().st_mtime)
    if not snapshots:
        return ""
    try:  # (a ref that does not read - no permission, not text: the newest snapshot, not a traceback)
        main = path / "snapshots" / (path / "refs" / "main").read_text().strip()
    except (OSError, ValueError):
        main = None
    snapshot = main if main in snapshots else snapshots[-1]
    return f"; {path} is a HF hub cache folder: give its snapshot directory, {snapshot}"
