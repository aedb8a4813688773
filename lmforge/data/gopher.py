"""Gopher heuristic quality and repetition filters (Rae et al. 2021, "Scaling Language Models:
Methods, Analysis & Insights from Training Gopher", Appendix A.1.1, Table A1). Defaults are the
paper's thresholds. Every rule that fails is counted (`gopher.<rule>` counters); the document's drop
reason is the first failing rule.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass

import numpy as np

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.hashing import ngram_hashes
from lmforge.data.stage import StageContext

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = ("•", "‣", "○", "●", "◦", "▪", "-", "*", "·")
_PARAGRAPHS = re.compile(r"\n\s*\n")
_PUNCT_STRIP = "\"'“”‘’.,;:!?()[]{}«»"


def words_of(text: str) -> list[str]:
    """Whitespace tokens, as Gopher counts words."""
    return text.split()


@dataclass(frozen=True, kw_only=True)
class GopherConfig:
    """Thresholds of Gopher's quality rules (Table A1) and repetition rules (Table A2)."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # "#" per word and ellipses per word, each on its own
    max_bullet_lines_ratio: float = 0.9
    max_ellipsis_lines_ratio: float = 0.3
    min_alpha_words_ratio: float = 0.8
    min_stop_words: int = 2
    stop_words: tuple[str, ...] = STOP_WORDS
    repetition: bool = True
    max_dup_line_frac: float = 0.30
    max_dup_para_frac: float = 0.30
    max_dup_line_char_frac: float = 0.20
    max_dup_para_char_frac: float = 0.20
    top_ngram_max_char_frac: tuple[float, ...] = (0.20, 0.18, 0.16)  # n = 2, 3, 4
    dup_ngram_max_char_frac: tuple[float, ...] = (0.15, 0.14, 0.13, 0.12, 0.11, 0.10)  # n = 5..10

    def __post_init__(self) -> None:
        coerce_fields(self, "gopher")  # each field's type, named when wrong
        check(0 <= self.min_words <= self.max_words, f"gopher: need 0 <= min_words <= max_words, got "
              f"{self.min_words}, {self.max_words}")
        check(len(self.top_ngram_max_char_frac) == 3, "gopher.top_ngram_max_char_frac needs 3 values (n=2,3,4)")
        check(len(self.dup_ngram_max_char_frac) == 6, "gopher.dup_ngram_max_char_frac needs 6 values (n=5..10)")


def quality_failures(text: str, cfg: GopherConfig) -> list[str]:
    """Names of the failing quality rules (Table A1), in the paper's order."""
    words = words_of(text)
    n = len(words)
    fails = []
    if not cfg.min_words <= n <= cfg.max_words:
        fails.append("word_count")
    if n == 0:
        return fails
    mean_len = sum(map(len, words)) / n
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        fails.append("mean_word_length")
    # "a symbol-to-word ratio greater than 0.1 for either the hash symbol or the ellipsis": two ratios
    ellipses = text.count("...") + text.count("…")
    if max(text.count("#"), ellipses) / n > cfg.max_symbol_word_ratio:
        fails.append("symbol_word_ratio")
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if lines and sum(ln.startswith(BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_lines_ratio:
        fails.append("bullet_lines")
    if lines and sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
        fails.append("ellipsis_lines")
    # searched word by word: `\S*[letter]\S*` over the whole text was retried from every character of a token
    # holding no letter, quadratic in its length (a 40,000-digit token took seconds)
    has_alpha = _alpha_word_pattern().search
    if sum(1 for w in words if has_alpha(w)) / n < cfg.min_alpha_words_ratio:
        fails.append("alpha_words")
    found = 0
    for _ in _stop_word_pattern(cfg.stop_words).finditer(text.lower()):
        found += 1
        if found >= cfg.min_stop_words:
            break
    if found < cfg.min_stop_words:
        fails.append("stop_words")
    return fails


@functools.cache
def _alpha_word_pattern() -> re.Pattern:
    r"""One alphabetic character (`str.isalpha`), searched in each word: a word where it is found has the
    paper's "at least one alphabetic character". `[^\W\d_]` alone is not that: `\w` is `str.isalnum`, which also
    takes numerics that are neither letters nor decimal digits (² ½ ① Ⅳ: about 1,100 code points), so the
    class leaves those out too. Built on first use (a ~60 ms scan of all code points)."""
    numeric = [c for c in range(sys.maxunicode + 1)
               if chr(c).isnumeric() and not chr(c).isdecimal() and not chr(c).isalpha()]
    runs = []  # consecutive code points as ranges, to keep the class short
    for c in numeric:
        if runs and runs[-1][1] == c - 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    excluded = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in runs)
    return re.compile(rf"[^\W\d_{excluded}]")


@functools.lru_cache(maxsize=8)
def _stop_word_pattern(stop_words: tuple[str, ...]) -> re.Pattern:
    """A whitespace token that is a stop word, with surrounding punctuation, matched against the
    lowercased text. Not re.IGNORECASE: its Unicode case folding equates "ı" (dotless i), "ſ" (long s)
    and "K" (Kelvin sign) with ASCII letters, so it would count "wıth" as "with"."""
    punct = re.escape(_PUNCT_STRIP)
    alts = "|".join(re.escape(w.lower()) for w in stop_words)
    return re.compile(rf"(?<!\S)[{punct}]*(?:{alts})[{punct}]*(?!\S)")


def _dup_fractions(pieces: list[str]) -> tuple[float, float]:
    """(fraction of pieces that repeat an earlier one, fraction of characters in those repeats)."""
    if not pieces:
        return 0.0, 0.0
    seen: set[str] = set()
    dup_n = dup_chars = 0
    for p in pieces:
        if p in seen:
            dup_n += 1
            dup_chars += len(p)
        seen.add(p)
    total = sum(len(p) for p in pieces)
    return dup_n / len(pieces), dup_chars / max(total, 1)


class _Words:
    """A document's words with their hashes and lengths, computed once for all n."""

    def __init__(self, words: list[str]):
        self.words = words
        # Python's str hash is salted per process, which is fine here: n-grams are only compared
        # within one document, in one process; it is much faster than a deterministic hash per word.
        self.hashes = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
        self.lens = np.fromiter(map(len, words), dtype=np.int64, count=len(words))


def _ngram_ids(w: _Words, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first index of each distinct n-gram, occurrences of each, distinct-id of each position), with
    n-grams identified by 64-bit hashes of their words (collisions are negligible at 2^-64)."""
    g = ngram_hashes(w.hashes, n)
    _, first, inv, counts = np.unique(g, return_index=True, return_inverse=True, return_counts=True)
    return first, counts, inv


def top_ngram_char_frac(words: list[str] | _Words, n: int) -> float:
    """Characters covered by the most frequent word n-gram (count x its characters) / all word
    characters. Ties go to the n-gram seen first."""
    w = words if isinstance(words, _Words) else _Words(words)
    if len(w.words) < n:
        return 0.0
    first, counts, _ = _ngram_ids(w, n)
    best = counts.max()
    if best < 2:
        return 0.0
    start = int(first[counts == best].min())
    return float(best * w.lens[start:start + n].sum() / max(w.lens.sum(), 1))


def dup_ngram_char_frac(words: list[str] | _Words, n: int) -> float:
    """Characters in repeats of word n-grams / all word characters. As datatrove's `find_all_duplicate`
    (GopherRepetitionFilter): scanning left to right, an n-gram seen before adds its characters and the scan
    jumps past it (no word counts twice), while a first occurrence adds nothing; the paper's "fraction of
    characters contained within all duplicate n-grams" counts the text a repeat adds. The denominator is all
    word characters (datatrove divides by len(text), spaces included)."""
    w = words if isinstance(words, _Words) else _Words(words)
    if len(w.words) < n:
        return 0.0
    grams = ngram_hashes(w.hashes, n).tolist()
    ends = np.concatenate([[0], np.cumsum(w.lens)])
    chars = (ends[n:] - ends[:-n]).tolist()  # characters of the n-gram starting at each word
    seen: set[int] = set()
    repeated = i = 0
    while i < len(grams):
        if grams[i] in seen:
            repeated += chars[i]
            i += n
        else:
            seen.add(grams[i])
            i += 1
    return repeated / max(int(ends[-1]), 1)


def repetition_failures(text: str, cfg: GopherConfig) -> list[str]:
    """Names of the failing repetition rules (Table A2)."""
    fails = []
    lines = [ln for ln in text.split("\n") if ln.strip()]
    paras = [p for p in _PARAGRAPHS.split(text) if p.strip()]
    line_frac, line_chars = _dup_fractions(lines)
    para_frac, para_chars = _dup_fractions(paras)
    if line_frac > cfg.max_dup_line_frac:
        fails.append("dup_line_frac")
    if para_frac > cfg.max_dup_para_frac:
        fails.append("dup_para_frac")
    if line_chars > cfg.max_dup_line_char_frac:
        fails.append("dup_line_char_frac")
    if para_chars > cfg.max_dup_para_char_frac:
        fails.append("dup_para_char_frac")
    words = _Words(words_of(text))
    for n, thr in zip((2, 3, 4), cfg.top_ngram_max_char_frac):
        if top_ngram_char_frac(words, n) > thr:
            fails.append(f"top_{n}gram")
    for n, thr in zip(range(5, 11), cfg.dup_ngram_max_char_frac):
        if dup_ngram_char_frac(words, n) > thr:
            fails.append(f"dup_{n}gram")
    return fails


def gopher(cfg: GopherConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Reject documents failing any Gopher rule; reason `gopher:<first failing rule>`."""
    for d in docs:
        fails = quality_failures(d.text, cfg)
        if cfg.repetition and len(words_of(d.text)) <= cfg.max_words:
            fails += repetition_failures(d.text, cfg)
        for f in fails:
            ctx.count(f"gopher.{f}")
        if fails:
            d.reject(f"gopher:{fails[0]}")
    return docs
