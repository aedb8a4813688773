"""The `--nproc N` launcher's signals (lmforge.parallel.launch.run_passing_signals), against a stand-in for torchrun:
a parent that waits for a worker in a session of its own, as torchrun does after a first signal."""

import os
import signal
import sys
import textwrap
import threading
import time

import pytest

from lmforge.parallel import launch

# a worker that notes each SIGINT it gets and goes on (a rank stuck inside a collective, where Python's handler never
# runs, looks the same from outside); SIGTERM is ignored
WORKER = textwrap.dedent("""
    import os, signal, sys, time
    signal.signal(signal.SIGINT, lambda *a: open(sys.argv[1] + "/worker_got_sigint", "a").write("x"))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(sys.argv[1] + "/worker.pid", "w").write(str(os.getpid()))
    while True:
        time.sleep(0.05)
""")
# torchrun after a first signal: its workers are told, and it waits for them (30 s, here 8), deaf to more signals
PARENT = textwrap.dedent("""
    import signal, subprocess, sys
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True)
    try:
        worker.wait(timeout=8)
    except subprocess.TimeoutExpired:
        worker.kill()
""")


def _alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers through /proc")
def test_a_second_signal_reaches_the_workers_and_kills_them_promptly(tmp_path, monkeypatch):
    """Two SIGINTs to the launcher: the second goes to the worker itself (torchrun, shutting down, passes on no
    more), and a worker that has not ended SECOND_SIGNAL_GRACE seconds later is killed with its parent, so the
    launcher returns at once (it waited the parent's 30 s for a worker that ignores signals)."""
    monkeypatch.setattr(launch, "SECOND_SIGNAL_GRACE", 0.5)
    pid_file = tmp_path / "worker.pid"
    second_at = []

    def interrupt_twice():
        while not pid_file.exists():
            time.sleep(0.02)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        second_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_twice, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        launch.run_passing_signals([sys.executable, "-c", PARENT, WORKER, str(tmp_path)])
    took = time.monotonic() - second_at[0]
    worker = int(pid_file.read_text())
    try:
        assert (tmp_path / "worker_got_sigint").read_text() == "x"  # the second signal, from the launcher
        assert 0.5 <= took < 2.5 and not _alive(worker)
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)
