"""Sharded writers: JSONL (optionally .gz/.zst) and Parquet, each shard holding at most
`docs_per_shard` documents, each file appearing atomically when complete."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any, Iterable

from lmforge.data.document import Document
from lmforge.data.readers import compression
from lmforge.errors import ConfigError, require
from lmforge.utils import atomic_path

WRITE_FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")
# A lone surrogate (U+D800-U+DFFF) reaches a document through a legal JSON escape ("\ud800") but has no UTF-8
# encoding: written as CESU bytes it reads back as three U+FFFD, and pyarrow refuses it.
_SURROGATE = re.compile("[\ud800-\udfff]")
# a writer's temporary file beside its output: `.<name>.<pid>.tmp` (TokenShardWriter) or `.<name>.<pid>-<random>.tmp`
# (utils.atomic_path; mkstemp's `.<name>.<random>.tmp` before 2026-12)


def _json_line(value: Any) -> str:
    """One line of JSON, non-ASCII text as is and lone surrogates as the escapes they came from, so that
    they read back exactly."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", json.dumps(value, ensure_ascii=False))


def _utf8_safe(value: str | None) -> tuple[str | None, int]:
    """(value with lone surrogates replaced by U+FFFD, how many were replaced)."""
    return (value, 0) if value is None else _SURROGATE.subn("\ufffd", value)


def write_jsonl(path: str | Path, docs: Iterable[Document], *, with_text: bool = True) -> int:
    """Write documents to one JSONL file (compressed by suffix), atomically; returns the count."""
    path = Path(path)
    lines = [_json_line(d.to_record(with_text)) for d in docs]
    data = ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")
    codec = compression(path)  # the suffixes, in any case, that readers.open_binary decompresses
    if codec == "gzip":
        data = gzip.compress(data, compresslevel=5, mtime=0)  # no timestamp: the same documents, the same bytes
    elif codec == "zstd":
        data = require("zstandard", "data").ZstdCompressor(level=3).compress(data)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return len(lines)


def write_parquet(path: str | Path, docs: Iterable[Document]) -> int:
    """Parquet with columns id, text, meta (a JSON string: metadata is free-form), drop. Parquet strings
    must be valid UTF-8: lone surrogates in id, text or drop become U+FFFD, counted in the written
    `meta.encode_errors` (the meta JSON keeps them as escapes)."""
    pa = require("pyarrow", "data")
    pq = require("pyarrow.parquet", "data")
    columns: dict[str, list] = {"id": [], "text": [], "meta": [], "drop": []}
    for d in docs:
        (doc_id, a), (text, b), (drop, c) = _utf8_safe(d.id), _utf8_safe(d.text), _utf8_safe(d.drop)
        meta = {**d.meta, "encode_errors": a + b + c} if a + b + c else d.meta
        for name, value in (("id", doc_id), ("text", text), ("meta", _json_line(meta)), ("drop", drop)):
            columns[name].append(value)
    table = pa.table(columns)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return len(columns["id"])


def write_docs(path: str | Path, docs: Iterable[Document], fmt: str = "jsonl") -> int:
    if fmt == "parquet":
        return write_parquet(path, docs)
    return write_jsonl(path, docs)


class ShardedWriter:
    """Write a stream of documents as `{prefix}-00000.{fmt}`, `{prefix}-00001.{fmt}`, ...

    >>> with ShardedWriter("out", fmt="jsonl.gz", docs_per_shard=10_000) as w:
    ...     for d in docs: w.write(d)
    """

    def __init__(self, directory: str | Path, *, prefix: str = "part", fmt: str = "jsonl",
                 docs_per_shard: int = 100_000):
        if fmt not in WRITE_FORMATS:
            raise ConfigError(f"output format {fmt!r} is not one of {', '.join(WRITE_FORMATS)}")
        if docs_per_shard < 1:
            raise ConfigError(f"docs_per_shard must be >= 1, got {docs_per_shard}")
        self.dir = Path(directory)
        self.prefix, self.fmt, self.docs_per_shard = prefix, fmt, docs_per_shard
        self.paths: list[Path] = []
        self._buf: list[Document] = []

    def write(self, doc: Document) -> None:
        self._buf.append(doc)
        if len(self._buf) >= self.docs_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        path = self.dir / f"{self.prefix}-{len(self.paths):05d}.{self.fmt}"
        write_docs(path, self._buf, "parquet" if self.fmt == "parquet" else "jsonl")
        self.paths.append(path)
        self._buf = []

    def close(self) -> list[Path]:
        self._flush()
        return self.paths

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
