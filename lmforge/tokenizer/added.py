"""Added tokens (specials and HF's other added tokens) found in a text as HF tokenizers' AddedVocabulary finds them,
for the byte-level `bpe.Tokenizer`: the tokens not marked `normalized` in the raw text (leftmost, longest first),
then the `normalized` ones in each normalized stretch between those, by their own normalized text (under NFKC "ﬁ"
matches "fi", under NFC "é" matches "e" + U+0301). A match of a token not kept (a special that encode_ordinary
leaves as text) is text, and no added token inside it is matched (pretokenize.split_specials).
"""

from __future__ import annotations

import unicodedata
from typing import Iterable, Iterator

from lmforge.tokenizer.pretokenize import special_regex, split_specials


def overlapping(these: Iterable[str], others: Iterable[str]) -> bool:
    """Whether a text of `these` and one of `others` can share characters of a match: one inside the other, or one's
    end the other's start."""
    others = list(others)
    return any(a in b or b in a or any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))
               for a in these for b in others)


class AddedVocabulary:
    """The added tokens of one Tokenizer (name -> id), the `normalized` among them, and its normalization (a Unicode
    normal form or None)."""

    def __init__(self, tokens: dict[str, int], normalized: tuple[str, ...], normalization: str | None):
        self.tokens, self.normalization = tokens, normalization
        # the tokens matched in the normalized text, second: none where that text is the raw text and no such token
        # overlaps a raw one (one pass then finds what HF's two find: GPT-2's tokenizer.json marks <|endoftext|>
        # normalized, which must stay a cut point of encode_iterable and needs no warning on export)
        self.second_pass = () if normalization is None and not overlapping(
            normalized, [s for s in tokens if s not in normalized]) else normalized
        self.raw = tuple(s for s in tokens if s not in self.second_pass)
        """the tokens matched in the raw text, first (the cut points of encode_iterable)"""
        self._raw_set = frozenset(self.raw)
        self.by_normal: dict[str, str] = {}
        """a second-pass token's normalized text -> its name (the first's, where two normalize alike)"""
        for s in self.second_pass:
            self.by_normal.setdefault(self.normalize(s), s)

    def normalize(self, text: str) -> str:
        return unicodedata.normalize(self.normalization, text) if self.normalization is not None else text

    def split(self, text: str, keep: Iterable[str] | None) -> Iterator[tuple[str, int | None]]:
        """`text` cut at the added tokens in `keep` (None: all): each match as (its text, its id), each stretch
        between as (that stretch normalized, None)."""
        norm = tuple(self.by_normal)
        keep = None if keep is None else frozenset(keep)
        keep_norm = None if keep is None else frozenset(c for c in norm if self.by_normal[c] in keep)
        for seg, is_added in self._raw_split(text, keep):
            if is_added:
                yield seg, self.tokens[seg]
                continue
            seg = self.normalize(seg)
            for piece, is_norm in split_specials(seg, norm, keep_norm) if norm else [(seg, False)]:
                yield piece, self.tokens[self.by_normal[piece]] if is_norm else None

    def _raw_split(self, text: str, keep: frozenset[str] | None) -> Iterator[tuple[str, bool]]:
        """`text` cut at the added tokens matched in the raw text (all but the second pass's), those in `keep` (None:
        all) as units."""
        return split_specials(text, self.raw, None if keep is None else keep & self._raw_set)

    def find(self, text: str, names: tuple[str, ...], keep: frozenset[str] | None) -> str | None:
        """The first of `names` that `text` holds where split (keeping `keep`) looks for it: a second-pass token by its
        normalized text in the normalized stretches (under NFC "[e" + U+0301 + "]" holds "[é]", "xe" + U+0301 no
        "xe"), any other in the raw text, as tiktoken; None where none is there."""
        by_norm = {self.normalize(s): s for s in names if s in self.second_pass} if self.second_pass else {}
        raw = tuple(s for s in names if s not in by_norm.values()) if by_norm else names
        m = special_regex(raw).search(text) if raw else None
        found = m.group() if m else None
        if not found and by_norm:
            rx = special_regex(tuple(by_norm))
            found = next((by_norm[m.group()] for seg, is_added in self._raw_split(text, keep)
                          if not is_added and (m := rx.search(self.normalize(seg)))), None)
        return found
