"""Stages that score documents with a user's fastText classifier (read by `fasttext_model`, no
`fasttext` package): `toxicity` and `nsfw` (Dolma's Jigsaw-trained classifiers, Soldaini et al. 2024),
and the helpers `langid` and `quality` use when given a `.bin` / `.ftz` model path.

A model that cannot be loaded (missing, truncated, another format version), or that has no label the stage is
told to score, fails the run with one line naming the setting, the file and the fix, before any document is read
(`StageSpec.check`, called by the executors). It used to reject every document as `<stage>:bad_model` and the run
ended "balanced" with nothing kept, exit status 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.fasttext_model import FastTextModel, load_fasttext
from lmforge.data.stage import StageContext
from lmforge.errors import DataError

LABEL_PREFIX = "__label__"


def load_model(path: str, stage: str) -> FastTextModel:
    """The stage's fastText model (loaded once per process: `load_fasttext`), or a one-line DataError naming the
    stage's setting, the file and the fix."""
    try:
        return load_fasttext(path)
    except DataError as e:
        raise DataError(f"{stage}.model: {e}") from None


def model_files(cfg: Any) -> list[Path]:
    """What a fastText stage reads (StageSpec.reads): its `model` file, if it names one (langid's may be empty)."""
    return [Path(cfg.model)] if cfg.model else []


def one_line(text: str, max_chars: int) -> str:
    """What the classifiers see: the first max_chars characters, newlines as spaces (fastText predicts
    one line at a time; DCLM and Dolma join a document's lines the same way). Other characters stay: fastText
    splits words on ASCII whitespace only, so a no-break space or an ideographic space (U+3000) is part of a
    word to it (str.split() made them word breaks, and changed the scores)."""
    return text[:max_chars].replace("\n", " ")


def label_name(model: FastTextModel, label: str, stage: str) -> str:
    """The model's name of `label` ("toxic" or "__label__toxic": "__label__toxic"); DataError naming the labels if
    it has none such."""
    name = label if label.startswith(LABEL_PREFIX) else LABEL_PREFIX + label
    if name not in model.labels:
        raise DataError(f"{stage}.label: {model.path} has no label {label!r}; its labels: "
                        f"{', '.join(x.removeprefix(LABEL_PREFIX) for x in model.labels)}")
    return name


def label_model(model_path: str, label: str, stage: str) -> tuple[FastTextModel, str]:
    """(model, its name of `label`) for a stage that scores one label: what its check and the stage itself load."""
    model = load_model(model_path, stage)
    return model, label_name(model, label, stage)


def top_label(model: FastTextModel, text: str) -> tuple[str, float]:
    """(label without the `__label__` prefix, probability) of the best label."""
    best = model.predict(text, k=1)
    return (best[0][0].removeprefix(LABEL_PREFIX), best[0][1]) if best else ("unknown", 0.0)


@dataclass(frozen=True, kw_only=True)
class ToxicityConfig:
    """model: a fastText .bin/.ftz classifier; label: the label whose probability is the score
    (`meta.<stage>_score`); threshold: reject documents scoring >= it (1.0 = score only);
    max_chars: characters of the text given to the model."""

    model: str
    label: str = "toxic"
    threshold: float = 0.5
    max_chars: int = 10_000

    @property
    def stage(self) -> str:
        return type(self).__name__.removesuffix("Config").lower()  # toxicity or nsfw

    def __post_init__(self) -> None:
        stage = self.stage
        coerce_fields(self, stage)  # each field's type, named when wrong
        check(bool(self.model), f"{stage}.model must name a fastText .bin or .ftz file")
        check(0.0 <= self.threshold <= 1.0, f"{stage}.threshold must be in [0, 1], got {self.threshold}")
        check(self.max_chars > 0, f"{stage}.max_chars must be > 0, got {self.max_chars}")


@dataclass(frozen=True, kw_only=True)
class NSFWConfig(ToxicityConfig):
    label: str = "nsfw"


def check_label_filter(cfg: ToxicityConfig) -> None:
    """StageSpec.check of toxicity and nsfw: the model loads and has the label."""
    label_model(cfg.model, cfg.label, cfg.stage)


def _label_filter(stage: str, cfg: ToxicityConfig, docs: list[Document]) -> list[Document]:
    model, name = label_model(cfg.model, cfg.label, stage)
    for d in docs:
        score = model.label_probs(one_line(d.text, cfg.max_chars))[name]
        d.meta[f"{stage}_score"] = round(score, 4)
        if score >= cfg.threshold and cfg.threshold < 1.0:
            d.reject(f"{stage}:flagged")
    return docs


def toxicity(cfg: ToxicityConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Score `meta.toxicity_score`; reject `toxicity:flagged` at or above the threshold."""
    return _label_filter("toxicity", cfg, docs)


def nsfw(cfg: NSFWConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Score `meta.nsfw_score`; reject `nsfw:flagged` at or above the threshold."""
    return _label_filter("nsfw", cfg, docs)
