"""Fuzzy deduplication with MinHash + LSH (Broder 1997; Leskovec, Rajaraman & Ullman, "Mining of
Massive Datasets", ch. 3), as used by GPT-3, The Pile, RefinedWeb and FineWeb.

1. Shingles: the set of word (or character) n-grams of a document, hashed to uint64.
2. Signatures: for num_perm hash functions h_i(x) = ((a_i x + b_i) mod 2^64) >> 32 -- Dietzfelbinger's
   multiply-add-shift family, universal for 32-bit keys with random 64-bit a_i, b_i, and two cheap
   numpy operations instead of a modulo by a prime -- the minimum over the shingles. x is the low 32 bits
   of the key after a splitmix64 mix: universality is not min-wise independence, and over structured keys
   (consecutive integers, ids) the plain family's minima were correlated (estimates of J ~0.06 low). Computed for a
   whole batch of documents at once: one (num_perm, total_shingles) matrix per chunk and
   `np.minimum.reduceat` over document boundaries.
3. LSH: signatures cut into b bands of r rows; documents sharing any band become candidates. (b, r)
   are chosen for the target Jaccard threshold t by minimising the false-positive plus false-negative
   area under the S-curve P(s) = 1 - (1 - s^r)^b.
4. Candidates are verified by the true Jaccard similarity of their shingle sets, joined with
   union-find, and the first document of each cluster (input order) is kept, unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.hashing import batch_word_ngram_hashes, char_ngram_hashes, mix64
from lmforge.data.stage import StageContext

_CHUNK = 1 << 12  # shingles per signature block: num_perm x 4096 x 8 bytes = 4 MiB at 128 perms


@dataclass(frozen=True, kw_only=True)
class MinHashConfig:
    """threshold: Jaccard similarity above which two documents are duplicates; num_perm: signature
    length; ngram / unit: shingles; bands/rows: 0 = choose from the threshold; verify: check candidates
    by true Jaccard; max_bucket_pairs: buckets larger than this are verified against their first member
    only (a star), not all pairs."""

    threshold: float = 0.8
    num_perm: int = 128
    ngram: int = 5
    unit: str = "word"
    bands: int = 0
    rows: int = 0
    verify: bool = True
    seed: int = 1
    max_bucket_pairs: int = 50

    def __post_init__(self) -> None:
        coerce_fields(self, "minhash_dedup")  # each field's type, named when wrong
        check(0.0 < self.threshold < 1.0, f"minhash_dedup.threshold must be in (0, 1), got {self.threshold}")
        check(self.num_perm >= 2, f"minhash_dedup.num_perm must be >= 2, got {self.num_perm}")
        check(self.ngram >= 1, f"minhash_dedup.ngram must be >= 1, got {self.ngram}")
        check(self.unit in ("word", "char"), f"minhash_dedup.unit must be 'word' or 'char', got {self.unit!r}")
        check(self.bands >= 0 and self.rows >= 0,
              f"minhash_dedup.bands and rows must be >= 0 (0: chosen), got {self.bands} and {self.rows}")
        check((self.bands == 0) == (self.rows == 0), "minhash_dedup: set both bands and rows, or neither")
        check(self.bands * self.rows <= self.num_perm,
              f"minhash_dedup: bands*rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")


@functools.lru_cache(maxsize=64)
def choose_bands_rows(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
                      ) -> tuple[int, int]:
    """(b, r) with b*r <= num_perm minimising fp_weight * area of P(s) below the threshold (false
    positives) + fn_weight * area of 1 - P(s) above it (false negatives), by the trapezoid rule."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)], dtype=float)
    b, r = pairs[:, :1], pairs[:, 1:]  # (K, 1)
    lo, hi = np.linspace(0.0, threshold, 201), np.linspace(threshold, 1.0, 201)

    def area(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return ((y[:, 1:] + y[:, :-1]) * np.diff(x)).sum(axis=1) / 2

    err = fp_weight * area(1 - (1 - lo ** r) ** b, lo) + fn_weight * area((1 - hi ** r) ** b, hi)
    best = int(np.argmin(err))  # first minimum: smallest b, then smallest r, as a loop would find
    return int(pairs[best, 0]), int(pairs[best, 1])


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the hash functions, each (num_perm, 1) uint64; a is odd."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64 - 1, size=(num_perm, 1), dtype=np.uint64, endpoint=True) | np.uint64(1)
    b = rng.integers(0, 2**64 - 1, size=(num_perm, 1), dtype=np.uint64, endpoint=True)
    return a, b


def signatures_flat(hashes: np.ndarray, counts: np.ndarray, num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """(N, num_perm) uint32 MinHash signatures of N documents whose shingle hashes lie concatenated in
    `hashes` (counts[i] of them for document i). A document without shingles gets all-max."""
    a, b = permutations(num_perm, seed)
    n = len(counts)
    out = np.full((n, num_perm), np.iinfo(np.uint32).max, dtype=np.uint32)
    if not n or not counts.any():
        return out
    ends = np.cumsum(counts)
    nonempty = np.flatnonzero(counts)
    # reused: no page faults. Sized for a block, not for the longest document: that made a 300k-shingle document
    # (a book) take 320 MB at 128 perms, and a 3M-word one 3 GB
    buf = np.empty((num_perm, min(_CHUNK, int(counts.sum()))), dtype=np.uint64)
    start = 0
    while start < len(nonempty):
        # a block of documents holding at most _CHUNK shingles, or one longer document alone
        lo = ends[nonempty[start]] - counts[nonempty[start]]
        stop = max(start + 1, int(np.searchsorted(ends[nonempty], lo + _CHUNK, side="right")))
        idx = nonempty[start:stop]
        hi = ends[idx[-1]]
        if hi - lo <= _CHUNK:
            out[idx] = _block_minima(hashes[lo:hi], ends[idx] - counts[idx] - lo, a, b, buf)
        else:  # one document: the minimum over its pieces
            out[idx[0]] = np.min([_block_minima(hashes[s:min(s + _CHUNK, hi)], np.zeros(1, np.int64), a, b, buf)[0]
                                  for s in range(lo, hi, _CHUNK)], axis=0)
        start = stop
    return out


def _block_minima(hashes: np.ndarray, starts: np.ndarray, a: np.ndarray, b: np.ndarray, buf: np.ndarray
                  ) -> np.ndarray:
    """(len(starts), num_perm) minima of h_i over the runs of `hashes` (S <= buf's width) starting at `starts`."""
    x = mix64(hashes) & np.uint64(0xFFFFFFFF)  # (S,)
    h = buf[:, : len(hashes)]  # (num_perm, S)
    with np.errstate(over="ignore"):
        np.multiply(a, x[None, :], out=h)  # wrapping mod 2^64
    np.add(h, b, out=h)
    np.right_shift(h, np.uint64(32), out=h)
    return np.minimum.reduceat(h, starts, axis=1).T


def signatures(shingle_sets: list[np.ndarray], num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """(N, num_perm) uint32 signatures of a list of shingle-hash arrays."""
    counts = np.array([len(s) for s in shingle_sets], dtype=np.int64)
    flat = np.concatenate(shingle_sets) if len(shingle_sets) else np.zeros(0, dtype=np.uint64)
    return signatures_flat(flat.astype(np.uint64), counts, num_perm, seed)


def shingle_texts(texts: list[str], ngram: int = 5, unit: str = "word") -> tuple[np.ndarray, np.ndarray]:
    """(concatenated shingle hashes, count per text): n-grams of `hashing.normalize_words` words (or of
    characters), the word n-grams in one vectorised pass."""
    if unit == "word":
        return batch_word_ngram_hashes(texts, ngram)
    per = [char_ngram_hashes(t, ngram) for t in texts]
    counts = np.array([len(p) for p in per], dtype=np.int64)
    return (np.concatenate(per) if per else np.zeros(0, np.uint64)), counts


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64: each band's r rows folded into one key."""
    n = sig.shape[0]
    s = sig[:, : bands * rows].astype(np.uint64).reshape(n, bands, rows)
    mult = np.random.default_rng(12345).integers(1, 1 << 62, size=rows, dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):
        return (s * mult).sum(axis=2, dtype=np.uint64)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """True Jaccard similarity of two sorted, distinct uint64 arrays."""
    if len(a) == 0 and len(b) == 0:
        return 1.0
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


class UnionFind:
    """Disjoint sets with path halving; the root of a set is its smallest member (= first in input)."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, x: int, y: int) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)


def candidate_pairs(keys: np.ndarray, max_bucket_pairs: int = 50) -> set[tuple[int, int]]:
    """Pairs (i < j) sharing a band key; buckets of more than max_bucket_pairs documents give a star."""
    pairs: set[tuple[int, int]] = set()
    for band in range(keys.shape[1]):
        order = np.argsort(keys[:, band], kind="stable")
        col = keys[order, band]
        same = col[1:] == col[:-1]  # neighbours in sorted order sharing a bucket
        if not same.any():
            continue
        first = np.flatnonzero(np.concatenate([[True], ~same]))  # start of every bucket
        sizes = np.diff(np.concatenate([first, [len(col)]]))
        for s, k in zip(first[sizes > 1], sizes[sizes > 1]):
            g = sorted(order[s:s + k].tolist())
            if k <= max_bucket_pairs:
                pairs.update((g[i], g[j]) for i in range(k) for j in range(i + 1, k))
            else:
                pairs.update((g[0], x) for x in g[1:])
    return pairs


def cluster_shingles(hashes: np.ndarray, counts: np.ndarray, cfg: MinHashConfig) -> list[int]:
    """Cluster root (index of the kept document) for each document, given its shingle hashes."""
    bands, rows = (cfg.bands, cfg.rows) if cfg.bands else choose_bands_rows(cfg.threshold, cfg.num_perm)
    sig = signatures_flat(hashes, counts, cfg.num_perm, cfg.seed)
    ends = np.cumsum(counts)
    sets: dict[int, set[int]] = {}

    def shingle_set(i: int) -> set[int]:  # Python sets: cheaper than sorting for a few hundred items
        if i not in sets:
            sets[i] = set(hashes[ends[i] - counts[i]:ends[i]].tolist())
        return sets[i]

    def set_jaccard(a: set[int], b: set[int]) -> float:
        inter = len(a & b)
        return inter / (len(a) + len(b) - inter)

    uf = UnionFind(len(counts))
    for i, j in sorted(candidate_pairs(band_keys(sig, bands, rows), cfg.max_bucket_pairs)):
        if not counts[i] or not counts[j] or uf.find(i) == uf.find(j):
            continue  # already joined through other verified pairs: no need to verify this one
        if not cfg.verify or set_jaccard(shingle_set(i), shingle_set(j)) >= cfg.threshold:
            uf.union(i, j)
    return [uf.find(i) for i in range(len(counts))]


def cluster(texts: list[str], cfg: MinHashConfig = MinHashConfig()) -> list[int]:
    """Cluster root for each text (roots are the first member of each cluster, in input order)."""
    return cluster_shingles(*shingle_texts(texts, cfg.ngram, cfg.unit), cfg)


def minhash_dedup(cfg: MinHashConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Global stage: reject all but the first document of each near-duplicate cluster
    (`minhash_duplicate`, with `meta.dup_of` = the kept id). Kept documents are not modified."""
    roots = cluster([d.text for d in docs], cfg)
    for i, (d, r) in enumerate(zip(docs, roots)):
        if r != i:
            d.meta["dup_of"] = docs[r].id
            d.reject("minhash_duplicate")
    return docs
