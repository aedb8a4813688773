"""lmforge.utils.atomic_path: the file it renames into place has the mode a plain open() gives."""

from __future__ import annotations

import os

import pytest

from lmforge.utils import atomic_path, write_json_atomic


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
