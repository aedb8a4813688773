"""The unit every pipeline stage works on: a `Document` with an id, its text (or raw bytes before
extraction) and a metadata dict (source, url, language, scores, counts ...).

A stage never deletes a document. It *rejects* it by setting `drop` to a short reason string
("gopher:word_count", "minhash_duplicate", ...); the executor then moves it out of the live stream
and counts the reason, so every input document ends up either kept or rejected with a reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any


def unix_line_ends(text: str) -> str:
    """Windows line ends ("\\r\\n") as "\\n"; a lone "\\r" stays. Where a line split or a line rule must see a CRLF
    file as its LF copy (a text file read by line, FineWeb's line rules); the stored text keeps its own ends."""
    return text.replace("\r\n", "\n")


@dataclass(slots=True)
class Document:
    """One document. `raw` holds undecoded bytes (HTML, WARC payloads) until extraction fills `text`."""

    id: str
    text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    raw: bytes | None = None
    drop: str | None = None
    # (text, its UTF-8 size) as `nbytes` last measured it: the executors count bytes in and out at every stage
    _text_bytes: tuple[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def reject(self, reason: str) -> None:
        """Mark this document as dropped (the first reason wins)."""
        if self.drop is None:
            self.drop = reason

    @property
    def nbytes(self) -> int:
        """Size used for the bytes-in/bytes-out report: text if extracted, else the raw payload."""
        text = self.text
        if text:
            if text.isascii():  # O(1): CPython flags ASCII strings
                return len(text)
            # encoding ~3 KB of non-ASCII text takes microseconds, and most stages leave the text as it is: the
            # size is measured again only for a new text (an identity check, not a comparison)
            if self._text_bytes is None or self._text_bytes[0] is not text:
                self._text_bytes = (text, len(text.encode("utf-8", errors="replace")))
            return self._text_bytes[1]
        return len(self.raw) if self.raw is not None else 0

    def to_record(self, with_text: bool = True) -> dict[str, Any]:
        """A JSON-serialisable dict (raw bytes are never written)."""
        rec: dict[str, Any] = {"id": self.id}
        if with_text:
            rec["text"] = self.text
        rec["meta"] = self.meta
        if self.drop is not None:
            rec["drop"] = self.drop
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "Document":
        return cls(id=str(rec["id"]), text=rec.get("text") or "", meta=dict(rec.get("meta") or {}),
                   drop=rec.get("drop"))


def stable_id(*parts: str | bytes) -> str:
    """A short, deterministic id from its parts (source path, record number, url ...)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode("utf-8", errors="surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def split_dropped(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(kept, dropped) in input order."""
    kept = [d for d in docs if d.drop is None]
    dropped = [d for d in docs if d.drop is not None]
    return kept, dropped
