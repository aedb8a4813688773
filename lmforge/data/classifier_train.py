"""Training the quality classifier from example files, with a held-out accuracy (used by
`lmforge data train-classifier`)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from lmforge.data.classifier import ClassifierConfig, train_classifier
from lmforge.data.readers import detect_format, read_documents
from lmforge.errors import DataError


def read_examples(paths: tuple[str, ...] | list[str], text_key: str = "text") -> list[str]:
    """Texts of every readable document in the files (plain text: one example per line)."""
    texts: list[str] = []
    for p in paths:
        if not Path(p).is_file():
            raise DataError(f"example file not found: {p}")
        fmt = detect_format(p)
        opts: dict[str, Any] = {"text_key": text_key} if fmt in ("jsonl", "parquet") else {"unit": "line"}
        texts += [d.text for d in read_documents(p, fmt, **opts) if d.drop is None and d.text.strip()]
    return texts


def train_from_files(positive: tuple[str, ...] | list[str], negative: tuple[str, ...] | list[str], out: str | Path,
                     *, cfg: ClassifierConfig = ClassifierConfig(), text_key: str = "text",
                     holdout: float = 0.1) -> dict[str, Any]:
    """Train, measure accuracy on a random held-out share, save to `out`; returns the numbers."""
    pos, neg = read_examples(positive, text_key), read_examples(negative, text_key)
    rng = random.Random(cfg.seed)
    data = [(t, 1) for t in pos] + [(t, 0) for t in neg]
    rng.shuffle(data)
    n_hold = int(len(data) * holdout)
    test, train = data[:n_hold], data[n_hold:]
    model = train_classifier([t for t, y in train if y], [t for t, y in train if not y], cfg)
    acc = float("nan")
    if test:
        probs = model.predict_proba([t for t, _ in test])
        acc = sum((p >= 0.5) == bool(y) for p, (_, y) in zip(probs, test)) / len(test)
    model.save(out)
    return {"train": len(train), "holdout": len(test), "holdout_accuracy": acc}
