"""A fastText-style quality classifier (Joulin et al. 2017, "Bag of Tricks for Efficient Text
Classification"), trained from scratch in numpy: word unigrams and bigrams hashed into `buckets` rows
of an embedding table, averaged, then one linear layer and a softmax. DCLM (Li et al. 2024) showed such
a classifier, trained on high-quality positives against random web negatives, is the best filter they
tried; the `quality` stage keeps documents whose positive probability clears a threshold. It also
takes a real fastText model file (DCLM's `openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train.bin`,
label `hq`), read by `fasttext_model` without the fasttext package.

Training uses AdaGrad (Duchi et al. 2011) on mini-batches rather than fastText's per-example SGD: with
a zero-initialised output layer, plain SGD on averaged features barely moves on small example sets,
while AdaGrad's per-row step sizes suit sparse hashed features. Gradients are written out by hand:
for a bag b with hidden h_b = mean of its rows, dL/dz = (p - y) / B, dW = dz^T h, and every row in
the bag receives dz_b W / |b|.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from lmforge.config import check, coerce_fields
from lmforge.data import fasttext_stages
from lmforge.data.document import Document
from lmforge.data.fasttext_model import FastTextModel
from lmforge.data.hashing import ngram_hashes, normalize_words, word_hashes
from lmforge.data.stage import StageContext
from lmforge.errors import DataError
from lmforge.utils import atomic_path, once_per_file, write_json_atomic

FILE_NAME = "quality_classifier.safetensors"
CONFIG_NAME = "quality_classifier.json"


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """buckets: hashed feature rows; dim: embedding size; ngrams: longest word n-gram used; epochs,
    lr (AdaGrad), batch_size, seed: training; max_words: words of a text that are featurised."""

    buckets: int = 1 << 18
    dim: int = 16
    ngrams: int = 2
    epochs: int = 5
    lr: float = 0.5
    batch_size: int = 16
    seed: int = 0
    max_words: int = 2000

    def __post_init__(self) -> None:
        coerce_fields(self, "classifier")  # each field's type, named when wrong
        check(self.buckets >= 16, f"classifier.buckets must be >= 16, got {self.buckets}")
        check(self.dim >= 1 and self.ngrams >= 1 and self.epochs >= 1,
              "classifier.dim, ngrams and epochs must be >= 1")
        check(self.lr > 0 and self.batch_size >= 1, "classifier.lr must be > 0 and batch_size >= 1")


def features(text: str, cfg: ClassifierConfig) -> np.ndarray:
    """int64 bucket ids of the text's word 1..ngrams-grams."""
    wh = word_hashes(normalize_words(text)[: cfg.max_words])
    if len(wh) == 0:
        return np.zeros(1, dtype=np.int64)  # bucket 0 stands for the empty text
    hs = [ngram_hashes(wh, n) for n in range(1, cfg.ngrams + 1) if n <= len(wh)]
    return (np.concatenate(hs) % np.uint64(cfg.buckets)).astype(np.int64)


def _pack(feats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(flat ids, bag start offsets, bag index of each id)."""
    lens = np.array([len(f) for f in feats])
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return np.concatenate(feats), offsets, np.repeat(np.arange(len(feats)), lens)


class HashedNgramClassifier:
    """Mean of hashed n-gram embeddings -> linear -> softmax over {low, high} quality."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        self.emb = rng.uniform(-1 / cfg.dim, 1 / cfg.dim, size=(cfg.buckets, cfg.dim)).astype(np.float32)
        self.w = np.zeros((2, cfg.dim), dtype=np.float32)
        self.b = np.zeros(2, dtype=np.float32)

    def _forward(self, feats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, tuple]:
        flat, offsets, bag = _pack(feats)
        lens = np.diff(np.concatenate([offsets, [len(flat)]]))[:, None]
        h = np.add.reduceat(self.emb[flat], offsets, axis=0) / lens  # (B, dim)
        z = h @ self.w.T + self.b  # (B, 2)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True), h, (flat, bag, lens)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        """(N,) probability that each text is high quality."""
        if not texts:
            return np.zeros(0)
        return self._forward([features(t, self.cfg) for t in texts])[0][:, 1].astype(np.float64)

    def fit(self, texts: list[str], labels: list[int]) -> list[float]:
        """Mini-batch AdaGrad on the cross-entropy; returns the mean loss of each epoch."""
        cfg = self.cfg
        rng = np.random.default_rng(cfg.seed)
        feats, y = [features(t, cfg) for t in texts], np.asarray(labels)
        g_emb = np.zeros(cfg.buckets, dtype=np.float32)  # AdaGrad accumulators (one per embedding row)
        g_w, g_b = np.zeros_like(self.w), np.zeros_like(self.b)
        losses = []
        for _ in range(cfg.epochs):
            perm, total = rng.permutation(len(texts)), 0.0
            for i in range(0, len(texts), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                p, h, (flat, bag, lens) = self._forward([feats[j] for j in idx])
                total -= float(np.log(p[np.arange(len(idx)), y[idx]] + 1e-12).sum())
                dz = p.copy()
                dz[np.arange(len(idx)), y[idx]] -= 1
                dz /= len(idx)
                dw, db = dz.T @ h, dz.sum(axis=0)
                drow = (dz @ self.w / lens)[bag]  # (len(flat), dim): gradient of each bag member
                g_w += dw * dw
                g_b += db * db
                self.w -= cfg.lr * dw / (np.sqrt(g_w) + 1e-8)
                self.b -= cfg.lr * db / (np.sqrt(g_b) + 1e-8)
                rows, inv = np.unique(flat, return_inverse=True)
                grad = np.zeros((len(rows), cfg.dim), dtype=np.float32)
                np.add.at(grad, inv, drow)
                g_emb[rows] += (grad * grad).mean(axis=1)
                self.emb[rows] -= cfg.lr * grad / (np.sqrt(g_emb[rows])[:, None] + 1e-8)
            losses.append(total / len(texts))
        return losses

    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_path(d / FILE_NAME) as tmp:
            save_file({"emb": self.emb, "w": self.w, "b": self.b}, str(tmp))
        write_json_atomic(d / CONFIG_NAME, asdict(self.cfg))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "HashedNgramClassifier":
        from safetensors.numpy import load_file

        d = Path(directory)
        if not (d / FILE_NAME).is_file() or not (d / CONFIG_NAME).is_file():
            raise DataError(f"no quality classifier in {d} (train one with `lmforge data train-classifier`)")
        model = cls(ClassifierConfig(**json.loads((d / CONFIG_NAME).read_text())))
        tensors = load_file(str(d / FILE_NAME))
        model.emb, model.w, model.b = tensors["emb"], tensors["w"], tensors["b"]
        return model


def train_classifier(positive: Iterable[str], negative: Iterable[str],
                     cfg: ClassifierConfig = ClassifierConfig()) -> HashedNgramClassifier:
    """Train on positive (label 1) and negative (label 0) texts."""
    pos, neg = list(positive), list(negative)
    if not pos or not neg:
        raise DataError(f"need positive and negative examples, got {len(pos)} and {len(neg)}")
    model = HashedNgramClassifier(cfg)
    model.fit(pos + neg, [1] * len(pos) + [0] * len(neg))
    return model


@dataclass(frozen=True, kw_only=True)
class QualityConfig:
    """model: a directory written by `lmforge data train-classifier`, or a fastText .bin/.ftz file;
    threshold: keep documents whose positive probability is >= it (0 = score only); label: the
    positive label of a fastText model; max_chars: characters a fastText model sees."""

    model: str
    threshold: float = 0.5
    label: str = "hq"
    max_chars: int = 100_000

    def __post_init__(self) -> None:
        coerce_fields(self, "quality")  # each field's type, named when wrong
        check(bool(self.model), "quality.model must name a classifier directory or a fastText .bin/.ftz file")
        check(self.max_chars > 0, f"quality.max_chars must be > 0, got {self.max_chars}")
        check(0.0 <= self.threshold <= 1.0, f"quality.threshold must be in [0, 1], got {self.threshold}")


def classifier_files(directory: str) -> list[Path]:
    """The files a classifier directory is read from (`HashedNgramClassifier.save`)."""
    return [Path(directory) / FILE_NAME, Path(directory) / CONFIG_NAME]


@once_per_file(files_of=classifier_files)
def load_classifier(directory: str) -> HashedNgramClassifier:
    """A classifier per directory, loaded once per process however its path is written, and again when its files
    are rewritten (a classifier retrained into the same directory); held per directory for the reason `load_fasttext`
    is (3 quality stages against a cache of 2 read every classifier again for every shard)."""
    return HashedNgramClassifier.load(directory)


def quality_model(cfg: QualityConfig) -> HashedNgramClassifier | tuple[FastTextModel, str]:
    """The classifier `model` names: a fastText model with its name of `label`, or a classifier directory (`model`
    naming one of its files means the directory: it was read as a fastText model, rejecting every document). A
    one-line DataError when it does not load; the stage's check (`StageSpec.check`) before a run."""
    fasttext, path = _quality_model_path(cfg)
    if fasttext:
        return fasttext_stages.label_model(cfg.model, cfg.label, "quality")
    try:
        return load_classifier(path)
    except DataError as e:
        raise DataError(f"quality.model: {e}") from None


def _quality_model_path(cfg: QualityConfig) -> tuple[bool, str]:
    """(whether `model` is a fastText file, the file or classifier directory it names)."""
    path = Path(cfg.model)
    ours = path.name in (FILE_NAME, CONFIG_NAME)
    if not ours and (path.suffix.lower() in (".bin", ".ftz") or path.is_file()):
        return True, cfg.model
    return False, str(path.parent) if ours else cfg.model


def quality_files(cfg: QualityConfig) -> list[Path]:
    """What the stage reads (StageSpec.reads): the fastText file, or the classifier directory's files."""
    fasttext, path = _quality_model_path(cfg)
    return [Path(path)] if fasttext else classifier_files(path)


def quality(cfg: QualityConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Set `meta.quality_score`; reject `quality:low_score` below the threshold."""
    model = quality_model(cfg)
    if isinstance(model, tuple):
        ft, label = model
        scores = [ft.label_probs(fasttext_stages.one_line(d.text, cfg.max_chars))[label] for d in docs]
    else:
        scores = model.predict_proba([d.text for d in docs])
    for d, s in zip(docs, scores):
        d.meta["quality_score"] = round(float(s), 4)
        if s < cfg.threshold:
            d.reject("quality:low_score")
    return docs
