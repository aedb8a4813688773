"""What the processes of one `lmforge COMMAND --nproc N` launch print once between them, not once each: the same
error (a bad input every rank fails on), the same warning, the same notice. Torch-free: the CLI's error and warning
printers use it.

The launcher (lmforge.cli.train.relaunch) makes a folder for the launch and names it in the environment (REPORTS),
which the processes torchrun starts inherit; before printing a line, a process creates a file named by the line's
hash there, and prints only where it was the one that created it."""

from __future__ import annotations

import contextlib
import os
import tempfile

REPORTS = "LMFORGE_REPORTS"
"""environment variable: the folder in which the processes of one `--nproc N` launch note the lines they printed"""


@contextlib.contextmanager
def shared_reports():
    """While the launcher (this process) and the processes it starts run: one folder named by REPORTS, in which
    report_once notes what each printed."""
    from lmforge.utils import environment

    with tempfile.TemporaryDirectory(prefix="lmforge_reports_") as folder, environment({REPORTS: folder}):
        yield


def report_once(text: str) -> bool:
    """Whether this process should print `text` (an error, a warning, a notice): False where a process of the same
    `--nproc N` launch, the launcher included, printed the same text before, so ranks that fail or warn alike say
    it once, not N times. Outside such a launch (one process, torchrun run directly): always True."""
    folder = os.environ.get(REPORTS)
    if not folder:
        return True
    import hashlib

    name = hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:32]
    try:  # (O_EXCL: of processes printing the same line at once, exactly one creates the file)
        os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # the folder is gone (the launcher has ended): say it
        pass
    return True


def launched_worker() -> bool:
    """Whether this process is one of those a `--nproc N` launcher started (it says for them how the run ended)."""
    return "RANK" in os.environ and REPORTS in os.environ


PEER_ENDED = ("Connection reset by peer", "Connection closed by peer")
"""how gloo's collectives fail in a process whose peer process has ended (killed, or failed and said why)"""


def peer_ended(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another process of the launch has ended: that process (or, for
    a signal, the launcher) says what happened, so this one need not add a traceback of the collective."""
    return isinstance(error, RuntimeError) and any(words in str(error) for words in PEER_ENDED)
