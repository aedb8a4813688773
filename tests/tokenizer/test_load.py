"""`load_tokenizer` reads every format the README lists, and what `lmforge tokenizer train --export`
writes reads back to the same ids (checked against HF `tokenizers` for tokenizer.json)."""

from __future__ import annotations

import shutil

import pytest

from lmforge.cli import main
from lmforge.errors import DataError
from lmforge.tokenizer.load import load_tokenizer

TEXT = "def add(a, b):\n    return a + b  # the sum<|endoftext|>print(add(1, 2))\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "corpus.txt").write_text("def f(x):\n    return x * 2\n" * 40 + "the cat sat on the mat. " * 40)
    assert main(["tokenizer", "train", "--input", str(d / "corpus.txt"), "--vocab-size", "300", "--out",
                 str(d / "all"), "--export", "hf", "gpt2", "tiktoken", "--progress", "False"]) == 0
    return d


def _alone(exported, tmp_path, *names):
    """A directory holding only the named files of the export."""
    out = tmp_path / "_".join(names).replace(".", "_")
    out.mkdir()
    for n in names:
        shutil.copy(exported / "all" / n, out / n)
    return out


@pytest.mark.parametrize("files", [("lmforge_tokenizer.json",), ("tokenizer.json",), ("vocab.json", "merges.txt"),
                                   ("bpe.tiktoken",)])
def test_every_exported_format_reads_back(exported, tmp_path, files):
    ref = load_tokenizer(exported / "all")
    d = _alone(exported, tmp_path, *files)
    for spec in (d, d / files[0]):  # the directory or its file
        tok = load_tokenizer(spec)
        assert tok.encode(TEXT) == ref.encode(TEXT) and tok.decode(tok.encode(TEXT)) == TEXT
        assert tok.vocab_size == ref.vocab_size and tok.eot_id == ref.eot_id


def test_hf_tokenizer_json_matches_hf_tokenizers(exported):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(exported / "all" / "tokenizer.json"))
    assert load_tokenizer(exported / "all" / "tokenizer.json").encode(TEXT) == hf.encode(TEXT).ids


def test_unreadable_specs_are_one_line_errors(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": "world"}')
    with pytest.raises(DataError, match="none of the formats"):
        load_tokenizer(tmp_path / "x.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no tokenizer in directory"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(DataError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "nope")


def test_non_utf8_bytes_are_counted_and_the_byte_tokenizer_keeps_them(exported, tmp_path, capsys):
    from lmforge.data.shards import TokenFile

    raw = b"caf\xe9 ok \xff\xfe end<|endoftext|>second \x80doc"
    (tmp_path / "bad.txt").write_bytes(raw)
    for name, tok in (("bpe", str(exported / "all")), ("byte", "byte")):
        assert main(["tokenizer", "encode", "--tokenizer", tok, "--input", str(tmp_path / "bad.txt"), "--out",
                     str(tmp_path / name), "--progress", "False"]) == 0
        out = capsys.readouterr().out
        assert "4 undecodable bytes (not UTF-8)" in out
        assert ("kept the 4 bytes" if name == "byte" else "were read as Windows-1252") in out
    bpe = TokenFile(tmp_path / "bpe" / "train.bin").tokens.tolist()
    eot = bpe.index(256, 1)  # (each document opens with the separator)
    assert bpe[0] == 256
    text = [load_tokenizer(exported / "all").decode(d) for d in (bpe[1:eot], bpe[eot + 1:])]
    assert text == ["caf\u00e9 ok \u00ff\u00fe end", "second \u20acdoc"]  # Latin-1 / cp1252 letters, not U+FFFD
    ids = TokenFile(tmp_path / "byte" / "train.bin").tokens.tolist()
    assert ids == [256, *raw.split(b"<|endoftext|>")[0], 256, *raw.split(b"<|endoftext|>")[1]]  # every byte kept


def test_gpt2_files_whose_vocabulary_has_a_token_named_model(tmp_path):
    """GPT-2's own vocab.json holds the token "model" (id 19849): it is still GPT-2 files, not an HF
    tokenizer.json; merges.txt given alone opens with the vocab.json beside it."""
    from ..conftest import shared_data as shared

    vocab = shared("gpt2", "vocab.json")
    for spec in (vocab.parent, vocab, vocab.parent / "merges.txt"):
        tok = load_tokenizer(spec)
        assert tok.vocab_size == 50257 and tok.encode("Hello world, model!") == [15496, 995, 11, 2746, 0]
    (tmp_path / "lone").mkdir()
    shutil.copy(vocab.parent / "merges.txt", tmp_path / "lone" / "merges.txt")
    with pytest.raises(DataError, match="is GPT-2 merges; its vocab.json must sit beside it"):
        load_tokenizer(tmp_path / "lone" / "merges.txt")


def test_a_validation_split_too_small_for_the_files_warns(tmp_path):
    from lmforge.tokenizer.byte import ByteTokenizer
    from lmforge.tokenizer.corpus import encode_to_shards

    (tmp_path / "tiny.txt").write_text("tiny")
    with pytest.warns(UserWarning, match="val.bin holds no tokens"):
        rep = encode_to_shards(ByteTokenizer(), [str(tmp_path / "tiny.txt")], tmp_path / "s", val_fraction=0.5,
                               progress=False)
    assert rep.tokens == {"train": 5, "val": 0}


def test_tokenizer_load_of_another_format_names_load_tokenizer(tmp_path):
    """lf.Tokenizer.load on a HF tokenizer.json, or on a directory of GPT-2 or HF files, said only "not an lmforge BPE
    tokenizer" or "lmforge_tokenizer.json not found", naming no way to open the file it was given."""
    import lmforge as lf

    tok = lf.Tokenizer({i: bytes([i]) for i in range(256)} | {256: b"ab"}, [(b"a", b"b")], {"<|endoftext|>": 257})
    hf = tok.save_hf(tmp_path / "hf")
    tok.save_gpt2(tmp_path / "gpt2")
    for given in (hf, tmp_path / "hf", tmp_path / "gpt2"):
        with pytest.raises(DataError, match=rf"; lf\.load_tokenizer\('{given}'\) opens a HF tokenizer\.json, GPT-2 "):
            lf.Tokenizer.load(given)
        assert lf.load_tokenizer(given).encode("abab<|endoftext|>") == [256, 256, 257]
    assert lf.Tokenizer.load(tok.save(tmp_path / "own")).merges == tok.merges
