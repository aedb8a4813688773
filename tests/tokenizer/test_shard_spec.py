"""Token shards encoded with a tokenizer read from a HF tokenizer.json, GPT-2 files or a tiktoken rank file name that
file, so the trainer opens the tokenizer again: they recorded a content hash ('bpe:...'), which `lmforge train` then
failed to open ("tokenizer not found: bpe:...")."""

from __future__ import annotations

import pytest

from lmforge.data.shards import TokenFile
from lmforge.tokenizer.corpus import encode_to_shards
from lmforge.tokenizer.load import load_tokenizer
from lmforge.tokenizer.train import train_bpe
from lmforge.train.data import tokenizer_spec

TEXT = "the cat sat on the mat<|endoftext|>the dog sat on the log\n"


@pytest.mark.parametrize("fmt", ["hf", "gpt2", "tiktoken"])
def test_shards_name_the_file_a_tokenizer_was_read_from(tmp_path, fmt):
    trained = train_bpe(iter([TEXT * 20]), 280, ["<|endoftext|>"], progress=False, workers=1)
    written = {"hf": trained.save_hf, "gpt2": trained.save_gpt2, "tiktoken": trained.save_tiktoken}[fmt](tmp_path)
    tok = load_tokenizer(tmp_path)
    src = tmp_path / "docs.txt"
    src.write_text(TEXT)
    shard = TokenFile(encode_to_shards(tok, [str(src)], tmp_path / "out", progress=False).shards["train"])
    first = written[0] if isinstance(written, tuple) else written
    assert shard.tokenizer == str(first.resolve())
    again = load_tokenizer(tokenizer_spec(shard.tokenizer, shard))
    assert again.encode(TEXT) == trained.encode(TEXT) and again.eot_id == shard.doc_sep == trained.eot_id


def test_tokenize_to_shards_keeps_a_copy_of_a_tokenizer_read_from_another_format(tmp_path):
    """The one-call API saves a tokenizer read from a HF file beside its shards, which name that copy (the shards
    outlive the user's file; the copy keeps its eos_token); the read file's own path did not trigger the copy."""
    from lmforge.data.tokenize import tokenize_to_shards

    trained = train_bpe(iter([TEXT * 20]), 280, ["<|endoftext|>"], progress=False, workers=1)
    trained.save_hf(tmp_path / "hf")
    src = tmp_path / "docs.txt"
    src.write_text(TEXT)
    shard = TokenFile(tokenize_to_shards(src, tmp_path / "hf", tmp_path / "out").shards["train"])
    copy = (tmp_path / "out" / "tokenizer" / "lmforge_tokenizer.json").resolve()
    assert shard.tokenizer == str(copy) and load_tokenizer(copy).encode(TEXT) == trained.encode(TEXT)
