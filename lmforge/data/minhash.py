"""Fuzzy deduplication with MinHash + LSH (Broder 1997; Leskovec, Rajaraman & Ullman, "Mining of
Massive Datasets", ch. 3), as used by GPT-3, The Pile, RefinedWeb and FineWeb.

1. Shingles: the set of word (or character) n-grams of a document, hashed to uint64.
2. Signatures: for num_perm universal hashes h_i(x) = (a_i x + b_i) mod (2^61 - 1), the minimum over
   the shingles. Computed for a whole batch of documents at once: one (num_perm, total_shingles)
   matrix per chunk and `np.minimum.reduceat` over document boundaries.
3. LSH: signatures cut into b bands of r rows; documents sharing any band become candidates. (b, r)
   are chosen for the target Jaccard threshold t by minimising the false-positive plus false-negative
   area under the S-curve P(s) = 1 - (1 - s^r)^b.
4. Candidates are verified by the true Jaccard similarity of their shingle sets, joined with
   union-find, and the first document of each cluster (input order) is kept, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmforge.config import check
from lmforge.data.document import Document
from lmforge.data.hashing import text_ngram_hashes
from lmforge.data.stage import StageContext

MERSENNE = np.uint64((1 << 61) - 1)
_CHUNK = 1 << 15  # shingles per signature block: num_perm x 32768 x 8 bytes = 32 MiB at 128 perms


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
        check(0.0 < self.threshold < 1.0, f"minhash.threshold must be in (0, 1), got {self.threshold}")
        check(self.num_perm >= 2, f"minhash.num_perm must be >= 2, got {self.num_perm}")
        check(self.ngram >= 1, f"minhash.ngram must be >= 1, got {self.ngram}")
        check(self.unit in ("word", "char"), f"minhash.unit must be 'word' or 'char', got {self.unit!r}")
        check((self.bands == 0) == (self.rows == 0), "minhash: set both bands and rows, or neither")
        check(self.bands * self.rows <= self.num_perm,
              f"minhash: bands*rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def choose_bands_rows(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
                      ) -> tuple[int, int]:
    """(b, r) with b*r <= num_perm minimising fp_weight * area of P(s) below the threshold (false
    positives) + fn_weight * area of 1 - P(s) above it (false negatives)."""
    best, best_err = (1, num_perm), float("inf")
    lo, hi = np.linspace(0.0, threshold, 201), np.linspace(threshold, 1.0, 201)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = _trapezoid((1 - hi ** r) ** b, hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err - 1e-12:
                best, best_err = (b, r), err
    return best


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the universal hashes, each (num_perm, 1) uint64 below 2^31 so a*x + b (x < 2^32)
    cannot overflow 64 bits."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 31, size=(num_perm, 1), dtype=np.uint64)
    b = rng.integers(0, 1 << 31, size=(num_perm, 1), dtype=np.uint64)
    return a, b


def signatures(shingle_sets: list[np.ndarray], num_perm: int = 128, seed: int = 1) -> np.ndarray:
    """(N, num_perm) uint64 MinHash signatures; an empty set gets the all-max signature."""
    a, b = permutations(num_perm, seed)
    out = np.full((len(shingle_sets), num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    nonempty = [i for i, s in enumerate(shingle_sets) if len(s)]
    start = 0
    while start < len(nonempty):
        # gather documents until the block holds ~_CHUNK shingles (at least one document)
        stop, total = start, 0
        while stop < len(nonempty) and (total == 0 or total + len(shingle_sets[nonempty[stop]]) <= _CHUNK):
            total += len(shingle_sets[nonempty[stop]])
            stop += 1
        idx = nonempty[start:stop]
        x = np.concatenate([shingle_sets[i] for i in idx]) & np.uint64(0xFFFFFFFF)  # (S,)
        offsets = np.cumsum([0] + [len(shingle_sets[i]) for i in idx[:-1]])
        h = (a * x[None, :] + b) % MERSENNE  # (num_perm, S)
        out[idx] = np.minimum.reduceat(h, offsets, axis=1).T
        start = stop
    return out


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(N, bands) uint64: each band's r rows folded into one key."""
    n = sig.shape[0]
    s = sig[:, : bands * rows].reshape(n, bands, rows)
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
    """Pairs (i < j) sharing a band key."""
    pairs: set[tuple[int, int]] = set()
    for band in range(keys.shape[1]):
        col = keys[:, band]
        order = np.argsort(col, kind="stable")
        sorted_col = col[order]
        bounds = np.flatnonzero(np.diff(sorted_col)) + 1
        for group in np.split(order, bounds):
            if len(group) < 2:
                continue
            g = sorted(group.tolist())
            if len(g) <= max_bucket_pairs:
                pairs.update((g[i], g[j]) for i in range(len(g)) for j in range(i + 1, len(g)))
            else:
                pairs.update((g[0], x) for x in g[1:])
    return pairs


def cluster(shingle_sets: list[np.ndarray], cfg: MinHashConfig) -> list[int]:
    """Cluster root (index of the kept document) for each document."""
    bands, rows = (cfg.bands, cfg.rows) if cfg.bands else choose_bands_rows(cfg.threshold, cfg.num_perm)
    sig = signatures(shingle_sets, cfg.num_perm, cfg.seed)
    uf = UnionFind(len(shingle_sets))
    for i, j in sorted(candidate_pairs(band_keys(sig, bands, rows), cfg.max_bucket_pairs)):
        if not len(shingle_sets[i]) or not len(shingle_sets[j]):
            continue
        if not cfg.verify or jaccard(shingle_sets[i], shingle_sets[j]) >= cfg.threshold:
            uf.union(i, j)
    return [uf.find(i) for i in range(len(shingle_sets))]


def minhash_dedup(cfg: MinHashConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Global stage: reject all but the first document of each near-duplicate cluster
    (`minhash_duplicate`, with `meta.dup_of` = the kept id). Kept documents are not modified."""
    sets = [text_ngram_hashes(d.text, cfg.ngram, cfg.unit) for d in docs]
    roots = cluster(sets, cfg)
    for i, (d, r) in enumerate(zip(docs, roots)):
        if r != i:
            d.meta["dup_of"] = docs[r].id
            d.reject("minhash_duplicate")
    return docs
