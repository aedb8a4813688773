"""HF-format checkpoints <-> lmforge's Transformer (or another model class a family names through its config's
`arch`: lmforge.model.registry).

    Transformer.from_pretrained(dir)   config.json + model.safetensors (or model-*.safetensors with
                                       model.safetensors.index.json) of a supported family
    model.save_pretrained(dir)         the same layout, loadable by `transformers`

Loading builds the model on the meta device (no memory), allocates it once, then copies tensors one by
one from memory-mapped safetensors files (`safe_open`), so a checkpoint never exists twice in memory.
Every HF tensor must be consumed and every lmforge tensor filled: a missing, unexpected or misshapen
tensor, an unknown architecture or a quantized checkpoint raise CheckpointError/ConfigError naming it.
Families and their name rules: hf_families.py (dense) and hf_moe.py (mixture of experts).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import torch

from lmforge.config import SHORT_DTYPES
from lmforge.errors import CheckpointError, ConfigError, warn_caller
from lmforge.model import hf_families as D
from lmforge.model import hf_moe as M
from lmforge.model.config import ModelConfig
from lmforge.utils import atomic_path, compute_dtype, honour_umask, write_json_atomic

# model_type -> (architecture name, cfg_from_hf, cfg_to_hf, rules); the ModelConfig cfg_from_hf returns names the
# model class it loads into (arch, lmforge.model.registry: None = the Transformer)
FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", D.gpt2_cfg, D.gpt2_cfg_to_hf, D.gpt2_rules),
    "llama": ("LlamaForCausalLM", D.llama_cfg, D.llama_cfg_to_hf, D.llama_rules),
    "mistral": ("MistralForCausalLM", D.llama_cfg, D.llama_cfg_to_hf, D.llama_rules),
    "qwen2": ("Qwen2ForCausalLM", lambda d: D.llama_cfg(d, qkv_bias=True, o_bias=False, bias=False), D.llama_cfg_to_hf,
              D.llama_rules),
    "qwen3": ("Qwen3ForCausalLM", lambda d: D.llama_cfg(d, qk_norm=True), D.llama_cfg_to_hf, D.llama_rules),
    "gemma": ("GemmaForCausalLM", D.gemma_cfg, lambda c: D.llama_cfg_to_hf(c, "gemma"),
              lambda c: D.llama_rules(c, hf_norm_offset=1.0)),
    "gemma2": ("Gemma2ForCausalLM", D.gemma2_cfg, D.gemma2_cfg_to_hf,
               lambda c: D.llama_rules(c, hf_norm_offset=1.0)),
    "mixtral": ("MixtralForCausalLM", M.mixtral_cfg, M.mixtral_cfg_to_hf, M.mixtral_rules),
    "qwen2_moe": ("Qwen2MoeForCausalLM", M.qwen2_moe_cfg, M.qwen2_moe_cfg_to_hf, M.qwen2_moe_rules),
    "qwen3_moe": ("Qwen3MoeForCausalLM", M.qwen3_moe_cfg, M.qwen3_moe_cfg_to_hf, M.qwen3_moe_rules),
    "deepseek_v2": ("DeepseekV2ForCausalLM", M.deepseek_v2_cfg, M.deepseek_v2_cfg_to_hf, M.deepseek_v2_rules),
    "deepseek_v3": ("DeepseekV3ForCausalLM", M.deepseek_v3_cfg, M.deepseek_v3_cfg_to_hf, M.deepseek_v3_rules),
    "gpt_oss": ("GptOssForCausalLM", M.gpt_oss_cfg, M.gpt_oss_cfg_to_hf, M.gpt_oss_rules),
}
# transformers' base_model_prefix of each family's ForCausalLM class (default 'model.'): the module holding everything
# but the head, whose name a checkpoint saved from the base class (or GPT-2's own files) leaves out
BASE_PREFIX = {"gpt2": "transformer."}
# HF tensors that carry no weights lmforge needs (GPT-2's causal-mask buffers; DeepSeek-V3's MTP layer
# beyond num_hidden_layers is handled separately)
IGNORED = re.compile(r"(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$)")
UNSUPPORTED_DTYPES = {"I8", "U8", "F8_E4M3", "F8_E5M2", "I32", "U32", "I16"}


# config ----------------------------------------------------------------------------------------------
def read_hf_config(path: str | os.PathLike) -> dict:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise CheckpointError(f"no config.json in {path}: not a HF-format checkpoint directory")
    return _json_object(f)


def _json_object(f: Path) -> dict:
    """The JSON object in file f (config.json, the shard index); CheckpointError naming f if it holds none."""
    try:
        d = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{f} holds a JSON {type(d).__name__}, not an object: not a HF-format file")
    return d


def family_of(hf: dict) -> str:
    mt = hf.get("model_type")
    if mt in FAMILIES:
        return mt
    archs = hf.get("architectures") or []
    for name, (arch, *_) in FAMILIES.items():
        if arch in archs:
            return name
    raise ConfigError(f"config.json model_type={mt!r} (architectures={archs}) is not supported; "
                      f"supported model_type: {sorted(FAMILIES)}; run it through transformers instead: "
                      "LLM(lmforge.infer.hf_wrapper.HFCausalLM(AutoModelForCausalLM.from_pretrained(dir)), tokenizer) "
                      "(no KV cache: correct, slow)")


def config_from_hf(hf: dict) -> ModelConfig:
    """config.json dict -> ModelConfig (ConfigError naming the field if it is missing or unsupported)."""
    if hf.get("quantization_config"):
        qc = hf["quantization_config"]
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else qc
        raise CheckpointError(f"config.json quantization_config (quant_method={method!r}): quantized checkpoints are "
                              "not supported yet; use a bf16/fp16/fp32 checkpoint")
    fam = family_of(hf)
    try:
        return FAMILIES[fam][1](D.with_family_defaults(hf, fam))
    except KeyError as e:
        raise ConfigError(f"config.json of a {fam} model lacks the field {e.args[0]!r}") from e


def config_to_hf(cfg: ModelConfig, family: str) -> dict:
    arch, _, to_hf, _ = FAMILIES[family]
    return {"architectures": [arch], "model_type": family, **to_hf(cfg)}


def guess_family(cfg: ModelConfig) -> str:
    """The HF family whose architecture matches `cfg` (for save_pretrained without an explicit family): a
    Transformer's; another model class (ModelConfig.arch) names its family."""
    if cfg.arch not in (None, "transformer"):
        raise ConfigError(f"save_pretrained: a model.arch={cfg.arch!r} model has no family to guess; pass family= "
                          f"(one whose config.json reads back as arch {cfg.arch!r})")
    if cfg.attention == "mla":  # DeepSeek-V2 routes by softmax, V3 by sigmoid
        return "deepseek_v2" if cfg.mlp == "moe" and cfg.moe_cfg.score == "softmax" else "deepseek_v3"
    if cfg.mlp == "moe":
        if cfg.attn_sinks or cfg.activation == "swiglu_oss":
            return "gpt_oss"
        if cfg.moe_cfg.shared_gate:
            return "qwen2_moe"
        return "qwen3_moe" if cfg.qk_norm else "mixtral"
    if cfg.pos_emb == "learned":
        return "gpt2"
    if cfg.norm_position == "sandwich":
        return "gemma2"
    if cfg.embed_scale == math.sqrt(cfg.d_model):  # Gemma (1)'s embedding scale, pre-norm
        return "gemma"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias and not cfg.bias and not cfg.has_o_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window else "llama"


def hf_names(cfg: ModelConfig, family: str) -> dict[str, str]:
    """lmforge tensor name -> HF tensor name of every tensor the family's rules carry across as it is
    ('blocks.0.attn.wq.weight' -> 'model.layers.0.self_attn.q_proj.weight'): the names under which a file
    of per-module tensors in HF's naming, such as a PEFT adapter, is written. Tensors the rules transpose,
    split or fuse (GPT-2's c_attn, a fused q|k|v, stacked experts) are not in it."""
    return {lm: r.hf[0] for lm, r in hf_single_rules(cfg, family).items() if r.plain}


def hf_single_rules(cfg: ModelConfig, family: str) -> dict[str, D.Rule]:
    """lmforge tensor name -> the family's rule carrying it as one whole HF tensor, stored as it is or changed
    elementwise (norm gains between offsets: lmforge.model.hf_families.norm_rule): what a module kept in full
    (PEFT's modules_to_save) is written and read through. hf_names holds the plain ones among them."""
    if family not in FAMILIES:
        raise ConfigError(f"family={family!r} is not a supported HF family; choose one of {sorted(FAMILIES)}")
    return {r.lm[0]: r for r in FAMILIES[family][3](cfg) if len(r.hf) == len(r.lm) == 1 and "#" not in r.lm[0]}


def hf_tensor_names(cfg: ModelConfig, family: str) -> set[str]:
    """Every HF tensor name the family's rules give a model of `cfg` (fused, split and stacked ones too): what a
    file of HF-named tensors (a PEFT adapter) may name on this model."""
    if family not in FAMILIES:
        raise ConfigError(f"family={family!r} is not a supported HF family; choose one of {sorted(FAMILIES)}")
    return {name for r in FAMILIES[family][3](cfg) for name in r.hf}


# tensors ---------------------------------------------------------------------------------------------
def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file holding it (single file or sharded with an index). model.safetensors comes first, as
    transformers reads it: its save_pretrained leaves the other layout's files behind (an unsharded save over a
    sharded one keeps the index, its shards deleted)."""
    index, single = path / "model.safetensors.index.json", path / "model.safetensors"
    if index.is_file() and single.is_file():
        warn_caller(f"{path} holds both model.safetensors and model.safetensors.index.json, one left over from an "
                    "earlier save: loading model.safetensors, as transformers does (delete the stale one)")
    elif index.is_file():
        wm = _json_object(index).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{index} has no weight_map object of tensor name -> file name")
        return {k: path / v for k, v in wm.items()}
    if not single.is_file():
        shard = next((f.name for f in sorted(path.glob("model-*-of-*.safetensors"))), None)
        if shard is not None:
            raise CheckpointError(f"{path} holds shards ({shard}, ...) but not their index, "
                                  "model.safetensors.index.json: fetch it too (it names the shard of each tensor)")
        pickled = next((f.name for f in sorted(path.glob("pytorch_model*.bin"))), None)
        fix = (f"; {pickled} is a pickle: convert it where you trust it, e.g. transformers' "
               "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir) writes safetensors") if pickled else ""
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path} "
                              f"(only safetensors checkpoints are loaded: no pickle){fix}")
    return {k: single for k in _open_safetensors(single).keys()}


def _open_safetensors(path: Path):
    """safe_open(path) (memory-mapped); CheckpointError naming the file when it is not a safetensors file (a
    truncated download, a Git LFS pointer)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), "pt")
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}): a truncated or unfinished "
                              "download, or a Git LFS pointer? Fetch the file again") from e


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of one small safetensors file (a PEFT adapter's), with _open_safetensors' one-line error for a
    file that is none (a truncated copy) instead of safetensors' own exception."""
    handle = _open_safetensors(Path(path))
    return {k: handle.get_tensor(k) for k in handle.keys()}


def _target(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The lmforge tensor (or slice 'x#e' of a stacked one) a rule reads or writes."""
    base, _, idx = name.partition("#")
    if base not in tensors:
        raise CheckpointError(f"lmforge model has no tensor {base!r} (config and family rules disagree)")
    t = tensors[base]
    return t[int(idx)] if idx else t


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_buffers()), **dict(model.named_parameters())}


def _with_base_prefix(files: dict[str, Path], fam: str, expected: set[str]) -> tuple[dict[str, Path], dict[str, str]]:
    """(files by full name, full name -> the name stored where it differs). A checkpoint saved from the family's
    base class, or GPT-2's own files (openai-community/gpt2: 'h.0.attn.c_attn.weight', 'wte.weight'), names no
    tensor with the base prefix ('transformer.', 'model.'): transformers adds it to every name but the head's
    when it loads them into the ForCausalLM class, and so does this - where none of the stored names is one the
    family's rules expect (`expected`) and the prefixed ones are (a Mamba's 'backbone.' names stay as they are)."""
    prefix = BASE_PREFIX.get(fam, "model.")
    stored = {n if n.startswith("lm_head.") else prefix + n: n for n in files}
    if any(n.startswith(prefix) for n in files) or (set(files) - {"lm_head.weight"}) & expected \
            or not (set(stored) - {"lm_head.weight"}) & expected:
        return files, {}
    return {full: files[n] for full, n in stored.items()}, stored


class _Reader:
    """Opens each safetensors file once (memory-mapped) and hands out single tensors, by full HF name (`stored`:
    the name a file holds a tensor under where it differs: _with_base_prefix)."""

    def __init__(self, files: dict[str, Path], stored: dict[str, str] | None = None):
        self.files, self.stored, self.handles = files, stored or {}, {}

    def _handle(self, name: str):
        path, key = self.files[name], self.stored.get(name, name)
        if path not in self.handles:
            if not path.is_file():
                raise CheckpointError(f"{path} is missing: the index's weight_map names it for {key!r}; fetch it "
                                      f"again (every shard the index names must be beside it: "
                                      f"{len(set(self.files.values()))} files)")
            self.handles[path] = _open_safetensors(path)
        h = self.handles[path]
        if key not in h.keys():
            raise CheckpointError(f"{path.name} does not hold {key!r}, which the index's weight_map puts there")
        return h, key

    def is_empty(self, name: str) -> bool:
        """A tensor with no elements (transformers writes zero-width shared experts for n_shared_experts=0)."""
        h, key = self._handle(name)
        return math.prod(h.get_slice(key).get_shape()) == 0

    def dtype_of(self, name: str) -> str:
        h, key = self._handle(name)
        return h.get_slice(key).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        dtype = self.dtype_of(name)
        if dtype in UNSUPPORTED_DTYPES:
            raise CheckpointError(f"tensor {name!r} has dtype {dtype}: quantized checkpoints are not supported yet")
        h, key = self._handle(name)
        return h.get_tensor(key)


def load_pretrained(path, *, dtype: torch.dtype | str | None = None, device=None, family: str | None = None):
    """Build a model from a HF-format directory (a Transformer, or the class its family's config names:
    ModelConfig.arch, lmforge.model.registry); see the module docstring."""
    from lmforge.model.registry import build_model

    path, dtype = Path(path), float_dtype(dtype)
    _refuse_lmforge_kinds(path)
    hf = read_hf_config(path)
    cfg = config_from_hf(hf)
    fam = family or family_of(hf)
    files, stored = _with_base_prefix(_weight_files(path), fam, hf_tensor_names(cfg, fam))
    reader = _Reader(files, stored)
    dtype = dtype or _dtype(hf, reader)
    if cfg.mtp is not None and not any(n.startswith(f"model.layers.{cfg.n_layers}.") for n in files):
        cfg = dataclasses.replace(cfg, mtp=None)  # config announces MTP layers the file does not hold
    if cfg.tie_embeddings and "lm_head.weight" in files and fam != "gpt2":
        emb = next((n for n in files if n.endswith("embed_tokens.weight") and not n.startswith("model.layers.")), None)
        if emb is not None and not torch.equal(reader.get("lm_head.weight"), reader.get(emb)):  # as transformers
            warn_caller(f"{path}: config.json ties the embeddings but the checkpoint stores a different "
                        "lm_head.weight; loading it untied, as transformers does")
            cfg = dataclasses.replace(cfg, tie_embeddings=False)
    rules = FAMILIES[fam][3](cfg)
    _check_names(rules, files, cfg, fam, reader, hf.get("architectures") or [])
    with torch.device("meta"):
        model = build_model(cfg).to(dtype)  # cast while on meta: storage is allocated once, in `dtype`
    ties = shared_parameters(model)  # (to_empty gives each name a tensor of its own)
    model.to_empty(device=device or "cpu")
    init_buffers(model)
    own = _tensors(model)
    with torch.no_grad():
        for rule in rules:
            outs = rule.to_lm([reader.get(n).to(dtype) for n in rule.hf])
            for name, t in zip(rule.lm, outs):
                dst = _target(own, name)
                if tuple(dst.shape) != tuple(t.shape):
                    raise CheckpointError(f"tensor {rule.hf[0]!r} has shape {tuple(t.shape)} after conversion; "
                                          f"{name} expects {tuple(dst.shape)} (config.json and weights disagree)")
                dst.copy_(t)
    for alias, name in ties:  # a tied head: the embedding again
        owner, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(owner), attr, model.get_parameter(name))
    _check_filled(model, rules, fam)
    model.eos_token_ids = _eos_ids(path, hf)  # the engine stops a sample at any of them
    model.bos_token_id = hf.get("bos_token_id", D.FAMILY_BOS.get(fam))  # (left out: the family's, as transformers)
    return model.eval()


def _refuse_lmforge_kinds(path: Path) -> None:
    """An lmforge checkpoint, run directory or PEFT adapter directory given to from_pretrained read as a HF config
    without model_type ('model_type=None is not supported') or as no config.json at all: named, with the loader
    that opens it."""
    from lmforge.adapt.peft_format import is_peft_dir
    from lmforge.checkpoint.store import checkpoint_dirs

    kind = ("an lmforge checkpoint" if (path / "manifest.json").is_file() else
            "an lmforge run directory" if checkpoint_dirs(path) else
            "a PEFT adapter directory" if is_peft_dir(path) else None)
    if kind:
        raise CheckpointError(f"{path} is {kind}, not a HF-format model directory: open it with "
                              "lmforge.checkpoint.load_model(path) or LLM.load(path), which read every kind")


def shared_parameters(model: torch.nn.Module) -> list[tuple[str, str]]:
    """(alias, name) of every parameter reachable under a second name (a tied head: 'lm_head.weight',
    'tok_emb.weight')."""
    first: dict[int, str] = {}
    ties = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties.append((name, first[id(p)]))
        else:
            first[id(p)] = name
    return ties


def _generation_config(path: Path) -> dict:
    """generation_config.json of a HF directory ({} when there is none, or it is not a JSON object)."""
    try:
        d = json.loads((path / "generation_config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def _eos_ids(path: Path, hf: dict) -> tuple[int, ...]:
    """eos_token_id of generation_config.json, else of config.json."""
    return eos_token_ids(_generation_config(path).get("eos_token_id"), hf.get("eos_token_id"))


def eos_token_ids(generation_eos, config_eos) -> tuple[int, ...]:
    """A HF model's end-of-sequence ids: its generation config's eos_token_id, else its config's (an int or a
    list; Llama 3 lists three)."""
    eos = config_eos if generation_eos is None else generation_eos
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    return tuple(int(i) for i in ids if isinstance(i, int) and not isinstance(i, bool))


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def float_dtype(value: str | torch.dtype | None, *, where: str = "") -> torch.dtype | None:
    """The float dtype a loader's dtype= names: a torch dtype, its name as transformers' from_pretrained takes it
    ('bfloat16', 'torch.float16'), or the short name lmforge's options take ('bf16': config.SHORT_DTYPES); None or
    'auto' is None (the checkpoint's own). A string reaching nn.Module.to would be read as a device ('Invalid
    device string'): a one-line ConfigError instead, naming `where` the value came from (config.json) if not from
    the caller."""
    if value is None or value == "auto" or (isinstance(value, torch.dtype) and value in DTYPES.values()):
        return None if value == "auto" else value
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    name = SHORT_DTYPES.get(name, name)  # ('bf16', as --dtype and ref_dtype take it)
    if name not in DTYPES:
        fix = "or 'auto' (the stored tensors' own)" if where else \
            "(or a torch dtype), or leave it out for the checkpoint's own"
        raise ConfigError(f"{where + ' ' if where else ''}dtype={value!r} is not a floating-point dtype; use one of "
                          f"{sorted(DTYPES)} {fix}")
    return DTYPES[name]


def _dtype(hf: dict, reader: "_Reader") -> torch.dtype:
    """config.json's dtype (or torch_dtype) as float_dtype reads it; 'auto' or none = the stored tensors'."""
    return (float_dtype(hf.get("dtype") or hf.get("torch_dtype"), where="config.json")
            or SAFETENSORS_DTYPES.get(reader.dtype_of(next(iter(reader.files))), torch.float32))


def _check_filled(model, rules, fam: str) -> None:
    """Every parameter must have come from the checkpoint (to_empty leaves garbage in the rest)."""
    filled = {n.partition("#")[0] for r in rules for n in r.lm}
    unfilled = sorted(n for n, _ in model.named_parameters() if n not in filled)
    if unfilled:
        raise CheckpointError(f"no checkpoint tensor fills {unfilled[0]!r} ({len(unfilled)} unfilled) in the {fam} "
                              "rules")


def _check_names(rules, files: dict, cfg: ModelConfig, fam: str, reader: _Reader, archs: list) -> None:
    wanted = {n for r in rules for n in r.hf}
    missing = sorted(wanted - set(files))
    if missing:
        arch = FAMILIES[fam][0]  # a classifier's (a reward model's) score head or a bare base model has no lm_head
        other = (f"; config.json's architectures={archs} is not the causal LM {arch}, which lmforge loads"
                 if archs and arch not in archs else "")
        if missing == ["lm_head.weight"] and not cfg.tie_embeddings and not other:  # (a tied head, its flag lost)
            other += ("; config.json does not tie the head to the embeddings (tie_word_embeddings false or left out): "
                      "if this model's head is its embedding matrix, set \"tie_word_embeddings\": true there")
        raise CheckpointError(f"checkpoint lacks tensor {missing[0]!r} ({len(missing)} missing) for a {fam} model "
                              f"with the config in config.json{other}")
    extra = sorted(n for n in set(files) - wanted
                   if not IGNORED.search(n) and not _ignorable(n, cfg, fam) and not reader.is_empty(n))
    if extra:
        raise CheckpointError(f"checkpoint has unexpected tensor {reader.stored.get(extra[0], extra[0])!r} "
                              f"({len(extra)} unexpected) for a {fam} model")


def _ignorable(name: str, cfg: ModelConfig, fam: str) -> bool:
    if name == "lm_head.weight" and cfg.tie_embeddings:
        return True  # some writers store the tied head anyway
    m = re.match(r"model\.layers\.(\d+)\.", name)
    if fam != "deepseek_v3" or m is None or int(m.group(1)) < cfg.n_layers:
        return False
    # MTP layers: all of them when not loaded, else only their copies of the shared embedding/head
    return cfg.mtp is None or name.endswith(("embed_tokens.weight", "shared_head.head.weight"))


def init_buffers(model: torch.nn.Module) -> None:
    """Recompute the non-persistent buffers that to_empty() left uninitialised (RoPE tables, ...)."""
    from lmforge.model.layers.moe import MoE
    from lmforge.model.layers.position import SinusoidalPositions, sinusoidal_table
    from lmforge.model.layers.rope import RotaryEmbedding

    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset_tables()
        elif isinstance(m, SinusoidalPositions):
            m.table = sinusoidal_table(m.table.shape[0], m.dim).to(m.table.device)
        elif isinstance(m, MoE):
            m.e_bias.zero_()


# saving ----------------------------------------------------------------------------------------------
def save_pretrained(model, path, *, dtype: torch.dtype | str | None = None, family: str | None = None,
                    max_shard_bytes: int = 5 * 2**30) -> None:
    """Write config.json and safetensors weights (sharded with an index above max_shard_bytes). dtype: a torch
    dtype or its name, as load_pretrained takes it (float_dtype); default the model's own."""
    from safetensors.torch import save_file

    dtype = float_dtype(dtype)  # (a name reaching Tensor.to read as a device: 'Invalid device string')
    cfg = model.cfg
    fam = family or guess_family(cfg)
    if cfg.block != "sequential" or (cfg.mtp is not None and (fam != "deepseek_v3" or cfg.mtp.kind != "sequential")):
        raise ConfigError("save_pretrained: model.block='parallel' and model.mtp (except DeepSeek-V3's sequential "
                          "MTP) have no HF equivalent")
    hf_cfg = config_to_hf(cfg, fam)
    _refuse_inexpressible(cfg, hf_cfg, fam)
    rules = FAMILIES[fam][3](cfg)
    _refuse_dropped_state(model, rules, fam)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_cfg["dtype"] = str(dtype or compute_dtype(model)).removeprefix("torch.")
    eos = tuple(getattr(model, "eos_token_ids", None) or ())
    if eos:  # what the model was loaded with: transformers' generate stops there too
        hf_cfg["eos_token_id"] = eos[0] if len(eos) == 1 else list(eos)
    # null where the model knows none: left out, it read as the family's default (Llama's 1, Gemma's 2, GPT-2's
    # 50256, past a small vocabulary), a token the model never began with
    hf_cfg["bos_token_id"] = getattr(model, "bos_token_id", None)
    tensors: dict[str, torch.Tensor] = {}
    own = {**_tensors(model), **model.state_dict()}  # state_dict names fused projections' parts
    with torch.no_grad():
        for rule in rules:
            outs = rule.to_hf([_target(own, n).detach().cpu() for n in rule.lm])
            for name, t in zip(rule.hf, outs):
                tensors[name] = t.to(dtype or t.dtype).contiguous().clone()
    shards, cur, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = t, size + nbytes
    shards.append(cur)
    written = _write_shards(path, shards, save_file)
    for old in [*path.glob("model-*-of-*.safetensors"), path / "model.safetensors",
                path / "model.safetensors.index.json"]:
        if old.name not in written:  # an earlier save's weights: loaders would disagree about which to read
            old.unlink(missing_ok=True)
    if "eos_token_id" in hf_cfg:  # what transformers' generate reads first (other settings in the file are kept)
        write_json_atomic(path / "generation_config.json",
                          {**_generation_config(path), "eos_token_id": hf_cfg["eos_token_id"]})
    write_json_atomic(path / "config.json", hf_cfg)  # last: a directory without it was not finished


# fields that change no output of the model (training-time settings, implementation choices, norm_offset: the
# gains' parametrisation, which the rules convert)
NOT_MATH = {"attn_impl", "fused_proj", "dropout", "z_loss", "init_std", "scaled_residual_init", "norm_offset"}
NOT_MATH_MOE = {"noisy", "aux_loss", "z_loss", "seq_aux_loss", "bias_update_rate", "dispatch", "gemm"}


def _math_view(cfg: ModelConfig) -> dict:
    """The ModelConfig fields that decide what the model computes, with defaults resolved."""
    view = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_MATH}
    if cfg.moe is not None:
        view["moe"] = {k: v for k, v in dataclasses.asdict(cfg.moe).items() if k not in NOT_MATH_MOE}
        view["moe"]["d_expert"] = cfg.moe.d_expert or cfg.ff
    if cfg.mla is not None:
        view["mla"] = {**dataclasses.asdict(cfg.mla), "norm_eps": cfg.mla.norm_eps or cfg.norm_eps}
    if cfg.mtp is not None:
        view["mtp"] = (cfg.mtp.kind, cfg.mtp.depth)
    # d_ff sizes only dense MLPs (an MoE expert's default size is resolved into moe.d_expert above)
    dense = cfg.mtp is not None or any(not cfg.is_moe_layer(i) for i in range(cfg.n_layers))
    derived = dict(n_kv_heads=cfg.kv_heads, head_dim=cfg.hd, d_ff=cfg.ff if dense else None,
                   qkv_bias=cfg.has_qkv_bias, o_bias=cfg.has_o_bias,
                   attn_scale=cfg.attn_scale or cfg.hd ** -0.5,
                   layer_types=tuple(cfg.layer_type(i) for i in range(cfg.n_layers)) if cfg.sliding_window else None)
    for k in derived:  # compared last, so what the user set (an MoE layout a family lacks) is named first
        view.pop(k, None)
    view.update(derived)
    if cfg.attention == "mla":  # its own dimensions (model.mla) shape the heads and their default scale
        view.update(head_dim=None, n_kv_heads=None, attn_scale=cfg.attn_scale)
    return view


def _first_difference(mine: dict, theirs: dict) -> tuple[str, object, object] | None:
    """(field, mine, theirs) of the first field that differs, a nested table's differing key named."""
    for k, a in mine.items():
        b = theirs[k]
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            j = next(j for j in a if a[j] != b.get(j))
            return f"{k}.{j}", a[j], b.get(j)
        return k, a, b
    return None


def _inexpressible(cfg: ModelConfig, hf_cfg: dict, fam: str) -> str | None:
    """What of `cfg` the family's config.json `hf_cfg` cannot say (it would not read back, config_from_hf, as the
    same model), in words; None when it reads back whole."""
    try:
        back = config_from_hf(hf_cfg)
    except ConfigError as e:
        return f"this model ({e})"
    diff = _first_difference(_math_view(cfg), _math_view(back))
    if diff is None:
        return None
    name, a, b = diff
    return f"model.{name}={a!r} (it reads back as {b!r})"


def expressing_families(cfg: ModelConfig) -> list[str]:
    """The families whose config.json reads back as `cfg`: those an export keeps the model whole in."""
    return [f for f in FAMILIES if _inexpressible(cfg, config_to_hf(cfg, f), f) is None]


def _refuse_inexpressible(cfg: ModelConfig, hf_cfg: dict, fam: str) -> None:
    """What the family's config.json cannot say is lost in an export, and transformers would compute
    something else: the config must read back (config_from_hf) as the same model, else the first field
    that differs is named, with the families that can say it (Llama's one attention_bias cannot hold q/k/v
    biases without an o_proj bias; Qwen2's can), or that none can."""
    problem = _inexpressible(cfg, hf_cfg, fam)
    if problem is None:
        return
    others = [f for f in expressing_families(cfg) if f != fam]
    fix = (f"export it as {' or '.join(others)} (family={others[0]!r}; lmforge export --family {others[0]}), or "
           "save an lmforge checkpoint instead" if others else
           "no HF family lmforge writes can express it: save an lmforge checkpoint instead")
    raise ConfigError(f"save_pretrained: the {fam} HF layout cannot express {problem}, so transformers would compute "
                      f"something else; {fix}")


def _refuse_dropped_state(model, rules, fam: str) -> None:
    """Nothing the model computes with may be left out of the files: a state_dict tensor no rule reads (and
    that is not another read tensor, as a tied head is) must hold only zeros, which change nothing (an unused
    routing-bias buffer). An unmerged LoRA adapter, or a trained routing bias in a family without one, is
    refused with the fix named instead of exported as the model without it."""
    state = model.state_dict()
    read = {n.partition("#")[0] for rule in rules for n in rule.lm}
    read_ptrs = {state[k].data_ptr() for k in read if k in state}
    dropped = [k for k, v in state.items()
               if k not in read and v.data_ptr() not in read_ptrs and bool(v.detach().ne(0).any())]
    if not dropped:
        return
    from lmforge.adapt.qlora import base_layer_record

    quantized = [(n, e.get("kind") or e.get("class")) for n, e in base_layer_record(model).items()
                 if any(k.startswith(f"{n}.") for k in dropped)]
    hint = ("; they are unmerged LoRA adapters (merge them first with lmforge.adapt.merge_lora(model), or save "
            "them alone with lmforge.adapt.lora_state_dict)" if any(".lora_" in k for k in dropped) else
            f"; {quantized[0][0]} is a quantized layer ({quantized[0][1]}, {len(quantized)} such) and a HF layout "
            "holds float weights: dequantize the model first (an nn.Linear of each layer's dequantized weight in its "
            "place), or save it as an lmforge checkpoint, which records its quantized layers" if quantized else
            "; save it as an lmforge checkpoint, or choose a family whose layout holds it (family=...)")
    raise ConfigError(f"save_pretrained: the {fam} HF layout has no place for {len(dropped)} tensors of this model "
                      f"(e.g. {dropped[0]}), so the export would not compute what the model does{hint}")


def _write_shards(path: Path, shards: list[dict], save_file) -> set[str]:
    """Each file written under a temporary name and renamed, so no reader sees half a shard; returns the
    names written."""
    meta = {"format": "pt"}
    if len(shards) == 1:
        with atomic_path(path / "model.safetensors") as tmp:
            save_file(shards[0], str(tmp), metadata=meta)
            honour_umask(tmp)  # save_file makes it 0600
        return {"model.safetensors"}
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with atomic_path(path / fname) as tmp:
            save_file(shard, str(tmp), metadata=meta)
            honour_umask(tmp)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json_atomic(path / "model.safetensors.index.json", index)
    return set(weight_map.values()) | {"model.safetensors.index.json"}
