"""A checkpoint's identity (its resolved path and weights checksum: `checkpoint_identity`, a HF directory's
remembered under $LMFORGE_HASH_CACHE: utils.remembered_sha256) and the base an adapter-only checkpoint records
(`base_record`; `rebase` when that base has moved). What an objective saves of a frozen reference instead of its
weights, and what load_model checks a base against."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from lmforge.checkpoint.store import _seal, _verify, resolve_checkpoint
from lmforge.errors import CheckpointError, ConfigError
from lmforge.utils import atomic_dir, remembered_sha256


def checkpoint_identity(path: str | Path) -> dict[str, str]:
    """Path and weights checksum of a checkpoint: what an objective saves about a frozen reference or
    teacher model instead of its weights, and checks when a run resumes."""
    ckpt = resolve_checkpoint(path)
    sums = {}
    if (ckpt / "manifest.json").is_file():
        sums = json.loads((ckpt / "manifest.json").read_text()).get("sha256", {})
    weights = sorted(ckpt.glob("*.safetensors"))
    base = recorded_base(ckpt) or _peft_base(ckpt)  # an adapter-only checkpoint is its tensors over its base's
    digest = hashlib.sha256("".join([*(sums.get(w.name) or remembered_sha256(w) for w in weights),
                                     base.get("sha256", "")]).encode()).hexdigest()
    return {"path": str(ckpt.resolve()), "sha256": digest}


def recorded_base(ckpt: Path) -> dict | None:
    """The base an adapter-only lmforge checkpoint records in its config.json (None: it holds every weight)."""
    if not (ckpt / "manifest.json").is_file():
        return None
    try:
        return json.loads((ckpt / "config.json").read_text()).get("base") or None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {ckpt / 'config.json'}: {e}") from e


def _peft_base(ckpt: Path) -> dict:
    """A PEFT adapter directory's base identity, where its base_model_name_or_path is a local directory."""
    from lmforge.adapt.peft_format import NoLocalBase, is_peft_dir, peft_base

    if not is_peft_dir(ckpt):
        return {}
    try:  # (the one reader of base_model_name_or_path: a moved `lmforge export --adapter` directory's own base/)
        where = peft_base(ckpt)
    except NoLocalBase:
        return {}  # (a hub name: nothing downloaded)
    except CheckpointError as e:  # adapter_config.json unreadable: not "no local base"
        # (taken for a hub base, the identity was the adapters' alone, and the load failed later, elsewhere)
        raise CheckpointError(f"{e}; the adapter's identity covers the base it names there: repair the file, or "
                              "write the adapter again (PEFT save_pretrained, lmforge export --adapter)") from None
    return checkpoint_identity(where)


def base_record(path: str | Path, *, merge_lora: bool = False) -> dict[str, Any]:
    """What an adapter-only checkpoint records of its base: checkpoint_identity(path) (resolved directory,
    weights checksum) and whether the base's own LoRA adapters are merged into it (merge_lora=True: a LoRA
    run started from a LoRA checkpoint trains on that model merged)."""
    return {**checkpoint_identity(path), "merge_lora": merge_lora}


BASE_HINT = ("pass its current location: load_model(path, base=DIR), LLM.load(path, base=DIR) or --base DIR "
             "(lmforge sample | generate | chat | export), or record it once: lmforge.checkpoint.rebase(path, DIR)")


def rebase(path: str | Path, base: str | Path) -> Path:
    """Record in an adapter-only checkpoint that its base is now at `base` (moved, not changed: the weights
    checksum must be the recorded one), so every reader (a run's init, reference or teacher too) finds it
    without base=. The checkpoint is rewritten beside itself and swapped in: whole before or after."""
    ckpt = resolve_checkpoint(path)
    if not recorded_base(ckpt):
        raise ConfigError(f"{ckpt} is not an adapter-only lmforge checkpoint (it records no base): there is "
                          "nothing to rebase")
    meta = _verify(ckpt)
    record = meta["base"]
    found = checkpoint_identity(base)
    if found["sha256"] != record["sha256"]:
        raise CheckpointError(f"{base} has other weights (sha256 {found['sha256']}) than the base {ckpt} was "
                              f"trained on ({record['path']}, sha256 {record['sha256']}); give that base")
    with atomic_dir(ckpt) as tmp:
        shutil.copytree(ckpt, tmp, dirs_exist_ok=True)
        meta["base"] = {**record, "path": found["path"]}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        _seal(tmp)
    return ckpt
