"""Open any lmforge tokenizer from a spec: "byte", a directory holding lmforge_tokenizer.json, or
that JSON file itself (its "type" field says which class reads it)."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.errors import DataError
from lmforge.tokenizer.byte import FILE_NAME, ByteTokenizer


def load_tokenizer(spec: str | Path):
    spec = str(spec)
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise DataError(f"tokenizer not found: {spec} (give 'byte', a tokenizer directory or its {FILE_NAME})")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"tokenizer file {path} is corrupt: {e}") from e
    kind = data.get("type") if isinstance(data, dict) else None
    if kind == "byte":
        return ByteTokenizer.from_dict(data)
    if kind == "bpe":
        from lmforge.tokenizer.bpe import Tokenizer

        return Tokenizer.load(path)
    raise DataError(f"tokenizer file {path} has unknown type {kind!r} (expected 'byte' or 'bpe')")
