"""lmforge.utils.atomic_path: the file it renames into place has the mode a plain open() gives; honour_umask
gives other writers' files those modes; check_output_path refuses an output path no writer could use, and
output_path_problem, the check it words, is the one `lmforge generate` uses too."""

from __future__ import annotations

import os

import pytest

from lmforge.errors import ConfigError
from lmforge.utils import (atomic_dir, atomic_path, check_output_path, honour_umask, naming_file,
                           output_path_problem, write_json_atomic)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json_atomic(tmp_path / "a.json", {"x": 1})
        with atomic_path(tmp_path / "b.txt") as tmp:
            assert tmp.name.startswith(".b.txt.") and tmp.name.endswith(".tmp") and tmp.is_file()
            tmp.write_text("b")
        plain = tmp_path / "c.txt"
        plain.write_text("c")
    finally:
        os.umask(old)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"a.json": mode, "b.txt": mode,
                                                                             "c.txt": mode}


def test_atomic_path_removes_its_temporary_on_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_naming_file_names_the_file_a_write_error_left_out(tmp_path):
    """The one rewrap atomic_path and the metrics log's appends share: a full disk's ENOSPC names no file, and is
    raised again naming the file the user knows; an error that names its file passes as it is."""
    import errno

    with pytest.raises(OSError) as e, naming_file(tmp_path / "metrics.jsonl"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "metrics.jsonl"))
    with pytest.raises(OSError) as e, naming_file(tmp_path / "metrics.jsonl"):
        open(tmp_path / "missing" / "x")
    assert e.value.filename == str(tmp_path / "missing" / "x")
    with pytest.raises(OSError) as e, atomic_path(tmp_path / "loss.png"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(tmp_path / "loss.png") and os.listdir(tmp_path) == []


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_honour_umask_gives_a_folder_and_what_is_below_it_plain_modes(tmp_path, umask, file_mode, dir_mode):
    """safetensors' save_file makes 0600 files; an export folder has a subfolder (a PEFT export's base/)."""
    import torch
    from safetensors.torch import save_file

    (tmp_path / "out" / "base").mkdir(parents=True, mode=0o700)
    for p in (tmp_path / "out" / "a.safetensors", tmp_path / "out" / "base" / "b.safetensors"):
        save_file({"w": torch.zeros(2)}, str(p))
    (tmp_path / "alone.safetensors").write_bytes(b"x")
    (tmp_path / "alone.safetensors").chmod(0o600)
    assert (tmp_path / "out" / "a.safetensors").stat().st_mode & 0o777 == 0o600  # what the fix is for
    old = os.umask(umask)
    try:
        honour_umask(tmp_path / "out")
        honour_umask(tmp_path / "alone.safetensors")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert modes == {"out": dir_mode, "out/base": dir_mode, "out/a.safetensors": file_mode,
                     "out/base/b.safetensors": file_mode, "alone.safetensors": file_mode}


def test_check_output_path_refuses_what_no_writer_could_use(tmp_path):
    """The one check every command that writes a directory (or a file) runs before any work: the writers'
    mkdir and rename gave FileExistsError / NotADirectoryError tracebacks mid-run (found 2026-12-05)."""
    taken, folder = tmp_path / "notes.txt", tmp_path / "d"
    taken.write_text("mine\n")
    folder.mkdir()
    cases = [
        (taken, {}, f"--out '{taken}' is an existing file, not a directory; set --out to a new or existing "
                    "directory, or move the file away"),
        (taken / "a" / "b", {}, f"--out '{taken}/a/b' lies under '{taken}', an existing file, not a directory; "
                                "set --out to a new or existing directory, or move the file away"),
        ("", {}, "--out is empty; set --out to a new or existing directory"),
        (folder, {"file": True}, f"--out '{folder}' is a directory, not a file; set --out to a file path"),
        (taken / "x.json", {"file": True}, f"--out '{taken}/x.json' lies under '{taken}', an existing file, not a "
                                           "directory; set --out to a file path, or move the file away"),
    ]
    for path, kw, message in cases:
        with pytest.raises(ConfigError) as e:
            check_output_path(path, "--out", **kw)
        assert str(e.value) == message
    assert taken.read_text() == "mine\n"
    assert check_output_path(folder, "--out") == folder
    assert check_output_path(str(folder / "new" / "deeper"), "--out") == folder / "new" / "deeper"
    assert check_output_path(taken, "--out", file=True) == taken  # an existing file is replaced
    with pytest.raises(ConfigError) as e:  # the trainer's run_dir words (tests/test_cli.py), for it to share
        check_output_path(taken / "a", "run_dir", flag="--run-dir")
    assert str(e.value) == (f"run_dir '{taken / 'a'}' lies under '{taken}', an existing file, not a directory; "
                            "set run_dir (--run-dir) to a new or existing directory, or move the file away")


def test_one_output_path_check_for_generate_and_check_output_path(tmp_path):
    """lmforge generate's --output check walked the path's parents with a copy of check_output_path's logic: one
    check now, output_path_problem, that check_output_path and generate each word in their own way (generate's
    words are pinned in tests/infer/test_cli.py)."""
    from lmforge.cli.generate import check_output
    from lmforge.errors import DataError

    taken, folder, fifo = tmp_path / "notes.txt", tmp_path / "d", tmp_path / "p.fifo"
    taken.write_text("mine\n")
    folder.mkdir()
    os.mkfifo(fifo)
    as_file = {"": ("empty", None), folder: ("directory", folder), taken / "a": ("under", taken),
               taken / "a" / "b.jsonl": ("under", taken), taken: None, fifo: None, folder / "new.jsonl": None}
    for path, problem in as_file.items():
        assert output_path_problem(path, file=True) == problem, path
        if problem is not None:  # generate refuses what the one check finds, and nothing else of these
            with pytest.raises(DataError):
                check_output(str(path))
        else:
            check_output(str(path))
    assert output_path_problem(taken) == ("file", taken) and output_path_problem(folder) is None
    assert output_path_problem(taken / "x") == ("under", taken) and output_path_problem(folder / "a" / "b") is None


def test_atomic_dir_replaces_a_link_to_a_directory_and_leaves_its_target(tmp_path):
    """A link to a directory at the path was moved aside and then rmtree'd, which refuses links: the write was in
    place but raised OSError (an export with --force onto a linked OUT: a traceback) and left the link behind."""
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "kept.txt").write_text("x")
    (tmp_path / "out").symlink_to(tmp_path / "target")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("y")
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "new.txt").read_text() == "y"
    assert (tmp_path / "target" / "kept.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "target"]  # nothing hidden left over


def test_atomic_dir_replaces_a_dangling_link(tmp_path):
    """A link to nowhere at the path (path.exists() is False) was left there, and renaming the directory over it
    failed with ENOTDIR: it is a link like any other, replaced (unlinked)."""
    (tmp_path / "out").symlink_to(tmp_path / "gone")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "new.txt").write_text("y")
    assert not (tmp_path / "out").is_symlink() and (tmp_path / "out" / "new.txt").read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing hidden left over, no target made
