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
