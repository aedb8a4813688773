"""Writing a checkpoint: what config.json records of a model (`model_meta`, `bos_record`), which tensors an
adapter-only checkpoint leaves to its base (`frozen_names`), the train state refused before writing if it would
not read back (`check_train_state`), and `save_checkpoint`, which writes it all atomically and seals it
(store.py)."""

from __future__ import annotations

import io
import json
import shutil
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint.store import _seal, checkpoint_dirs
from lmforge.config import to_dict
from lmforge.errors import CheckpointError, ConfigError, write_refused
from lmforge.utils import atomic_dir, run_metadata


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
        why = write_refused(e)
        if why is not None:
            fix = "free space" if why == "disk full" else "make the run directory writable again"
            raise CheckpointError(f"{why} at {tmp or final.parent} while writing the step {step} checkpoint; "
                                  f"it was not written and earlier checkpoints are intact: {fix} and resume") from e
        raise
    if keep_last:
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final
