"""FineWeb's additional heuristic filters (Penedo et al. 2024, "The FineWeb Datasets", Sec. 3.5), found
by comparing the statistics of high- and low-quality documents.

The rules, their order, comparisons and measures are those of the code that built FineWeb, datatrove's
`FineWebQualityFilter` (datatrove/pipeline/filters/fineweb_quality_filter.py): over the non-blank lines (not
stripped), reject when the share ending in terminal punctuation is < 0.12 (`line_punct_ratio`); when the share of
lines of at most 30 characters is > 0.67 (`short_lines`); when the characters of lines repeating an earlier line,
over the text's characters less its newlines, are > `max_dup_line_char_ratio` (`dup_line_chars`); when newlines
per word are > 0.3 (`list_ratio`; datatrove splits words with a language-aware tokenizer, lmforge on whitespace).

One threshold differs: the duplicated-line character share is the paper's 0.1, while datatrove's default is 0.01
(ten times stricter: one repeated "Share this article." line in a 2,000-character page rejects it). Set
`max_dup_line_char_ratio = 0.01` to reproduce datatrove's defaults (`DATATROVE = FineWebConfig(...)` below).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document, unix_line_ends
from lmforge.data.stage import StageContext

TERMINAL = (".", "!", "?", '"', "'", "”", "’", "…")


@dataclass(frozen=True, kw_only=True)
class FineWebConfig:
    """Reject when: share of lines ending in punctuation < min_punct_lines_ratio; share of lines of at most
    short_line_chars characters > max_short_lines_ratio; share of characters in repeated lines >
    max_dup_line_char_ratio; newlines per word > max_newline_word_ratio (a list, not prose)."""

    min_punct_lines_ratio: float = 0.12
    short_line_chars: int = 30
    max_short_lines_ratio: float = 0.67
    max_dup_line_char_ratio: float = 0.1  # the paper's; datatrove's default is 0.01 (see the module docstring)
    max_newline_word_ratio: float = 0.3

    def __post_init__(self) -> None:
        coerce_fields(self, "fineweb")  # each field's type, named when wrong
        for name in ("min_punct_lines_ratio", "max_dup_line_char_ratio", "max_short_lines_ratio"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0, f"fineweb.{name} must be in [0, 1], got {v}")
        check(self.max_newline_word_ratio >= 0, f"fineweb.max_newline_word_ratio must be >= 0, got "
              f"{self.max_newline_word_ratio}")


DATATROVE = FineWebConfig(max_dup_line_char_ratio=0.01)  # datatrove FineWebQualityFilter's defaults


def fineweb_failures(text: str, cfg: FineWebConfig) -> list[str]:
    """Names of the failing rules, in datatrove's order. Windows line ends count as "\n" (datatrove's text comes from
    its extractor, "\n" only; a CRLF text file or JSON field here had no line ending in punctuation: every line
    ended in "\r", and the document was rejected `line_punct_ratio`)."""
    text = unix_line_ends(text)
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if not lines:
        return ["empty"]
    fails = []
    if sum(ln.endswith(TERMINAL) for ln in lines) / len(lines) < cfg.min_punct_lines_ratio:
        fails.append("line_punct_ratio")
    if sum(len(ln) <= cfg.short_line_chars for ln in lines) / len(lines) > cfg.max_short_lines_ratio:
        fails.append("short_lines")
    seen: set[str] = set()
    dup_chars = 0
    for ln in lines:
        if ln in seen:
            dup_chars += len(ln)
        seen.add(ln)
    if dup_chars / max(len(text) - text.count("\n"), 1) > cfg.max_dup_line_char_ratio:
        fails.append("dup_line_chars")
    if text.count("\n") / max(len(text.split()), 1) > cfg.max_newline_word_ratio:
        fails.append("list_ratio")
    return fails


def fineweb(cfg: FineWebConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Reject documents failing a FineWeb rule; reason `fineweb:<first failing rule>`."""
    for d in docs:
        fails = fineweb_failures(d.text, cfg)
        for f in fails:
            ctx.count(f"fineweb.{f}")
        if fails:
            d.reject(f"fineweb:{fails[0]}")
    return docs
