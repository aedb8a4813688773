"""`lmforge export`: an lmforge checkpoint as the rest of the ecosystem loads it.

    lmforge export runs/sft out/sft                    HF model directory (LoRA adapters merged) + tokenizer
    lmforge export runs/sft out/peft --adapter         PEFT adapter directory, its base model in out/peft/base
    lmforge export runs/sft out/peft --adapter --base-out out/base      the base model elsewhere

A model directory (config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json) opens with transformers' AutoModelForCausalLM / AutoTokenizer and with lmforge's
load_model / --checkpoint. The chat template the checkpoint records (or --template) goes into
tokenizer_config.json as Jinja that renders exactly what lmforge's ChatTemplate renders, and its end marker
joins the end-of-sequence ids, so HF's generate stops where `lmforge chat` does.

--adapter writes PEFT's layout instead of merging: adapter_config.json (r, lora_alpha, use_rslora,
lora_dropout, target_modules as full HF module names, modules_to_save for what [lora] trainable kept in
full) and adapter_model.safetensors (fp32, as lmforge trains adapters), named by the family's HF name rules
(lmforge.model.hf.hf_names), over a base model directory: the checkpoint's weights without the adapters.
peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), OUT) is then the trained model.
A QLoRA checkpoint (adapters over quantized layers, lmforge.adapt.qlora) exports with --adapter only: its
adapters over the float base its base record names, the layers' float originals (a note says base + adapters
differ from the trained model by the quantization error); merged, it is refused.

Each directory is built in a hidden temporary directory beside it and renamed into place, so a failed
export leaves nothing half-written; an existing non-empty OUT is replaced only with --force.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from lmforge.config import SHORT_DTYPES as DTYPES  # --dtype's names
from lmforge.errors import ConfigError
from lmforge.utils import atomic_dir, check_output_path, honour_umask, write_json_atomic


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    checkpoint: Annotated[str, tyro.conf.Positional, tyro.conf.arg(
        metavar="CKPT", help="run directory, checkpoint directory or HF-format model directory")]
    out: Annotated[str, tyro.conf.Positional, tyro.conf.arg(
        metavar="OUT", help="directory to write: a HF model directory (with --adapter, a PEFT adapter directory)")]
    adapter: bool = False
    """write the LoRA adapters as a PEFT adapter directory over a base model directory, instead of merging them"""
    base_out: str | None = None
    """with --adapter: where the base model directory goes (default OUT/base)"""
    dtype: Literal["bf16", "fp16", "fp32"] | None = None
    """dtype of the written weights (default: the checkpoint's; PEFT adapters stay fp32)"""
    family: str | None = None
    """HF family to write: llama, mistral, qwen2, qwen3, gemma2, gpt2, ... (default: the one the model's config
    matches, or a HF checkpoint's own)"""
    template: str | None = None
    """chat template for tokenizer_config.json: chatml, llama3 or plain (default: the one the checkpoint records, else
    a HF checkpoint's own Jinja)"""
    tokenizer: str | None = None
    """tokenizer to write when the checkpoint has none or to replace it: 'byte' or a tokenizer file/directory"""
    base: str | None = None
    """the base model of a PEFT adapter directory, or of an adapter-only checkpoint whose base moved"""
    force: bool = False
    """replace an existing non-empty OUT (and --base-out)"""


def main(argv: list[str]) -> int:
    from lmforge.cli.common import parse_config, refuse_flag_for_positional

    refuse_flag_for_positional(argv, ("--checkpoint", "--out"), "lmforge export CKPT OUT [options]")
    cfg = parse_config(ExportConfig, argv, prog="lmforge export", config_file=False,
                       description="Write a checkpoint as a HF model directory (LoRA adapters merged) or, with "
                                   "--adapter, as a PEFT adapter directory over its base model.")
    export(cfg)
    return 0


def export(cfg: ExportConfig) -> Path:
    """Write the export `cfg` asks for; returns OUT. Everything that can be refused is refused before a
    file is written."""
    import torch

    from lmforge.align.data import check_template
    from lmforge.checkpoint import bos_record, load_model, resolve_checkpoint
    from lmforge.model.hf import FAMILIES
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.byte import ByteTokenizer
    from lmforge.tokenizer.load import load_tokenizer

    out = check_output_path(cfg.out, "OUT")
    base_out = check_output_path(cfg.base_out, "--base-out") if cfg.base_out is not None else None
    ckpt = resolve_checkpoint(cfg.checkpoint)
    if base_out is not None and not cfg.adapter:
        raise ConfigError("--base-out is where --adapter puts the base model; add --adapter or leave --base-out out")
    if base_out is not None and base_out.resolve() == out.resolve():
        raise ConfigError(f"--base-out {base_out} is OUT itself; give the base model its own directory")
    if base_out is not None and base_out.resolve() in out.resolve().parents:  # (the base would be written over it)
        raise ConfigError(f"OUT {out} is inside --base-out {base_out}, which is written whole; give the base model a "
                          "directory apart from OUT (or leave --base-out out: OUT/base)")
    under = bases(ckpt, cfg.base)  # (once: it walks the chain of bases, reading each one's records)
    for target in (out, base_out) if base_out is not None else (out,):
        check_target(target, ckpt, cfg.force, under)
    if cfg.family is not None and cfg.family not in FAMILIES:
        raise ConfigError(f"--family {cfg.family!r} is not a HF family lmforge writes; choose one of "
                          f"{sorted(FAMILIES)}")
    template = chat_template(cfg, ckpt)
    model, tok = load_model(ckpt, tokenizer=cfg.tokenizer is None, base=cfg.base)
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else tok
    if not isinstance(model, Transformer):
        raise ConfigError(f"{ckpt} holds a {type(model).__name__} (a head on a backbone), which HF's "
                          "AutoModelForCausalLM has no place for; export a causal LM checkpoint")
    quantized = quantized_under_adapters(model, ckpt, cfg.adapter)
    if quantized:  # QLoRA: the adapters go over the float base the checkpoint's base record names
        model = over_float_base(model, ckpt, cfg.base)
    bpe = as_bpe(tok, model.cfg.vocab_size) if tok is not None else None
    if template is not None and tok is not None:  # its markers must be special tokens, as training required
        check_template(tok, template, plain="--template plain")
    family = cfg.family or source_family(ckpt, model)
    dtype = getattr(torch, DTYPES[cfg.dtype]) if cfg.dtype else stored_dtype(ckpt, model)
    model.eos_token_ids = eos_ids(model, bpe, template)
    if bpe is not None:  # config.json's bos_token_id (save_pretrained): the tokenizer's BOS, else the model's own
        model.bos_token_id = bos_record(model, bpe).get("bos_token_id")
    files = TokenizerFiles(bpe, template, model.eos_token_ids, model.cfg.max_seq_len,
                           byte=isinstance(tok, ByteTokenizer))
    if cfg.adapter:
        write_adapter(model, ckpt, out, base_out, family, dtype, files)
    else:
        write_merged(model, out, family, dtype, files)
    if quantized:  # (notes come after the export: a refused one prints its error alone)
        print(f"note: the adapters were trained over {len(quantized)} quantized layers (QLoRA) and are written over "
              f"the float base those were quantized from ({recorded_base_path(ckpt, cfg.base)}), so base + adapters "
              "differ from the trained model by the quantization error")
    if bpe is None:
        print(f"note: {ckpt} holds no tokenizer, so none is written (give one with --tokenizer)")
    return out


def write_merged(model, out: Path, family: str, dtype, files: TokenizerFiles) -> None:
    from lmforge.adapt.lora import lora_layers, merge_lora
    from lmforge.model.hf import save_pretrained

    n = len(lora_layers(model))
    if n:
        merge_lora(model)
    with atomic_dir(out) as tmp:
        save_pretrained(model, tmp, dtype=dtype, family=family)
        files.write(tmp)
    if n:
        print(f"merged {n} LoRA adapters into the weights (--adapter writes them apart, for PEFT)")
    print(f"wrote {out}: a HF {family} model in {str(dtype).removeprefix('torch.')}{files.summary()}")


def write_adapter(model, ckpt: Path, out: Path, base_out: Path | None, family: str, dtype,
                  files: TokenizerFiles) -> None:
    from safetensors.torch import save_file

    from lmforge.adapt.lora import remove_lora
    from lmforge.adapt.peft_format import to_peft
    from lmforge.model.hf import save_pretrained

    lora = run_lora(ckpt)
    config, tensors = to_peft(model, family, lora)  # refused before any note is printed
    # a base inside OUT (the default OUT/base) is written in OUT's temporary directory: a rename of its own would be
    # undone when OUT's replaces the directory whole
    inside = base_out is None or out.resolve() in base_out.resolve().parents
    within = base_out.resolve().relative_to(out.resolve()) if base_out is not None and inside else Path("base")
    with atomic_dir(out) as tmp, \
            (contextlib.nullcontext(tmp / within) if inside else atomic_dir(base_out)) as base_tmp:
        remove_lora(model)  # the adapters are in `tensors`; what is left is the base model
        save_pretrained(model, base_tmp, dtype=dtype, family=family)
        files.write(base_tmp)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        honour_umask(tmp / "adapter_model.safetensors")  # save_file makes it 0600
        base_final = (base_out or out / "base").resolve()
        write_json_atomic(tmp / "adapter_config.json", {**config, "base_model_name_or_path": str(base_final)})
        files.write(tmp)
    print(f"wrote {out}: a PEFT LoRA adapter on {len(config['target_modules'])} modules (r={config['r']}, "
          f"lora_alpha={config['lora_alpha']:g}) over the HF {family} base model in {base_out or out / 'base'}"
          f"{files.summary()}")
    if not lora:
        print(f"note: no [lora] section in the config.json of {ckpt}'s run: the adapter got lora_dropout 0 and no "
              "modules_to_save (modules trained in full are in the base model written)")


# ---- QLoRA ------------------------------------------------------------------------------------------

def quantized_under_adapters(model, ckpt: Path, adapter: bool) -> dict[str, dict]:
    """The quantized layers (lmforge.adapt.qlora's record) of a model with LoRA adapters: a QLoRA model, whose
    merged export is refused ({} for any other model)."""
    from lmforge.adapt.lora import lora_layers
    from lmforge.adapt.qlora import base_layer_record

    quantized = base_layer_record(model) if lora_layers(model) else {}
    if quantized and not adapter:
        name, entry = next(iter(quantized.items()))
        raise ConfigError(f"{ckpt}'s LoRA adapters were trained over quantized layers ({name}: "
                          f"{entry.get('kind') or entry.get('class')}, QLoRA): merging them into the codes would "
                          "requantize the update, and merging them into the float weights would make a model that "
                          "was never trained, without a word; export with --adapter (PEFT adapters over its float "
                          "base, noted), or serve it unmerged with lmforge")
    return quantized


def over_float_base(model, ckpt: Path, base: str | None):
    """A QLoRA model's adapters (and what else trained) moved onto the float base its checkpoint records
    (lmforge.adapt.qlora.onto_float_base): what PEFT's adapters go over."""
    from lmforge.adapt.qlora import onto_float_base
    from lmforge.checkpoint import load_recorded_base

    floats = load_recorded_base(ckpt, base)
    if floats is None:
        raise ConfigError(f"--adapter: {ckpt} holds its quantized base whole and records no float base, which PEFT "
                          "adapters need under them; export a checkpoint saved adapter-only over the float base the "
                          "run quantized ([lora] save = 'adapters', the default)")
    try:
        onto_float_base(model, floats)
    except ConfigError as e:
        raise ConfigError(f"--adapter: {ckpt} holds adapters over quantized layers, and its recorded base is no "
                          f"float model to put them over: {e}; in Python, move them onto the float model the base "
                          "was quantized from (lmforge.adapt.qlora.onto_float_base(model, float_model)), save that "
                          "(save_checkpoint(DIR, step, float_model, base=base_record(FLOAT))) and export DIR") from None
    floats.eos_token_ids = model.eos_token_ids
    return floats


def recorded_base_path(ckpt: Path, base: str | None) -> str:
    from lmforge.checkpoint import recorded_base

    return str(base) if base is not None else (recorded_base(ckpt) or {})["path"]


# ---- where and how ----------------------------------------------------------------------------------

def bases(ckpt: Path, base: str | None) -> list[Path]:
    """The directories an adapter-only checkpoint or a PEFT adapter directory is loaded over: its base (`base`, else
    the recorded one), that base's own base where it is adapter-only too, and so on; those that exist."""
    from lmforge.adapt.peft_format import is_peft_dir, peft_base
    from lmforge.checkpoint import recorded_base, resolve_checkpoint
    from lmforge.errors import LmforgeError

    found, path = [], ckpt
    while True:
        try:
            if is_peft_dir(path):
                path = resolve_checkpoint(peft_base(path, base))
            else:
                record = recorded_base(path)  # (a lmforge checkpoint's only: a HF config.json's "base" is none)
                if not isinstance(record, dict) and base is None:
                    return found
                path = resolve_checkpoint(base if base is not None else record["path"])
        except (LmforgeError, OSError, ValueError, KeyError, TypeError):  # (a missing base: the load says so)
            return found
        if path in found or path == ckpt:
            return found
        found.append(path)
        base = None  # --base names the first base only


def check_target(path: Path, ckpt: Path, force: bool, under: list[Path] = ()) -> None:
    """An existing non-empty target is replaced only with --force, and never when it holds the checkpoint, a base
    it is loaded over (`under`, bases(): replacing it lost the base for good, found 2026-12-07) or the current
    directory (atomic_dir renames the target away, and a process cannot rename '.')."""
    if path.resolve() == Path.cwd() or path.resolve() in Path.cwd().parents:
        raise ConfigError(f"{path} is the current directory or holds it, and an export replaces its directory "
                          "whole; run lmforge from another directory, or export into another one")
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not force:
        raise ConfigError(f"{path} exists and is not empty; pass --force to replace it, or choose another directory")
    if path.resolve() == ckpt.resolve() or path.resolve() in ckpt.resolve().parents:
        raise ConfigError(f"{path} holds the checkpoint being exported ({ckpt}); write the export elsewhere")
    for base in under:
        if path.resolve() == base.resolve() or path.resolve() in base.resolve().parents:
            raise ConfigError(f"{path} holds {base}, the base model the adapters of {ckpt} are loaded over, which "
                              "the export would replace; write the export elsewhere")


def source_family(ckpt: Path, model) -> str:
    """A HF checkpoint's own family; else the family whose architecture the model's config matches."""
    from lmforge.checkpoint import is_hf_dir
    from lmforge.model.hf import family_of, guess_family, read_hf_config

    return family_of(read_hf_config(ckpt)) if is_hf_dir(ckpt) else guess_family(model.cfg)


def stored_dtype(ckpt: Path, model):
    """The dtype the checkpoint stores its weights in: its file's (most common) float dtype (load_model builds an
    lmforge model in the dtype config.json records, but in fp32 for a checkpoint written before that); a HF
    checkpoint, or an adapter-only one or a PEFT directory (their weights come from their base), loads in its
    own: the model's float dtype less its adapters' (fp32 over a half-precision base) and integer codes."""
    import torch
    from safetensors import safe_open

    from lmforge.adapt.lora import adapter_names
    from lmforge.checkpoint import is_hf_dir, recorded_base
    from lmforge.model.hf import SAFETENSORS_DTYPES

    counts: Counter = Counter()
    adapters = adapter_names(model)  # (the checkpoint's tensors are named as the model's)
    own = not is_hf_dir(ckpt) and (ckpt / "config.json").is_file()  # (a PEFT directory: its base's)
    if own and not recorded_base(ckpt):
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
            counts.update(f.get_slice(k).get_dtype() for k in f.keys() if k not in adapters)  # noqa: SIM118
    stored = [d for d, _ in counts.most_common() if d in SAFETENSORS_DTYPES]
    if stored:
        return SAFETENSORS_DTYPES[stored[0]]
    return next((p.dtype for n, p in model.named_parameters() if n not in adapters and p.is_floating_point()),
                torch.get_default_dtype())


def chat_template(cfg: ExportConfig, ckpt: Path):
    """The ChatTemplate asked for or recorded by the checkpoint's fine-tuning run, else a HF checkpoint's own Jinja
    (checkpoint.hf_chat_template: an export of a HF directory dropped it), else None; a PEFT adapter directory's
    base's (checkpoint.template_dir)."""
    from lmforge.checkpoint import hf_chat_template, recorded_chat_template
    from lmforge.infer.chat_template import get_template

    name = cfg.template or recorded_chat_template(ckpt, base=cfg.base)
    return get_template(name) if name else hf_chat_template(ckpt, base=cfg.base)


def eos_ids(model, tok, template) -> tuple[int, ...]:
    """End-of-sequence ids for HF's generate: the model's own (a HF model's), the template's end marker when
    it is one special token (an answer ends at <|im_end|>), and the tokenizer's end of text (<|endoftext|>,
    a SentencePiece tokenizer's </s> or <eos>)."""
    specials = tok.special_tokens if tok is not None else {}
    ids = [*(getattr(model, "eos_token_ids", None) or ()), specials.get(template.end.strip()) if template else None,
           getattr(tok, "eot_id", None)]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


# ---- tokenizer --------------------------------------------------------------------------------------

def as_bpe(tok, vocab_size: int):
    """The tokenizer as one that writes HF's tokenizer.json (save_hf): a byte-level BPE Tokenizer, or a
    SentencePieceBPE (Llama 2, Mistral, Gemma: the file it was read from); a byte tokenizer is the Tokenizer
    with the 256 bytes as its vocabulary and no merges (the same ids)."""
    from lmforge.tokenizer.bpe import Tokenizer
    from lmforge.tokenizer.byte import ByteTokenizer
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE

    if isinstance(tok, ByteTokenizer):
        tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], dict(tok.special_ids))
    elif not isinstance(tok, (Tokenizer, SentencePieceBPE)):
        raise ConfigError(f"a {type(tok).__name__} has no HF tokenizer.json form (lmforge writes its byte-level "
                          "BPE, SentencePiece-style BPE and byte tokenizers); give one with --tokenizer")
    if tok.vocab_size > vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}: "
                          "it was not made for this model; give the model's own with --tokenizer")
    return tok


@dataclass(frozen=True)
class TokenizerFiles:
    """tokenizer.json and tokenizer_config.json (with the chat template) of an export."""
    tok: object | None
    template: object | None
    eos: tuple[int, ...]
    max_len: int
    byte: bool
    """a byte tokenizer's: special tokens' text is never parsed as them (HF's split_special_tokens)"""

    def write(self, path: Path) -> None:
        if self.tok is None:
            return
        names = {i: s for s, i in self.tok.special_tokens.items()}
        conf = {"model_max_length": self.max_len}
        if self.eos and self.eos[0] in names:  # (the model's own end of sequence)
            conf["eos_token"] = names[self.eos[0]]
        # a HF checkpoint's own Jinja reads its config's bos_token, eos_token, ...: written as they were
        conf.update(getattr(self.template, "tokens", ()))
        if self.byte:
            conf["split_special_tokens"] = True
        self.tok.save_hf(path, chat_template=self.template, config=conf)  # (tokenizer_config.json too)

    def summary(self) -> str:
        if self.tok is None:
            return ""
        return ", its tokenizer" + (f" and the {self.template.name} chat template" if self.template else "")


# ---- PEFT -------------------------------------------------------------------------------------------

def run_lora(ckpt: Path) -> dict:
    """The [lora] section of the run a checkpoint belongs to (RUN/config.json; {} outside a run directory)."""
    if ckpt.parent.name != "checkpoints":
        return {}
    try:
        lora = json.loads((ckpt.parent.parent / "config.json").read_text())["config"]["lora"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return lora if isinstance(lora, dict) else {}
