"""`encode_to_shards` killed mid-way, then rerun: no temporary file stays (some are as large as a shard), and the
rerun writes exactly what an uninterrupted run does."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmforge.tokenizer.byte import ByteTokenizer
from lmforge.tokenizer.corpus import encode_to_shards


def _encode(src: Path, out: Path):
    return encode_to_shards(ByteTokenizer(), [str(src)], out, val_fraction=0.25, progress=False)


def test_killed_between_the_two_renames_leaves_no_temporary_and_the_rerun_completes(tmp_path, monkeypatch):
    src = tmp_path / "corpus.txt"
    src.write_text("".join(f"line {i} of the corpus, about rivers and towns\n" for i in range(200)))
    _encode(src, tmp_path / "ref")
    out = tmp_path / "out"
    real = os.replace

    def killed_at_val(a, b):  # train.bin is in place, val.bin never comes
        if Path(b).name == "val.bin":
            raise KeyboardInterrupt
        return real(a, b)

    monkeypatch.setattr(os, "replace", killed_at_val)
    with pytest.raises(KeyboardInterrupt):
        _encode(src, out)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["train.bin"]
    # what a SIGKILL leaves behind: a shard's temporary no writer lived to remove, beside a file of the user's
    for name in (".val.bin.4242.tmp", ".train.bin.17-0a1b2c3d.tmp", ".notes.4242.tmp", "val.bin.4242.tmp"):
        (out / name).write_bytes(b"\0" * 4096)
    rep = _encode(src, out)
    assert sorted(os.listdir(out)) == [".notes.4242.tmp", "train.bin", "val.bin", "val.bin.4242.tmp"]
    assert rep.tokens["val"] > 0
    for name in ("train.bin", "val.bin"):
        assert (out / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
