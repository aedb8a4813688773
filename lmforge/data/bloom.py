"""Bloom-filter deduplication of paragraphs or n-gram spans, as in Dolma (Soldaini et al. 2024), which
streams a corpus once through a single Bloom filter instead of holding every hash in memory.

Filter size for n expected items at false-positive rate p (Bloom 1970): m = -n ln p / (ln 2)^2 bits
and k = (m / n) ln 2 hash functions. The k positions are k independent 64-bit mixes of the item's hash.
Double hashing (Kirsch & Mitzenmacher 2006: g_i = h1 + i h2 mod m, one mix instead of k) makes two items with
the same h2 mod m hit shifted copies of one sequence, which at small m (a few hundred bits) raised the
false-positive rate up to 6.6x the target, and 1.8x with Dillinger & Manolios' cubic term; k mixes cost the
same here (numpy, memory-bound). The formula for m is asymptotic: for filters under 4,096 bits the spread of
the number of set bits left the expected rate up to 2.3x the target (5 items at 1e-3), so there m grows until
the exact expectation (`expected_fp_rate`) meets it.
A false positive removes a paragraph that was not a duplicate, so p bounds the over-removal rate.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.exact import set_kept_lines
from lmforge.data.hashing import mix64, ngram_hashes, normalize_words, word_hashes
from lmforge.data.stage import StageContext

_PARA = re.compile(r"\n")


_EXACT_BELOW = 4096  # bits: above, the asymptotic size is within a few percent of the target rate


def expected_fp_rate(m: int, k: int, n: int) -> float:
    """The expected false-positive rate of an m-bit filter with k hashes holding n items, exactly, for uniform
    bit positions: E[(X / m)^k] over X, the bits that n k throws set (their occupancy distribution, by
    dynamic programming over the throws). (1 - e^(-kn/m))^k is its limit for large m."""
    x = np.arange(m + 1, dtype=np.float64)
    p = np.zeros(m + 1)
    p[0] = 1.0
    for _ in range(n * k):
        new = p * (x / m)  # the throw lands on a set bit
        new[1:] += p[:-1] * ((m - x[:-1]) / m)  # or sets a new one
        p = new
    return float(np.sum(p * (x / m) ** k))


def _k(m: int, n: int) -> int:
    return max(1, int(round(m / n * math.log(2))))


class BloomFilter:
    """A bit array with k hash functions, sized for `capacity` items at `fp_rate`."""

    def __init__(self, capacity: int, fp_rate: float):
        self.m = max(64, int(math.ceil(-capacity * math.log(fp_rate) / math.log(2) ** 2)))
        while self.m < _EXACT_BELOW and expected_fp_rate(self.m, _k(self.m, capacity), capacity) > fp_rate:
            self.m = int(self.m * 1.05) + 1
        self.k = _k(self.m, capacity)
        self.bits = np.zeros((self.m + 7) // 8, dtype=np.uint8)

    def _positions(self, h: np.ndarray) -> np.ndarray:
        """(len(h), k) bit positions for uint64 item hashes h: k independent mixes."""
        seeds = np.arange(1, self.k + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)  # splitmix64's gamma, wraps
        return mix64(h.astype(np.uint64)[:, None] ^ seeds[None, :]) % np.uint64(self.m)

    def contains(self, h: np.ndarray) -> np.ndarray:
        """(len(h),) bool: every bit set (maybe seen; false positives at rate ~fp_rate)."""
        pos = self._positions(h)
        bit = (self.bits[(pos >> np.uint64(3)).astype(np.int64)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
        return bit.all(axis=1)

    def add(self, h: np.ndarray) -> None:
        pos = self._positions(h).ravel()
        np.bitwise_or.at(self.bits, (pos >> np.uint64(3)).astype(np.int64),
                         (np.uint8(1) << (pos & np.uint64(7)).astype(np.uint8)))


@dataclass(frozen=True, kw_only=True)
class BloomDedupConfig:
    """unit: "paragraph" removes a paragraph seen before; "ngram" removes a paragraph when at least
    `overlap` of its word n-grams were seen before (Dolma's n-gram mode). capacity: expected distinct
    items; fp_rate: target false-positive rate; min_words: shorter paragraphs are never removed."""

    unit: str = "paragraph"
    ngram: int = 13
    overlap: float = 0.8
    capacity: int = 1_000_000
    fp_rate: float = 1e-4
    min_words: int = 1

    def __post_init__(self) -> None:
        coerce_fields(self, "bloom_dedup")  # each field's type, named when wrong
        check(self.unit in ("paragraph", "ngram"),
              f"bloom_dedup.unit must be 'paragraph' or 'ngram', got {self.unit!r}")
        check(0.0 < self.fp_rate < 1.0, f"bloom_dedup.fp_rate must be in (0, 1), got {self.fp_rate}")
        check(self.capacity >= 1, f"bloom_dedup.capacity must be >= 1, got {self.capacity}")
        check(0.0 < self.overlap <= 1.0, f"bloom_dedup.overlap must be in (0, 1], got {self.overlap}")


def _para_hashes(para: str, cfg: BloomDedupConfig) -> np.ndarray:
    wh = word_hashes(normalize_words(para))
    if cfg.unit == "paragraph":
        return ngram_hashes(wh, max(len(wh), 1))[:1]
    return ngram_hashes(wh, cfg.ngram)


def bloom_dedup(cfg: BloomDedupConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Global (sequential) stage: drop paragraphs already seen; reject a document left empty
    (`bloom:empty`). `meta.paragraphs_removed` counts removals."""
    bf = BloomFilter(cfg.capacity, cfg.fp_rate)
    for d in docs:
        kept, removed = [], 0
        for para in _PARA.split(d.text):
            if len(para.split()) < cfg.min_words:
                kept.append(para)
                continue
            h = _para_hashes(para, cfg)
            if len(h) == 0:
                kept.append(para)
                continue
            seen = bf.contains(h)
            bf.add(h)
            if seen.mean() >= (1.0 if cfg.unit == "paragraph" else cfg.overlap):
                removed += 1
            else:
                kept.append(para)
        set_kept_lines(d, kept, removed, "paragraphs_removed", "bloom", ctx)
    return docs
