"""Token shards: the memory-mapped files the trainer reads.

Layout of one shard file (little-endian):

    b"LMFTOKS1"             8 bytes magic
    uint32 header_len       4 bytes
    header JSON (utf-8)     header_len bytes, space-padded so that tokens start at a multiple of 64
    tokens                  num_tokens x dtype (uint16 when vocab_size <= 65536, else uint32)
    doc starts              (version 2: doc_sep null, documents added) zero bytes to a multiple of 8, then
                            num_docs x int64: where each document's tokens begin

The header holds: version, dtype, vocab_size, tokenizer (a spec string such as "byte" or a path),
doc_sep (the id written between documents, or null), num_tokens, num_docs, max_id, and doc_starts (true where the
starts follow the tokens: documents written back to back, with no separator to tell where one begins; what
val_bpb needs to leave out the "▁" a SentencePiece-style tokenizer puts before each). The file size is checked
against them on open, so a truncated shard is refused rather than half-read.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from array import array
from typing import Any, Iterable

import numpy as np

from lmforge.errors import DataError
from lmforge.utils import temp_name

MAGIC = b"LMFTOKS1"
VERSION = 2
"""the newest format: 2 adds the documents' starts after the tokens (shards written without a separator); a shard
without them is written as version 1, which readers before it read"""
SCAN_AT_OPEN = 1 << 24
"""Shards of up to this many tokens in all have every id checked when a run opens them (TokenFile.check_vocab: one
vectorised max, ~10 ms per 16M tokens in memory; train.data.open_splits counts across its shards, so a corpus of many
small shards is not read whole at every start); any other has each window checked as it is read
(TokenFile.check_ids from train.data.Split.window), so a header's max_id is never trusted alone."""
_RESERVED = 4096  # header bytes reserved by the streaming writer (the header is rewritten at close)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _data_offset(header_len: int) -> int:
    return -(-(len(MAGIC) + 4 + header_len) // 64) * 64


class TokenShardWriter:
    """Stream token ids into one shard; the file appears (atomically renamed) only on `close()`.

    >>> with TokenShardWriter("train.bin", vocab_size=257, tokenizer="byte", doc_sep=256) as w:
    ...     w.add_document([104, 105])
    """

    def __init__(self, path: str | Path, *, vocab_size: int, tokenizer: str, doc_sep: int | None = None,
                 extra: dict[str, Any] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.vocab_size = int(vocab_size)
        self.dtype = dtype_for_vocab(self.vocab_size)
        self.tokenizer = tokenizer
        self.doc_sep = doc_sep
        self.extra = extra or {}
        self.num_tokens = 0
        self.num_docs = 0
        self.max_id = -1
        self._starts = array("q")  # (doc_sep None) each document's first token: written after the tokens
        self._tmp = temp_name(self.path)
        self._f = open(self._tmp, "wb")
        try:
            self._f.write(b"\0" * _RESERVED)
        except BaseException:
            self.abort()
            raise

    def add(self, ids: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64)
        if arr.size == 0:
            return
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = hi if hi >= self.vocab_size else lo
            raise DataError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size}) of {self.path}")
        self.max_id = max(self.max_id, hi)
        self._f.write(arr.astype(self.dtype).tobytes())
        self.num_tokens += arr.size

    def add_document(self, ids: Iterable[int] | np.ndarray) -> None:
        """Append one document, preceded by the separator (so every document starts after one); without one, where
        it starts is recorded (written after the tokens)."""
        if self.doc_sep is not None:
            self.add([self.doc_sep])
        else:
            self._starts.append(self.num_tokens)
        self.add(ids)
        self.num_docs += 1

    def header(self) -> dict[str, Any]:
        return {
            "version": VERSION if self._starts else 1, "dtype": self.dtype.name, "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer, "doc_sep": self.doc_sep, "num_tokens": self.num_tokens,
            "num_docs": self.num_docs, "max_id": self.max_id, **self.extra,
            **({"doc_starts": True} if self._starts else {}),
        }

    def close(self) -> Path:
        """Write the header and rename the file into place; a failure (or Ctrl-C) here removes the temporary."""
        try:
            head = json.dumps(self.header()).encode()
            room = _RESERVED - len(MAGIC) - 4
            if len(head) > room:
                raise DataError(f"shard header too large ({len(head)} bytes); shorten the extra metadata")
            head = head.ljust(room, b" ")
            if self._starts:
                self._f.write(b"\0" * (-(self.num_tokens * self.dtype.itemsize) % 8))
                self._f.write(np.asarray(self._starts, dtype="<i8").tobytes())
            self._f.flush()
            self._f.seek(0)
            self._f.write(MAGIC + struct.pack("<I", len(head)) + head)
            self._f.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop the shard: close and remove the temporary file (a no-op after a successful close)."""
        self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "TokenShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_tokens(path: str | Path, ids: Iterable[int] | np.ndarray, *, vocab_size: int, tokenizer: str,
                 doc_sep: int | None = None) -> Path:
    """Write a whole token sequence as one shard (already separated into documents by the caller)."""
    with TokenShardWriter(path, vocab_size=vocab_size, tokenizer=tokenizer, doc_sep=doc_sep) as w:
        w.add(ids)
    return Path(path)


class TokenFile:
    """A read-only, memory-mapped token shard. `tokens` is a numpy memmap of shape (num_tokens,)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"token file not found: {self.path} (make one with `lmforge tokenizer encode`)")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise DataError(f"{self.path} is not an lmforge token shard (bad magic bytes)")
            raw_len = f.read(4)
            if len(raw_len) != 4:
                raise DataError(f"{self.path} is truncated (no header)")
            (header_len,) = struct.unpack("<I", raw_len)
            try:
                self.header: dict[str, Any] = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{self.path} has a corrupt header: {e}") from e
        for key in ("dtype", "vocab_size", "num_tokens"):
            if key not in self.header:
                raise DataError(f"{self.path} header lacks {key!r}; re-create the shard")
        version = self.header.get("version", 1)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise DataError(f"{self.path} has a corrupt header: version {version!r} is no format version; re-create "
                            "the shard")
        if version > VERSION:
            raise DataError(f"{self.path} is a version {self.header.get('version')!r} token shard, newer than this "
                            f"lmforge reads (up to {VERSION}); upgrade lmforge")
        self.dtype = np.dtype(self.header["dtype"])
        self.offset = _data_offset(header_len)
        n = int(self.header["num_tokens"])
        starts_at = -(-(self.offset + n * self.dtype.itemsize) // 8) * 8
        docs = int(self.header.get("num_docs", 0)) if self.header.get("doc_starts") else 0
        expected = starts_at + 8 * docs if self.header.get("doc_starts") else self.offset + n * self.dtype.itemsize
        if size != expected:
            raise DataError(f"{self.path} is truncated or corrupt: {size} bytes, header says {expected}")
        self.tokens = (np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(n,))
                       if n else np.zeros(0, dtype=self.dtype))
        self.model_vocab: int | None = None
        """the vocab_size of the model reading the shard (check_vocab), which bounds its ids with the shard's own"""
        self.scanned = False
        """whether every id was checked (check_vocab: within the SCAN_AT_OPEN tokens scanned at open)"""
        self.doc_starts: np.ndarray | None = None
        """where each document's tokens begin, in a shard without doc_sep that records them (older ones do not)"""
        if self.header.get("doc_starts"):
            self.doc_starts = (np.memmap(self.path, dtype="<i8", mode="r", offset=starts_at, shape=(docs,))
                               if docs else np.zeros(0, dtype=np.int64))

    @property
    def vocab_size(self) -> int:
        return int(self.header["vocab_size"])

    @property
    def tokenizer(self) -> str | None:
        return self.header.get("tokenizer")

    @property
    def doc_sep(self) -> int | None:
        return self.header.get("doc_sep")

    def __len__(self) -> int:
        return len(self.tokens)

    def check_vocab(self, model_vocab: int, scan: bool = True) -> None:
        """Refuse shards whose ids do not fit the model's embedding table; `scan`: check every id now where the
        shard holds up to SCAN_AT_OPEN tokens (open_splits stops scanning once its shards together pass it)."""
        max_id = self.header.get("max_id")
        if max_id is None:
            max_id = int(self.tokens.max()) if len(self.tokens) else -1
        if max_id >= model_vocab:
            raise DataError(
                f"{self.path} holds token id {max_id} but the model's vocab_size is {model_vocab}; "
                f"set model.vocab_size >= {max_id + 1} or re-tokenize"
            )
        self.model_vocab = model_vocab
        if scan and len(self.tokens) <= SCAN_AT_OPEN:
            self.check_ids(self.tokens)
            self.scanned = True

    def check_ids(self, ids: np.ndarray, start: int = 0) -> None:
        """Refuse `ids` (the shard's tokens from index `start`) holding one outside the vocabulary: the shard's
        vocab_size and the model's (check_vocab). One vectorised max, no per-token Python: the header's max_id, which
        check_vocab trusts, hid a corrupt id until the embedding raised an IndexError mid-run."""
        own, model = self.vocab_size, self.model_vocab or self.vocab_size
        limit = min(own, model)
        if not len(ids) or int(ids.max()) < limit:
            return
        at = int(np.argmax(np.asarray(ids) >= limit))
        whose = ("the model's and the shard's" if own == model else
                 f"the shard's; the model's is {model}" if own < model else f"the model's; the shard's is {own}")
        max_id = self.header.get("max_id")
        header = f"; its header's max_id {max_id} is wrong" if max_id is not None and max_id < ids[at] else ""
        raise DataError(f"{self.path}: token {start + at} is id {int(ids[at])}, outside the vocabulary (vocab_size "
                        f"{limit}: {whose}){header}: the shard is corrupt; re-create it (lmforge tokenizer encode)")
