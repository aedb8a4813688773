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
A false positive removes a paragraph that was not a duplicate, so p bounds the over-removal rate -- up to
`capacity` distinct items. Past it the rate climbs towards 1 (100 items' filter fed 2,000 distinct paragraphs
removed 78% of them), so the stage counts the distinct items it adds and fails the run, naming a capacity that
fits, once the corpus holds more than `capacity`: an output silently stripped of unique text would pass as deduped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Iterator

import numpy as np

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.exact import set_kept_lines
from lmforge.data.hashing import power_tables, mix64, ngram_hashes, normalize_words, word_hashes
from lmforge.data.stage import StageContext
from lmforge.errors import DataError

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

    def _test(self, pos: np.ndarray) -> np.ndarray:
        """pos's bits (0/1, same shape)."""
        return (self.bits[(pos >> np.uint64(3)).astype(np.int64)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1

    def _set(self, pos: np.ndarray) -> None:
        np.bitwise_or.at(self.bits, (pos >> np.uint64(3)).astype(np.int64),
                         (np.uint8(1) << (pos & np.uint64(7)).astype(np.uint8)))

    def contains(self, h: np.ndarray) -> np.ndarray:
        """(len(h),) bool: every bit set (maybe seen; false positives at rate ~fp_rate)."""
        return self._test(self._positions(h)).all(axis=1)

    def add(self, h: np.ndarray) -> None:
        self._set(self._positions(h).ravel())

    def contains_then_add(self, h: np.ndarray, group: np.ndarray) -> np.ndarray:
        """`contains` then `add` of each group of items in turn, in one pass: (len(h),) bool, whether each item
        was in the filter before its group was added (not its own group: items of one group do not see each
        other). `group`: (len(h),) group numbers, items of a group together and groups in order. A bit counts as set
        for an item when it was set before the call or an earlier group sets it."""
        if len(h) == 0:
            return np.zeros(0, dtype=bool)
        pos = self._positions(h)  # (N, k)
        flat, groups = pos.ravel(), np.repeat(group, self.k)
        order = np.argsort(flat)  # runs of equal positions (quicksort: 1.5x faster than np.unique's stable sort)
        sorted_pos = flat[order]
        starts = np.flatnonzero(np.r_[True, sorted_pos[1:] != sorted_pos[:-1]])
        first = np.minimum.reduceat(groups[order], starts)  # the earliest group setting each distinct position
        set_by = np.empty_like(groups)
        set_by[order] = np.repeat(first, np.diff(np.r_[starts, len(flat)]))
        seen = (self._test(pos).astype(bool) | (set_by.reshape(pos.shape) < group[:, None])).all(axis=1)
        self._set(sorted_pos[starts])
        return seen


@dataclass(frozen=True, kw_only=True)
class BloomDedupConfig:
    """unit: "paragraph" removes a paragraph seen before; "ngram" removes a paragraph when at least
    `overlap` of its word n-grams were seen before (Dolma's n-gram mode). capacity: expected distinct
    items (a corpus holding more fails the stage: see the module docstring); fp_rate: target false-positive
    rate; min_words: shorter paragraphs are never removed."""

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
        check(self.ngram >= 1, f"bloom_dedup.ngram must be >= 1, got {self.ngram}")


def _para_hashes(para: str, cfg: BloomDedupConfig) -> np.ndarray:
    wh = word_hashes(normalize_words(para))
    if cfg.unit == "paragraph":
        return ngram_hashes(wh, max(len(wh), 1))[:1]
    return ngram_hashes(wh, cfg.ngram)


def bloom_dedup_reference(cfg: BloomDedupConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """`bloom_dedup` paragraph by paragraph: the plain version it must equal (about 30 numpy calls a paragraph,
    which dominated the stage's time)."""
    bf = BloomFilter(cfg.capacity, cfg.fp_rate)
    added = 0  # distinct items in the filter (less false positives)
    for d in docs:
        kept, removed = [], 0
        for para in d.text.split("\n"):
            if len(para.split()) < cfg.min_words:
                kept.append(para)
                continue
            h = _para_hashes(para, cfg)
            if len(h) == 0:
                kept.append(para)
                continue
            seen = bf.contains(h)
            bf.add(h)
            added += len(np.unique(h[~seen]))
            check_capacity(cfg, added, docs)
            if seen.mean() >= (1.0 if cfg.unit == "paragraph" else cfg.overlap):
                removed += 1
            else:
                kept.append(para)
        set_kept_lines(d, kept, removed, "paragraphs_removed", "bloom", ctx)
    return docs


def _whole_hashes(wh: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """One hash of all the words of each non-empty paragraph (`ngram_hashes(w, len(w))`, whose polynomial is
    sum_j (w_j + 1) P^(L-1-j) before mixing), for paragraphs of `lengths` words laid end to end in `wh`."""
    if len(wh) == 0:
        return np.zeros(0, dtype=np.uint64)
    ends = np.cumsum(lengths)
    exponent = np.repeat(ends - 1, lengths) - np.arange(len(wh))  # L-1-j: the word's place from its paragraph end
    pw, _ = power_tables(int(lengths.max()))
    with np.errstate(over="ignore"):
        terms = (wh + np.uint64(1)) * pw[exponent]
        return mix64(np.add.reduceat(terms, (ends - lengths)[lengths > 0]))  # segments of the non-empty ones


def _item_hashes(words: list[list[str]], cfg: BloomDedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """The items of many paragraphs (given as their words) at once: (hashes, paragraph of each), in paragraph
    order, each paragraph's hashes those `_para_hashes` gives it."""
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    wh = word_hashes(list(chain.from_iterable(words)))
    nonempty = np.flatnonzero(lengths > 0)
    whole = _whole_hashes(wh, lengths)
    if cfg.unit == "paragraph":
        return whole, nonempty
    n = cfg.ngram
    short = lengths[nonempty] < n  # fewer than n words: one hash of them all
    hashes, groups = [whole[short]], [nonempty[short]]
    if len(wh) >= n:
        para = np.repeat(np.arange(len(words)), lengths)
        windows = ngram_hashes(wh, n)  # every n consecutive words, those across a paragraph end too
        inside = para[:len(windows)] == para[n - 1:]
        hashes.append(windows[inside])
        groups.append(para[:len(windows)][inside])
    order = np.argsort(np.concatenate(groups), kind="stable")
    return np.concatenate(hashes)[order], np.concatenate(groups)[order]


def check_capacity(cfg: BloomDedupConfig, added: int, docs: list[Document]) -> None:
    """Fail once the filter holds more than `capacity` distinct items, with a capacity that fits the corpus: its
    number of items, duplicates included (counted only here, when failing)."""
    if added <= cfg.capacity:
        return
    total = 0
    for d in docs:
        for para in d.text.split("\n"):
            words = normalize_words(para) if len(para.split()) >= cfg.min_words else []
            total += 0 if not words else 1 if cfg.unit == "paragraph" else max(len(words) - cfg.ngram + 1, 1)
    what = "paragraphs" if cfg.unit == "paragraph" else f"{cfg.ngram}-grams"
    raise DataError(f"bloom_dedup.capacity = {cfg.capacity} but the corpus holds more distinct {what} (at least "
                    f"{added}): past its capacity the filter's false-positive rate rises above fp_rate = {cfg.fp_rate} "
                    f"and removes paragraphs that are not duplicates; set bloom_dedup.capacity to {total} (the "
                    f"corpus's {what}, duplicates included) and rerun with --restart")


def _blocks(sizes: list[int], limit: int) -> Iterator[slice]:
    """Consecutive runs of items whose sizes add up to at most `limit` (an item larger alone is a run)."""
    start, total = 0, 0
    for i, n in enumerate(sizes):
        if i > start and total + n > limit:
            yield slice(start, i)
            start, total = i, 0
        total += n
    if start < len(sizes):
        yield slice(start, len(sizes))


def _paragraph_drops(cfg: BloomDedupConfig, bf: BloomFilter, paras: list[str]) -> tuple[np.ndarray, int]:
    """((len(paras),) bool: which of these consecutive paragraphs `bloom_dedup` removes, all through `bf` at once;
    the number of distinct items they added to it)."""
    words = [normalize_words(p) if len(p.split()) >= cfg.min_words else [] for p in paras]
    h, group = _item_hashes(words, cfg)
    seen = bf.contains_then_add(h, group)
    items = np.bincount(group, minlength=len(words))
    # seen / items is the reference's seen.mean() exactly (a count over a count, in float64)
    share = np.bincount(group, weights=seen, minlength=len(words)) / np.maximum(items, 1)
    return (items > 0) & (share >= (1.0 if cfg.unit == "paragraph" else cfg.overlap)), len(np.unique(h[~seen]))


_BLOCK_CHARS = 1 << 18  # text per batch of numpy calls: their overhead amortised, positions (items x k) ~MBs


def bloom_dedup(cfg: BloomDedupConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Global (sequential) stage: drop paragraphs already seen; reject a document left empty
    (`bloom:empty`). `meta.paragraphs_removed` counts removals. Blocks of paragraphs (of about _BLOCK_CHARS, a
    large document's split over several) go through the filter at once, with the result of
    `bloom_dedup_reference`, its paragraph-by-paragraph loop, in a fraction of its time (1,000 synthetic documents,
    11k paragraphs: 9.1 s -> 0.53 s by paragraph, 5.9 s -> 1.6 s by 5-gram, where hashing each word in Python is
    left; 2-core dev box, 2026-12)."""
    bf = BloomFilter(cfg.capacity, cfg.fp_rate)
    added = 0  # distinct items in the filter (less false positives)
    for run in _blocks([len(d.text) for d in docs], _BLOCK_CHARS):
        paras = [d.text.split("\n") for d in docs[run]]
        flat = list(chain.from_iterable(paras))
        drops = []
        for b in _blocks([len(p) for p in flat], _BLOCK_CHARS):
            drop, new = _paragraph_drops(cfg, bf, flat[b])
            drops.append(drop)
            added += new
            check_capacity(cfg, added, docs)
        drop = np.concatenate(drops)
        i = 0
        for d, ps in zip(docs[run], paras):
            gone = drop[i:i + len(ps)]
            i += len(ps)
            set_kept_lines(d, [p for p, g in zip(ps, gone) if not g], int(gone.sum()), "paragraphs_removed",
                           "bloom", ctx)
    return docs
