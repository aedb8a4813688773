"""PEFT's LoRA adapter directories <-> lmforge's LoRA layers, so adapters move between lmforge and the HF
ecosystem in both directions:

    config, tensors = to_peft(model, "llama", lora)   # lmforge's adapters as adapter_config.json + tensors
    model = load_peft("adapters/", base="Llama-3.2-1B/")  # a PEFT adapter directory onto its base model

A PEFT directory holds adapter_config.json (r, lora_alpha, use_rslora, target_modules, modules_to_save,
base_model_name_or_path) and adapter_model.safetensors, whose keys are "base_model.model." + the HF module
name + ".lora_A.weight" / ".lora_B.weight" ((r, in) and (out, r): lmforge's shapes), and, for a module
kept in full (modules_to_save), "base_model.model." + its HF tensor names; beside an adapted lm_head or
embed_tokens PEFT also saves that layer's base weight (".base_layer.weight", save_embedding_layers="auto"),
which it loads in place of the base's, as load_peft does where it differs. Names go through the family's HF
rules (lmforge.model.hf.hf_names; kept modules through hf_single_rules, which also changes Gemma's norm gains
as its checkpoints store them), the same table that loads and writes HF checkpoints. load_model and every
--checkpoint option open a PEFT directory through load_peft: the base model (a HF or lmforge directory; a
hub id needs base=), lmforge LoRA layers with PEFT's scale (lora_alpha / r, or / sqrt(r) with rsLoRA; each
module's r read from its tensors, so rank_pattern needs nothing), the kept modules' weights; use_dora adapters
(lora_magnitude_vector beside A and B) as lmforge's DoRA layers, both ways. What lmforge's
LoRALinear cannot compute (aLoRA, LoRA biases, alpha_pattern, Conv1D's fan_in_fan_out, an initialisation
that PEFT recomputes the base weights from, such as PiSSA, ...: UNSUPPORTED) is refused, and so is a config field
set that lmforge does not know (INERT lists those that change nothing it computes). The legacy adapter_model.bin
(a pickle) is refused with the command that converts it.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path

import torch

from lmforge.errors import CheckpointError, ConfigError

PREFIX = "base_model.model."
"""what PEFT puts before a module name of the model it wraps (adapter_model.safetensors keys)"""
MAGNITUDE = "lora_magnitude_vector"
"""the key suffix of a DoRA layer's magnitude (out,) in adapter_model.safetensors"""
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
LEGACY_WEIGHTS = "adapter_model.bin"
"""what PEFT wrote before safetensors (a pickle: refused, with the one-line conversion)"""
UNSUPPORTED = {"lora_bias": "LoRA biases", "fan_in_fan_out": "fan_in_fan_out (Conv1D weights)",
               "alpha_pattern": "per-module lora_alpha (alpha_pattern)", "layer_replication": "layer_replication",
               "trainable_token_indices": "trainable token indices",
               "alora_invocation_tokens": "aLoRA (alora_invocation_tokens: the update only from the invocation "
                                          "tokens on)",
               "use_bdlora": "block-diagonal LoRA (use_bdlora)", "velora_config": "VeLoRA (velora_config)",
               "monteclora_config": "MonteCLoRA (monteclora_config)", "arrow_config": "Arrow routing (arrow_config)",
               "kasa_config": "KaSA (kasa_config)"}
"""adapter_config.json fields (peft 0.21's LoraConfig) that, set, make an adapter compute something lmforge's
LoRALinear does not (the name in errors). `_peft_config` also refuses a bias, an initialisation that changes
the base weights and any field of neither this table nor INERT."""
UNMERGEABLE = ("alora_invocation_tokens", "arrow_config")
"""of those, what peft's merge_and_unload refuses too"""
INERT = frozenset({
    # what the adapter is and where it came from
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    # which modules are adapted, at what rank, and which are kept in full: the tensors say it (each r is lora_A's)
    "r", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
    "modules_to_save",
    # training only: dropout (off at inference), the settings of an initialisation (the tensors replace its
    # values; init_lora_weights itself is checked)
    "lora_dropout", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    # QA-LoRA pools the inputs of GPTQ layers only, which lmforge does not load: over a float base PEFT
    # computes plain LoRA, as lmforge does
    "use_qalora", "qalora_group_size",
    # Megatron's parallel Linears (a HF or lmforge base has none) and PEFT's runtime options
    "megatron_config", "megatron_core", "runtime_config",
    # adapters tied as the base's weights are: what it ties (an embedding's adapter, a tied head's, a tied head
    # kept in full) shows in the tensors, which load_peft refuses; without tied weights it does nothing
    "ensure_weight_tying",
    "lora_alpha", "use_rslora", "use_dora", "bias", "init_lora_weights",  # what lmforge computes with, or checks
    "target_parameters",
})
"""adapter_config.json fields that change nothing lmforge computes once the tensors are loaded, or that
`_peft_config` checks itself"""
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica", "lora_ga")
"""init_lora_weights under which PEFT loads an adapter onto its base as it is; PiSSA, CorDA, OLoRA and LoftQ
recompute the base weights when the adapter is loaded (a residual of the base, a quantized base)"""


PEFT_CANNOT_LOAD: dict[str, tuple[tuple[str, str], ...]] = {
    "gpt_oss": ((r"\.mlp\.router$", "gpt-oss's router, a GptOssTopKRouter in transformers (not a Linear PEFT "
                                     "adapts)"),),
    # (PEFT's MoE conversion, which adapts DeepSeek's and Qwen3-MoE's routers as parameters, skips qwen2_moe: its
    # router stays a module target, which PEFT refuses)
    "qwen2_moe": ((r"\.mlp\.router$", "Qwen2-MoE's router, a Qwen2MoeTopKRouter in transformers (not a Linear PEFT "
                                       "adapts)"),),
    "deepseek_v3": ((r"\.mlp(\.shared)?\.(gate|up|down)$",
                     "a DeepSeek-V3 MLP projection, which PEFT's transformers-5 MoE conversion reads as the routed "
                     "experts' fused gate_up_proj / down_proj (it fails to load, or adapts the wrong weights)"),),
}
"""per family: lmforge LoRA layer names (regex) whose PEFT adapter transformers + PEFT would not load as written
(found with transformers 5.25 and peft 0.21 by loading written directories; tests/test_export.py)"""


V5_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {"mixtral": ((".mlp.", ".block_sparse_moe."),)}
"""per family: (transformers-5 module name part, the checkpoint's) where transformers 5 renames modules as it loads
a checkpoint (its conversion_mapping: Mixtral's block_sparse_moe is `mlp`), so a PEFT adapter trained on transformers 5
names them so (model.layers.0.mlp.gate: the router)"""


def peft_moe_targets(model_type: str) -> dict[str, str]:
    """Module leaf name (gate_proj, up_proj, down_proj, w1, gate, ...) -> the parameter PEFT adapts in its place when
    it loads an adapter onto a transformers-5 model of `model_type` (its v4 -> v5 MoE conversion): the experts' fused
    gate_up_proj / down_proj (an adapter on a dense MLP or shared expert of that name fails to load, or adapts the
    experts instead), or the router's own weight ("gate" -> "gate.weight": the same weights, adapted through PEFT's
    lora.ParamWrapper). Read from PEFT's own tables (private: none where a version lacks them), which are those
    PEFT consults (its model -> pattern table adds Mixtral to transformers')."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
    except ImportError:
        return {}
    return dict(_MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type), {}))


def _refuse_unloadable(layers: dict, modules: dict[str, str], model_type: str) -> None:
    """Refuses, in one line, an adapted layer PEFT would not load as written: a base that is no nn.Linear (PEFT's
    LoRA adapts those; a quantized base of lmforge's is none), a module name PEFT moves onto MoE experts, or a DoRA
    layer PEFT would adapt as a parameter (its ParamWrapper takes no DoRA)."""
    from torch import nn

    moe = peft_moe_targets(model_type)
    for name, m in layers.items():
        if m.base is not None and not isinstance(m.base, nn.Linear):
            raise ConfigError(f"--adapter: LoRA layer {name} wraps a {type(m.base).__name__} (e.g. a quantized base), "
                              "not an nn.Linear, which PEFT's LoRA does not load onto; save the adapters with lmforge "
                              "(lmforge.adapt.lora_state_dict or an adapter-only checkpoint) instead")
        leaf = modules[name].rsplit(".", 1)[-1]
        if leaf not in moe:
            continue
        if moe[leaf] != f"{leaf}.weight":
            raise ConfigError(f"--adapter: LoRA layer {name} is the {model_type} module {modules[name]}, whose adapter "
                              f"PEFT (transformers 5) loads onto the MoE experts' fused weights instead (a {leaf} of a "
                              "dense MLP or shared expert); export without --adapter (merged), or train adapters on "
                              "other layers")
        if hasattr(m, "magnitude"):  # DoRA (all layers or none: to_peft)
            raise ConfigError(f"--adapter: DoRA layer {name} is the {model_type} module {modules[name]}, which PEFT "
                              f"(transformers 5) adapts as the parameter {moe[leaf]} (lora.ParamWrapper), which does "
                              "not take DoRA; export without --adapter (merged), or train DoRA on other layers")


def to_peft(model, family: str, lora: dict) -> tuple[dict, dict]:
    """(adapter_config.json, adapter_model.safetensors tensors) of the model's LoRA layers in PEFT's naming.
    `lora`: the run's [lora] section, for rslora, dropout and the modules kept trainable. A HF model behind
    lmforge.infer.hf_wrapper.HFCausalLM already has HF's module names (under `hf.`): `family` is not used."""
    from lmforge.adapt.dora import DoRALinear
    from lmforge.adapt.lora import LoRALinear, lora_layers
    from lmforge.infer.hf_wrapper import HFCausalLM
    from lmforge.model.hf import hf_names, hf_single_rules

    layers = lora_layers(model)
    if not layers:
        raise ConfigError("the checkpoint holds no LoRA adapters: export it without --adapter")
    for name, m in layers.items():
        extra = [p for p in m.adapter_params if p not in LoRALinear.adapter_params]
        if extra and type(m) is not DoRALinear:  # PEFT's adapter has a place for A, B and DoRA's magnitude only
            raise ConfigError(f"--adapter: LoRA layer {name} ({type(m).__name__}) has adapter parameters {extra} "
                              "beyond A and B, which a PEFT LoRA adapter does not hold; export without --adapter")
    if len({type(m) is DoRALinear for m in layers.values()}) > 1:
        raise ConfigError("--adapter: some LoRA layers are DoRA and some are not, which one adapter_config.json "
                          "(use_dora) does not say; export without --adapter (merged)")
    if isinstance(model, HFCausalLM):
        modules = {name: name.removeprefix("hf.") for name in layers}
        _refuse_unloadable(layers, modules, getattr(model.hf.config, "model_type", ""))
        kept = _kept_hf_modules(model, tuple(lora.get("trainable") or ()))
        return _peft_files(layers, modules, kept, lora)
    names = hf_names(model.cfg, family)
    modules = {}
    for name in layers:
        if f"{name}.weight" not in names:
            why = ("a fused projection (model.fused_proj=true), which PEFT's per-projection adapters cannot express"
                   if name.endswith((".wqkv", ".gate_up")) else f"stored in another form in the {family} HF layout")
            raise ConfigError(f"--adapter: LoRA layer {name} is {why}; export without --adapter (merged)")
        for pattern, what in PEFT_CANNOT_LOAD.get(family, ()):
            if re.search(pattern, name):
                raise ConfigError(f"--adapter: LoRA layer {name} is {what}; export without --adapter (merged), or "
                                  "train adapters on other layers")
        modules[name] = names[f"{name}.weight"].removesuffix(".weight")
    _refuse_unloadable(layers, modules, family)
    kept = kept_modules(model, tuple(lora.get("trainable") or ()), hf_single_rules(model.cfg, family))
    return _peft_files(layers, modules, kept, lora)


def _peft_files(layers: dict, modules: dict[str, str], kept: dict[str, dict], lora: dict) -> tuple[dict, dict]:
    """to_peft's (config, tensors) from the LoRA layers, their HF module names and the kept modules' tensors."""
    shapes = {(m.lora_A.shape[0], m.scale) for m in layers.values()}
    if len(shapes) > 1:
        raise ConfigError(f"--adapter: the LoRA layers differ in rank or scale ({sorted(shapes)}), which one "
                          "adapter_config.json does not say; export without --adapter (merged)")
    (r, scale), = shapes
    rslora = bool(lora.get("rslora", False))
    alpha = scale * (math.sqrt(r) if rslora else r)  # PEFT's scale: lora_alpha / r, or / sqrt(r) with rsLoRA
    if isinstance(lora.get("alpha"), (int, float)) and math.isclose(lora["alpha"], alpha, rel_tol=1e-9):
        alpha = lora["alpha"]  # the run's own, not its value rounded through the scale
    tensors = {}
    dora = any(hasattr(m, "magnitude") for m in layers.values())  # (all or none: to_peft)
    for name, m in layers.items():
        for part in ("lora_A", "lora_B"):  # (r, in), (out, r): PEFT's Linear weights as lmforge's
            tensors[f"{PREFIX}{modules[name]}.{part}.weight"] = getattr(m, part).detach().contiguous().cpu()
        if dora:  # (out,): PEFT's DoRA magnitude, saved without ".weight"
            tensors[f"{PREFIX}{modules[name]}.{MAGNITUDE}"] = m.magnitude.detach().contiguous().cpu()
    for params in kept.values():
        tensors.update({f"{PREFIX}{k}": t for k, t in params.items()})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "use_rslora": rslora,
              "lora_dropout": float(lora.get("dropout", 0.0)), "target_modules": list(modules.values()),
              "modules_to_save": list(kept) or None, "bias": "none", "fan_in_fan_out": False, "use_dora": dora,
              "inference_mode": True}
    return config, tensors


def _kept(model, patterns: tuple[str, ...]):
    """(name, module) of each outermost module whose name [lora] trainable's patterns match."""
    from lmforge.model.surgery import matches

    chosen: list[str] = []
    for name, module in model.named_modules():
        if name and matches(name, patterns) and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
            yield name, module


def _kept_hf_modules(model, patterns: tuple[str, ...]) -> dict[str, dict]:
    """kept_modules of a HF model behind HFCausalLM: its tensors as they are, under their HF names."""
    out: dict[str, dict] = {}
    for name, module in _kept(model, patterns):
        if name == "hf":
            raise ConfigError("--adapter: [lora] trainable keeps the whole HF model in full, which is no adapter; "
                              "export without --adapter (merged)")
        hf = name.removeprefix("hf.")
        out[hf] = {f"{hf}.{p}": t.detach().contiguous().cpu() for p, t in module.named_parameters()}
    return out


def kept_modules(model, patterns: tuple[str, ...], rules: dict) -> dict[str, dict]:
    """HF module name -> {HF tensor name: tensor} of each module [lora] trainable kept in full (PEFT's
    modules_to_save), each tensor as HF stores it (`rules`: lmforge.model.hf.hf_single_rules); one whose
    tensors are not those of one HF module is refused. A module's submodules may have other HF names (DeepSeek's
    `shared` is HF's `shared_experts`, its `gate` `gate_proj`): each tensor names its HF module by dropping as many
    trailing parts as its name under the module has (gate.weight: two), and all must name the same one."""
    out: dict[str, dict] = {}
    for name, module in _kept(model, patterns):
        params = {p: rules.get(f"{name}.{p}") for p, _ in module.named_parameters()}
        heads = {r.hf[0].rsplit(".", p.count(".") + 1)[0] if r and r.hf[0].count(".") > p.count(".") else None
                 for p, r in params.items()}
        if None in heads or len(heads) != 1:
            raise ConfigError(f"--adapter: the module {name} that [lora] trainable kept in full is not one HF module "
                              "PEFT can keep (modules_to_save); export without --adapter (merged)")
        out[heads.pop()] = {params[p].hf[0]: params[p].to_hf([t.detach()])[0].contiguous().cpu()
                            for p, t in module.named_parameters()}
    return out


def is_peft_dir(path: str | Path) -> bool:
    """A PEFT adapter directory: adapter_config.json beside adapter_model.safetensors."""
    path = Path(path)
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file()


def refuse_pickled(path: str | Path) -> None:
    """Refuses, naming the file and the conversion, a PEFT directory whose tensors are only in the legacy
    adapter_model.bin: a pickle, which lmforge does not open (as it opens no pickled checkpoint)."""
    path = Path(path)
    if (path / CONFIG).is_file() and (path / LEGACY_WEIGHTS).is_file() and not (path / WEIGHTS).is_file():
        # the paths as JSON strings, which are Python literals too, in double quotes (no quoting inside shlex's)
        code = (f"import torch; from safetensors.torch import save_file; save_file(torch.load("
                f"{json.dumps(str(path / LEGACY_WEIGHTS))}, weights_only=True), {json.dumps(str(path / WEIGHTS))})")
        raise CheckpointError(f"{path} is a PEFT adapter whose tensors are in {path / LEGACY_WEIGHTS}, a pickle, "
                              f"which lmforge does not load; write them as {WEIGHTS} once: python -c "
                              f"{shlex.quote(code)}")


class NoLocalBase(CheckpointError):
    """A PEFT adapter directory's base is no local directory (a hub name, a path that is gone): peft_base's refusal,
    which checkpoint_identity takes as "the adapters' identity alone" (nothing is downloaded)."""


def peft_base(path: str | Path, base: str | Path | None = None) -> Path:
    """Where a PEFT adapter directory's base model is: `base` (--base DIR), else its adapter_config.json's
    base_model_name_or_path; refused when that is no local path (nothing is downloaded). A recorded `.../base` that
    is gone while the directory holds its own `base/` is `lmforge export --adapter`'s layout moved whole (copied to
    another machine, renamed): that `base/` (the export records it by its absolute path, as PEFT reads it; the moved
    directory was refused, found 2026-12-07)."""
    where = base if base is not None else _peft_config(Path(path)).get("base_model_name_or_path")
    if (base is None and isinstance(where, str) and where and Path(where).name == "base" and not Path(where).exists()
            and (Path(path) / "base" / "config.json").is_file()):
        return Path(path) / "base"
    if not isinstance(where, (str, Path)) or not where or not Path(where).exists():
        raise NoLocalBase(f"{path} is a PEFT adapter over the base {where!r}, which is not a local directory "
                              "(nothing is downloaded); pass where the base model is: base=DIR or --base DIR")
    return Path(where)


def tokenizer_dir(path: str | Path, base: str | Path | None = None) -> Path:
    """The directory a PEFT adapter directory's tokenizer, and so its chat template, is read from (load_peft,
    checkpoint.hf_chat_template): its own when it holds tokenizer.json, else its base's (peft_base)."""
    path = Path(path)
    return path if (path / "tokenizer.json").is_file() else peft_base(path, base)


def load_peft(path: str | Path, base: str | Path | None = None, tokenizer: bool = True):
    """(model, tokenizer) of a PEFT LoRA adapter directory over its base: the base as load_model loads it
    (`base`, else the config's base_model_name_or_path), lmforge LoRA layers (unmerged) around the adapted
    Linears with the adapter's tensors, and the kept modules' weights. The tokenizer is the adapter
    directory's own when it has one, else the base's."""
    from lmforge.adapt.lora import load_lora, lora_layers, merge_lora, restore_lora, unmergeable
    from lmforge.checkpoint import is_hf_dir, load_model, resolve_checkpoint
    from lmforge.model.hf import family_of, guess_family, read_hf_config, read_safetensors
    from lmforge.tokenizer.load import load_tokenizer

    path = Path(path)
    config = _peft_config(path)  # refused before the base loads, as an unreadable tensor file is
    tensors = read_safetensors(path / WEIGHTS)
    where = peft_base(path, base)
    model, tok = load_model(where, tokenizer=tokenizer)
    if not hasattr(model, "cfg"):
        raise ConfigError(f"{path}: the base {where} holds a {type(model).__name__}, not a causal LM; give the "
                          "language model the adapter was trained on: base=DIR or --base DIR")
    kept = unmergeable(model)
    if kept:  # a QLoRA run's checkpoint: its adapters cannot be merged into the quantized base
        raise ConfigError(f"{path}: the base {where} holds LoRA adapters over a quantized base (QLoRA; layer "
                          f"{kept[0]}), which cannot be merged to put this adapter over them; give the float base "
                          "model the adapter was trained on: base=DIR or --base DIR")
    if lora_layers(model):  # a LoRA run's checkpoint: its adapters are part of the model (merged, as a run's init)
        merge_lora(model)
    if tokenizer and tokenizer_dir(path, where) == path:
        tok = load_tokenizer(path)
    ckpt = resolve_checkpoint(where)
    family = family_of(read_hf_config(ckpt)) if is_hf_dir(ckpt) else guess_family(model.cfg)
    layers, state = _lmforge_state(path, tensors, model, family, config)
    restore_lora(model, layers)
    load_lora(model, state)  # checked whole (names, shapes) before anything is copied
    return model.eval(), tok


def _lmforge_state(path: Path, tensors: dict, model, family: str, config: dict) -> tuple[dict, dict]:
    """({lmforge layer: [r, scale]}, {lmforge name: tensor}) of a PEFT adapter's tensors over `model`: the
    LoRA factors, the modules kept in full, and the base weights PEFT saves beside an adapted embedding or
    output head (save_embedding_layers="auto") and loads in place of the base's."""
    from lmforge.model.hf import hf_names, hf_single_rules, hf_tensor_names

    to_lm = {hf: lm for lm, hf in hf_names(model.cfg, family).items()}
    held = hf_tensor_names(model.cfg, family)
    kept_rules = {r.hf[0]: r for r in hf_single_rules(model.cfg, family).values()}
    if model.cfg.tie_embeddings and any(k.startswith(f"{PREFIX}lm_head.lora_") for k in tensors):
        raise ConfigError(f"{path} adapts lm_head, whose weight this base ties to its embeddings "
                          "(tie_word_embeddings); lmforge's LoRA layers do not adapt a tied head (a merge would change "
                          "the embeddings too): save the base with its head untied (tie_word_embeddings=false) and "
                          "load the adapter onto that")
    own = model.state_dict()  # (a kept module's buffers too: DeepSeek-V3's router bias)
    layers, state = {}, {}
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        for v5, v4 in V5_RENAMES.get(family, ()):  # a module named as transformers 5 names it, the file as v4 does
            name = name.replace(v5, v4)
        module = name.rsplit(".", 2)[0]
        unwrapped = re.sub(r"\.base_layer(?=\.[^.]+$)", "", name)  # lm_head.base_layer.weight -> lm_head.weight
        if name.endswith((".lora_A.weight", ".lora_B.weight")):
            part, (lm, linear) = name.rsplit(".", 2)[1], _adapted(path, module, model, to_lm, held, family)
            _fits(path, key, t, (t.shape[0], linear.in_features) if part == "lora_A" else
                  (linear.out_features, t.shape[-1]), f"which the base's {lm} ({linear.in_features} -> "
                  f"{linear.out_features}) does not take: the adapter was trained on another base")
            if part == "lora_A":
                r = t.shape[0]
                if r == 0:  # (the scale below divides by it)
                    raise ConfigError(f"{path / WEIGHTS} holds {key} of rank 0 (shape {tuple(t.shape)}), an empty "
                                      "adapter; save it again from peft with r > 0")
                layers[lm] = [r, config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r),
                              *(["dora"] if config.get("use_dora") else [])]
            state[f"{lm}.{part}"] = t
        elif name.endswith(f".{MAGNITUDE}") and config.get("use_dora"):  # DoRA's (out,) magnitude
            lm, linear = _adapted(path, name.removesuffix("." + MAGNITUDE), model, to_lm, held, family)
            out = linear.out_features
            _fits(path, key, t, (out,), f"which the base's {lm} (out_features {out}) does not take: the adapter was "
                  "trained on another base")
            state[lm + ".magnitude"] = t
        elif unwrapped != name and unwrapped in kept_rules:
            lm, weight = kept_rules[unwrapped].lm[0], kept_rules[unwrapped].to_lm([t])[0]
            _fits(path, f"the base weight {key}", weight, own[lm].shape,
                  f"the base's is {tuple(own[lm].shape)} (a resized vocabulary?)")
            if not torch.equal(weight.to(own[lm].dtype), own[lm]):
                state[lm] = weight  # another base weight than the base's: PEFT loads it in the base's place
        elif name.endswith((".lora_embedding_A", ".lora_embedding_B")):
            raise ConfigError(f"{path} adapts the embedding {name.rsplit('.', 1)[0]} (lora_embedding_A / B), which "
                              "lmforge's LoRA layers (Linears only) do not compute; merge the adapter with peft "
                              "(merge_and_unload) and load the merged model instead")
        elif name in kept_rules:  # a module kept in full (modules_to_save), as HF stores it
            lm, weight = kept_rules[name].lm[0], kept_rules[name].to_lm([t])[0]
            _fits(path, f"the weight {key}", weight, own[lm].shape, f"the base's is {tuple(own[lm].shape)} (the "
                  "adapter was trained on another base, or one with a resized vocabulary)")
            state[lm] = weight
        elif name == "lm_head.weight" and model.cfg.tie_embeddings:
            raise ConfigError(f"{path} keeps lm_head in full (modules_to_save) over a base whose output head is tied "
                              "to its embeddings (tie_word_embeddings): PEFT trained a head of its own, which the tied "
                              "model has no place for; merge it with peft (merge_and_unload), untie the head "
                              "(tie_word_embeddings=false) and load that model instead")
        else:
            raise ConfigError(f"{path}: tensor {key} is neither a LoRA factor nor a weight the {family} rules map; "
                              "lmforge cannot apply this adapter")
    if not layers:
        raise ConfigError(f"{path} holds no LoRA factors (lora_A / lora_B weights)")
    lacking = [lm for lm in layers if config.get("use_dora") and f"{lm}.magnitude" not in state]
    if lacking:
        raise ConfigError(f"{path} sets use_dora but holds no {MAGNITUDE} for {lacking[0]} (DoRA's magnitude); it is "
                          "not a complete DoRA adapter: save it again with peft")
    return layers, state


def _adapted(path: Path, module: str, model, to_lm: dict[str, str], held: set[str], family: str):
    """(name, layer) of the lmforge Linear a PEFT adapter's HF `module` names; refuses a module the base lacks
    (another base's) and one the family's rules do not carry across as one Linear weight."""
    from lmforge.adapt.lora import linear_like

    lm = to_lm.get(module + ".weight")
    if lm is not None:
        lm = lm.removesuffix(".weight")
        layer = model.get_submodule(lm)
        if not linear_like(layer):
            raise ConfigError(f"{path} adapts {module}, which is a {type(layer).__name__} in lmforge, not a Linear "
                              "layer: lmforge's LoRA layers cannot apply it")
        return lm, layer
    if module + ".weight" not in held:
        raise ConfigError(f"{path} adapts {module}, which the base has no module of: the adapter was trained on "
                          "another base; give the base it was trained on: base=DIR or --base DIR")
    raise ConfigError(f"{path}: the adapter adapts {module}, which the {family} rules do not map onto one lmforge "
                      "Linear (a fused or transposed weight); lmforge cannot apply it")


def _fits(path: Path, what: str, t: torch.Tensor, shape, why: str) -> None:
    """Refuses an adapter tensor of another shape than the base gives it room for: the adapter is another base's."""
    if tuple(t.shape) != tuple(shape):
        raise ConfigError(f"{path} holds {what} of shape {tuple(t.shape)}, {why}; give the base it was trained on: "
                          "base=DIR or --base DIR")


def _peft_config(path: Path) -> dict:
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path / CONFIG}: {e}") from e
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ConfigError(f"{path} is a {kind} adapter; lmforge applies LoRA adapters only")
    alpha, r = config.get("lora_alpha"), config.get("r")  # (json reads NaN and Infinity as floats)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ConfigError(f"{path / CONFIG}: lora_alpha is {alpha!r}, not a finite number; set it to the alpha the "
                          "adapter was trained with (its scale is lora_alpha / r)")
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise ConfigError(f"{path / CONFIG}: r is {r!r}, not a positive integer; set it to the adapter's rank (the "
                          "first dimension of its lora_A tensors)")
    targets = config.get("target_parameters")
    if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise ConfigError(f"{path / CONFIG}: target_parameters is {targets!r}, not a list of parameter names; write it "
                          'as PEFT does (["gate.weight"]), or null for none')
    used = [what for key, what in UNSUPPORTED.items() if config.get(key)]
    # a module's own 2-D weight adapted as a parameter (PEFT's lora.ParamWrapper; "gate.weight", what PEFT makes of
    # a MoE router target on transformers 5) is B A added to that Linear's weight, as LoRA on the module; a fused
    # 3-D expert weight (experts.gate_up_proj) is per-expert factors lmforge's LoRA layers do not compute
    fused = [t for t in targets or () if not t.endswith(".weight")]
    if fused:
        used.append(f"target_parameters {fused} (fused MoE expert weights)")
    if config.get("bias", "none") != "none":
        used.append(f"bias={config['bias']!r}")
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        used.append(f"init_lora_weights={init!r} (the base weights recomputed when PEFT loads it)"
                    if isinstance(init, str) and init.lower().startswith(("pissa", "corda", "olora", "loftq"))
                    else f"init_lora_weights={init!r}")
    used += [f"{key}={value!r} (a field this lmforge does not know)" for key, value in config.items()
             if key not in INERT and key not in UNSUPPORTED and value]
    if used:
        fix = ("run it with peft, which cannot merge it either" if any(config.get(k) for k in UNMERGEABLE) else
               "merge the adapter with peft (merge_and_unload) and load the merged model instead")
        raise ConfigError(f"{path} uses {', '.join(used)}, which lmforge's LoRA layers do not compute; {fix}")
    return config
