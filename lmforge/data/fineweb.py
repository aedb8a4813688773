"""FineWeb's additional heuristic filters (Penedo et al. 2024, "The FineWeb Datasets", Sec. 3.5), found
by comparing the statistics of high- and low-quality documents; defaults are FineWeb's thresholds.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.stage import StageContext

TERMINAL = (".", "!", "?", '"', "'", "”", "’", "…")


@dataclass(frozen=True, kw_only=True)
class FineWebConfig:
    """Reject when: share of lines ending in punctuation <= min_punct_lines_ratio; share of characters in
    duplicated lines >= max_dup_line_char_ratio; share of lines shorter than short_line_chars >=
    max_short_lines_ratio."""

    min_punct_lines_ratio: float = 0.12
    max_dup_line_char_ratio: float = 0.1
    short_line_chars: int = 30
    max_short_lines_ratio: float = 0.67

    def __post_init__(self) -> None:
        coerce_fields(self, "fineweb")  # each field's type, named when wrong
        for name in ("min_punct_lines_ratio", "max_dup_line_char_ratio", "max_short_lines_ratio"):
            v = getattr(self, name)
            check(0.0 <= v <= 1.0, f"fineweb.{name} must be in [0, 1], got {v}")


def fineweb_failures(text: str, cfg: FineWebConfig) -> list[str]:
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        return ["empty"]
    fails = []
    if sum(ln.endswith(TERMINAL) for ln in lines) / len(lines) <= cfg.min_punct_lines_ratio:
        fails.append("line_punct_ratio")
    seen: set[str] = set()
    dup_chars = 0
    for ln in lines:
        if ln in seen:
            dup_chars += len(ln)
        seen.add(ln)
    if dup_chars / max(sum(len(ln) for ln in lines), 1) >= cfg.max_dup_line_char_ratio:
        fails.append("dup_line_chars")
    if sum(len(ln) < cfg.short_line_chars for ln in lines) / len(lines) >= cfg.max_short_lines_ratio:
        fails.append("short_lines")
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
