"""HTML -> main text, after charset detection on the raw bytes, with one of two backends:

- "resiliparse" (default): resiliparse's fast DOM (Bevendorff et al. 2018) plus lmforge's own
  boilerplate rules (`boilerplate.py`: comment sections, related-article boxes, share widgets,
  sidebars, navigation, by structure, link density, class/id vocabularies and position), then
  resiliparse's text rendering with its main-content heuristics;
- "trafilatura" (Barbaric 2021), the extractor FineWeb and datatrove use, slower and often the
  reference extraction users compare against (`pip install 'lmforge[data]'`).

`main_content=False` keeps all visible text (menus and tag lists included), as a reference full-text
extraction does; `preserve_formatting=True` keeps paragraph breaks, which the line- and
paragraph-level filters downstream (Gopher, C4, line dedup) rely on. Bytes that are not HTML (binary
files, and WARC responses whose Content-Type names another type: PDFs, JSON, scripts, images) are rejected
`extract:not_html` before parsing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.readers import BOMS, looks_binary
from lmforge.data.stage import StageContext
from lmforge.errors import LmforgeError, require

_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_\-:.]+)", re.I)
BACKENDS = ("resiliparse", "trafilatura")
# when the rules leave less than GUARD_SHARE of resiliparse's own main text (and under GUARD_CHARS),
# a rule hid the article (a wrapper named "...-comments-..."): resiliparse's text is used instead
GUARD_CHARS, GUARD_SHARE = 500, 0.3
_META_CHARSET = re.compile(rb"<meta[^>]*charset\s*=\s*[\"']?([A-Za-z0-9_\-:.]+)", re.I)


@dataclass(frozen=True, kw_only=True)
class ExtractConfig:
    """backend: "resiliparse" (lmforge's rules on resiliparse's DOM) or "trafilatura"; main_content:
    drop boilerplate; boilerplate_rules: apply lmforge's rules before resiliparse's own main-content
    heuristics (False = resiliparse alone); fallback_full_text: when the main-content heuristics find
    nothing (they fail on some layouts), extract all visible text instead; min_chars: reject
    extractions shorter than this (`extract:empty`); max_html_bytes: reject larger pages unparsed
    (`extract:too_large`)."""

    backend: str = "resiliparse"
    main_content: bool = True
    boilerplate_rules: bool = True
    fallback_full_text: bool = True
    preserve_formatting: bool = True
    links: bool = False
    min_chars: int = 1
    max_html_bytes: int = 10_000_000

    def __post_init__(self) -> None:
        coerce_fields(self, "extract")  # each field's type, named when wrong
        check(self.backend in BACKENDS, f"extract.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        check(self.min_chars >= 0, f"extract.min_chars must be >= 0, got {self.min_chars}")
        check(self.max_html_bytes > 0, f"extract.max_html_bytes must be > 0, got {self.max_html_bytes}")


def detect_charset(raw: bytes, content_type: str | None = None) -> str:
    """The charset to decode a page with, in order of trust: a byte-order mark; the HTTP Content-Type
    header; UTF-8 when the bytes are valid UTF-8 (statistical detectors mistake UTF-8 pages with little
    non-ASCII text for cp1252); a <meta charset> in the first 4 KiB; else resiliparse's detector.

    Declared labels go through the WHATWG Encoding Standard's label table (resiliparse's
    `map_encoding_to_html5`), as browsers do: iso-8859-1, latin1 and us-ascii decode as windows-1252, whose
    0x80-0x9F bytes are the curly quotes, dashes and euro sign such pages mean, not C1 control characters;
    iso-8859-9 as windows-1254, gb2312 as gbk. Unknown labels are skipped."""
    import codecs

    enc = require("resiliparse.parse.encoding", "data")
    for bom, name in BOMS:  # a header or <meta> that disagrees with a byte-order mark is stale
        if raw.startswith(bom):
            return name
    declared = [(m.group(1), False) for m in [_CHARSET.search(content_type or "")] if m]
    try:
        raw.decode("utf-8")
        declared.append(("utf-8", False))
    except UnicodeDecodeError:
        declared += [(m.group(1).decode("ascii", "replace"), True) for m in [_META_CHARSET.search(raw[:4096])] if m]
    for label, in_meta in declared:
        name = enc.map_encoding_to_html5(label, fallback_utf8=False)
        if name is None:
            continue
        if in_meta and name.startswith("utf-16"):  # a <meta> readable as ASCII is not UTF-16 (WHATWG prescan)
            name = "utf-8"
        return codecs.lookup(name).name
    return enc.detect_encoding(raw) or "utf-8"


# A response declaring a type other than HTML (a crawl's PDFs, JSON, scripts, feeds, images) is no page (datatrove's
# WARC reader keeps text/html only). Any type naming html is one (text/html, application/xhtml+xml, a header sent twice:
# "text/html, text/html"), and so is an undeclared type (""), as read_html says of .html files.
_HTML_START = re.compile(rb"\s*(<!--.*?-->\s*)*<(!doctype\s+html|html)[\s>]", re.I | re.S)


def not_html_type(raw: bytes, content_type: str | None) -> str:
    """The declared MIME type when it is not HTML and the bytes do not open as an HTML document either (a
    mislabelled page is still a page); '' for a page."""
    mime = (content_type or "").split(";")[0].strip().lower()
    if not mime or "html" in mime or _HTML_START.match(raw[:4096].removeprefix(b"\xef\xbb\xbf")):
        return ""
    return mime


def decode_html(raw: bytes | str, content_type: str | None = None) -> tuple[str, str]:
    """(html string, charset) of a page given as bytes or an already-decoded string."""
    if isinstance(raw, str):
        return raw, "str"
    enc = require("resiliparse.parse.encoding", "data")
    charset = detect_charset(raw, content_type)
    return enc.bytes_to_str(raw, charset), charset


def _resiliparse_text(html: str, cfg: ExtractConfig) -> str:
    h2t = require("resiliparse.extract.html2text", "data")
    opts = dict(preserve_formatting=cfg.preserve_formatting, links=cfg.links)
    if not cfg.main_content:
        return h2t.extract_plain_text(html, main_content=False, **opts).strip()
    if not cfg.boilerplate_rules:
        text = h2t.extract_plain_text(html, main_content=True, **opts).strip()
        if not text and cfg.fallback_full_text:
            text = h2t.extract_plain_text(html, main_content=False, **opts).strip()
        return text
    from lmforge.data.boilerplate import headline, mark_boilerplate

    text = h2t.extract_plain_text(mark_boilerplate(html), main_content=True, comments=False, **opts).strip()
    if len(text) < GUARD_CHARS:  # did a rule hide the article itself? compare with resiliparse alone
        plain = h2t.extract_plain_text(html, main_content=True, **opts).strip()
        text = plain if len(text) < GUARD_SHARE * len(plain) else text
    if not text and cfg.fallback_full_text:
        text = h2t.extract_plain_text(html, main_content=False, **opts).strip()
    title = headline(html)  # resiliparse's main-content pass sometimes drops the article's h1
    if title and " ".join(title.split()) not in " ".join(text.split()):
        text = f"{title}\n\n{text}"
    return text


def _trafilatura_text(html: str, cfg: ExtractConfig) -> str:
    traf = require("trafilatura", "data")
    if not cfg.main_content:
        return traf.html2txt(html).strip()
    text = traf.extract(html, include_comments=False, include_tables=True, include_links=cfg.links) or ""
    if not text.strip() and cfg.fallback_full_text:
        text = traf.html2txt(html)
    return text.strip()


def html_to_text(raw: bytes | str, cfg: ExtractConfig = ExtractConfig(), content_type: str | None = None
                 ) -> tuple[str, str]:
    """(text, charset) of one page."""
    html, charset = decode_html(raw, content_type)
    text = (_trafilatura_text if cfg.backend == "trafilatura" else _resiliparse_text)(html, cfg)
    return text, charset


def extract(cfg: ExtractConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Fill `text` from `raw` for documents that have raw bytes; text-only documents pass through.
    `meta.extractor` records the backend, and the run report counts `extract.backend.<name>`."""
    for d in docs:
        if d.raw is None:
            continue
        if len(d.raw) > cfg.max_html_bytes:
            d.reject("extract:too_large")
        elif looks_binary(d.raw):
            d.meta["error"] = f"{d.meta.get('source', d.id)}: not an HTML page (binary content)"
            d.reject("extract:not_html")
        elif mime := not_html_type(d.raw, d.meta.get("content_type")):
            where = d.meta.get("url") or d.meta.get("source", d.id)
            d.meta["error"] = f"{where}: not an HTML page (Content-Type {mime})"
            d.reject("extract:not_html")
        else:
            try:
                d.text, d.meta["charset"] = html_to_text(d.raw, cfg, d.meta.get("content_type"))
                d.meta["extractor"] = cfg.backend
                ctx.count(f"extract.backend.{cfg.backend}")
            except LmforgeError:
                raise  # a missing optional dependency: one line for the user, not a rejected document
            except Exception as e:  # parsers raise on pathological markup
                d.meta["error"] = f"{type(e).__name__}: {e}"[:200]
                d.reject("extract:parse_error")
        d.raw = None
        if d.drop is None and len(d.text) < max(cfg.min_chars, 1):
            d.reject("extract:empty")
    return docs
