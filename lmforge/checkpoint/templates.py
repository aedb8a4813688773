"""The chat template a checkpoint carries: the one a fine-tuning run recorded in config.json
(`recorded_chat_template`) or a HF model directory's own Jinja (`hf_chat_template`); a PEFT adapter's is that
of the tokenizer it loads with (`template_dir`)."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.checkpoint.store import is_hf_dir, resolve_checkpoint
from lmforge.errors import LmforgeError


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
    source, where = config.get("chat_template"), "tokenizer_config.json"
    if (ckpt / "chat_template.jinja").is_file():  # where transformers >= 4.43 saves it
        source, where = (ckpt / "chat_template.jinja").read_text(), "chat_template.jinja"
    if isinstance(source, list):
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str) or not source.strip():
        return None
    tokens = {}
    for key, value in config.items():  # an AddedToken is saved as {"content": ...}
        value = value.get("content") if isinstance(value, dict) else value
        if key.endswith("_token") and isinstance(value, str):
            tokens[key] = value
    return JinjaTemplate(name=f"{ckpt.name}'s own ({where})", source=source,
                         tokens=tuple(sorted(tokens.items())), end=tokens.get("eos_token", ""))
