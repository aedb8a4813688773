"""Exact deduplication: whole documents by content hash, and lines across a corpus.

Line-level dedup follows CCNet (Wenzek et al. 2019), which removes paragraphs (newline-separated
lines) occurring elsewhere in the corpus: mode "all" drops every copy of a line seen more than once
(CCNet's choice: repeated lines are boilerplate wherever they appear); mode "first" keeps its first
occurrence. Lines are compared exactly by default, as CCNet's and C4's line dedup do, so "see doc3.txt"
and "see doc4.txt" stay distinct; `normalize=True` compares them after Unicode NFKC, lowercasing, digits to 0 and
whitespace collapsing, which also catches boilerplate that differs only in dates and counters.

Normalised comparison (the default for whole documents) takes the text's NFKC form first, the one the fuzzy dedup
and decontamination stages use (`hashing.nfkc`): without it a full-width, ligatured or decomposed (NFD) copy of a
document -- the same text on screen -- hashed differently and survived exact dedup.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.hashing import nfkc
from lmforge.data.stage import StageContext

_DIGITS = re.compile(r"\d")


def content_hash(text: str, normalize: bool = True) -> bytes:
    if normalize:
        text = " ".join(nfkc(text).lower().split())
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass(frozen=True, kw_only=True)
class ExactDedupConfig:
    """normalize: compare after Unicode NFKC (full-width letters, ligatures, decomposed accents folded),
    lowercasing and collapsing whitespace."""

    normalize: bool = True

    def __post_init__(self) -> None:
        coerce_fields(self, "exact_dedup")  # each field's type, named when wrong


def exact_dedup(cfg: ExactDedupConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Global stage: keep the first document with each content hash (the first in shard order, with the local
    and the Ray executor alike); later copies are rejected `exact_duplicate` with `meta.dup_of`."""
    first: dict[bytes, str] = {}
    for d in docs:
        h = content_hash(d.text, cfg.normalize)
        if h in first:
            d.meta["dup_of"] = first[h]
            d.reject("exact_duplicate")
        else:
            first[h] = d.id
    return docs


@dataclass(frozen=True, kw_only=True)
class LineDedupConfig:
    """mode: "all" drops every copy of a repeated line, "first" keeps the first; min_chars: shorter
    lines are never treated as duplicates (kept as they are); normalize: compare lines after Unicode NFKC,
    lowercasing, digits -> 0 and whitespace collapsing instead of exactly."""

    mode: str = "all"
    min_chars: int = 0
    normalize: bool = False

    def __post_init__(self) -> None:
        coerce_fields(self, "line_dedup")  # each field's type, named when wrong
        check(self.mode in ("all", "first"), f"line_dedup.mode must be 'all' or 'first', got {self.mode!r}")
        check(self.min_chars >= 0, f"line_dedup.min_chars must be >= 0, got {self.min_chars}")


def line_key(line: str, normalize: bool = False) -> bytes:
    """A 64-bit key of one line: the line exactly, or its normalised form. Text is split on "\n", so a CRLF
    line keeps its "\r"; the key leaves it out, or Windows and Unix copies of a line would never match."""
    line = _DIGITS.sub("0", " ".join(nfkc(line).lower().split())) if normalize else line.rstrip("\r")
    return hashlib.blake2b(line.encode("utf-8", "surrogatepass"), digest_size=8).digest()


def line_dedup(cfg: LineDedupConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Global stage: remove duplicated lines corpus-wide; a document left empty is rejected
    `line_dedup:empty`. `meta.lines_removed` counts removals."""
    def keys(d: Document) -> list[bytes | None]:
        """The key of each line of `d` (split on "\n"); None for a line never treated as a duplicate."""
        out: list[bytes | None] = []
        for ln in d.text.split("\n"):
            s = ln.strip()
            out.append(line_key(ln, cfg.normalize) if s and len(s) >= cfg.min_chars else None)
        return out

    # mode "all" must count every line before removing any: each line is hashed once, its key kept for the
    # second pass (hashing dominates: hashing twice took 1.65 s instead of 0.87 s on 20k synthetic documents, 2-core
    # dev box, 2026-12)
    doc_keys = [keys(d) for d in docs] if cfg.mode == "all" else None
    counts = Counter(k for ks in doc_keys for k in ks if k is not None) if doc_keys is not None else Counter()
    seen: set[bytes] = set()
    for i, d in enumerate(docs):
        kept, removed = [], 0
        for ln, k in zip(d.text.split("\n"), doc_keys[i] if doc_keys is not None else keys(d)):
            if k is None:
                kept.append(ln)
                continue
            dup = counts[k] > 1 if doc_keys is not None else k in seen
            seen.add(k)
            if dup:
                removed += 1
            else:
                kept.append(ln)
        set_kept_lines(d, kept, removed, "lines_removed", "line_dedup", ctx)
    return docs


def set_kept_lines(d: Document, kept: list[str], removed: int, meta_key: str, stage: str,
                   ctx: StageContext, sep: str = "\n") -> None:
    """Write back the surviving pieces (joined by `sep`) of a line/paragraph dedup; reject
    `<stage>:empty` if none remain. The document keeps its own trailing newlines whether or not
    anything was removed (removing the last line must not take the final newline with it)."""
    if removed:
        d.meta[meta_key] = removed
        ctx.count(f"{stage}.{meta_key}", removed)
        text = sep.join(kept).rstrip("\n")
        d.text = text + d.text[len(d.text.rstrip("\n")):] if text.strip() else ""
    if not d.text.strip():
        d.reject(f"{stage}:empty")
