"""Reading a checkpoint back: `load_model` (an lmforge checkpoint, adapter-only over its recorded base, a HF
model directory or a PEFT adapter), `load_weights` (refusing missing, unexpected, mis-shaped or uncastable
tensors), `load_train_state`, and the model config a run resumes with (`check_same_model`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint.identity import BASE_HINT, recorded_base, checkpoint_identity
from lmforge.checkpoint.store import _verify, is_hf_dir, resolve_checkpoint
from lmforge.config import from_dict, to_dict, with_defaults
from lmforge.errors import CheckpointError, ConfigError


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


def model_config_of(ckpt: Path):
    from lmforge.model.config import ModelConfig

    meta = _verify(ckpt)
    if "model" not in meta:
        raise CheckpointError(f"{ckpt} holds a {meta.get('model_class', 'custom')} model, not an lmforge "
                              "Transformer; build that model yourself and load_weights(model, path)")
    return from_dict(ModelConfig, meta["model"], "model"), meta


def _quantized_hint(ckpt: Path, names: list[str]) -> str:
    """Why a checkpoint with quantized base layers (config.json's "base_layers", lmforge.adapt.qlora) does not
    match a model whose layers at those names are others (a float model built by hand): load_model rebuilds them."""
    try:
        layers = json.loads((ckpt / "config.json").read_text()).get("base_layers") or {}
    except (OSError, ValueError):
        return ""
    inside = tuple(f"{n}." for n in layers)
    if not any(n.startswith(inside) for n in names):
        return ""
    first, entry = next(iter(layers.items()))
    return (f"; it holds quantized base layers ({first}: {entry.get('kind') or entry.get('class')}, {len(layers)} "
            "such) where the model has other modules: load_model(path) rebuilds them, or put layers of that kind "
            "there (lmforge.model.surgery.replace_module) before load_weights")


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
    if required is not None and own_frozen and recorded_base(ckpt) \
            and "leaves_out" not in json.loads((ckpt / "config.json").read_text()):
        need = need - {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    shared = {n for n in need if n not in state and any(own[n].data_ptr() == own[m].data_ptr()
                                                       for m in state if m in own)}
    missing = sorted(need - set(state) - shared)
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        hint = ("; it holds LoRA adapters: apply_lora(model, the LoRAConfig it was trained with) first, or "
                "load_model(path), which puts them back" if any(".lora_" in n for n in unexpected) else "")
        base = recorded_base(ckpt) if required is None else None
        if base:
            hint = f"; it holds only what trained over the base {base['path']}: load_model(path)"
        hint = _quantized_hint(ckpt, missing + unexpected) or hint
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
    record = recorded_base(ckpt)
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
    fp32 over a half-precision model, as when they were trained (lmforge.adapt.lora).

    Loading draws nothing from the caller's random generator (as transformers' from_pretrained, which skips the
    initialisation the file's weights replace): building the layers draws their random initial weights, as many
    as the format builds (a PEFT adapter's base and LoRA layers, or its merged export's one model), so a seeded run
    whose NEFTune noise, dropout or fresh head drew after it depended on how its init was stored (an SFT run from a
    PEFT adapter and one from its merged export differed, found 2026-12-07)."""
    with torch.random.fork_rng(devices=[]):  # (the CPU generator: every model is built there, then moved)
        return _load_model(path, device, tokenizer, base=base, dtype=dtype)


def _load_model(path, device: str, tokenizer: bool, *, base, dtype):
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
