"""A fastText-style quality classifier (Joulin et al. 2017, "Bag of Tricks for Efficient Text
Classification"), trained from scratch: word unigrams and bigrams hashed into `buckets` rows of an
embedding table, averaged, then one linear layer and a softmax. DCLM (Li et al. 2024) showed such a
classifier, trained on high-quality positives against random web negatives, is the best filter they
tried; the `quality` stage keeps documents whose positive probability clears a threshold.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn

from lmforge.config import check
from lmforge.data.document import Document
from lmforge.data.hashing import ngram_hashes, normalize_words, word_hashes
from lmforge.data.stage import StageContext
from lmforge.errors import DataError

FILE_NAME = "quality_classifier.safetensors"
CONFIG_NAME = "quality_classifier.json"


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """buckets: hashed feature rows; dim: embedding size; ngrams: longest word n-gram used; training
    options as fastText's supervised mode (SGD, linearly decaying learning rate)."""

    buckets: int = 1 << 18
    dim: int = 16
    ngrams: int = 2
    epochs: int = 5
    lr: float = 0.5
    batch_size: int = 32
    seed: int = 0
    max_words: int = 2000

    def __post_init__(self) -> None:
        check(self.buckets >= 16, f"classifier.buckets must be >= 16, got {self.buckets}")
        check(self.dim >= 1 and self.ngrams >= 1 and self.epochs >= 1,
              "classifier.dim, ngrams and epochs must be >= 1")


def features(text: str, cfg: ClassifierConfig) -> np.ndarray:
    """int64 bucket ids of the text's word 1..ngrams-grams."""
    wh = word_hashes(normalize_words(text)[: cfg.max_words])
    if len(wh) == 0:
        return np.zeros(1, dtype=np.int64)  # bucket 0 stands for the empty text
    hs = [ngram_hashes(wh, n) for n in range(1, cfg.ngrams + 1) if n <= len(wh)]
    return (np.concatenate(hs) % np.uint64(cfg.buckets)).astype(np.int64)


class HashedNgramClassifier(nn.Module):
    """EmbeddingBag(mean) over hashed n-grams -> Linear(dim, 2). Label 1 = high quality."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.EmbeddingBag(cfg.buckets, cfg.dim, mode="mean")
        self.out = nn.Linear(cfg.dim, 2)
        nn.init.uniform_(self.emb.weight, -1.0 / cfg.dim, 1.0 / cfg.dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, flat: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(flat, offsets))  # (B, 2)

    def _pack(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = [features(t, self.cfg) for t in texts]
        offsets = torch.tensor(np.cumsum([0] + [len(f) for f in feats[:-1]]), dtype=torch.long)
        return torch.from_numpy(np.concatenate(feats)), offsets

    @torch.no_grad()
    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(N,) probability that each text is high quality."""
        if not texts:
            return np.zeros(0)
        return torch.softmax(self(*self._pack(texts)), dim=-1)[:, 1].numpy()

    def fit(self, texts: list[str], labels: list[int]) -> list[float]:
        """SGD with a learning rate decaying linearly to 0 (fastText's schedule); returns epoch losses."""
        g = torch.Generator().manual_seed(self.cfg.seed)
        y = torch.tensor(labels, dtype=torch.long)
        steps = self.cfg.epochs * -(-len(texts) // self.cfg.batch_size)
        opt = torch.optim.SGD(self.parameters(), lr=self.cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
        losses = []
        for _ in range(self.cfg.epochs):
            perm, total = torch.randperm(len(texts), generator=g), 0.0
            for i in range(0, len(texts), self.cfg.batch_size):
                idx = perm[i:i + self.cfg.batch_size]
                loss = nn.functional.cross_entropy(self(*self._pack([texts[j] for j in idx])), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss) * len(idx)
            losses.append(total / len(texts))
        return losses

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(d / FILE_NAME))
        (d / CONFIG_NAME).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "HashedNgramClassifier":
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / FILE_NAME).is_file() or not (d / CONFIG_NAME).is_file():
            raise DataError(f"no quality classifier in {d} (train one with `lmforge data train-classifier`)")
        model = cls(ClassifierConfig(**json.loads((d / CONFIG_NAME).read_text())))
        model.load_state_dict(load_file(str(d / FILE_NAME)))
        return model.eval()


def train_classifier(positive: Iterable[str], negative: Iterable[str],
                     cfg: ClassifierConfig = ClassifierConfig()) -> HashedNgramClassifier:
    """Train on positive (label 1) and negative (label 0) texts."""
    pos, neg = list(positive), list(negative)
    if not pos or not neg:
        raise DataError(f"need positive and negative examples, got {len(pos)} and {len(neg)}")
    torch.manual_seed(cfg.seed)
    model = HashedNgramClassifier(cfg)
    model.fit(pos + neg, [1] * len(pos) + [0] * len(neg))
    return model.eval()


@dataclass(frozen=True, kw_only=True)
class QualityConfig:
    """model: a directory written by `lmforge data train-classifier`; threshold: keep documents whose
    positive probability is >= it (0 = score only)."""

    model: str
    threshold: float = 0.5

    def __post_init__(self) -> None:
        check(bool(self.model), "quality.model must name a classifier directory")
        check(0.0 <= self.threshold <= 1.0, f"quality.threshold must be in [0, 1], got {self.threshold}")


@functools.lru_cache(maxsize=2)
def _load(directory: str) -> HashedNgramClassifier:
    return HashedNgramClassifier.load(directory)


def quality(cfg: QualityConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Set `meta.quality_score`; reject `quality:low_score` below the threshold."""
    scores = _load(cfg.model).predict_proba([d.text for d in docs])
    for d, s in zip(docs, scores):
        d.meta["quality_score"] = round(float(s), 4)
        if s < cfg.threshold:
            d.reject("quality:low_score")
    return docs
