"""Which files a tokenizer command reads from --input."""

from __future__ import annotations

from lmforge.tokenizer.corpus import expand_inputs


def test_a_directory_gives_its_visible_files_once(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / ".git" / "objects").mkdir(parents=True)
    for name in ("a.txt", "sub/b.txt", ".DS_Store", ".git/objects/1f2e", "sub/.notes"):
        (data / name).write_bytes(b"x\n")
    # hidden files and everything under a hidden directory (zlib-packed git objects) were read as text
    assert expand_inputs([str(data)]) == [data / "a.txt", data / "sub" / "b.txt"]
    # a file named twice (a directory and one of its files, an overlapping glob) is read once, first place kept
    assert expand_inputs([str(data / "sub" / "b.txt"), str(data), str(data / "*.txt")]) == [
        data / "sub" / "b.txt", data / "a.txt"]
    assert expand_inputs([str(data / ".DS_Store")]) == [data / ".DS_Store"]  # named outright, it is read


def test_compressed_parquet_and_token_files_are_refused_not_read_as_text(tmp_path):
    """A data pipeline's kept documents (data/*.jsonl.gz) given to `lmforge tokenizer train` were read byte for byte
    as Windows-1252 text: merges were learned from gzip's bytes, with only a note counting the "undecodable" ones."""
    import gzip

    import pytest

    from lmforge.data.shards import write_tokens
    from lmforge.errors import DataError
    from lmforge.tokenizer.corpus import corpus_stats, encode_to_shards
    from lmforge.tokenizer.byte import ByteTokenizer
    from lmforge.tokenizer.train import train_bpe

    text = tmp_path / "a.txt"
    text.write_text("the cat sat on the mat\n" * 50)
    shard = gzip.compress(b'{"id": "1", "text": "the cat sat on the mat"}\n' * 50)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "shard-00000.jsonl.gz").write_bytes(shard)
    (tmp_path / "docs.txt").write_bytes(shard)  # the bytes decide, not the name
    write_tokens(tmp_path / "train.bin", [1, 2, 3], vocab_size=257, tokenizer="byte")
    for bad, kind in (("data", "gzip-compressed"), ("docs.txt", "gzip-compressed"),
                      ("train.bin", "an lmforge token shard")):
        path = tmp_path / bad
        named = str(path / "shard-00000.jsonl.gz") if path.is_dir() else str(path)
        want = f"tokenizer input '{named}' is {kind}, not text"
        with pytest.raises(DataError, match=want):
            expand_inputs([str(text), str(path)])  # what `lmforge tokenizer train | encode | stats` read
        with pytest.raises(DataError, match=want):
            train_bpe([text, named], 300, progress=False)
        with pytest.raises(DataError, match=want):
            encode_to_shards(ByteTokenizer(), [str(text), str(path)], tmp_path / "out", progress=False)
        with pytest.raises(DataError, match=want):
            corpus_stats(ByteTokenizer(), [str(path)], progress=False)
    assert not (tmp_path / "out" / "train.bin").exists()
    assert expand_inputs([str(text)]) == [text]


def test_a_text_opening_with_a_magic_word_is_text_and_real_bzip2_and_parquet_files_are_refused(tmp_path):
    """Text that opens with "BZh" or "PAR1" was refused as bzip2 / Parquet (the check read only those letters); the
    formats' fuller marks decide now: bzip2's block magic after "BZh" and a digit, Parquet's magic at both ends."""
    import bz2

    import pytest

    from lmforge.errors import DataError
    from lmforge.tokenizer.train import check_text_file

    for name, text in (("bzh.txt", "BZh is a word here\nBZh9 too\n"), ("par.txt", "PAR1 and PAR2\n")):
        (tmp_path / name).write_text(text)
        check_text_file(tmp_path / name)  # (no error)
    (tmp_path / "a.bz2").write_bytes(bz2.compress(b"the cat sat\n" * 20))
    (tmp_path / "empty.bz2").write_bytes(bz2.compress(b""))
    (tmp_path / "t.parquet").write_bytes(b"PAR1" + bytes(range(40)) + b"PAR1")
    for name, kind in (("a.bz2", "bzip2-compressed"), ("empty.bz2", "bzip2-compressed"), ("t.parquet", "Parquet")):
        with pytest.raises(DataError, match=f"is {kind}, not text"):
            check_text_file(tmp_path / name)


def test_the_refusal_s_python_advice_runs_as_written(tmp_path, monkeypatch):
    """The refusal of a pipeline's kept documents (and docs/training.md) said to train on them with
    lf.train_bpe(d.text for d in lmforge.data.readers.read_documents(path)), which is a TypeError (no vocab_size)."""
    import gzip
    import re
    from pathlib import Path

    import pytest

    import lmforge as lf
    from lmforge.data.readers import read_documents
    from lmforge.errors import DataError
    from lmforge.tokenizer.train import check_text_file, train_bpe

    path = tmp_path / "shard-00000.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"id": "1", "text": "the cat sat on the mat"}\n' * 50))
    with pytest.raises(DataError) as refused:
        check_text_file(path)
    advice = re.search(r"(lf\.train_bpe\(.*\)) with", str(refused.value))
    assert advice, str(refused.value)
    guide = (Path(__file__).parents[2] / "docs" / "training.md").read_text()
    assert advice.group(1) in guide.replace("\n", " ")  # the guide gives the same line
    monkeypatch.setattr(lf, "train_bpe", lambda *a, **kw: train_bpe(*a, **kw, progress=False, workers=1))
    with pytest.warns(UserWarning, match="merges"):  # (a tiny corpus: fewer merges than asked)
        tok = eval(advice.group(1), {"lf": lf, "read_documents": read_documents, "path": path})
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat" and tok.vocab_size > 257


def test_binary_data_named_as_text_is_refused_as_the_data_pipeline_refuses_it(tmp_path):
    """Token ids or random bytes saved as .txt were trained into the tokenizer with only a "not UTF-8" note; the
    check is the pipeline readers' looks_binary (NUL bytes or many control characters)."""
    import random

    import numpy as np
    import pytest

    from lmforge.errors import DataError
    from lmforge.tokenizer.train import train_bpe

    text = tmp_path / "a.txt"
    text.write_text("the cat sat on the mat\n" * 50)
    (tmp_path / "ids.txt").write_bytes(np.arange(2000, dtype=np.int32).tobytes())
    (tmp_path / "noise.txt").write_bytes(random.Random(0).randbytes(5000))
    for bad in ("ids.txt", "noise.txt"):
        with pytest.raises(DataError, match=f"tokenizer input '{tmp_path / bad}' is binary data .*, not text"):
            train_bpe([text, tmp_path / bad], 300, progress=False)
    utf16 = tmp_path / "u16.txt"
    utf16.write_bytes("the cat sat on the mat\n".encode("utf-16") * 3)  # text with a byte-order mark stays text
    assert train_bpe([text, utf16], 260, progress=False).vocab_size == 260


def test_a_terminal_log_with_colour_codes_is_text(tmp_path):
    """check_text_file refused a terminal log with dense colour codes as binary data (ESC counted as a binary
    control byte; 2026-12-07): ESC, backspace and form feed are text, and the log trains."""
    from lmforge.tokenizer.train import check_text_file, train_bpe

    log = tmp_path / "build.log"
    log.write_text("".join(f"\x1b[1;3{i % 8}mstep {i}\x1b[0m loss \x1b[32m{i / 7:.3f}\x1b[0m\n" for i in range(300)))
    check_text_file(log)
    assert train_bpe([log], 270, progress=False).vocab_size == 270
