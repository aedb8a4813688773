"""Checkpoints: directories written atomically, verified at load, refused rather than half-loaded.

    RUN_DIR/checkpoints/step_000500/
        config.json          model config (or the model's class) + lmforge version + git hash + step
        model.safetensors    weights (tied tensors stored once)
        train_state.pt       optimizer, data-source, objective and RNG state (loaded with weights_only=True)
        lmforge_tokenizer.json
        manifest.json        byte size and SHA-256 of every file above, written last

A checkpoint is built in a hidden `.step_*.writing-PID-TAG` directory and renamed into place
(lmforge.utils.atomic_dir; a step written again replaces its old checkpoint whole or not at all), so a crash
never leaves a partial `step_*`; a kill can leave the hidden directories, which `clean_partial` sorts out at
resume (TAG tells the writer apart from a later process with its PID).
On load every file's size and checksum is checked against the manifest (streamed, ~1.5 GB/s), so a
truncated or same-size-corrupted file is refused instead of producing NaNs later. Files get the mode
the umask allows (0644 under umask 022), so a shared run folder is readable by collaborators.

`load_model` also opens a HF-format model directory (config.json + safetensors of a supported family,
with its tokenizer.json), so every `--checkpoint` option and `LLM.load` accept downloaded models.

Adapter-only checkpoints (`save_checkpoint(..., base=base_record(init))`, what a LoRA run writes by default)
leave out exactly what the base gives back (`frozen_names`: the base model's frozen parameters and buffers,
a quantized base's codes too): model.safetensors holds everything else (what trains, a head, a frozen part
that is not the base's, such as a separate critic's trunk), and config.json's "base" names where the rest
comes from, {"path", "sha256", "merge_lora"}: the base checkpoint's resolved directory, its
checkpoint_identity checksum and whether its own adapters are merged first (a LoRA run whose init was
itself a LoRA checkpoint trains on the merged model). `load_model` rebuilds base + recorded adapters + saved
tensors, refusing a base that is missing or whose weights changed.

config.json records how to rebuild what is not a plain Transformer: "lora" ({layer: [r, scale]}, [r, scale,
"dora"] for DoRA: lmforge.adapt.lora.lora_record) and "base_layers" (the modules that are not what build_model
puts there - quantized Linears, experts, embeddings of a QLoRA model - by registered kind and settings:
lmforge.adapt.qlora; load_model builds them as empty shells on a Transformer made on the meta device, never their
float weights). A module quantized after its base checkpoint was loaded is not what that base gives back, so an
adapter-only checkpoint keeps its codes (_left_to_base), and refuses to leave to the base a frozen tensor the
base's model does not have. "dtype" is the model's float compute dtype (lmforge.utils.compute_dtype), which
load_model builds in (a checkpoint written before it was recorded loads in fp32); integer and boolean tensors
load only into their own dtype (castable). "eos_token_ids" and "bos_token_id" are the ids a HF model stops at
and a prompt begins with (bos_record: the saved tokenizer's BOS, else the model's), which save_pretrained writes
(a checkpoint written before bos_token_id was recorded takes its tokenizer's when that is loaded).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from lmforge.config import from_dict, to_dict, with_defaults
from lmforge.errors import CheckpointError, ConfigError, LmforgeError, is_disk_full
from lmforge.utils import atomic_dir, honour_umask, process_tag, run_metadata

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


def frozen_names(model) -> set[str]:
    """Names of what an adapter-only checkpoint leaves to its base, a tied tensor under each of its names:
    exactly what the base checkpoint gives back, i.e. the frozen parameters and the buffers of the base model
    (the innermost `.backbone` of a head's model, where base_record's checkpoint is loaded: the tensors
    load_model takes from the base), less its adapters' own parameters (lmforge.adapt.lora.adapter_names) and
    the MoE balancing biases a Trainer moves (bias_update_rate > 0). Everything else is saved, frozen or not:
    what trains, a head, a separate critic's trunk, a frozen part that is not the base's. A stand-in for a
    model (a sharded model's gathered weights) gives its `frozen` attribute."""
    if not isinstance(model, torch.nn.Module):
        return set(getattr(model, "frozen", ()))
    from lmforge.adapt.lora import adapter_names
    from lmforge.model.layers.moe import MoE
    from lmforge.model.surgery import state_dict_name

    prefix, base = _base_of(model)
    kept = adapter_names(base) | {f"{n}.e_bias" if n else "e_bias" for n, m in base.named_modules(
        remove_duplicate=False) if isinstance(m, MoE) and m.m.bias_update_rate > 0}
    given = {n for n, p in base.named_parameters(remove_duplicate=False) if not p.requires_grad}
    given |= {n for n, _ in base.named_buffers(remove_duplicate=False)}
    keys = model.state_dict().keys()
    # (an activation-checkpointed model's names hold the wrapper's part, which its state_dict keys drop)
    left = {prefix + state_dict_name(n) for n in given - kept}
    return left & keys


def _base_of(model) -> tuple[str, Any]:
    """(name prefix, module) of the innermost `.backbone` of a head's model (the model itself without a head):
    where base_record's checkpoint is loaded."""
    prefix, base = "", model
    while getattr(base, "head_record", None) is not None and isinstance(getattr(base, "backbone", None),
                                                                          torch.nn.Module):
        prefix, base = prefix + "backbone.", base.backbone
    return prefix, base


LEAVES_OUT = "base_tensors"
"""config.json's "leaves_out" of an adapter-only checkpoint: it leaves out frozen_names (the base model's frozen
parameters and buffers). Those written before 2026-12-06 have none: they left out every frozen parameter, the
base's or not, and held every buffer."""


def _state_for_save(model: torch.nn.Module, leave_out: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """state_dict without `leave_out`, tied tensors kept once (safetensors refuses shared storage). Refuses a
    tensor subclass (torchao's quantized weights, ...): safetensors stores plain tensors, and reading its data
    failed deep inside the writer ("Attempted to access the data pointer on an invalid python storage")."""
    seen: dict[int, str] = {}
    out = {}
    for name, t in model.state_dict().items():
        if name in leave_out:
            continue
        if type(t) not in (torch.Tensor, torch.nn.Parameter):
            cls = f"{type(t).__module__}.{type(t).__qualname__}"
            raise ConfigError(f"{name} is a {cls}, a tensor subclass a checkpoint cannot store (it holds plain "
                              "tensors); keep such layers' state as plain tensors (codes, scales) and register "
                              "the layer (lmforge.model.surgery.register_base_layer), or save the model before "
                              "converting it")
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def model_meta(model: torch.nn.Module) -> dict[str, Any]:
    """What config.json records about the model: its ModelConfig when it has one (lmforge's Transformer),
    otherwise only its class, so any nn.Module honouring the model interface can be checkpointed."""
    from lmforge.model.config import ModelConfig

    head = getattr(model, "head_record", None)
    if head is not None:  # a head on an lmforge backbone (a reward model): the backbone's record + the head's
        inner = model_meta(model.backbone)
        if "model" in inner:
            return {**inner, "head": head()}
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, ModelConfig):
        from lmforge.adapt.lora import lora_record
        from lmforge.adapt.qlora import base_layer_record

        lora = lora_record(model)  # unmerged adapters: load_model puts them back before the weights
        layers = base_layer_record(model)  # quantized Linears (QLoRA's base): load_model rebuilds them first
        eos = [int(i) for i in getattr(model, "eos_token_ids", None) or ()]  # a HF model's end-of-sequence ids
        return {"model": to_dict(cfg), "dtype": _dtype_name(_float_dtype(model)),
                **({"base_layers": layers} if layers else {}), **({"lora": lora} if lora else {}),
                **({"eos_token_ids": eos} if eos else {})}
    cls = getattr(model, "model_class", type(model))  # a gathered sharded model names the class it shards
    return {"model_class": f"{cls.__module__}.{cls.__qualname__}"}


def _float_dtype(model) -> torch.dtype:
    """The model's float compute dtype (lmforge.utils.compute_dtype); a stand-in's from its state_dict."""
    from lmforge.utils import compute_dtype

    if isinstance(model, torch.nn.Module):
        return compute_dtype(model)
    return next((t.dtype for t in model.state_dict().values() if t.is_floating_point()), torch.get_default_dtype())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def recorded_dtype(meta: dict, ckpt: Path) -> torch.dtype | None:
    """The float compute dtype config.json records ("dtype"; None for a checkpoint written before 2026-12-06,
    which loads in the default dtype as it always did)."""
    name = meta.get("dtype")
    if name is None:
        return None
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise CheckpointError(f"{ckpt}/config.json: dtype {name!r} is not a floating-point torch dtype; write "
                              "e.g. 'bfloat16', or remove it to load in float32")
    return dtype


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write(tmp: Path, step: int, model: torch.nn.Module, train_state, tokenizer, extra, base) -> None:
    from safetensors.torch import save_file

    left = {"base": base, "leaves_out": LEAVES_OUT} if base else {}
    meta = {"step": step, **model_meta(model), **bos_record(model, tokenizer), **left, **run_metadata(),
            **(extra or {})}
    if meta.get("base_layers"):  # refused only at load, maybe hours later: said now
        from lmforge.adapt.qlora import warn_unregistered

        warn_unregistered(meta["base_layers"])
    (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    weights = _state_for_save(model, _left_to_base(model, meta, base) if base else set())
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if train_state is not None:  # through a Python file: torch's own writer reports a full disk as a bare
        with open(tmp / "train_state.pt", "wb") as f:  # RuntimeError ('unexpected pos'); Python's raises ENOSPC
            torch.save(train_state, f)
    if tokenizer is not None:
        tokenizer.save(tmp)
    _seal(tmp)


def bos_record(model, tokenizer) -> dict[str, int]:
    """config.json's bos_token_id, the id a prompt begins with (Transformer.bos_token_id, which save_pretrained
    writes): the saved tokenizer's BOS where it has one, else the model's own (a HF checkpoint's: Qwen2's tokenizer
    puts no BOS, its config names one); {} for none. Read back by load_model, so a checkpoint loaded without its
    tokenizer, or saved with or without one, keeps the same id."""
    bos = getattr(tokenizer, "bos_id", None) if tokenizer is not None else None
    bos = bos if bos is not None else getattr(model, "bos_token_id", None)
    return {"bos_token_id": int(bos)} if bos is not None else {}


def _left_to_base(model: torch.nn.Module, meta: dict, base: dict) -> set[str]:
    """frozen_names less the tensors of base layers the base checkpoint does not have as the model has them
    (a Linear quantized after the base was loaded, for QLoRA): the base cannot give those back."""
    left = frozen_names(model)
    ours = meta.get("base_layers") or {}
    try:
        theirs = json.loads((Path(base["path"]) / "config.json").read_text()).get("base_layers") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        theirs = {}
    prefix, inner = _base_of(model)  # (the record's names are the backbone's)
    changed = tuple(f"{prefix}{n}." for n, entry in ours.items() if theirs.get(n) != entry)
    left = {n for n in left if not n.startswith(changed)} if changed else left
    same = tuple(f"{prefix}{n}." for n, entry in ours.items() if theirs.get(n) == entry)  # the base rebuilds them
    _refuse_unbuilt(inner, prefix, {n for n in left if not n.startswith(same)}, base)
    return left


def _refuse_unbuilt(inner, prefix: str, left: set[str], base: dict) -> None:
    """Refuse, in one line, to leave to the base a tensor the base's model does not have: one of a module whose
    class is not what build_model(cfg) puts there, or that it does not build (a frozen module added to the model),
    which base_layer_record did not record as a layer the base lacks (a stand-in's stale record): the checkpoint
    would load the base's module in its place, or none, without a word."""
    from lmforge.adapt.qlora import meta_model
    from lmforge.model.config import ModelConfig

    cfg = getattr(inner, "cfg", None)
    if not isinstance(cfg, ModelConfig) or not left:
        return
    built = meta_model(cfg)  # (the build base_layer_record compared the model with; a stand-in's too)
    own = built.state_dict().keys()
    foreign = sorted(n for n in left if n[len(prefix):] not in own)
    if not foreign:
        return
    module = foreign[0][len(prefix):].rpartition(".")[0]
    cls = type(inner.get_submodule(module)).__name__ if isinstance(inner, torch.nn.Module) else "module"
    there = type(built.get_submodule(module)).__name__ if module in dict(built.named_modules()) else "nothing"
    raise ConfigError(f"adapter-only checkpoint: {module} (a {cls}) holds the frozen {foreign[0]}, which the base "
                      f"{base.get('path')} does not give back (its model builds {there} there); if it replaced the "
                      "base's module, register its class (lmforge.model.surgery.register_base_layer) so the checkpoint "
                      "records and saves it, else save the whole model (save_checkpoint without base=) and "
                      "load_weights it onto the model you build")


def _seal(folder: Path) -> None:
    """Write manifest.json (every other file's size and SHA-256) and give the files their umask modes."""
    files = sorted(p for p in folder.iterdir() if p.name != "manifest.json")
    manifest = {"files": {p.name: p.stat().st_size for p in files},
                "sha256": {p.name: sha256_file(p) for p in files}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    honour_umask(folder)


_OWNERS = {"data": "the data source's state_dict()", "objective": "the objective's state_dict()"}


def _reads_back(value: Any) -> bool:
    """Whether torch.load(weights_only=True) reads `value` back (torch's own unpickler decides)."""
    buf = io.BytesIO()
    torch.serialization.save(value, buf)  # (torch.save itself: what a test makes fail to fake a full disk)
    buf.seek(0)
    try:
        torch.serialization.load(buf, weights_only=True)
    except Exception:  # torch raises several types for what its weights-only unpickler refuses
        return False
    return True


def _skeleton(value: Any) -> Any:
    """`value` with every tensor replaced by None (tensors always read back): what else it holds, small.
    Other container types (a dict subclass, a namedtuple) are kept whole: the unpickler judges them too."""
    if isinstance(value, torch.Tensor):
        return None
    if type(value) in (dict, OrderedDict):
        return type(value)((k, _skeleton(v)) for k, v in value.items())
    if type(value) in (list, tuple, set):
        return type(value)(_skeleton(v) for v in value)
    return value


def _unreadable(value: Any, path: str) -> tuple[str, Any] | None:
    """(key path, value) of the innermost part of `value` that weights_only loading refuses, or None."""
    if type(value) in (dict, OrderedDict):
        for k, v in value.items():
            if not _reads_back(k):
                return f"{path} (the key {k!r})", k
            if found := _unreadable(v, f"{path}[{k!r}]"):
                return found
    elif type(value) in (list, tuple, set):
        for i, v in enumerate(value):
            if found := _unreadable(v, f"{path}[{i}]"):
                return found
    return None if _reads_back(_skeleton(value)) else (path, value)


def check_train_state(state: dict[str, Any]) -> None:
    """Refuse, in one line and before anything is written, a train state that load_train_state could not read
    back (checkpoints are loaded with torch.load(weights_only=True), which takes tensors and plain Python
    values only): e.g. a numpy integer or array in a data source's or objective's state_dict(), which would
    make every checkpoint of the run unusable at its resume."""
    if _reads_back(_skeleton(state)):
        return
    for key, part in state.items():
        if found := _unreadable(part, ""):
            path, value = found
            where = f"{_OWNERS[key]}{path}" if key in _OWNERS else f"the train state's {key!r}{path}"
            kind = f"{type(value).__module__}.{type(value).__qualname__}"
            raise ConfigError(f"{where} is a {kind}, which a checkpoint cannot hold (it is read back with "
                              "torch.load(weights_only=True): tensors, int, float, bool, str, None and lists, "
                              "tuples and dicts of these); store it as one of those, e.g. int(x), x.tolist() or "
                              "torch.from_numpy(x)")
    raise ConfigError("the train state cannot be read back with torch.load(weights_only=True); keep it to tensors "
                      "and plain Python values")


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, *, train_state: dict | None = None,
                    tokenizer=None, keep_last: int | None = None, extra: dict | None = None,
                    base: dict | None = None) -> Path:
    """Write RUN_DIR/checkpoints/step_{step:06d} atomically; keep the newest `keep_last` checkpoints.
    base (base_record of the checkpoint the model's frozen weights come from): an adapter-only checkpoint,
    without the frozen parameters, recording the base instead."""
    final = Path(run_dir) / "checkpoints" / f"step_{step:06d}"
    if train_state is not None:
        check_train_state(train_state)  # what a resume could not read back is refused before writing
    tmp = None
    try:  # a step written again (a resumed run's) replaces the old one whole, or leaves it as it was
        with atomic_dir(final) as tmp:
            _write(tmp, step, model, train_state, tokenizer, extra, base)
    except BaseException as e:
        if is_disk_full(e):
            raise CheckpointError(f"disk full at {tmp or final.parent} while writing the step {step} checkpoint; "
                                  "it was not written and earlier checkpoints are intact: free space and resume"
                                  ) from e
        raise
    if keep_last:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


EARLIER = ("use an earlier checkpoint: give its directory, or move this one aside (a run resumes from the newest "
           "it finds)")


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
    (models--org--name/snapshots/<revision>/, the revision refs/main names, else the newest); '' for any other
    folder."""
    if path.is_file():
        return f"; {path} is a file: give the directory holding it, {path.parent}"
    if not path.exists():
        return f"; {path} does not exist"
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


def checkpoint_identity(path: str | Path) -> dict[str, str]:
    """Path and weights checksum of a checkpoint: what an objective saves about a frozen reference or
    teacher model instead of its weights, and checks when a run resumes."""
    ckpt = resolve_checkpoint(path)
    sums = {}
    if (ckpt / "manifest.json").is_file():
        sums = json.loads((ckpt / "manifest.json").read_text()).get("sha256", {})
    weights = sorted(ckpt.glob("*.safetensors"))
    base = _recorded_base(ckpt) or _peft_base(ckpt)  # an adapter-only checkpoint is its tensors over its base's
    digest = hashlib.sha256("".join([*(sums.get(w.name) or _remembered_sha256(w) for w in weights),
                                     base.get("sha256", "")]).encode()).hexdigest()
    return {"path": str(ckpt.resolve()), "sha256": digest}


HASH_CACHE_ENV = "LMFORGE_HASH_CACHE"


def _remembered_sha256(path: Path) -> str:
    """sha256_file of a weight file no manifest lists (a HF directory's), remembered on disk under its path,
    size, modification time and inode ($LMFORGE_HASH_CACHE, default ~/.cache/lmforge/sha256/): a 14 GB base
    is read once, not at every load of adapters over it. A file rewritten in place has a new modification
    time and is read again. (Checksum verification of an lmforge checkpoint, _verify, always reads.)"""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()
    root = Path(os.environ.get(HASH_CACHE_ENV) or Path.home() / ".cache" / "lmforge" / "sha256")
    try:
        known = (root / key).read_text()
        if len(known) == 64:
            return known
    except OSError:
        pass
    digest = sha256_file(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{key}.{os.getpid()}"
        tmp.write_text(digest)
        os.replace(tmp, root / key)
    except OSError:  # a read-only home: the checksum is still right, only not remembered
        pass
    return digest


def _recorded_base(ckpt: Path) -> dict | None:
    """The base an adapter-only lmforge checkpoint records in its config.json (None: it holds every weight)."""
    if not (ckpt / "manifest.json").is_file():
        return None
    try:
        return json.loads((ckpt / "config.json").read_text()).get("base") or None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {ckpt / 'config.json'}: {e}") from e


def _peft_base(ckpt: Path) -> dict:
    """A PEFT adapter directory's base identity, where its base_model_name_or_path is a local directory."""
    from lmforge.adapt.peft_format import CONFIG, is_peft_dir

    if not is_peft_dir(ckpt):
        return {}
    try:
        where = json.loads((ckpt / CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"cannot read {ckpt / CONFIG}: {e}") from e
    return checkpoint_identity(where) if isinstance(where, str) and Path(where).exists() else {}


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
    if not _recorded_base(ckpt):
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


def model_config_of(ckpt: Path):
    from lmforge.model.config import ModelConfig

    meta = _verify(ckpt)
    if "model" not in meta:
        raise CheckpointError(f"{ckpt} holds a {meta.get('model_class', 'custom')} model, not an lmforge "
                              "Transformer; build that model yourself and load_weights(model, path)")
    return from_dict(ModelConfig, meta["model"], "model"), meta


def load_weights(model: torch.nn.Module, ckpt: Path, required: set[str] | None = None, *,
                 own_frozen: bool = True) -> None:
    """Load weights, refusing missing/unexpected/mis-shaped tensors (nothing is half-loaded). `required`:
    the names the file must hold (an adapter-only checkpoint's: what its base does not give); default all.
    own_frozen (a resume: the model's frozen parameters are as the run built them): an adapter-only
    checkpoint from before "leaves_out" was recorded, which left out every frozen parameter, need not hold
    them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(ckpt / "model.safetensors"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {ckpt / 'model.safetensors'}: {e}") from e
    from lmforge.model.layers.moe import upgrade_expert_keys

    state = upgrade_expert_keys(model, state)  # (checkpoints from before MoE.experts: mlp.w_up -> mlp.experts.w_up)
    own = model.state_dict()
    need = set(own) if required is None else required
    if required is not None and own_frozen and _recorded_base(ckpt) \
            and "leaves_out" not in json.loads((ckpt / "config.json").read_text()):
        need = need - {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    shared = {n for n in need if n not in state and any(own[n].data_ptr() == own[m].data_ptr()
                                                       for m in state if m in own)}
    missing = sorted(need - set(state) - shared)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        hint = ("; it holds LoRA adapters: apply_lora(model, the LoRAConfig it was trained with) first, or "
                "load_model(path), which puts them back" if any(".lora_" in n for n in unexpected) else "")
        base = _recorded_base(ckpt) if required is None else None
        if base:
            hint = f"; it holds only what trained over the base {base['path']}: load_model(path)"
        raise CheckpointError(f"{ckpt} does not match the model: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}{hint}")
    for name, t in state.items():
        if t.shape != own[name].shape:
            raise CheckpointError(f"{ckpt}: tensor {name} has shape {tuple(t.shape)}, model expects "
                                  f"{tuple(own[name].shape)}")
        if not castable(t.dtype, own[name].dtype):
            raise CheckpointError(f"{ckpt}: tensor {name} is {t.dtype} in the file but {own[name].dtype} in the "
                                  f"model, and copying would convert it ({CAST_RULE}); build the model with the "
                                  "layers it was saved from (the same quantized layer kind and settings), or convert "
                                  "the tensor yourself")
    model.load_state_dict(state, strict=False)


CAST_RULE = ("only floating-point tensors are cast between widths; integer codes would be truncated, wrapped "
             "(uint8 int4 codes into int8) or read as numbers")


def castable(saved: torch.dtype, into: torch.dtype) -> bool:
    """Whether a tensor of dtype `saved` may be copied into one of dtype `into`: floats into floats (fp32 <-> bf16
    is a rounding); integers (quantized codes, indices) and booleans (masks) only into their own dtype."""
    return saved == into or (saved.is_floating_point and into.is_floating_point)


def check_same_model(saved: dict, current) -> None:
    """Refuse a checkpoint's model config (its config.json "model") that differs from `current`. A field the
    checkpoint's lmforge did not have yet reads as its default, as load_model builds it: compared raw, a run
    written before `model.norm_offset` existed could not resume ('model.norm_offset=None but the config says
    0.0')."""
    cur, saved = to_dict(current), with_defaults(type(current), saved, "model")
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


def _load_hf(path: Path, tokenizer: bool = True, dtype: torch.dtype | None = None):
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.load import load_tokenizer

    model = Transformer.from_pretrained(path, dtype=dtype)
    # (byte-level BPE as a Tokenizer, SentencePiece-style as a SentencePieceBPE: Llama 2, Mistral, Gemma; else GPT-2's
    # vocab.json + merges.txt, which a directory without tokenizer.json holds: one saved by a slow GPT2Tokenizer)
    found = next((path / name for name, beside in (("tokenizer.json", "tokenizer.json"), ("vocab.json", "merges.txt"))
                  if (path / name).is_file() and (path / beside).is_file()), None)
    tok = load_tokenizer(found) if tokenizer and found is not None else None
    return model, tok


def _with_head(backbone: torch.nn.Module, record: Any, ckpt: Path) -> torch.nn.Module:
    from lmforge.align.reward import SequenceHead
    from lmforge.align.value import value_from_record

    # a reward model / classifier; a per-token value head (a critic, a PRM, or a policy sharing its trunk)
    kinds = {"sequence": SequenceHead.from_record, "value": value_from_record}
    kind = record.get("kind") if isinstance(record, dict) else None
    if kind not in kinds:
        raise CheckpointError(f"{ckpt}/config.json: head {record!r} is not one this lmforge builds "
                              f"(kinds: {sorted(kinds)}); load it with the lmforge version that wrote it")
    return kinds[kind](backbone, record)


def template_dir(path: str | Path, base: str | Path | None = None) -> Path:
    """The checkpoint directory a checkpoint's chat template is read from (recorded_chat_template,
    hf_chat_template): the checkpoint itself (a run directory's newest), or, for a PEFT adapter directory, that of
    the tokenizer it loads with (adapt.peft_format.tokenizer_dir): its own beside its tokenizer.json, else its
    base's: `base` (--base DIR, where the model loads from), else the one adapter_config.json records. Raises
    what resolving the path raises."""
    from lmforge.adapt.peft_format import is_peft_dir, tokenizer_dir

    ckpt = resolve_checkpoint(path)
    return resolve_checkpoint(tokenizer_dir(ckpt, base)) if is_peft_dir(ckpt) else ckpt


def recorded_chat_template(path: str | Path, base: str | Path | None = None) -> str | None:
    """The chat template a fine-tuned checkpoint records in its config.json (None: none recorded, e.g. a
    pretrained or HF checkpoint, or a path that is none: loading it says what is wrong); a PEFT adapter
    directory's is its base's (template_dir: an adapter over an lmforge checkpoint)."""
    try:
        meta = json.loads((template_dir(path, base) / "config.json").read_text())
    except (OSError, ValueError, LmforgeError):
        return None
    found = meta.get("chat_template") if isinstance(meta, dict) else None
    return found if isinstance(found, str) else None


def hf_chat_template(path: str | Path, base: str | Path | None = None):
    """A HF model directory's own chat template as a lmforge.infer.chat_template.JinjaTemplate (None: not a HF
    directory, or it has none): chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or
    a list of named templates: "default"), with the special tokens the config names (bos_token, eos_token, ...),
    which the Jinja reads; its eos_token ends an answer. A PEFT adapter directory's is that of the tokenizer it
    loads with (template_dir)."""
    from lmforge.adapt.peft_format import is_peft_dir
    from lmforge.infer.chat_template import JinjaTemplate

    try:
        ckpt = template_dir(path, base)
    except (OSError, LmforgeError):  # (loading it says what is wrong)
        return None
    if not is_hf_dir(ckpt) and not is_peft_dir(ckpt):
        return None
    try:
        config = json.loads((ckpt / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    config = config if isinstance(config, dict) else {}
    source = config.get("chat_template")
    if (ckpt / "chat_template.jinja").is_file():  # where transformers >= 4.43 saves it
        source = (ckpt / "chat_template.jinja").read_text()
    if isinstance(source, list):
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str) or not source.strip():
        return None
    tokens = {}
    for key, value in config.items():  # an AddedToken is saved as {"content": ...}
        value = value.get("content") if isinstance(value, dict) else value
        if key.endswith("_token") and isinstance(value, str):
            tokens[key] = value
    return JinjaTemplate(name=f"{ckpt.name}'s own (tokenizer_config.json)", source=source,
                         tokens=tuple(sorted(tokens.items())), end=tokens.get("eos_token", ""))


def _base_model(record: dict, ckpt: Path, base: str | Path | None) -> torch.nn.Module:
    """The model an adapter-only checkpoint's tensors go onto: its recorded base (or `base`, where it is
    now) once its identity is checked, with the base's own adapters merged where the record says so."""
    where = Path(base) if base is not None else Path(record["path"])
    what = f"{ckpt} holds adapters over the base {record['path']} (sha256 {record['sha256']})"
    try:
        found = checkpoint_identity(where)["sha256"]
    except CheckpointError:
        gone = "which is missing" if base is None else f"which is not at {where}"
        raise CheckpointError(f"{what}, {gone}; {BASE_HINT}") from None
    if found != record["sha256"]:
        raise CheckpointError(f"{what}, but {where} has other weights (sha256 {found}); restore that base or "
                              f"{BASE_HINT}")
    model, _ = load_model(where, tokenizer=False)
    if record.get("merge_lora"):  # the run trained on its init with the init's adapters merged
        from lmforge.adapt.lora import merge_lora

        merge_lora(model)
    return model


def load_recorded_base(path: str | Path, base: str | Path | None = None) -> torch.nn.Module | None:
    """The base model an adapter-only checkpoint records (loaded, its identity checked; `base`: where it is now,
    as load_model's), or None for a checkpoint that holds all its weights."""
    ckpt = resolve_checkpoint(path)
    record = _recorded_base(ckpt)
    return _base_model(record, ckpt, base).eval() if record else None


def load_model(path: str | Path, device: str = "cpu", tokenizer: bool = True, *, base: str | Path | None = None,
               dtype: torch.dtype | str | None = None):
    """(model, tokenizer) from a checkpoint, a run directory, a HF model directory or a PEFT LoRA adapter
    directory (lmforge.adapt.peft_format); tokenizer is None if none was saved, or not read (tokenizer=False:
    the caller brings its own). An adapter-only checkpoint loads its base from the path it records, or from
    `base` when the base has moved (checked to be the same weights either way); a PEFT adapter from its
    base_model_name_or_path, or `base`. dtype: the float compute dtype (or its name) to build the model in; default
    the one the checkpoint records (config.json "dtype": what the model computed in when saved; float32 for one written
    before it was recorded), a HF directory's own, a PEFT adapter's base's. Quantized layers' integer codes keep
    their dtype; the float parts of their shells are built in it (base_shell's dtype=), and LoRA adapters are
    fp32 over a half-precision model, as when they were trained (lmforge.adapt.lora)."""
    from lmforge.adapt.peft_format import is_peft_dir, load_peft
    from lmforge.model.hf import float_dtype
    from lmforge.model.registry import build_model  # the class model.arch names (a Transformer unless registered)
    from lmforge.tokenizer.byte import FILE_NAME
    from lmforge.tokenizer.load import load_tokenizer
    from lmforge.utils import compute_dtype

    dtype = float_dtype(dtype)
    if is_peft_dir(path):  # a PEFT LoRA adapter directory: over its base_model_name_or_path, or `base`
        model, tok = load_peft(path, base, tokenizer)
        if dtype is not None:  # the base in dtype, the adapters kept fp32 (as the other checkpoints load them)
            from lmforge.adapt.lora import adapter_names

            keep = adapter_names(model)
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name not in keep and t.is_floating_point():
                    t.data = t.data.to(dtype)
        return model.to(device), tok
    ckpt = resolve_checkpoint(path)
    hf = is_hf_dir(ckpt)
    cfg, meta = (None, {}) if hf else model_config_of(ckpt)
    record = meta.get("base")
    if base is not None and not record:
        raise ConfigError(f"base={str(base)!r} was given, but {ckpt} holds all its weights (it has no base); "
                          "leave base out")
    if hf:
        model, tok = _load_hf(ckpt, tokenizer, dtype)
    else:
        dtype = dtype or recorded_dtype(meta, ckpt)
        layers = meta.get("base_layers")  # quantized modules (QLoRA): rebuilt, their codes loaded from the file
        if record:
            model = _base_model(record, ckpt, base)
        elif layers:  # on meta: the float weights of the quantized layers are never built (qlora.base_shell)
            with torch.device("meta"):
                model = build_model(cfg)
        else:
            model = build_model(cfg)
        if dtype is not None and compute_dtype(model) != dtype:  # (before the shells and adapters: see above)
            model.to(dtype)
        given = {id(t) for t in (*model.parameters(), *model.buffers())} if record else set()
        if layers:
            from lmforge.adapt.qlora import restore_base_layers

            restore_base_layers(model, layers, str(ckpt), dtype=compute_dtype(model), device="cpu")
        if meta.get("lora"):  # a LoRA run's checkpoint: the adapters as they were trained (unmerged)
            from lmforge.adapt.lora import restore_lora

            restore_lora(model, meta["lora"])
        if layers:  # what is still on meta allocated for the file's tensors; RoPE tables and the like computed
            from lmforge.adapt.qlora import materialize
            from lmforge.model.hf import init_buffers

            init_buffers(materialize(model))
        model.eos_token_ids = tuple(meta.get("eos_token_ids", ()))
        if meta.get("head"):  # a reward model or classifier: its head around the backbone
            model = _with_head(model, meta["head"], ckpt)
        # over a base, the file must hold every tensor the base does not give (adapters, a new head)
        required = {n for n, t in _named_tensors(model) if id(t) not in given} if record else None
        load_weights(model, ckpt, required, own_frozen=False)  # the model is rebuilt: nothing is its own
        tok = load_tokenizer(ckpt) if tokenizer and (ckpt / FILE_NAME).is_file() else None
        if hasattr(model, "bos_token_id") and "bos_token_id" in meta:  # (save_pretrained writes it)
            model.bos_token_id = meta["bos_token_id"]
        elif tok is not None and hasattr(model, "bos_token_id"):  # one written before it was recorded: its tokenizer's
            model.bos_token_id = getattr(tok, "bos_id", None)
    return model.to(device).eval(), tok


def _named_tensors(model: torch.nn.Module):
    """(name, tensor) of every parameter and buffer in the model's state_dict, tied ones under each name."""
    keys = model.state_dict().keys()
    return [(n, t) for n, t in (*model.named_parameters(remove_duplicate=False),
                                *model.named_buffers(remove_duplicate=False)) if n in keys]
