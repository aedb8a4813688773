"""Stages that score documents with a user's fastText classifier (read by `fasttext_model`, no
`fasttext` package): `toxicity` and `nsfw` (Dolma's Jigsaw-trained classifiers, Soldaini et al. 2024),
and the helpers `langid` and `quality` use when given a `.bin` / `.ftz` model path.

A model that cannot be loaded (missing, truncated, another format version) does not crash the run:
every document of the batch is rejected `<stage>:bad_model` with the one-line reason, naming the
file, in `meta.error`, so the report accounts for them.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.fasttext_model import FastTextModel, load_fasttext
from lmforge.data.stage import StageContext
from lmforge.errors import DataError

LABEL_PREFIX = "__label__"


def model_or_reject(path: str, docs: list[Document], stage: str) -> FastTextModel | None:
    """The loaded model, or None after rejecting every live document with the load error."""
    try:
        return load_fasttext(path)
    except DataError as e:
        for d in docs:
            if d.drop is None:
                d.meta["error"] = str(e)
                d.reject(f"{stage}:bad_model")
        return None


def one_line(text: str, max_chars: int) -> str:
    """What the classifiers see: the first max_chars characters, newlines as spaces (fastText predicts
    one line at a time; DCLM and Dolma join a document's lines the same way). Other characters stay: fastText
    splits words on ASCII whitespace only, so a no-break space or an ideographic space (U+3000) is part of a
    word to it (str.split() made them word breaks, and changed the scores)."""
    return text[:max_chars].replace("\n", " ")


def label_score(model: FastTextModel, text: str, label: str) -> float:
    """Probability of `label` ("toxic" or "__label__toxic"); DataError naming the labels if absent."""
    name = label if label.startswith(LABEL_PREFIX) else LABEL_PREFIX + label
    if name not in model.labels:
        raise DataError(f"{model.path} has no label {label!r}; its labels: "
                        f"{', '.join(x.removeprefix(LABEL_PREFIX) for x in model.labels)}")
    return model.label_probs(text)[name]


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

    def __post_init__(self) -> None:
        stage = type(self).__name__.removesuffix("Config").lower()  # toxicity or nsfw
        coerce_fields(self, stage)  # each field's type, named when wrong
        check(bool(self.model), f"{stage}.model must name a fastText .bin or .ftz file")
        check(0.0 <= self.threshold <= 1.0, f"{stage}.threshold must be in [0, 1], got {self.threshold}")
        check(self.max_chars > 0, f"{stage}.max_chars must be > 0, got {self.max_chars}")


@dataclass(frozen=True, kw_only=True)
class NSFWConfig(ToxicityConfig):
    label: str = "nsfw"


def _label_filter(stage: str, cfg: ToxicityConfig, docs: list[Document]) -> list[Document]:
    model = model_or_reject(cfg.model, docs, stage)
    if model is None:
        return docs
    for d in docs:
        score = label_score(model, one_line(d.text, cfg.max_chars), cfg.label)
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
