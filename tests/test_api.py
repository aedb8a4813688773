"""The public API: every exported name resolves, and `lf.tokenize_to_shards` writes the shards the trainer
reads (ids equal to the tokenizer's own encoding, documents separated, tokenizer reopenable)."""

from __future__ import annotations

import lmforge as lf
from lmforge.data.shards import TokenFile
from lmforge.tokenizer.load import load_tokenizer


def test_every_public_name_resolves():
    for name in lf.__all__:
        assert getattr(lf, name) is not None, name


def test_tokenize_to_shards_one_call(tmp_path):
    a, b = "the cat sat on the mat. " * 20, "a dog on a log<|endoftext|>second document"
    (tmp_path / "a.txt").write_text(a)
    (tmp_path / "b.txt").write_text(b)
    tok = lf.train_bpe([str(tmp_path / "a.txt")], vocab_size=280, special_tokens=["<|endoftext|>"])
    rep = lf.tokenize_to_shards([tmp_path / "a.txt", tmp_path / "b.txt"], tok, tmp_path / "shards")
    shard = TokenFile(rep.shards["train"])
    eot = tok.eot_id
    want = [eot, *tok.encode(a), eot, *tok.encode("a dog on a log"), eot, *tok.encode("second document")]
    assert shard.tokens.tolist() == want and shard.header["num_docs"] == 3
    assert load_tokenizer(shard.tokenizer).encode(a) == tok.encode(a)  # the unsaved tokenizer was saved
    rep = lf.tokenize_to_shards(tmp_path / "b.txt", "byte", tmp_path / "bytes", val_fraction=0.3)
    assert set(rep.shards) == {"train", "val"} and TokenFile(rep.shards["train"]).tokenizer == "byte"
