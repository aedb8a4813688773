"""The run directory a Trainer writes into: `check_run_dir` refuses an unusable one before anything is built,
and `RunDirLock` keeps a second training process out of it while a Trainer holds it (lmforge.train.trainer
takes the lock when it is built, and again at each fit; it releases it when fit ends or on close())."""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.utils import check_output_path


def check_run_dir(run_dir: str | Path) -> None:
    """Refuses a run_dir that is empty, or is or lies under an existing file (its metrics log and checkpoints
    could not be written), before anything is built."""
    check_output_path(run_dir, "run_dir", flag="--run-dir")


class RunDirLock:
    """An exclusive, non-blocking lock on RUN_DIR/.lock (flock), so a second process training into the same
    run_dir is refused instead of interleaving its metrics and checkpoints with the first one's. The kernel
    drops it when the process dies (a SIGKILL leaves no stale lock); the file holds the holder's PID. The refusal
    names the setting `key` and the holder `what`, with `in_process` when this process holds the lock (the data
    pipeline's output.dir lock passes its own: "output.dir", "pipeline run")."""

    _held: dict[Path, "RunDirLock"] = {}  # the run_dirs this process holds (a conflict there may be garbage)

    def __init__(self, run_dir: Path, *, what: str = "training process", key: str = "run_dir",
                 in_process: str = "another Trainer of this process: call its close() or let its fit end"):
        self.path = Path(run_dir) / ".lock"
        self.what, self.key, self.in_process = what, key, in_process
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no protection
            return
        if self._file is not None:
            return
        key = self.path.resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if key not in RunDirLock._held:
                    raise
                # held in this process: by a Trainer nothing refers to any more (a notebook cell run again), whose
                # reference cycle only the collector frees - collect it, and its lock with it, then try once more
                import gc

                gc.collect()
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            mine = f" ({self.in_process})" if key in RunDirLock._held else ""
            raise ConfigError(f"{self.key} {str(self.path.parent)!r} is in use by another {self.what} (PID "
                              f"{holder}){mine}; wait for it to end or stop it, or use another {self.key}") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        RunDirLock._held[key] = self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None
            key = self.path.resolve()
            if RunDirLock._held.get(key) is self:
                del RunDirLock._held[key]

