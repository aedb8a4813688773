"""Streaming readers: plain text, JSONL (plain, .gz, .zst), Parquet, HTML files, WARC/WET archives.

Every reader yields `Document`s one at a time and never raises on bad input: a line that is not JSON,
a record that cannot be decoded, or an archive cut off mid-stream becomes a document rejected with a
`read_error:*` reason, so the pipeline report accounts for it (issue 6, "nothing lost").
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from lmforge.data.document import Document, stable_id
from lmforge.errors import DataError, require

FORMATS = ("text", "jsonl", "parquet", "html", "warc")


def detect_format(path: str | Path) -> str:
    """Guess a reader from the file name (compression suffixes are looked through)."""
    name = Path(path).name.lower()
    for suffix in (".gz", ".zst", ".zstd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".html", ".htm")):
        return "html"
    if name.endswith((".warc", ".wet", ".arc")):
        return "warc"
    return "text"


def open_binary(path: str | Path) -> BinaryIO:
    """Open a file for reading, decompressing .gz and .zst transparently."""
    path = Path(path)
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if path.name.endswith((".zst", ".zstd")):
        zstd = require("zstandard", "data")
        raw = zstd.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True)
        return io.BufferedReader(raw)  # type: ignore[arg-type]  # adds line iteration
    return open(path, "rb")


def decode_text(data: bytes) -> tuple[str, int]:
    """UTF-8 decode that never fails: undecodable bytes become U+FFFD; returns (text, n_bad_bytes)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - data.count("\ufffd".encode())


def _error_doc(path: Path, where: str, reason: str, err: BaseException | None = None) -> Document:
    meta: dict[str, Any] = {"source": str(path), "where": where}
    if err is not None:
        meta["error"] = f"{type(err).__name__}: {err}"[:300]
    return Document(id=stable_id(str(path), where, reason), meta=meta, drop=f"read_error:{reason}")


def read_text(path: str | Path, *, unit: str = "file") -> Iterator[Document]:
    """Plain text: the whole file is one document (unit="file"), or one per line / blank-line paragraph."""
    path = Path(path)
    try:
        with open_binary(path) as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        yield _error_doc(path, "file", "truncated_archive" if isinstance(e, (EOFError, zlib.error)) else "io", e)
        return
    text, bad = decode_text(data)
    if unit != "file":  # Windows line ends split like Unix ones
        text = text.replace("\r\n", "\n")
    pieces = [text] if unit == "file" else (text.split("\n") if unit == "line" else text.split("\n\n"))
    for i, piece in enumerate(pieces):
        if unit != "file" and not piece.strip():
            continue
        meta: dict[str, Any] = {"source": str(path)}
        if bad:
            meta["decode_errors"] = bad
        yield Document(id=stable_id(str(path), str(i)), text=piece, meta=meta)


def _json_doc(path: Path, lineno: int, line: bytes, text_key: str, id_key: str) -> Document:
    text, bad = decode_text(line)
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        return _error_doc(path, f"line {lineno}", "bad_json", e)
    # a null text reads as "", as a null in a Parquet text column does
    if not isinstance(rec, dict) or not isinstance(rec.get(text_key), (str, type(None))):
        return _error_doc(path, f"line {lineno}", "bad_record")
    # a record lmforge wrote (Document.to_record: id, text, a dict meta, drop) keeps its drop reason; in
    # anyone else's records "drop" and a non-dict "meta" are ordinary fields
    ours = isinstance(rec.get("meta"), dict)
    meta = dict(rec["meta"]) if ours else {}
    meta.update({k: v for k, v in rec.items() if k not in (text_key, id_key) and not (ours and k in ("meta", "drop"))})
    meta.setdefault("source", str(path))
    if bad:
        meta["decode_errors"] = bad
    doc_id = rec.get(id_key)
    drop = rec.get("drop") if ours and isinstance(rec.get("drop"), str) else None
    return Document(id=str(doc_id) if doc_id is not None else stable_id(str(path), str(lineno)),
                    text=rec.get(text_key) or "", meta=meta, drop=drop)


def read_jsonl(path: str | Path, *, text_key: str = "text", id_key: str = "id") -> Iterator[Document]:
    """JSON Lines, optionally .gz or .zst. Other top-level keys go into `meta`."""
    path = Path(path)
    lineno = 0
    try:
        with open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                if lineno == 1:  # a UTF-8 byte-order mark (Windows editors write one) is no part of the JSON
                    line = line.removeprefix(b"\xef\xbb\xbf")
                if line.strip():
                    yield _json_doc(path, lineno, line, text_key, id_key)
    except (OSError, EOFError, zlib.error) as e:
        yield _error_doc(path, f"after line {lineno}", "truncated_archive", e)
    except Exception as e:  # zstandard raises its own ZstdError on a cut stream
        yield _error_doc(path, f"after line {lineno}", "truncated_archive", e)


def read_parquet(path: str | Path, *, text_key: str = "text", id_key: str = "id",
                 batch_size: int = 1024) -> Iterator[Document]:
    """Parquet, streamed by record batches. A `meta` column holding JSON strings is parsed back."""
    pq = require("pyarrow.parquet", "data")
    path = Path(path)
    row = 0
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=batch_size):
            for rec in batch.to_pylist():
                text = rec.get(text_key)
                if text is not None and not isinstance(text, str):  # e.g. an integer column
                    yield _error_doc(path, f"row {row}", "bad_record",
                                     TypeError(f"column {text_key!r} holds {type(text).__name__}, not text"))
                    row += 1
                    continue
                meta = rec.pop("meta", None)
                meta = json.loads(meta) if isinstance(meta, str) else dict(meta or {})
                drop = rec.pop("drop", None)
                meta.update({k: v for k, v in rec.items() if k not in (text_key, id_key)})
                meta.setdefault("source", str(path))
                doc_id = rec.get(id_key)
                yield Document(id=str(doc_id) if doc_id is not None else stable_id(str(path), str(row)),
                               text=text or "", meta=meta, drop=drop if isinstance(drop, str) else None)
                row += 1
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a corrupt or cut file
        yield _error_doc(path, f"after row {row}", "corrupt_parquet", e)


def read_html(path: str | Path) -> Iterator[Document]:
    """One HTML file = one document whose `raw` bytes the extract stage turns into text."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        yield _error_doc(path, "file", "io", e)
        return
    yield Document(id=stable_id(str(path)), raw=data, meta={"source": str(path), "content_type": "text/html"})


def read_warc(path: str | Path, *, record_types: tuple[str, ...] = ("response", "conversion", "resource")
              ) -> Iterator[Document]:
    """WARC (raw HTML responses) and WET (extracted text, `conversion` records) via warcio."""
    warcio = require("warcio.archiveiterator", "data")
    path = Path(path)
    n = 0
    try:
        with open(path, "rb") as f:
            for rec in warcio.ArchiveIterator(f):
                if rec.rec_type not in record_types:
                    continue
                yield _warc_doc(path, rec, n)
                n += 1
    except Exception as e:  # warcio: ArchiveLoadFailed, EOFError or zlib.error on a cut archive
        yield _error_doc(path, f"after record {n}", "truncated_archive", e)


def _warc_doc(path: Path, rec: Any, n: int) -> Document:
    headers = rec.rec_headers
    url = headers.get_header("WARC-Target-URI") or ""
    rid = headers.get_header("WARC-Record-ID") or stable_id(str(path), str(n))
    payload = rec.content_stream().read()
    meta: dict[str, Any] = {"source": str(path), "url": url, "warc_type": rec.rec_type}
    if getattr(rec.raw_stream, "limit", 0) > 0:  # fewer bytes than the record's Content-Length
        meta["missing_bytes"] = rec.raw_stream.limit
        return Document(id=rid.strip("<>"), meta=meta, drop="read_error:truncated_archive")
    if rec.rec_type == "conversion":
        text, bad = decode_text(payload)
        if bad:
            meta["decode_errors"] = bad
        return Document(id=rid.strip("<>"), text=text, meta=meta)
    ctype = rec.http_headers.get_header("Content-Type") if rec.http_headers else None
    meta["content_type"] = ctype or headers.get_header("Content-Type") or ""
    return Document(id=rid.strip("<>"), raw=payload, meta=meta)


READERS: dict[str, Callable[..., Iterator[Document]]] = {
    "text": read_text, "jsonl": read_jsonl, "parquet": read_parquet, "html": read_html, "warc": read_warc,
}


def read_documents(path: str | Path, fmt: str = "auto", **options: Any) -> Iterator[Document]:
    """Stream documents from one file with the reader for `fmt` ("auto" guesses from the name)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in READERS:
        raise DataError(f"unknown input format {fmt!r}; choose one of {', '.join(FORMATS)} or 'auto'")
    return READERS[fmt](path, **options)


def iter_bytes(data: bytes) -> BinaryIO:
    """In-memory binary stream (used by tests and the Ray executor)."""
    return io.BytesIO(data)
