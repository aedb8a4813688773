"""Open a tokenizer from a spec, in every format lmforge reads:

    "byte"                                  the byte tokenizer
    lmforge JSON                            lmforge_tokenizer.json (or a directory holding it); its "type"
                                            field says which class reads it
    HF tokenizer.json                       a BPE `tokenizer.json` (or a directory holding one): byte-level
                                            (GPT-2, Llama 3, Qwen2) as a Tokenizer, SentencePiece-style (Llama 2,
                                            Mistral, Gemma) as a sentencepiece.SentencePieceBPE
    GPT-2 files                             a directory with vocab.json + merges.txt (or its vocab.json)
    tiktoken rank file                      "base64 rank" lines (`tokenizer train --export tiktoken`);
                                            the format holds no pattern or special tokens, so the GPT-2
                                            pattern is used and <|endoftext|> takes the first free id
                                            (256 in lmforge-trained files, after the last rank in GPT-2's)

A directory holding several formats (what `tokenizer train --export ...` writes) opens the lmforge JSON.
"""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

from lmforge.errors import DataError
from lmforge.tokenizer.byte import FILE_NAME, ByteTokenizer

FORMATS = "'byte', lmforge_tokenizer.json, HF tokenizer.json, GPT-2 vocab.json + merges.txt, a .tiktoken rank file"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"tokenizer file {path} is corrupt: {e}") from e
    if not isinstance(data, dict):
        raise DataError(f"tokenizer file {path} holds no JSON object")
    return data


def _from_json(path: Path):
    from lmforge.tokenizer import sentencepiece
    from lmforge.tokenizer.bpe import Tokenizer
    from lmforge.tokenizer.hf_json import is_sentencepiece

    data = _read_json(path)
    kind = data.get("type")
    if kind == "byte":
        return ByteTokenizer.from_dict(data)
    if kind == "bpe":
        return Tokenizer.load(path)
    if kind == sentencepiece.TYPE:
        tok = sentencepiece.SentencePieceBPE.from_dict(data, str(path))
        tok.path = path.resolve()
        return tok
    if isinstance(data.get("model"), dict):  # (GPT-2's vocab.json has a token "model" too, as an id)
        return sentencepiece.SentencePieceBPE.from_hf(path, data) if is_sentencepiece(data) else Tokenizer.from_hf(path)
    if (path.parent / "merges.txt").is_file() and all(isinstance(v, int) for v in data.values()):
        return Tokenizer.from_gpt2_files(path, path.parent / "merges.txt")
    raise DataError(f"tokenizer file {path} is none of the formats lmforge reads ({FORMATS})")


def _from_tiktoken(path: Path):
    from lmforge.tokenizer.bpe import Tokenizer
    from lmforge.tokenizer.formats import read_tiktoken, tiktoken_specials

    return Tokenizer.from_tiktoken(path, tiktoken_specials(read_tiktoken(path)))


def _in_directory(path: Path) -> Path:
    """The file of a tokenizer directory, in order of preference."""
    for name in (FILE_NAME, "tokenizer.json", "vocab.json"):
        if (path / name).is_file():
            return path / name
    ranks = sorted(path.glob("*.tiktoken"))
    if ranks:
        return ranks[0]
    raise DataError(f"no tokenizer in directory {path} (looked for {FORMATS})")


BESIDE = (FILE_NAME, "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json")
"""the files a tokenizer in a folder is read from (a tokenizer.json's tokenizer_config.json, a vocab.json's merges.txt
and added_tokens.json)"""


def tokenizer_files(spec: str | Path) -> list[Path]:
    """The files `load_tokenizer(spec)` may read, present or not (one that appears changes the key): what a cache of the
    tokenizer is keyed on (utils.file_stamps); none for "byte". Not the folder: its time changes with every file
    written beside the tokenizer (a run's shards), which would read the tokenizer again for every batch."""
    if str(spec) == "byte":
        return []
    path = Path(spec)
    if not path.is_dir():
        return [path, *(path.parent / name for name in BESIDE)]
    return [*(path / name for name in BESIDE), *sorted(path.glob("*.tiktoken"))]


def load_tokenizer(spec: str | Path):
    """A tokenizer object from a spec (see the module docstring for what it may be)."""
    spec = str(spec)
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = _in_directory(path)
    if not path.is_file():
        raise DataError(f"tokenizer not found: {spec} (give {FORMATS}, or a directory holding one)")
    if path.suffix == ".json":
        tok = _from_json(path)
    elif path.name == "merges.txt" or _first_line(path).startswith(b"#version"):  # GPT-2's merges: its vocab.json
        vocab = path.parent / "vocab.json"
        if not vocab.is_file():
            raise DataError(f"{path} is GPT-2 merges; its vocab.json must sit beside it ({vocab} not found)")
        tok = _from_json(vocab)
    else:
        tok = _from_tiktoken(path)
    if getattr(tok, "path", False) is None:  # read from a HF, GPT-2 or tiktoken file: spec() names it (what token
        tok.path = path.resolve()  # shards record, for the trainer to open again), not a content hash nothing opens
    return tok


def _first_line(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.readline(200)


def takes_where(tokenizer, method: str = "encode_ordinary") -> bool:
    """Whether the tokenizer's `method` takes `where` (SentencePieceBPE's: the text starts an input, follows a
    special token or continues the text before it, which decides the "▁" put before it); byte-level tokenizers and
    other objects put nothing before a text and take no such argument."""
    return _takes_where(type(tokenizer), method)


@functools.lru_cache(maxsize=None)
def _takes_where(cls: type, method: str) -> bool:  # (asked once per class: inspect costs ~50 us)
    try:
        return "where" in inspect.signature(getattr(cls, method)).parameters
    except (AttributeError, TypeError, ValueError):  # (set on the instance only, or a builtin without a signature)
        return False
