"""The plain, obviously-correct BPE encoder that the tiktoken fast path is tested against.

Within each pre-token, start from its bytes and repeatedly merge the adjacent pair that came earliest
in the merge list (every occurrence of it, left to right), until no adjacent pair is a merge. This is
GPT-2's original `bpe()` and applies the merges exactly as training did. With `whole` (HF's
`ignore_merges`, set by Llama-3), a pre-token that is itself a token is emitted as that token first,
as tiktoken does, whatever the merges would make of it.
"""

from __future__ import annotations

from lmforge.tokenizer.pretokenize import compile_pattern


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
