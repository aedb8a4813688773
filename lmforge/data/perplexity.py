"""CCNet-style perplexity filtering (Wenzek et al. 2019): score each document with a language model
trained on high-quality text; low perplexity = close to that text. CCNet used a KenLM 5-gram trained
on Wikipedia and split each language into head / middle / tail thirds by perplexity; here any lmforge
causal LM scores the text: a module honouring `model(input_ids: LongTensor[B, T]) -> logits[B, T, V]`
plus a tokenizer with `encode()`.

`model` in the config is a spec: "pkg.module:factory" (a callable returning `(model, tokenizer)`) or a
checkpoint directory loaded with `lmforge.Transformer.from_pretrained` and the tokenizer saved beside it.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.stage import StageContext
from lmforge.errors import ConfigError
from lmforge.utils import once_per_file


@dataclass(frozen=True, kw_only=True)
class PerplexityConfig:
    """model: spec (see module doc); max_perplexity: reject above it (0 = score only); head_max /
    middle_max: CCNet bucket boundaries (0 = no buckets); context: tokens per forward pass;
    max_tokens: tokens scored per document (the start of it)."""

    model: str
    tokenizer: str = ""
    max_perplexity: float = 0.0
    head_max: float = 0.0
    middle_max: float = 0.0
    context: int = 256
    max_tokens: int = 1024

    def __post_init__(self) -> None:
        coerce_fields(self, "perplexity")  # each field's type, named when wrong
        check(bool(self.model), "perplexity.model must name a checkpoint directory or 'module:factory'")
        check(self.max_perplexity >= 0, f"perplexity.max_perplexity must be >= 0, got {self.max_perplexity}")
        check(self.context >= 2, f"perplexity.context must be >= 2, got {self.context}")
        check(self.max_tokens >= 2, f"perplexity.max_tokens must be >= 2 (a token is scored given the one before "
                                    f"it), got {self.max_tokens}")
        check(self.head_max <= self.middle_max, "perplexity.head_max must be <= middle_max")


def scorer_files(spec: str, tokenizer: str = "") -> list[Path]:
    """The local files a scorer is read from: none for a "module:factory" spec; a checkpoint directory's config,
    weights and tokenizer files (present or not: one that appears changes the key)."""
    if _factory_spec(spec):
        return []
    from lmforge.tokenizer.load import tokenizer_files

    d = Path(spec)
    return [d / "config.json", d / "model.safetensors.index.json", *sorted(d.glob("*.safetensors")),
            *tokenizer_files(tokenizer or spec)]


def perplexity_files(cfg: PerplexityConfig) -> list[Path]:
    """What the stage reads (StageSpec.reads): its scorer's files."""
    return scorer_files(cfg.model, cfg.tokenizer)


def _factory_spec(spec: str) -> bool:
    return ":" in spec and not Path(spec).exists()


@once_per_file(files_of=scorer_files)  # per spec, read again when a checkpoint directory's files are rewritten
def load_scorer(spec: str, tokenizer: str = "") -> tuple[Any, Any]:
    """(model, tokenizer) from a spec (cached per process: utils.once_per_file)."""
    if _factory_spec(spec):
        mod, _, name = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"perplexity.model {spec!r}: cannot import {name} from {mod}: {e}") from e
        return factory()
    import lmforge
    from lmforge.tokenizer.load import load_tokenizer

    model = lmforge.Transformer.from_pretrained(spec)
    return model.eval(), load_tokenizer(tokenizer or spec)


def check_context(model: Any, context: int) -> None:
    """Refuse windows longer than the scoring model was built for (its cfg.max_seq_len, when it has one): RoPE
    would extrapolate silently and learned positions fail on the first long document, naming only the model."""
    limit = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if isinstance(limit, int) and context > limit:
        raise ConfigError(f"perplexity.context={context} is longer than the scoring model's max_seq_len={limit}; "
                          f"set perplexity.context to at most {limit}")


def perplexity(model: Any, tokenizer: Any, text: str, context: int = 256, max_tokens: int = 1024) -> float:
    """exp(mean next-token negative log-likelihood) over the first max_tokens tokens, scored in
    non-overlapping windows of `context` tokens (at most the model's max_seq_len: check_context). inf for
    texts of fewer than 2 tokens."""
    import torch
    import torch.nn.functional as F

    check_context(model, context)
    ids = list(tokenizer.encode(text))[:max_tokens]
    if len(ids) < 2:
        return math.inf
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, context):
            window = torch.tensor(ids[start:start + context + 1], dtype=torch.long)[None]  # (1, T+1)
            if window.shape[1] < 2:
                break
            logits = model(window[:, :-1])  # (1, T, V)
            loss = F.cross_entropy(logits[0].float(), window[0, 1:], reduction="sum")
            nll += float(loss)
            count += window.shape[1] - 1
    return math.exp(nll / count)


def score_documents(model: Any, tokenizer: Any, docs: list[Document], cfg: PerplexityConfig
                    ) -> list[Document]:
    """Set `meta.perplexity` (and `meta.ccnet_bucket`); reject `perplexity:too_high`."""
    for d in docs:
        ppl = perplexity(model, tokenizer, d.text, cfg.context, cfg.max_tokens)
        d.meta["perplexity"] = round(ppl, 3) if math.isfinite(ppl) else None
        if cfg.middle_max > 0:
            d.meta["ccnet_bucket"] = ("head" if ppl <= cfg.head_max else
                                      "middle" if ppl <= cfg.middle_max else "tail")
        if cfg.max_perplexity > 0 and not ppl <= cfg.max_perplexity:
            d.reject("perplexity:too_high")
    return docs


def perplexity_filter(cfg: PerplexityConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    model, tokenizer = load_scorer(cfg.model, cfg.tokenizer)
    return score_documents(model, tokenizer, docs, cfg)
