"""Pre-tokenization for byte-level BPE: the split patterns, special-token splitting, and the places
where a text may be cut without changing how it is tokenized.

BPE merges never cross pre-token boundaries, so everything that parallelises or streams (training,
`encode_iterable`, the shard encoder) cuts text only at points that are pre-token boundaries whatever
follows, and encodes the pieces independently.
"""

from __future__ import annotations

import re as _re
import sys
from functools import lru_cache
from typing import AbstractSet, Iterable, Iterator

import regex

from lmforge.errors import ConfigError

# The regexes GPT-2 (r50k), GPT-4 (cl100k) and GPT-4o (o200k) split text with, as written in
# tiktoken's openai_public definitions (possessive quantifiers are only a speed-up: `\s++$|\s+(?!\S)|\s`
# splits exactly like GPT-2's original `\s+(?!\S)|\s+`).
PATTERNS: dict[str, str] = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "cl100k": (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
               r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""),
    "o200k": "|".join([
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""", r"""\s+""",
    ]),
}

# The same splits restricted to ASCII text, for Python's `re`, which runs them about 3x faster than
# `regex` runs the Unicode versions: on ASCII, \p{L} is [A-Za-z], \p{N} is [0-9] and \s is [\t-\r ]
# (\x1c-\x1f are not White_Space). Tests check both give the same pieces on random ASCII.
_W = r"\t\n\x0b\x0c\r "
_ASCII_PATTERNS: dict[str, str] = {
    PATTERNS["gpt2"]: (rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]++| ?[0-9]++| ?[^{_W}A-Za-z0-9]++|[{_W}]++$"""
                       rf"""|[{_W}]+(?![^{_W}])|[{_W}]"""),
    PATTERNS["cl100k"]: (rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]++|[0-9]{{1,3}}+"""
                         rf"""| ?[^{_W}A-Za-z0-9]++[\r\n]*+|[{_W}]++$|[{_W}]*[\r\n]|[{_W}]+(?![^{_W}])|[{_W}]"""),
}


@lru_cache(maxsize=16)
def ascii_pattern(pat: str) -> _re.Pattern | None:
    """The stdlib-`re` twin of a named pattern for pure-ASCII text (Python >= 3.11), else None."""
    if pat not in _ASCII_PATTERNS or sys.version_info < (3, 11):
        return None
    return _re.compile(_ASCII_PATTERNS[pat])


def findall(pat: str, text: str) -> list[str]:
    """Pre-tokens of `text` (no specials in it), through the ASCII twin when it applies."""
    fast = ascii_pattern(pat) if text.isascii() else None
    return (fast or compile_pattern(pat)).findall(text)


# A newline between two printable ASCII characters ("x\ny"), where the second is not "/", is a pre-token
# boundary for every named pattern, whatever comes before or after. Right of it: the newline itself is
# a one-character token whether or not the text ends after it (gpt2/cl100k `\s`, `\s++$`, `\s*[\r\n]`;
# o200k `\s*[\r\n]+`), since only whitespace-led alternatives match a newline and none of them goes on
# into a non-space. Left of it: no alternative runs from a non-space across a newline into a non-space,
# except o200k's ` ?[^\s\p{L}\p{N}]+[\r\n/]*`, which takes "\n/" after punctuation ("!\n/" is one
# pre-token), hence no "/" after the cut. Custom patterns get no such guarantee, so their text is only
# cut at special tokens and document ends.
# Windows line ends ("x\r\ny") have no such point (the "\r\n" at a text's end is one pre-token, "\r", "\n" inside),
# so a CRLF file was one chunk, read whole by one worker. There the cut goes before the "\r" when a letter or digit
# precedes it: no alternative runs from one across "\r" (letters and numbers stop there; only punctuation-led
# ones take "[\r\n]" after them), and a run of whitespace starting at "\r" splits the same whatever precedes it.
_SAFE_CUT = _re.compile(r"(?<=[!-~]\n)(?=[!-.0-~])|(?<=[A-Za-z0-9])(?=\r\n)")
_SAFE_CUT_BYTES = _re.compile(_SAFE_CUT.pattern.encode())


def resolve_pattern(pattern: str) -> str:
    """A pattern name ("gpt2", "cl100k", "o200k") or a custom regex -> the regex string. A bare word that is not
    a name is refused: as a regex it matches only itself, so the text between matches (whole lines, spaces and
    all) would be one pre-token each, and a typo (`--pattern gpt4`, `cl100k_base`, `gpt-4`) trained such a tokenizer."""
    if not isinstance(pattern, str):
        raise ConfigError(f"pre-tokenization pattern must be a str (a name or a regex), got {type(pattern).__name__}")
    # a name-like word (`gpt-4`, `o200k-base` too); "." or "..." (every 1 or 3 characters a piece) stay regexes
    if pattern not in PATTERNS and _re.fullmatch(r"[\w.-]+", pattern) and _re.search(r"[^\W_]", pattern):
        import difflib
        close = difflib.get_close_matches(pattern.lower(), PATTERNS, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"pre-tokenization pattern {pattern!r} is not one of the names {list(PATTERNS)}; {hint}"
                          "give one of them or a regex")
    pat = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pat)
    except regex.error as e:
        raise ConfigError(f"pre-tokenization pattern {pattern!r} is not a valid regex: {e}") from e
    return pat


def pieces_pattern(pat: str) -> str:
    """`pat` extended so that each stretch of text between two of its matches is a piece too, as in HF's
    Split(behavior="isolated"): no text is lost (tiktoken drops such gaps). One regex, for tiktoken's fast
    path; right only for a pattern that never matches the empty string (`can_match_empty`). The named patterns
    match every character, so they stay as they are: tiktoken gets exactly the regex it was written for."""
    if pat in PATTERNS.values():
        return pat
    return rf"(?:{pat})|(?:(?!(?:{pat}))[\s\S])+"


def can_match_empty(pat: str) -> bool:
    """Whether `pat` may match the empty string somewhere: its smallest width, as the stdlib parser reads it
    with `\\p{..}` classes taken for one character each, is 0. True when that parser cannot read it (syntax
    only the `regex` module has): the safe answer, which only costs the tiktoken fast path."""
    if pat in PATTERNS.values():
        return False
    try:
        parser = __import__("re._parser" if sys.version_info >= (3, 11) else "sre_parse", fromlist=["parse"])
        return parser.parse(_re.sub(r"\\[pP](?:\{[^}]*\}|[A-Za-z])", r"\\w", pat)).getwidth()[0] == 0
    except Exception:  # noqa: BLE001 - any parse failure means "unknown"
        return True


def wraps_alone(pat: str) -> bool:
    """Whether `pieces_pattern(pat)`, one regex, splits as `_Pieces` does (the tiktoken fast path's condition):
    `pat` never matches empty, and holds no back-reference (the wrapper repeats `pat`, so a numbered or named
    reference in its second copy would point at the first copy's group, which never matched there)."""
    return not can_match_empty(pat) and not _BACKREFERENCE.search(pat)


_BACKREFERENCE = _re.compile(r"\\[1-9]|\\g<|\(\?P=|\\k<")


class _Pieces:
    """The pieces of a custom pattern, as HF's Split(behavior="isolated") cuts them: each non-empty match,
    and each stretch between two match boundaries (an empty match is a boundary too: `x?` isolates every
    character). Whole matches, whatever groups the pattern captures (`findall` would give the groups)."""

    def __init__(self, pat: str):
        self.regex = regex.compile(pat)

    def findall(self, text: str) -> list[str]:
        out, last, pos = [], 0, 0
        while pos <= len(text) and (m := self.regex.search(text, pos)) is not None:
            start, end = m.span()
            if start > last:
                out.append(text[last:start])
            if end > start:
                out.append(text[start:end])
            last = end
            # after an empty match the next starts one character on, as in Oniguruma and Rust's regex (Python's
            # finditer would retry the same position for a non-empty match: `(?:ab)*|\\w*` took "cabc" whole)
            pos = end if end > start else end + 1
        if last < len(text):
            out.append(text[last:])
        return out


@lru_cache(maxsize=16)
def compile_pattern(pat: str) -> regex.Pattern | _Pieces:
    """The splitter of `pat` (`.findall(text)` -> pre-tokens): a named pattern's regex, or a custom pattern's
    matches and the gaps between them (`_Pieces`)."""
    return regex.compile(pat) if pat in PATTERNS.values() else _Pieces(pat)


# Llama-3's split (its tokenizer.json Split regex as `hf_json.read_hf` reads it): a custom pattern, not cl100k's (it
# splits trailing whitespace otherwise), but the `_SAFE_CUT` argument holds for it word for word (its punctuation run
# takes "[\r\n]*" after it, no "/"), so a Llama-3 corpus is cut into chunks too: it was one chunk per file, read
# whole by one worker. The tests check its cuts as they check the named patterns'.
LLAMA3 = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
          r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def has_safe_cuts(pat: str) -> bool:
    """Whether `_SAFE_CUT` points are pre-token boundaries for this regex (true for the named ones and Llama-3's)."""
    return pat in PATTERNS.values() or pat == LLAMA3


def check_specials(special_tokens: Iterable[str] | None) -> list[str]:
    """Validate special tokens: non-empty strings, no duplicates. Returns them as a list."""
    if isinstance(special_tokens, str):  # (iterated, "<pad>" would be five one-character specials)
        raise ConfigError(f"special tokens are a list of strings, got the single string {special_tokens!r}: "
                          f"pass [{special_tokens!r}]")
    out: list[str] = []
    for s in special_tokens or ():
        if not isinstance(s, str) or not s:
            raise ConfigError(f"special tokens must be non-empty strings, got {s!r}")
        if s in out:
            raise ConfigError(f"special token {s!r} is given twice")
        out.append(s)
    return out


@lru_cache(maxsize=64)
def special_regex(specials: tuple[str, ...]) -> _re.Pattern | None:
    """Alternation of the specials, longest first: Python's regex alternation is leftmost-first, so
    ordering by length makes `<|a|><|a|>` win over `<|a|>` when both are registered."""
    if not specials:
        return None
    ordered = sorted(specials, key=lambda s: (-len(s), s))
    return _re.compile("|".join(_re.escape(s) for s in ordered))


def split_specials(text: str, specials: tuple[str, ...],
                   keep: AbstractSet[str] | None = None) -> Iterator[tuple[str, bool]]:
    """Yield (segment, is_special) in order; ordinary segments may be empty-free, specials are whole. keep: the
    specials whose matches are yielded as such (None: all); a match of another is text, and no special inside it is
    matched (HF's encode_special_tokens: a special token's text "<|a|>" is text whole, its "<|a" no added token)."""
    rx = special_regex(specials) if keep is None or keep else None
    if rx is None:
        if text:
            yield text, False
        return
    pos = 0
    for m in rx.finditer(text):
        if keep is not None and m.group() not in keep:
            continue
        if m.start() > pos:
            yield text[pos:m.start()], False
        yield m.group(), True
        pos = m.end()
    if pos < len(text):
        yield text[pos:], False


def safe_pieces(text: str, pat: str) -> list[str]:
    """Cut ordinary text (no specials) at safe boundaries; the pieces pre-tokenize independently."""
    if not has_safe_cuts(pat):
        return [text]
    return _SAFE_CUT.split(text)


def last_safe_cut(text: str, pat: str, specials: tuple[str, ...], end: int, line_cuts: bool = True) -> int:
    """The largest cut position p <= end such that `text[:p]` and `text[p:]` encode independently to
    the same ids as `text`, whatever characters later follow `text`; 0 when there is none.

    `end` must leave room for the longest special after it, so every special match that starts
    before `end` is already complete in `text` (a longer special cannot extend past the end).
    line_cuts: whether line ends (`_SAFE_CUT`) may be cut too (not where an added token matched after `specials`,
    in the text between them, may hold a line end).
    """
    cuts: list[int] = []
    spans: list[tuple[int, int]] = []
    rx = special_regex(specials)
    if rx is not None:
        for m in rx.finditer(text, 0, len(text)):
            if m.start() >= end:
                break
            spans.append((m.start(), m.end()))
            cuts.append(m.end())
    if line_cuts and has_safe_cuts(pat):
        for m in _SAFE_CUT.finditer(text, max(0, end - (1 << 16)), end):
            p = m.start()
            if not any(s < p < e for s, e in spans):
                cuts.append(p)
    return max(cuts, default=0)


def _specials_nest(specials: tuple[str, ...]) -> bool:
    """True when some special occurs inside another one after its first character; then the start
    of a special occurrence is not necessarily where a special match starts."""
    return any(s in t[1:] for s in specials for t in specials)


def safe_byte_cut(data: bytes, start: int, pat: str, specials: tuple[str, ...]) -> int:
    """First position >= start in `data` where the byte stream may be cut: the start of a special
    token, or (named patterns) just after a newline between printable ASCII bytes, the second not "/",
    or before a "\r\n" after a letter or digit (see `_SAFE_CUT`). -1 if none."""
    best = -1
    for s in () if _specials_nest(specials) else specials:
        i = data.find(s.encode("utf-8"), start)
        if i != -1 and (best == -1 or i < best):
            best = i
    if has_safe_cuts(pat):
        m = _SAFE_CUT_BYTES.search(data, start)  # (the lookbehind sees the byte before `start`)
        if m is not None and (best == -1 or m.start() < best):
            best = m.start()
    return best
