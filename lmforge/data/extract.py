"""HTML -> main text with resiliparse (Bevendorff et al. 2018; the extractor FineWeb-style pipelines
use for speed), after charset detection on the raw bytes.

`main_content=True` applies resiliparse's boilerplate heuristics (navigation, footers, sidebars,
cookie banners are skipped); `preserve_formatting=True` keeps paragraph breaks, which the line- and
paragraph-level filters downstream (Gopher, C4, line dedup) rely on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.config import check
from lmforge.data.document import Document
from lmforge.data.stage import StageContext
from lmforge.errors import require

_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_\-:.]+)", re.I)
_META_CHARSET = re.compile(rb"<meta[^>]*charset\s*=\s*[\"']?([A-Za-z0-9_\-:.]+)", re.I)


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """main_content: drop boilerplate; fallback_full_text: when the main-content heuristics find
    nothing (they fail on some layouts), extract all visible text instead; min_chars: reject extractions shorter than this
    (`extract:empty`); max_html_bytes: reject larger pages unparsed (`extract:too_large`)."""

    main_content: bool = True
    fallback_full_text: bool = True
    preserve_formatting: bool = True
    links: bool = False
    min_chars: int = 1
    max_html_bytes: int = 10_000_000

    def __post_init__(self) -> None:
        check(self.min_chars >= 0, f"extract.min_chars must be >= 0, got {self.min_chars}")
        check(self.max_html_bytes > 0, f"extract.max_html_bytes must be > 0, got {self.max_html_bytes}")


def detect_charset(raw: bytes, content_type: str | None = None) -> str:
    """The charset to decode a page with, in order of trust: the HTTP Content-Type header; UTF-8 when
    the bytes are valid UTF-8 (statistical detectors mistake UTF-8 pages with little non-ASCII text for
    cp1252); a <meta charset> in the first 4 KiB; else resiliparse's detector."""
    import codecs

    declared = [m.group(1) for m in [_CHARSET.search(content_type or "")] if m]
    try:
        raw.decode("utf-8")
        declared.append("utf-8")
    except UnicodeDecodeError:
        declared += [m.group(1).decode("ascii", "replace") for m in [_META_CHARSET.search(raw[:4096])] if m]
    for name in declared:
        try:
            return codecs.lookup(name).name
        except LookupError:
            continue
    enc = require("resiliparse.parse.encoding", "data")
    return enc.detect_encoding(raw) or "utf-8"


def html_to_text(raw: bytes | str, cfg: ExtractConfig = ExtractConfig(), content_type: str | None = None
                 ) -> tuple[str, str]:
    """(text, charset) of one page."""
    enc = require("resiliparse.parse.encoding", "data")
    h2t = require("resiliparse.extract.html2text", "data")
    if isinstance(raw, bytes):
        charset = detect_charset(raw, content_type)
        html = enc.bytes_to_str(raw, charset)
    else:
        charset, html = "str", raw
    text = h2t.extract_plain_text(html, main_content=cfg.main_content,
                                  preserve_formatting=cfg.preserve_formatting, links=cfg.links).strip()
    if not text and cfg.main_content and cfg.fallback_full_text:
        text = h2t.extract_plain_text(html, main_content=False, preserve_formatting=cfg.preserve_formatting,
                                      links=cfg.links).strip()
    return text, charset


def extract(cfg: ExtractConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Fill `text` from `raw` for documents that have raw bytes; text-only documents pass through."""
    for d in docs:
        if d.raw is None:
            continue
        if len(d.raw) > cfg.max_html_bytes:
            d.reject("extract:too_large")
        else:
            try:
                d.text, d.meta["charset"] = html_to_text(d.raw, cfg, d.meta.get("content_type"))
            except Exception as e:  # resiliparse raises on pathological markup
                d.meta["error"] = f"{type(e).__name__}: {e}"[:200]
                d.reject("extract:parse_error")
        d.raw = None
        if d.drop is None and len(d.text) < max(cfg.min_chars, 1):
            d.reject("extract:empty")
    return docs
