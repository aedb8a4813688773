"""Streaming readers: plain text, JSONL (plain, .gz, .zst), Parquet, HTML files, WARC/WET archives.

Every reader yields `Document`s one at a time and never raises on bad input: a line that is not JSON,
a record that cannot be decoded, or an archive cut off mid-stream becomes a document rejected with a
`read_error:*` reason, so the pipeline report accounts for it (issue 6, "nothing lost").

Text (text files, JSON Lines, WET records) is UTF-8, or the encoding a byte-order mark names; bytes that are not
UTF-8 are read as Windows-1252, the code page of Latin-1 files, and counted in `meta.decode_errors` (`decode_text`).
"""

from __future__ import annotations

import base64
import datetime
import gzip
import io
import json
import re
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, NamedTuple

from lmforge.data.document import Document, stable_id, unix_line_ends
from lmforge.errors import DataError, require

FORMATS = ("text", "jsonl", "parquet", "html", "warc")


# compression suffix -> codec; names are matched lower-cased, so FILE.JSONL.GZ reads as file.jsonl.gz does
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}


def compression(path: str | Path) -> str | None:
    """The codec a file name's suffix names ("gzip", "zstd"), any case, or None for an uncompressed file."""
    return COMPRESSIONS.get(Path(path).suffix.lower())


def uncompressed_name(path: str | Path) -> str:
    """A file's name lower-cased, less its compression suffix (Page.HTML.gz -> page.html): what names its
    format. The one place lmforge.data looks through compression suffixes."""
    name = Path(path).name.lower()
    return name[: -len(Path(name).suffix)] if compression(name) else name


def detect_format(path: str | Path) -> str:
    """Guess a reader from the file name (compression suffixes are looked through)."""
    name = uncompressed_name(path)
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".html", ".htm")):
        return "html"
    if name.endswith((".warc", ".wet", ".arc")):
        return "warc"
    return "text"


class CorruptArchive(ValueError):
    """A compressed input whose bytes do not decode (not a cut: a damaged or mislabelled file)."""


class _ZstdFrames(io.RawIOBase):
    """A zstd file decoded frame after frame (a streaming writer emits one frame per chunk). Raises EOFError when
    the input ends inside a frame: zstandard's stream_reader returns the bytes it has and no error there, so a
    file cut by a killed download read as a shorter, valid one."""

    def __init__(self, f: BinaryIO, zstd: Any):
        self._f, self._zstd = f, zstd
        self._dec: Any = None  # the decompressor of the frame being read; None between frames
        self._out, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while self._pos == len(self._out):
            data = self._f.read(1 << 16)
            if not data:
                if self._dec is not None:
                    raise EOFError("zstd input ends inside a frame (the file is truncated)")
                return 0
            self._out, self._pos = self._decode(data), 0
        n = min(len(b), len(self._out) - self._pos)
        b[:n] = self._out[self._pos:self._pos + n]
        self._pos += n
        return n

    def _decode(self, data: bytes) -> bytes:
        parts = []
        while data:
            if self._dec is None:
                self._dec = self._zstd.ZstdDecompressor().decompressobj()
            try:
                parts.append(self._dec.decompress(data))
            except self._zstd.ZstdError as e:
                raise CorruptArchive(f"zstd: {e}") from e
            if not self._dec.eof:
                break
            data, self._dec = self._dec.unused_data, None  # the next frame starts in the same chunk
        return b"".join(parts)

    def close(self) -> None:
        self._f.close()
        super().close()


class NotCompressed(CorruptArchive):
    """A file whose name and bytes disagree on its compression: named as compressed (.gz, .zst) and plain, or
    compressed and named plain (`_check_magic`); the fix is a rename."""


# what a damaged or cut compressed file raises while it is read: gzip's EOFError/BadGzipFile/zlib.error, ours
ARCHIVE_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, CorruptArchive)

# the first bytes of every gzip member (RFC 1952, 2.3.1) and zstd frame (RFC 8878, 3.1.1); a zstd stream may also
# open with a skippable frame (3.1.2: magic 0x184D2A50-5F, little-endian; pzstd writes one first)
MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}
SUFFIX = {"gzip": ".gz", "zstd": ".zst"}


def _opens_as(head: bytes, codec: str) -> bool:
    """Whether `head` (a file's first bytes) may open a `codec` stream, as far as it goes."""
    n = min(len(head), len(MAGIC[codec]))
    if head[:n] == MAGIC[codec][:n]:
        return True
    return codec == "zstd" and 0x50 <= head[0] <= 0x5F and head[1:4] == b"\x2a\x4d\x18"[:len(head) - 1]


def _check_magic(path: Path, codec: str | None, head: bytes) -> None:
    """Raise NotCompressed for a file whose name says `codec` and whose first bytes (`head`, 4 of them where the file
    has them) say otherwise, which the decompressor would report as damage ("BadGzipFile: Not a gzipped file") when
    renaming is the fix: to the suffix of the codec its bytes do open (gzip named .zst), else with the suffix
    dropped. An empty file, or one shorter than the magic number that matches as far as it goes, is left to the
    decompressor. A file named plain (codec None) whose first 4 bytes open a gzip or zstd stream is told to take
    that codec's suffix: read as it is, its compressed bytes were a `bad_json` record per "line", or a document of
    them kept."""
    if codec is None:
        found = next((c for c in MAGIC if len(head) == 4 and _opens_as(head, c)), None)
        if found is not None:
            raise NotCompressed(f"{path}: {found}-compressed, but its name says plain (it starts with {head!r}); "
                                f"rename it to {path.name + SUFFIX[found]}")
        return
    if not head or _opens_as(head, codec):
        return
    base = path.name[: -len(path.suffix)]
    other = next((c for c in MAGIC if c != codec and _opens_as(head, c)), None)
    what = f"{other}-compressed, not {codec} as its name says" if other else f"not {codec}-compressed despite its name"
    raise NotCompressed(f"{path}: {what} (it starts with {head!r}); rename it to {base + SUFFIX.get(other, '')}")


def archive_reason(e: BaseException) -> str:
    """The read_error reason for an exception met while reading a file."""
    if isinstance(e, (CorruptArchive, gzip.BadGzipFile)):
        return "corrupt_archive"
    if isinstance(e, (EOFError, zlib.error)):
        return "truncated_archive"
    return "io"


def open_binary(path: str | Path) -> BinaryIO:
    """Open a file for reading, decompressing .gz and .zst transparently. A cut file raises EOFError and a
    damaged one CorruptArchive (or gzip's BadGzipFile / zlib.error) when the bad part is read; a plain file named
    as compressed raises NotCompressed here."""
    path = Path(path)
    codec = compression(path)
    f = open(path, "rb")
    try:  # the magic read through the handle returned (peek: nothing consumed), not by opening the file again
        _check_magic(path, codec, f.peek(4)[:4])
        if codec == "zstd":
            return io.BufferedReader(_ZstdFrames(f, require("zstandard", "data")))  # type: ignore[return-value]
    except BaseException:
        f.close()
        raise
    if codec == "gzip":
        f.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return f


# Byte-order marks, longest first: a BOM decides the encoding before any declaration (WHATWG Encoding Standard,
# "decode", and HTML's "determining the character encoding", step 1). Windows editors save "Unicode" text as UTF-16
# with one: read as UTF-8 it became a NUL between every two characters, kept as a document.
BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe", "utf-16-le"), (b"\xfe\xff", "utf-16-be"))
_BOM_STARTS = frozenset(bom[:1] for bom, _ in BOMS)


# the control bytes that say "binary" when they are more than 5% of a head: C0 less NUL (alone decisive) and those text
# holds - tab, line ends, and what a terminal log keeps: ESC of its colour codes, backspace, form feed
_BINARY_CONTROLS = bytes(c for c in range(1, 32) if c not in (0x08, 0x09, 0x0A, 0x0C, 0x0D, 0x1B))


def looks_binary(raw: bytes) -> bool:
    """True for bytes that are no text: NUL bytes or many control characters in the first 4 KiB (images,
    archives, PDFs, token ids renamed .html or .txt). A head under 64 bytes is judged by NUL alone (one control
    byte made "hi\\x01" binary). UTF-16 text with a byte-order mark is text."""
    head = raw[:4096]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return False
    if b"\0" in head:
        return True
    control = len(head) - len(head.translate(None, _BINARY_CONTROLS))
    return len(head) >= 64 and control > len(head) // 20


def _mostly_binary(head: bytes) -> bool:
    """Whether most bytes of the non-blank lines of a head are in lines that look binary: a text file read by line
    with one line of NULs is text less that line, random bytes or token ids are binary (their short lines that hold
    no NUL are a few % of them)."""
    lines = [line for line in head.split(b"\n") if line.strip()]
    text = sum(len(line) for line in lines if not looks_binary(line))
    return 2 * text < sum(map(len, lines))


def _windows_1252_char(b: int) -> str:
    try:
        return bytes([b]).decode("cp1252")
    except UnicodeDecodeError:  # 0x81, 0x8D, 0x8F, 0x90, 0x9D: undefined in cp1252, the C1 controls in WHATWG's table
        return chr(b)


# a byte that is not UTF-8, as Python's surrogateescape decodes it (U+DC80-U+DCFF), -> that byte in Windows-1252 as
# the WHATWG Encoding Standard decodes it (Latin-1 but for 0x80-0x9F)
_ESCAPED_TO_1252 = str.maketrans({0xDC00 + b: _windows_1252_char(b) if b < 0xA0 else chr(b)
                                  for b in range(0x80, 0x100)})
_ESCAPED = re.compile("[\udc80-\udcff]")


def decode_utf8(data: bytes) -> tuple[str, int]:
    """UTF-8 where the bytes are UTF-8; each byte that is not (of an invalid sequence) read as Windows-1252, the code
    page of Latin-1 / cp1252 text files. Returns (text, bytes read as Windows-1252). A whole-file fallback would turn
    the UTF-8 characters of a mostly-UTF-8 file with one bad byte into mojibake; this keeps them. One pass in linear
    time (surrogateescape, then a table): re-decoding the rest after each bad byte was quadratic, minutes for a few
    MB of Latin-1. (No byte-order mark is looked for: the tokenizer's corpus ranges after a file's first are read
    with this.)"""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", "surrogateescape")
    return text.translate(_ESCAPED_TO_1252), len(_ESCAPED.findall(text))


def decode_text(data: bytes) -> tuple[str, int]:
    """Decode that never fails; returns (text, n_bad_bytes). Bytes that open with a byte-order mark are decoded in the
    encoding it names (the mark itself dropped), a unit that does not decode becoming U+FFFD. Other bytes are UTF-8,
    and a byte sequence that is not UTF-8 is read as Windows-1252 (so a Latin-1 / cp1252 text file keeps its "é" and
    curly quotes rather than U+FFFD): n_bad_bytes counts those bytes (`meta.decode_errors`)."""
    bom, codec = b"", "utf-8"
    if data[:1] in _BOM_STARTS:  # (called per JSON line too: most data starts with no mark)
        bom, codec = next(((bom, name) for bom, name in BOMS if data.startswith(bom)), (b"", "utf-8"))
    data = data[len(bom):]
    if codec == "utf-8":
        return decode_utf8(data)
    try:
        return data.decode(codec), 0
    except UnicodeDecodeError:
        text = data.decode(codec, errors="replace")
        return text, text.count("\ufffd") - data.count("\ufffd".encode(codec))


def _error_doc(path: Path, where: str, reason: str, err: BaseException | None = None) -> Document:
    meta: dict[str, Any] = {"source": str(path), "where": where}
    if err is not None:
        meta["error"] = f"{type(err).__name__}: {err}"[:300]
    return Document(id=stable_id(str(path), where, reason), meta=meta, drop=f"read_error:{reason}")


def _binary_doc(path: Path, where: str = "file") -> Document:
    """The one `read_error:binary` record of a text or JSON Lines file whose bytes are no text (`looks_binary`), or
    of one binary line or paragraph (`where`) of a text file read by line or paragraph."""
    doc = _error_doc(path, where, "binary")
    doc.meta["error"] = (f"{path}: not text (NUL or control bytes in its first 4 KiB: binary data); leave it out of "
                         "input.paths" if where == "file" else
                         f"{path}: {where} is not text (NUL or control bytes: binary data); the file's others are read")
    return doc


def read_text(path: str | Path, *, unit: str = "file") -> Iterator[Document]:
    """Plain text: the whole file is one document (unit="file"), or one per line / blank-line paragraph. A
    compressed file cut short is a `read_error` after the lines (paragraphs) read before the cut, the last of them
    with it (it may be cut too), as JSON Lines are read; with unit="file" the one document is that error. A file
    whose first 4 KiB look binary (`looks_binary`) is one `read_error:binary`; read by line or paragraph, only when
    most of that head is binary (`_mostly_binary`), else each piece that looks binary is its own."""
    path = Path(path)
    parts: list[bytes] = []
    cut: BaseException | None = None
    try:
        with open_binary(path) as f:
            try:
                while chunk := f.read1(1 << 16):  # one raw read a call: a cut loses no bytes read before it
                    parts.append(chunk)
            except ARCHIVE_ERRORS as e:
                cut = e
    except (OSError, NotCompressed) as e:
        yield _error_doc(path, "file", archive_reason(e), e)
        return
    if cut is not None and unit == "file":
        yield _error_doc(path, "file", archive_reason(cut), cut)
        return
    data = b"".join(parts)
    binary = looks_binary(data)
    if binary and (unit == "file" or _mostly_binary(data[:4096])):  # decoded: a document of control characters, kept
        yield _binary_doc(path)
        return
    text, bad = decode_text(data)
    if unit != "file":  # Windows line ends split like Unix ones
        text = unix_line_ends(text)
    pieces = [text] if unit == "file" else (text.split("\n") if unit == "line" else text.split("\n\n"))
    if cut is not None:
        pieces = pieces[:-1]
    for i, piece in enumerate(pieces):
        if unit != "file" and not piece.strip():
            continue
        if binary and looks_binary(piece.encode("utf-8", "surrogatepass")):  # (a line of NULs in a text file)
            yield _binary_doc(path, f"{unit} {i + 1}")
            continue
        meta: dict[str, Any] = {"source": str(path)}
        if bad:
            meta["decode_errors"] = bad
        yield Document(id=stable_id(str(path), str(i)), text=piece, meta=meta)
    if cut is not None:
        yield _error_doc(path, f"{unit} {len(pieces) + 1}", archive_reason(cut), cut)


def _record_doc(path: Path, where: str, key: str, rec: Any, text_key: str, id_key: str, bad: int = 0) -> Document:
    """A Document from one parsed JSON record (a line of JSON Lines or an element of a JSON array)."""
    # a null text reads as "", as a null in a Parquet text column does
    if not isinstance(rec, dict) or not isinstance(rec.get(text_key), (str, type(None))):
        return _error_doc(path, where, "bad_record")
    # a record lmforge wrote (Document.to_record: id, text, a dict meta, drop) keeps its drop reason; in
    # anyone else's records "drop" and a non-dict "meta" are ordinary fields
    ours = isinstance(rec.get("meta"), dict)
    drop = rec.get("drop") if ours and isinstance(rec.get("drop"), str) else None
    if text_key not in rec and drop is None:  # not the same as an empty text: the wrong field name, most often
        return _error_doc(path, where, "missing_text", KeyError(f"no field {text_key!r} (input.text_key)"))
    meta = dict(rec["meta"]) if ours else {}
    meta.update({k: v for k, v in rec.items() if k not in (text_key, id_key) and not (ours and k in ("meta", "drop"))})
    meta.setdefault("source", str(path))
    if bad:
        meta["decode_errors"] = bad
    doc_id = rec.get(id_key)
    return Document(id=str(doc_id) if doc_id is not None else stable_id(str(path), key),
                    text=rec.get(text_key) or "", meta=meta, drop=drop)


class JsonRecord(NamedTuple):
    """One record of a JSON file: `where` it is ("line N" / "element N", or "file" for an array that does not
    parse), `key` naming it for stable ids ("N" for line N), the parsed `value` (None where `error` is set) and the
    bytes `decode` could not read as they are (`meta.decode_errors`)."""
    where: str
    key: str
    value: Any
    decode_errors: int = 0
    error: ValueError | None = None


def _parse(where: str, key: str, data: bytes, decode: Callable[[bytes], tuple[str, int]]) -> JsonRecord:
    try:
        text, bad = decode(data)
        return JsonRecord(where, key, json.loads(text), bad)
    except ValueError as e:  # UnicodeDecodeError (a strict `decode`), json.JSONDecodeError
        return JsonRecord(where, key, None, 0, e)


def json_records(path: str | Path, decode: Callable[[bytes], tuple[str, int]] = decode_text) -> Iterator[JsonRecord]:
    """The records of a JSON Lines file (optionally .gz or .zst), one a non-blank line; of a `.json` file whose first
    non-blank byte is `[`, the elements of that one JSON array (json.dump, pandas or `datasets` to_json(lines=False),
    Alpaca's alpaca_data.json), parsed whole: such a file is held in memory as json.load would hold it, as the
    one-line conversion to JSON Lines would too, so it is read rather than refused. The one reader of JSON records
    (the data pipeline's `read_jsonl`, post-training's `lmforge.align.data.read_jsonl`). A UTF-8 byte-order mark
    is dropped. The file is opened and decompressed once; OSError and ARCHIVE_ERRORS propagate (after the records
    read before them)."""
    maybe_array = uncompressed_name(path).endswith(".json")
    with open_binary(path) as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:  # a UTF-8 byte-order mark (Windows editors write one) is no part of the JSON
                line = line.removeprefix(b"\xef\xbb\xbf")
            if not line.strip():
                continue
            if maybe_array and line.lstrip().startswith(b"["):  # (only blank lines came before)
                array = _parse("file", "file", line + f.read(), decode)
                if array.error is not None:
                    yield array
                for i, rec in enumerate(array.value or ()):  # (a `[` that parses is a list)
                    yield JsonRecord(f"element {i}", f"element {i}", rec, array.decode_errors if i == 0 else 0)
                return
            maybe_array = False
            yield _parse(f"line {lineno}", str(lineno), line, decode)


def _head(path: Path, n: int = 4096) -> bytes:
    """The first n bytes of a file, decompressed, as far as they read: a cut or damage among them is reported where
    the records reach it (the records before it are kept)."""
    parts: list[bytes] = []
    with open_binary(path) as f:
        try:
            while n > 0 and (chunk := f.read1(n)):
                parts.append(chunk)
                n -= len(chunk)
        except ARCHIVE_ERRORS:
            pass
    return b"".join(parts)


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(decode_text(line)[0]), dict)
    except ValueError:
        return False


def _binary_records(path: Path) -> bool:
    """Whether a JSON file whose first record does not parse is binary data: its head looks binary (`looks_binary`)
    and no whole line of it is a JSON record (an object: a number or string may be a line of any bytes). A file
    opening with a line of NULs before its records is text: that line one bad_json, the records kept."""
    head = _head(path)
    return looks_binary(head) and not any(_is_record(line) for line in head.split(b"\n")[:-1])


def read_jsonl(path: str | Path, *, text_key: str = "text", id_key: str = "id") -> Iterator[Document]:
    """JSON Lines, or a `.json` file holding one JSON array, read by `json_records`. Other top-level keys go into
    `meta`. A record without the text field is `read_error:missing_text`. A file whose first record does not parse
    and whose head is binary (`_binary_records`) is one `read_error:binary` record: not a `bad_json` record per
    "line" of its bytes, as many as they happened to hold."""
    path = Path(path)
    where = "line 0"
    try:
        for rec in json_records(path):
            if rec.error is not None and where == "line 0" and _binary_records(path):
                yield _binary_doc(path)  # (the head read again only here: a good file is read once)
                return
            where = rec.where
            if rec.error is not None:
                yield _error_doc(path, rec.where, "bad_json", rec.error)
            else:
                yield _record_doc(path, rec.where, rec.key, rec.value, text_key, id_key, rec.decode_errors)
    except (OSError, *ARCHIVE_ERRORS) as e:
        yield _error_doc(path, f"after {where}", archive_reason(e), e)


def json_safe(value: Any) -> Any:
    """A Parquet cell as a JSON value, so the writers can store it in `meta`: timestamps, dates and times become
    ISO-8601 strings, decimals and durations their str(), binary base64 text; lists and maps are converted
    element by element."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(isinstance(x, tuple) and len(x) == 2 for x in value) and value:  # pyarrow's map type: (key, value)
            return {str(k): json_safe(v) for k, v in value}
        return [json_safe(x) for x in value]
    return str(value)  # Decimal, timedelta, anything else pyarrow hands back


def read_parquet(path: str | Path, *, text_key: str = "text", id_key: str = "id",
                 batch_size: int = 1024) -> Iterator[Document]:
    """Parquet, streamed by record batches. A `meta` column holding JSON strings is parsed back; other columns
    go into `meta` as JSON values (`json_safe`). A file without the text column gives one
    `read_error:missing_text` per row."""
    pq = require("pyarrow.parquet", "data")
    path = Path(path)
    row = 0
    try:
        pf = pq.ParquetFile(path)
        has_text = text_key in pf.schema_arrow.names
        for batch in pf.iter_batches(batch_size=batch_size):
            for rec in batch.to_pylist():
                doc = _parquet_doc(path, row, rec, text_key, id_key, has_text)
                row += 1
                yield doc
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError on a corrupt or cut file
        yield _error_doc(path, f"after row {row}", "corrupt_parquet", e)


def _parquet_doc(path: Path, row: int, rec: dict[str, Any], text_key: str, id_key: str, has_text: bool
                 ) -> Document:
    text = rec.get(text_key)
    # a row lmforge wrote (write_parquet: meta as a JSON string, drop) keeps its drop reason; in anyone else's rows
    # "drop" is an ordinary column, as in JSON Lines (it rejected every row with its cell as the reason)
    drop = rec.pop("drop", None) if isinstance(rec.get("meta"), str) else None
    if not has_text and not isinstance(drop, str):
        return _error_doc(path, f"row {row}", "missing_text", KeyError(f"no column {text_key!r} (input.text_key)"))
    if text is not None and not isinstance(text, str):  # e.g. an integer column
        return _error_doc(path, f"row {row}", "bad_record",
                          TypeError(f"column {text_key!r} holds {type(text).__name__}, not text"))
    meta = rec.pop("meta", None)
    try:
        meta = json.loads(meta) if isinstance(meta, str) else json_safe(dict(meta or {}))
        if not isinstance(meta, dict):
            raise TypeError(f"column 'meta' holds {type(meta).__name__}, not an object")
    except (ValueError, TypeError) as e:  # one bad row, not the rest of the file (json's errors are ValueErrors)
        return _error_doc(path, f"row {row}", "bad_record", e)
    meta.update({k: json_safe(v) for k, v in rec.items() if k not in (text_key, id_key)})
    meta.setdefault("source", str(path))
    doc_id = rec.get(id_key)
    return Document(id=str(doc_id) if doc_id is not None else stable_id(str(path), str(row)),
                    text=text or "", meta=meta, drop=drop if isinstance(drop, str) else None)


def read_html(path: str | Path) -> Iterator[Document]:
    """One HTML file (.html, .html.gz, .html.zst) = one document whose `raw` bytes the extract stage turns into
    text."""
    path = Path(path)
    try:
        with open_binary(path) as f:
            data = f.read()
    except (OSError, *ARCHIVE_ERRORS) as e:
        yield _error_doc(path, "file", archive_reason(e), e)
        return
    yield Document(id=stable_id(str(path)), raw=data, meta={"source": str(path), "content_type": "text/html"})


def read_warc(path: str | Path, *, record_types: tuple[str, ...] = ("response", "conversion", "resource")
              ) -> Iterator[Document]:
    """WARC (raw HTML responses) and WET (extracted text, `conversion` records) via warcio.

    warcio ends quietly on some cuts: inside the last record's headers it sees no record at all, and a
    gzip member cut inside its payload reads as a shorter payload. So each record is read to its end and
    its gzip member must be complete, and after the last one the rest of the file must be blank; otherwise
    the archive is reported as `read_error:truncated_archive`."""
    warcio = require("warcio.archiveiterator", "data")
    path = Path(path)
    n = 0
    end = 0  # where the last complete record ends (a byte offset in the file as stored)
    try:
        with open(path, "rb") as f:
            it = warcio.ArchiveIterator(f)
            for rec in it:
                doc = _warc_doc(path, rec, n) if rec.rec_type in record_types else None
                it.read_to_end()
                cut = _warc_cut(rec, it.reader.decompressor)
                if cut:
                    yield _error_doc(path, f"record {n}", "truncated_archive", EOFError(cut))
                    return
                end = it.get_record_offset() + it.get_record_length()
                if doc is not None:
                    yield doc
                    n += 1
            f.seek(end)
            while chunk := f.read(1 << 16):
                if chunk.strip():  # bytes after the last record that make no record: a cut one
                    yield _error_doc(path, f"after record {n}", "truncated_archive",
                                     EOFError(f"{path.stat().st_size - end} bytes after the last complete record "
                                              "make no record"))
                    return
    except Exception as e:  # warcio: ArchiveLoadFailed, EOFError or zlib.error on a cut archive
        yield _error_doc(path, f"after record {n}", "truncated_archive", e)


def _warc_cut(rec: Any, decompressor: Any) -> str:
    """Why a record warcio read to its end is cut short ('' when it is whole)."""
    length = (rec.rec_headers.get_header("Content-Length") or "").strip()
    # every WARC record has one; warcio parses headers cut before it as a record (ARC headers name no such field)
    if getattr(rec, "format", "warc") == "warc" and not length.isdigit():
        return "the record's headers stop before a Content-Length"
    if decompressor is not None and not getattr(decompressor, "eof", True):
        return "the record's gzip member ends before its end-of-stream marker"
    return ""


def _warc_doc(path: Path, rec: Any, n: int) -> Document:
    headers = rec.rec_headers
    url = headers.get_header("WARC-Target-URI") or ""
    rid = headers.get_header("WARC-Record-ID") or stable_id(str(path), str(n))
    meta: dict[str, Any] = {"source": str(path), "url": url, "warc_type": rec.rec_type}
    try:
        payload = rec.content_stream().read()  # (undoes the HTTP Content-Encoding and chunking)
    except Exception as e:  # noqa: BLE001  one record's body, not the archive: warcio's brotli decoder fails on the
        # brotli package (AttributeError), a body may not be the gzip its header says; the exception ended the archive,
        # every later record lost. A cut archive is still found by read_warc (read_to_end, _warc_cut) after this.
        encoding = rec.http_headers.get_header("Content-Encoding") if rec.http_headers else None
        meta["error"] = f"Content-Encoding {encoding or '(none)'}: {type(e).__name__}: {e}"[:300]
        return Document(id=rid.strip("<>"), meta=meta, drop="read_error:content_encoding")
    if getattr(rec.raw_stream, "limit", 0) > 0:  # fewer bytes than the record's Content-Length
        meta["missing_bytes"] = rec.raw_stream.limit
        return Document(id=rid.strip("<>"), meta=meta, drop="read_error:truncated_archive")
    if rec.rec_type == "conversion":
        text, bad = decode_text(payload)
        if bad:
            meta["decode_errors"] = bad
        return Document(id=rid.strip("<>"), text=text, meta=meta)
    # the payload's type: the HTTP header's ("" when the server sent none); the WARC header's only where there is no
    # HTTP message (a resource record), since a response record's names the message ("application/http; ...")
    http = rec.http_headers
    meta["content_type"] = (http.get_header("Content-Type") if http else headers.get_header("Content-Type")) or ""
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
