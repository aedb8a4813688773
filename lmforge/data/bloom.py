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
A false positive removes a paragraph that was not a duplicate, so p bounds the over-removal rate -- up to the
filter's capacity. Past it the rate climbs towards 1 (100 items' filter fed 2,000 distinct paragraphs removed 78% of
them), and a fixed capacity either wastes memory on small corpora or stops large ones. So the stage holds a
scalable Bloom filter (Almeida et al. 2007): `capacity` sizes its first filter, and past it filters of doubling
capacity and tightening rate are added, which keeps the rate over the whole corpus below `fp_rate` at any size
(at the default 1e-4, 3.0-3.2 bytes per item the filters can hold over ten doublings, where one filter sized in
advance takes 2.4; the newest filter is allocated whole when the one before fills).
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

    def in_block(self, h: np.ndarray, group: np.ndarray, adds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Whether each item would be in the filter if the groups of items before its own were added first, without
        adding any: ((len(h),) bool, the (len(h), k) positions, for `set_positions`). Items of one group do not see
        each other. `group`: (len(h),) group numbers, items of a group together and groups in order; `adds`:
        (len(h),) bool, the items whose bits a group sets for the later ones. A bit counts as set for an item when it
        was set before the call or an adding item of an earlier group sets it."""
        pos = self._positions(h)  # (N, k)
        if len(h) == 0:
            return np.zeros(0, dtype=bool), pos
        flat = pos.ravel()
        groups = np.where(adds, group, np.iinfo(np.int64).max)  # an item that adds nothing sets no bit
        groups = np.repeat(groups.astype(np.int64), self.k)
        order = np.argsort(flat)  # runs of equal positions (quicksort: 1.5x faster than np.unique's stable sort)
        sorted_pos = flat[order]
        starts = np.flatnonzero(np.r_[True, sorted_pos[1:] != sorted_pos[:-1]])
        first = np.minimum.reduceat(groups[order], starts)  # the earliest group setting each distinct position
        set_by = np.empty_like(groups)
        set_by[order] = np.repeat(first, np.diff(np.r_[starts, len(flat)]))
        return (self._test(pos).astype(bool) | (set_by.reshape(pos.shape) < group[:, None])).all(axis=1), pos

    def set_positions(self, pos: np.ndarray) -> None:
        """Add the items whose positions `in_block` gave."""
        self._set(pos.ravel())


def first_unseen(h: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """The indices of the items not seen, one for each distinct hash (its first), in order."""
    unseen = np.flatnonzero(~seen)
    _, first = np.unique(h[unseen], return_index=True)
    return unseen[np.sort(first)]


class ScalableBloomFilter:
    """Bloom filters of growing capacity, for a set of unknown size at a bounded false-positive rate (Almeida,
    Baquero, Preguica & Hutchison 2007, "Scalable Bloom Filters"). The i-th filter (from 0) holds `capacity` *
    GROWTH^i items at fp_rate * (1 - TIGHTENING) * TIGHTENING^i; an item is in the set when any filter holds it,
    so the rate over all of them stays below the sum, fp_rate. A new item goes into the newest filter, and once that
    holds its capacity, into a new one. Items are uint64 hashes."""

    GROWTH = 2
    TIGHTENING = 0.9  # the paper favours 0.8-0.9 for sets that grow by orders of magnitude

    def __init__(self, capacity: int, fp_rate: float):
        self.capacity, self.fp_rate = capacity, fp_rate
        self.filters: list[BloomFilter] = []
        self.room = 0  # items the newest filter can still take

    def _grow(self) -> None:
        i = len(self.filters)
        size = self.capacity * self.GROWTH ** i
        self.filters.append(BloomFilter(size, self.fp_rate * (1 - self.TIGHTENING) * self.TIGHTENING ** i))
        self.room = size

    @property
    def nbytes(self) -> int:
        return sum(f.bits.nbytes for f in self.filters)

    def contains(self, h: np.ndarray) -> np.ndarray:
        """(len(h),) bool: in any filter (maybe seen)."""
        seen = np.zeros(len(h), dtype=bool)
        for f in self.filters:
            seen |= f.contains(h)
        return seen

    def add_new(self, h: np.ndarray) -> None:
        """Add items not in the set (distinct, in order), the newest filter's room first, then new filters'."""
        while len(h):
            if self.room == 0:
                self._grow()
            take = h[:self.room]
            self.filters[-1].add(take)
            self.room -= len(take)
            h = h[len(take):]

    def contains_then_add(self, h: np.ndarray, group: np.ndarray) -> np.ndarray:
        """`contains` then `add_new` of each group's unseen items in turn, in a few passes: (len(h),) bool, whether
        each item was in the set before its group was added (not its own group: items of one group do not see each
        other). `group`: (len(h),) group numbers, items of a group together and groups in order. The items go into
        the filters that the group-by-group loop puts them in, so the false positives are that loop's too: the
        groups up to the one that fills the newest filter are checked and added at once, then the rest."""
        seen = np.zeros(len(h), dtype=bool)
        lo = 0
        while lo < len(h):
            rest, rest_group = h[lo:], group[lo:]
            if not self.filters:
                self._grow()
            old = np.zeros(len(rest), dtype=bool)
            for f in self.filters[:-1]:
                old |= f.contains(rest)
            now, pos = self.filters[-1].in_block(rest, rest_group, ~old)
            now |= old
            new = first_unseen(rest, now)
            if len(new) <= self.room:  # every group fits the newest filter
                self.filters[-1].set_positions(pos[new])
                self.room -= len(new)
                seen[lo:] = now
                break
            fills = rest_group[new[self.room]]  # the group whose new items fill the newest filter
            end = int(np.searchsorted(rest_group, fills, side="right"))
            seen[lo:lo + end] = now[:end]
            self.filters[-1].set_positions(pos[new[:self.room]])
            left = new[self.room:]
            self.room = 0
            self.add_new(rest[left[left < end]])
            lo += end
        return seen


@dataclass(frozen=True, kw_only=True)
class BloomDedupConfig:
    """unit: "paragraph" removes a paragraph seen before; "ngram" removes a paragraph when at least
    `overlap` of its word n-grams were seen before (Dolma's n-gram mode). capacity: distinct items the first
    filter holds (past it the filter grows: see the module docstring; a good guess saves memory, none is needed);
    fp_rate: bound on the false-positive rate over the whole corpus; min_words: shorter paragraphs are never
    removed."""

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
    bf = ScalableBloomFilter(cfg.capacity, cfg.fp_rate)
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
            bf.add_new(h[first_unseen(h, seen)])
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


def _paragraph_drops(cfg: BloomDedupConfig, bf: ScalableBloomFilter, paras: list[str]) -> np.ndarray:
    """(len(paras),) bool: which of these consecutive paragraphs `bloom_dedup` removes, all through `bf` at once."""
    words = [normalize_words(p) if len(p.split()) >= cfg.min_words else [] for p in paras]
    h, group = _item_hashes(words, cfg)
    seen = bf.contains_then_add(h, group)
    items = np.bincount(group, minlength=len(words))
    # seen / items is the reference's seen.mean() exactly (a count over a count, in float64)
    share = np.bincount(group, weights=seen, minlength=len(words)) / np.maximum(items, 1)
    return (items > 0) & (share >= (1.0 if cfg.unit == "paragraph" else cfg.overlap))


_BLOCK_CHARS = 1 << 18  # text per batch of numpy calls: their overhead amortised, positions (items x k) ~MBs


def bloom_dedup(cfg: BloomDedupConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Global (sequential) stage: drop paragraphs already seen; reject a document left empty
    (`bloom:empty`). `meta.paragraphs_removed` counts removals. Blocks of paragraphs (of about _BLOCK_CHARS, a
    large document's split over several) go through the filter at once, with the result of
    `bloom_dedup_reference`, its paragraph-by-paragraph loop, in a fraction of its time (1,000 synthetic documents,
    11k paragraphs: 9.1 s -> 0.53 s by paragraph, 5.9 s -> 1.6 s by 5-gram, where hashing each word in Python is
    left; 2-core dev box, 2026-12)."""
    bf = ScalableBloomFilter(cfg.capacity, cfg.fp_rate)
    for run in _blocks([len(d.text) for d in docs], _BLOCK_CHARS):
        paras = [d.text.split("\n") for d in docs[run]]
        flat = list(chain.from_iterable(paras))
        drops = []
        for b in _blocks([len(p) for p in flat], _BLOCK_CHARS):
            drops.append(_paragraph_drops(cfg, bf, flat[b]))
        drop = np.concatenate(drops)
        i = 0
        for d, ps in zip(docs[run], paras):
            gone = drop[i:i + len(ps)]
            i += len(ps)
            set_kept_lines(d, [p for p, g in zip(ps, gone) if not g], int(gone.sum()), "paragraphs_removed",
                           "bloom", ctx)
    return docs
