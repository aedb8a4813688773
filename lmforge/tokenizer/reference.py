"""The plain, obviously-correct BPE encoder that the tiktoken fast path is tested against.

Within each pre-token, start from its bytes and repeatedly merge the adjacent pair that came earliest
in the merge list (every occurrence of it, left to right), until no adjacent pair is a merge. This is
GPT-2's original `bpe()` and applies the merges exactly as training did. With `whole` (HF's
`ignore_merges`, set by Llama-3), a pre-token that is itself a token is emitted as that token first,
as tiktoken does, whatever the merges would make of it.

Long pre-tokens (a base64 blob, minified code, a run of CJK without spaces) take the same merges through a
heap over a linked list: the scan costs O(length) per merge applied, which made a 100k-character random word
take minutes (2026-12-06: 158 s against 0.06 s on tiktoken).
"""

from __future__ import annotations

import heapq

from lmforge.tokenizer.pretokenize import compile_pattern

SCAN_MAX = 128
"""pre-tokens of at most this many bytes are merged by the plain scan; longer ones through the heap"""


class ReferenceEncoder:
    """Encode ordinary text (no special tokens) with the merge list, in pure Python.

    ranks: (left id, right id) -> merge index; merged: same pair -> id of the merged token;
    byte_ids: id of each single byte, indexed by byte value; whole: token bytes -> id of the tokens a
    pre-token is emitted as without merging (ignore_merges), or None.
    """

    def __init__(self, pattern: str, ranks: dict[tuple[int, int], int], merged: dict[tuple[int, int], int],
                 byte_ids: list[int], whole: dict[bytes, int] | None = None, cache_size: int = 1 << 16):
        self.regex = compile_pattern(pattern)
        self.ranks = ranks
        self.merged = merged
        self.byte_ids = byte_ids
        self.whole = whole or {}
        self.cache: dict[str, list[int]] = {}
        self.cache_size = cache_size

    def bpe(self, ids: list[int]) -> list[int]:
        return self.bpe_scan(ids) if len(ids) <= SCAN_MAX else self.bpe_heap(ids)

    def bpe_scan(self, ids: list[int]) -> list[int]:
        """Merge the lowest-ranked adjacent pair, every occurrence left to right, until none is a merge."""
        ranks = self.ranks
        while len(ids) > 1:
            best, best_rank = None, float("inf")  # ranks are merge indices, past len(ranks) when a pair repeats
            for pair in zip(ids, ids[1:]):
                r = ranks.get(pair)
                if r is not None and r < best_rank:
                    best, best_rank = pair, r
            if best is None:
                break
            new, out, i, n = self.merged[best], [], 0, len(ids)
            while i < n:
                if i + 1 < n and ids[i] == best[0] and ids[i + 1] == best[1]:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def bpe_heap(self, ids: list[int]) -> list[int]:
        """What `bpe_scan` makes of `ids`, in O(n log n). A heap holds (rank, position) of adjacent pairs; all
        entries of the lowest rank are taken at once and merged left to right, as the scan merges every
        occurrence of its pair in one pass (a pair made meanwhile waits for the next round even when its rank
        is lower, as in the scan). Positions are the first byte's index, so they keep the left-to-right order;
        an entry is stale when its position is gone or now starts another pair (each rank names one pair)."""
        ranks, merged = self.ranks, self.merged
        tok = list(ids)  # -1: merged into its left neighbour
        nxt = list(range(1, len(tok))) + [-1]
        prv = list(range(-1, len(tok) - 1))
        heap = [(r, i) for i, pair in enumerate(zip(tok, tok[1:])) if (r := ranks.get(pair)) is not None]
        heapq.heapify(heap)
        while heap:
            rank, made = heap[0][0], []
            while heap and heap[0][0] == rank:
                i = heapq.heappop(heap)[1]
                j = nxt[i]
                if tok[i] < 0 or j < 0 or ranks.get((tok[i], tok[j])) != rank:
                    continue
                tok[i], tok[j] = merged[(tok[i], tok[j])], -1
                k = nxt[i] = nxt[j]
                if k >= 0:
                    prv[k] = i
                for left, right in ((prv[i], i), (i, k)):  # the merged token's two new pairs
                    if left >= 0 and right >= 0 and (r := ranks.get((tok[left], tok[right]))) is not None:
                        made.append((r, left))
            for entry in made:
                heapq.heappush(heap, entry)
        return [t for t in tok if t >= 0]

    def encode_bytes(self, piece: bytes) -> list[int]:
        return self.bpe([self.byte_ids[b] for b in piece])

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self.cache
        for piece in self.regex.findall(text):
            ids = cache.get(piece)
            if ids is None:
                b = piece.encode("utf-8")
                ids = [self.whole[b]] if b in self.whole else self.encode_bytes(b)
                if len(cache) >= self.cache_size:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)
        return out
