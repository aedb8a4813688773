"""Decontamination: drop training documents that share word n-grams with evaluation sets.

GPT-3 (Brown et al. 2020, App. C) flagged overlaps of 13-grams (after lowercasing and stripping
punctuation); we do the same with a configurable n. Evaluation items shorter than n words are skipped,
as in GPT-3, because their n-grams would be too generic. Eval files: JSONL (every string in a record is one
item, e.g. GSM8K's question and answer, including those in lists and nested objects; a line may also be a
bare string or list), CSV (every cell, e.g. MMLU's question and choices), plain text (one item per line); a
directory means all such files inside it.
"""

from __future__ import annotations

import csv
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.hashing import ngram_hashes, normalize_words, word_hashes
from lmforge.data.stage import StageContext
from lmforge.errors import DataError


@dataclass(frozen=True, kw_only=True)
class DecontamConfig:
    """eval_paths: files or directories of evaluation data; ngram: n; min_matches: reject a document
    when at least this many of its distinct n-grams occur in the evaluation sets."""

    eval_paths: tuple[str, ...] = ()
    ngram: int = 13
    min_matches: int = 1

    def __post_init__(self) -> None:
        coerce_fields(self, "decontam")  # each field's type, named when wrong
        check(len(self.eval_paths) > 0, "decontam.eval_paths must name at least one evaluation file")
        check(self.ngram >= 1, f"decontam.ngram must be >= 1, got {self.ngram}")
        check(self.min_matches >= 1, f"decontam.min_matches must be >= 1, got {self.min_matches}")


def _strings(value: object) -> Iterator[str]:
    """Every string in a JSON value: itself, or those inside its lists and objects (a record's "choices" list
    holds eval text as much as its "question" field does; a line may also be a bare string or list)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def _items(path: Path) -> Iterator[str]:
    if path.suffix == ".jsonl":
        # split on "\n" only: str.splitlines also splits on U+2028, U+2029 and U+0085, which JSON allows
        # unescaped inside strings
        for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
            if line.strip():
                yield from _strings(json.loads(line))
    elif path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for row in csv.reader(f):
                yield from row
    else:
        yield from path.read_text(encoding="utf-8", errors="replace").splitlines()


def _files(paths: tuple[str, ...]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix in (".jsonl", ".csv", ".txt"))
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"decontamination set not found: {p}")
    return out


@functools.lru_cache(maxsize=4)
def eval_ngrams(paths: tuple[str, ...], n: int) -> np.ndarray:
    """Sorted distinct uint64 hashes of every n-gram of every evaluation item with >= n words."""
    chunks = []
    for f in _files(paths):
        for item in _items(f):
            words = normalize_words(item)
            if len(words) >= n:
                chunks.append(ngram_hashes(word_hashes(words), n))
    return np.unique(np.concatenate(chunks)) if chunks else np.zeros(0, dtype=np.uint64)


def count_matches(text: str, table: np.ndarray, n: int) -> int:
    """Number of distinct n-grams of `text` present in the sorted table."""
    words = normalize_words(text)
    if len(words) < n or len(table) == 0:
        return 0
    h = np.unique(ngram_hashes(word_hashes(words), n))
    idx = np.searchsorted(table, h).clip(max=len(table) - 1)
    return int((table[idx] == h).sum())


def decontam(cfg: DecontamConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Reject documents overlapping an evaluation set (`decontam`), recording `meta.eval_ngram_matches`."""
    table = eval_ngrams(tuple(cfg.eval_paths), cfg.ngram)
    for d in docs:
        m = count_matches(d.text, table, cfg.ngram)
        if m:
            d.meta["eval_ngram_matches"] = m
        if m >= cfg.min_matches:
            d.reject("decontam")
    return docs
