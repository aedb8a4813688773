"""The `--nproc N` launcher's signals (lmforge.parallel.launch.run_passing_signals), against a stand-in for torchrun
(a parent that waits for a worker in a session of its own, deaf to signals) and against torchrun itself."""

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


def _ends(pid: int, within: float = 2.0) -> bool:
    """Whether `pid` has ended within `within` seconds (a SIGKILLed process on a busy machine takes a moment)."""
    deadline = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers through /proc")
def test_a_second_signal_reaches_the_workers_and_kills_them_promptly(tmp_path, monkeypatch):
    """Two SIGINTs to the launcher: both go to the worker itself (torchrun, shutting down, passed on no more), and a
    worker that has not ended SECOND_SIGNAL_GRACE seconds after the second is killed with its parent, so the
    launcher returns at once (it waited the parent's 30 s for a worker that ignores signals)."""
    monkeypatch.setattr(launch, "SECOND_SIGNAL_GRACE", 0.5)
    pid_file = tmp_path / "worker.pid"
    second_at = []

    def interrupt_twice():
        while not pid_file.exists():
            time.sleep(0.02)
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(launch.SIGNAL_ECHO_S + 0.2)  # (a second signal, not the first one delivered twice)
        second_at.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_twice, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        launch.run_passing_signals([sys.executable, "-c", PARENT, WORKER, str(tmp_path)])
    took = time.monotonic() - second_at[0]
    worker = int(pid_file.read_text())
    try:
        # both signals, from the launcher (two SIGNAL_ECHO_S + 0.2 s apart may reach a worker a busy machine has not run
        # as one)
        assert (tmp_path / "worker_got_sigint").read_text() in ("xx", "x")
        assert 0.5 <= took < 2.5 and _ends(worker)
    finally:
        if _alive(worker):
            os.kill(worker, signal.SIGKILL)


# a worker that notes each SIGINT it gets and ends 1 s after the first (a rank stopping at a step boundary)
ONE_STOP = textwrap.dedent("""
    import os, signal, sys, time
    got = []
    signal.signal(signal.SIGINT, lambda *a: (got.append(1), open(sys.argv[1] + "/worker_got_sigint", "a").write("x")))
    open(sys.argv[1] + "/worker.pid", "w").write(str(os.getpid()))
    while not got:
        time.sleep(0.02)
    time.sleep(1.0)
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers through /proc")
def test_one_signal_delivered_twice_reaches_the_workers_once(tmp_path):
    """coreutils `timeout` signals its command and then the command's process group, so the launcher got one SIGTERM
    twice within microseconds and passed both on: each rank took the second as "stop at once" and left its step
    without a checkpoint ("rank 0 stopped inside step 25"). A repeat within SIGNAL_ECHO_S is the same signal."""
    pid_file = tmp_path / "worker.pid"

    # (the second after the first handler ran, within SIGNAL_ECHO_S: Python merges two at once)
    _signals_once_started(pid_file, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        launch.run_passing_signals([sys.executable, "-c", PARENT, ONE_STOP, str(tmp_path)])
    assert (tmp_path / "worker_got_sigint").read_text() == "x"


def _signals_once_started(pid_file, first, second) -> None:
    """From a thread: once the worker wrote its pid, send this process `first`, then 0.05 s later `second`."""
    def send():
        while not pid_file.exists():
            time.sleep(0.02)
        time.sleep(0.1)
        os.kill(os.getpid(), first)
        time.sleep(0.05)
        os.kill(os.getpid(), second)

    threading.Thread(target=send, daemon=True).start()


# a worker that notes each SIGINT (i) and SIGTERM (t) it gets and ends 1 s after the first
EACH_STOP = ONE_STOP.replace('got = []', 'got = []\n'
                             'signal.signal(signal.SIGTERM, lambda *a: (got.append(1), '
                             'open(sys.argv[1] + "/worker_got_sigint", "a").write("t")))').replace('.write("x")',
                                                                                             '.write("i")')


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers through /proc")
def test_another_signal_soon_after_is_passed_on(tmp_path):
    """The echo window drops the same signal delivered twice, not a SIGTERM sent 0.05 s after a SIGINT (a user
    escalating to 'stop at once'): both reach the workers."""
    pid_file = tmp_path / "worker.pid"

    _signals_once_started(pid_file, signal.SIGINT, signal.SIGTERM)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        launch.run_passing_signals([sys.executable, "-c", PARENT, EACH_STOP, str(tmp_path)])
    assert (tmp_path / "worker_got_sigint").read_text() == "it"


# a process torchrun starts: on SIGINT it "writes a checkpoint" for longer than torchrun's shutdown grace, then notes
# it and ends as an interrupted lmforge command does (130)
SLOW_SAVER = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[1] + "/rank" + os.environ["RANK"]
    def save(*_):
        time.sleep(2.0)
        open(out, "w").write("saved")
        os._exit(130)
    signal.signal(signal.SIGINT, save)
    open(out + ".ready", "w").close()
    while True:
        time.sleep(0.05)
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds the workers through /proc")
def test_the_first_signal_waits_for_the_workers_as_long_as_they_need(tmp_path):
    """A Ctrl-C to `--nproc 2`'s launcher: torchrun, told, passed it on and SIGKILLed the workers its shutdown grace
    (30 s; here 1 s) later, mid-checkpoint. The launcher passes the first signal to the workers alone, and torchrun
    sees them end: each writes its checkpoint, the launcher ends interrupted with 130 from torchrun, and nothing of
    torchrun's (log lines, traceback, table of failed ranks) is printed."""
    import subprocess

    (tmp_path / "worker.py").write_text(SLOW_SAVER)
    driver = textwrap.dedent("""
        import sys
        from lmforge.parallel import launch
        argv = [sys.executable, "-m", "lmforge.parallel.launch", "--standalone", "--nproc-per-node=2",
                sys.argv[1] + "/worker.py", sys.argv[1]]
        try:
            launch.run_passing_signals(argv)
        except KeyboardInterrupt:
            sys.exit(99)
    """)
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "1", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-c", driver, str(tmp_path)], stderr=subprocess.PIPE, text=True,
                                env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"rank{r}.ready").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and launcher.poll() is None, "the workers never started"
            time.sleep(0.05)
        launcher.send_signal(signal.SIGINT)
        _, err = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert [(tmp_path / f"rank{r}").exists() for r in (0, 1)] == [True, True]
    assert launcher.returncode == 99 and err == ""


# a process torchrun starts that fails as an lmforge command does on a bad input (rank 0: one line, exit 2), or is
# killed (rank 1: the OOM killer's SIGKILL, which leaves no message)
FAILING = textwrap.dedent("""
    import os, signal, sys, time
    if sys.argv[1] == "error":  # rank 1 fails; rank 0, SIGTERMed by torchrun, ends as launch.end_quietly does
        if os.environ["RANK"] == "0":
            signal.signal(signal.SIGTERM, lambda *a: os._exit(128 + signal.SIGTERM))
            time.sleep(30)
        print("lmforge train: error: token file not found: x.bin", file=sys.stderr)
        sys.exit(2)
    if os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(30)
""")


@pytest.mark.parametrize("how", ["error", "killed"])
def test_a_failed_worker_is_said_in_its_own_words_and_exit_code(tmp_path, how):
    """torchrun printed its log lines, a traceback and a table of failed ranks after a worker's one-line error, and
    exited 1 whatever the worker's code. lmforge's torchrun (lmforge.parallel.launch.torchrun) exits with the failed
    worker's code, the worker's own words its only output; a worker a signal ended gets one line naming it."""
    import subprocess

    (tmp_path / "worker.py").write_text(FAILING)
    out = subprocess.run([sys.executable, "-m", "lmforge.parallel.launch", "--standalone", "--nproc-per-node=2",
                          str(tmp_path / "worker.py"), how], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    if how == "error":
        assert out.returncode == 2
        assert out.stderr.splitlines() == ["lmforge train: error: token file not found: x.bin"]
    else:
        assert out.returncode == 128 + signal.SIGKILL
        assert out.stderr.splitlines() == ["lmforge: the process of rank 1 was ended by SIGKILL (out of memory?)"]


def test_the_processes_of_one_launch_say_an_error_a_warning_and_an_interrupt_once(tmp_path, capsys, monkeypatch):
    """N processes of one `--nproc N` launch that fail alike printed the error N times, warned N times, and each
    said `interrupted` beside the launcher. Within the launch (shared_reports, which the processes inherit), each
    line is printed once, and the launcher alone says the run was interrupted; outside it, every time."""
    from lmforge import cli
    from lmforge.cli import train as train_cli
    from lmforge.parallel.reports import shared_reports

    missing = ["train", "--config", str(tmp_path / "none.toml")]

    def interrupted(argv):
        raise KeyboardInterrupt

    with shared_reports():
        monkeypatch.setenv("RANK", "1")  # a process the launcher started (twice: two ranks)
        assert [cli.main(missing), cli.main(missing)] == [2, 2]
        for _ in range(2):
            cli._show_warning("train")("the shard is short", UserWarning, "x.py", 1)
        monkeypatch.setattr(train_cli, "main", interrupted)
        assert cli.main(["train"]) == 130
        monkeypatch.delenv("RANK")
        assert cli.main(["train"]) == 130  # the launcher
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[1] for line in err if line.startswith("lmforge train:")] == [
        " error", " warning", " interrupted"]
    monkeypatch.setenv("RANK", "1")  # (torchrun run directly: every rank prints)
    assert [cli.main(["train"]), cli.main(["train"])] == [130, 130]
    assert capsys.readouterr().err.count("lmforge train: interrupted") == 2


@pytest.mark.parametrize("after", [0.2, 0.4, 0.6])
def test_a_signal_while_torchrun_starts_ends_it_quietly(tmp_path, after):
    """Before torchrun has started its workers, the launcher passes a Ctrl-C to torchrun itself: arriving while it
    still imported torch, it printed Python's KeyboardInterrupt traceback (40 lines of torch's imports), or exited 0
    or aborted inside torch's C++. It ends with 130 and says nothing (the launcher says `interrupted`), wherever in
    its start the signal lands."""
    import subprocess

    (tmp_path / "worker.py").write_text("import os, signal, time\n"
                                        "signal.signal(signal.SIGINT, lambda *a: os._exit(130))\ntime.sleep(30)\n")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge.parallel.launch", "--standalone", "--nproc-per-node=1",
                             str(tmp_path / "worker.py")], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(after)  # (importing torch)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err) == (130, "")


def test_a_launched_process_ends_quietly_on_a_signal_until_it_trains(tmp_path, monkeypatch):
    """A Ctrl-C in the first seconds of `--nproc N` reaches processes still importing torch: they printed Python's
    "Exception ignored ... KeyboardInterrupt" (and the import went on) or a traceback of imports. While a command
    of a launched process runs, SIGINT and SIGTERM end it at once with 128 + the signal (launch.end_quietly); the
    Trainer puts its own handlers in place while it trains; the handlers are as before once the command ends, and
    a process outside a launch keeps Python's."""
    from lmforge import cli
    from lmforge.cli import train as train_cli
    from lmforge.parallel.reports import shared_reports

    seen = []
    monkeypatch.setattr(train_cli, "main", lambda argv: seen.append(
        (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))) or 0)
    before = signal.getsignal(signal.SIGINT)
    with shared_reports():
        monkeypatch.setenv("RANK", "1")
        assert cli.main(["train"]) == 0
        off_main = []  # (a command run off the main thread, which may set no handler: left as it is)
        t = threading.Thread(target=lambda: off_main.append(cli.main(["train"])))
        t.start()
        t.join()
        monkeypatch.delenv("RANK")
        assert cli.main(["train"]) == 0  # the launcher
    assert off_main == [0] and seen[0] == (launch.end_quietly, launch.end_quietly)
    assert launch.end_quietly not in seen[1] + seen[2] and signal.getsignal(signal.SIGINT) is before


# a process torchrun starts: on SIGTERM (torchrun's, passing on its own) it notes it and ends as an interrupted
# lmforge command does; otherwise it trains for 30 s
STOPS_ON_SIGTERM = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[1] + "/rank" + os.environ["RANK"]
    signal.signal(signal.SIGTERM, lambda *a: (open(out, "w").write("stopped"), os._exit(143)))
    open(out + ".ready", "w").close()
    time.sleep(30)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_a_launcher_killed_outright_takes_its_run_with_it(tmp_path):
    """A SIGKILLed launcher (`kill -9`, a harness's subprocess timeout) can pass nothing on: torchrun, in a session of
    its own, went on training with no one to stop it, holding the run_dir's lock. It now gets a SIGTERM when the
    launcher dies and passes it to the workers, which stop as on a Ctrl-C."""
    import subprocess

    (tmp_path / "worker.py").write_text(STOPS_ON_SIGTERM)
    driver = textwrap.dedent("""
        import sys
        from lmforge.parallel import launch
        launch.run_passing_signals([sys.executable, "-m", "lmforge.parallel.launch", "--standalone",
                                    "--nproc-per-node=2", sys.argv[1] + "/worker.py", sys.argv[1]])
    """)
    launcher = subprocess.Popen([sys.executable, "-c", driver, str(tmp_path)],
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"rank{r}.ready").exists() for r in (0, 1)):
            assert time.monotonic() < deadline and launcher.poll() is None, "the workers never started"
            time.sleep(0.05)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 15
        while not all((tmp_path / f"rank{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [(tmp_path / f"rank{r}").exists() for r in (0, 1)] == [True, True]
    finally:
        if launcher.poll() is None:
            launcher.kill()


@pytest.mark.parametrize("words", ["Connection reset by peer", "Connection closed by peer"])
def test_a_process_whose_peer_ended_leaves_the_saying_to_the_peer(monkeypatch, capsys, words):
    """A rank killed mid-step (the OOM killer) left its peer failing inside a collective, which printed torch's 30-line
    traceback of gloo's "Read error ... Connection reset by peer" above the launcher's one line ("the process of rank 1
    was ended by SIGKILL"). The peer ends quietly as torchrun's SIGTERM would end it (143, which the launcher ranks
    below the cause it says); outside a launch, or under --debug, the error is raised as before."""
    from lmforge import cli
    from lmforge.cli import train as train_cli
    from lmforge.parallel.reports import shared_reports

    def fails(argv):
        raise RuntimeError(f"[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:9380: {words}. This is typically "
                           "caused by a remote worker hanging or bugs in the application.")

    monkeypatch.setattr(train_cli, "main", fails)
    with shared_reports():
        monkeypatch.setenv("RANK", "0")
        assert cli.main(["train"]) == 128 + signal.SIGTERM
        said = capsys.readouterr().err.splitlines()  # one line, never none: a peer may have ended cleanly
        assert len(said) == 1 and said[0].startswith("lmforge train: error: a peer process of this run ended while "
                                                     "this one waited on it ([gloo/transport/tcp/pair.cc:537]")
        assert said[0].endswith("); where no other line says why, run with --debug")
        with pytest.raises(RuntimeError, match=words):
            cli.main(["train", "--debug"])
        monkeypatch.delenv("RANK")
        with pytest.raises(RuntimeError, match=words):
            cli.main(["train"])
