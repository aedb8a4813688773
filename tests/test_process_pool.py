"""lmforge.utils.process_pool in a user's script: worker processes (forkserver / spawn) re-run the main
script's top level, so a script without an `if __name__ == "__main__":` guard would start pools in every
worker, endlessly (a first-hour trap: `lf.train_bpe(texts, ..., workers=2)` at a script's top level hung). Such
a script runs the work in its own process with a notice; a guarded one gets real workers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BODY = """
import os
from lmforge.utils import process_pool
with process_pool(2) as pool:
    values = set(pool.imap(abs, [-1, -2]))
    workers = {pool.apply_async(os.getpid).get()}
print("result", sorted(values), "inline" if workers == {os.getpid()} else "workers")
"""


def run(tmp_path, source: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(source))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_an_unguarded_script_runs_inline_with_a_notice_and_a_guarded_one_gets_workers(tmp_path):
    bare = run(tmp_path, BODY)
    assert bare.returncode == 0 and "result [1, 2] inline" in bare.stdout
    assert 'no `if __name__ == "__main__":` guard' in bare.stderr
    guarded = run(tmp_path, "def main():\n" + textwrap.indent(BODY, "    ")
                  + "\n\nif __name__ == '__main__':\n    main()\n")
    assert guarded.returncode == 0 and "result [1, 2] workers" in guarded.stdout, guarded.stderr[-400:]
    assert "guard" not in guarded.stderr


def test_a_packages_main_module_gets_workers(monkeypatch):
    """`python -m lmforge data run` (lmforge/__main__.py, no guard) ran a pipeline's workers = 2 in one process with
    the notice, but multiprocessing never re-runs a package's __main__ module in its workers
    (multiprocessing.spawn._fixup_main_from_name), so there is nothing to guard against."""
    import importlib.util
    import types

    from lmforge.utils import main_reimport_problem

    main = types.ModuleType("__main__")
    main.__spec__ = importlib.util.find_spec("lmforge.__main__")
    main.__file__ = main.__spec__.origin
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert main_reimport_problem() is None
    main.__spec__ = importlib.util.spec_from_file_location("script", main.__file__)  # the same file run by module
    assert "no `if __name__" in main_reimport_problem()  # name: its workers re-run it


def test_a_script_read_from_stdin_runs_inline(tmp_path, monkeypatch):
    """`python - <<EOF` (a heredoc, a pipe): __main__.__file__ is '<stdin>', which lmforge took for no
    script at all, but multiprocessing's workers try to run a file of that name, fail, and are started again without
    end: lf.train_bpe over a generator of texts hung there. Such a script runs its work in its own process."""
    import types

    from lmforge.utils import main_reimport_problem

    main = types.ModuleType("__main__")
    main.__spec__, main.__file__ = None, "<stdin>"
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert "read from <stdin>" in main_reimport_problem()
    monkeypatch.undo()
    piped = subprocess.run([sys.executable, "-"], input=textwrap.dedent(BODY), capture_output=True, text=True,
                           timeout=60, cwd=tmp_path)
    assert piped.returncode == 0 and "result [1, 2] inline" in piped.stdout, piped.stderr[-400:]
