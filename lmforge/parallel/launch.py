"""Process groups for the parallel code: join one (from torchrun's environment or explicit values), and
run a function on N local processes with a time limit (CPU tests and teaching examples, gloo backend).

Under `torchrun --nproc-per-node N`, every process reads RANK / WORLD_SIZE / LOCAL_RANK from its
environment and `init_distributed()` joins the group. For tests, `run_local(fn, world_size)` starts the
processes itself (torch.multiprocessing), rendezvous through a file (no ports to collide), and returns
each rank's return value, or raises if any rank failed or the time limit passed.

`lmforge COMMAND --nproc N` re-runs itself as `python -m lmforge.parallel.launch TORCHRUN-ARGS` (torchrun_argv):
torchrun, whose outcome `torchrun()` says in the failed process's own words and exit code, under a launcher that
passes signals to the processes that train (run_passing_signals).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from lmforge.errors import ConfigError, LmforgeError

# NVLink SHARP / multicast stays off on the lent multi-GPU machines (their KINDS.md): set before NCCL starts
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def backend_for(device: str) -> str:
    """The process group's backend for a run on `device` ('auto', 'cpu', 'cuda', ...): NCCL on GPUs, else gloo."""
    import torch

    from lmforge.utils import pick_device

    return "nccl" if torch.device(pick_device(device)).type == "cuda" else "gloo"


def check_local_gpus(nproc: int) -> None:
    """NCCL gives each local process its own GPU: refuse more processes than this machine has GPUs."""
    import torch

    n = torch.cuda.device_count()
    if nproc > n:
        raise ConfigError(f"{nproc} processes on the GPU need {nproc} GPUs but this machine has {n}: launch at "
                          f"most {n} per node (--nproc {max(n, 1)}), or set device = 'cpu' to run them on gloo")


def init_distributed(backend: str | None = None, expected_world: int | None = None) -> tuple[int, int]:
    """Join the process group described by torchrun's environment; returns (rank, world_size).

    backend: None = NCCL where there is a GPU, else gloo (`backend_for(device)` follows a run's device).
    `expected_world` (e.g. a config's product of mesh sizes) must equal the launched WORLD_SIZE."""
    import torch
    import torch.distributed as dist

    for k, v in NO_MULTICAST_ENV.items():
        os.environ.setdefault(k, v)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ConfigError("no distributed environment (RANK, WORLD_SIZE unset): launch with "
                              "`torchrun --nproc-per-node N ...`")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            local = int(os.environ.get("LOCAL_RANK", 0))
            check_local_gpus(max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), local + 1))
            torch.cuda.set_device(local)
        dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if expected_world is not None and expected_world != world:
        raise ConfigError(f"the parallel layout needs world_size={expected_world} processes but {world} were "
                          f"launched; launch with --nproc-per-node {expected_world} or change the layout")
    return rank, world


def torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    """The command that re-runs `lmforge <argv>` on `nproc` local processes under torchrun (for
    `lmforge train --nproc N`: exec this with --nproc removed; every process then calls init_distributed)."""
    import sys

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "lmforge.parallel.launch", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lmforge", *argv]


def torchrun(args: list[str]) -> int:
    """torchrun (torch.distributed.run) run on `args`, its outcome said as one lmforge command says it: the exit code
    of the process that failed (it has printed its own error), without torchrun's log lines, traceback and table of
    failed ranks that followed the one-line error N times over; one line for a process a signal ended (the OOM
    killer's SIGKILL), which printed nothing itself; 128 + the signal where torchrun itself was stopped by one,
    quietly also before its own handlers are in place (a Ctrl-C while torch loaded printed Python's traceback of
    torch's imports, or aborted inside its C++)."""
    import logging

    with quiet_signals():  # until torchrun puts its own in place, just before it starts workers (none is left behind)
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import parse_args, run

        logging.disable(logging.ERROR)  # (this process runs torchrun alone: the processes that train log as they do)
        try:
            run(parse_args(args))
        except ChildFailedError as e:
            return _failed_worker(e.failures)
        except SignalException as e:
            return 128 + int(e.sigval)
    return 0


def _failed_worker(failures: dict) -> int:
    """The exit code of the process that failed by itself, of torchrun's {rank: ProcessFailure}: an error's code
    before a signal's (a death by one, or 128 + it from end_quietly or Python's Ctrl-C), and of signals one other
    than the SIGTERM torchrun then ends the others with (the failures' timestamps, in whole seconds, mostly tie); a
    death by a signal is said in one line (the process printed nothing)."""
    import signal
    import sys

    def by_signal(code: int) -> int:
        return -code if code < 0 else code - 128 if code > 128 else 0

    rank, failure = min(failures.items(), key=lambda kv: (
        by_signal(kv[1].exitcode) != 0, by_signal(kv[1].exitcode) == signal.SIGTERM, kv[1].timestamp, kv[0]))
    if failure.exitcode > 0:
        return failure.exitcode
    try:
        name = signal.Signals(-failure.exitcode).name
    except ValueError:
        name = f"signal {-failure.exitcode}"
    hint = " (out of memory?)" if name == "SIGKILL" else ""
    print(f"lmforge: the process of rank {rank} was ended by {name}{hint}", file=sys.stderr)
    return 128 - failure.exitcode


SECOND_SIGNAL_GRACE = 3.0
"""seconds the processes get to end after a second signal (their "stop at once") before they are killed"""

SIGNAL_ECHO_S = 0.25
"""a stop signal the launcher gets this soon after the one before is that one delivered twice, not a second: coreutils
`timeout` signals its command and then the command's process group, and the workers, told twice, stopped at once
inside their step without a checkpoint (a person's second Ctrl-C comes later)"""


class SignalEcho:
    """Tells one stop signal delivered twice from a second one (SIGNAL_ECHO_S): for the launcher, and for each process
    that trains, which a scheduler signalling every process of a job (SLURM's `scancel`, `kill -TERM` to a group)
    reaches directly and also through the launcher and torchrun. The time is when Python runs the handler, not when the
    signal arrived: Python runs it only after the C call in flight returns, so a copy that arrived during a long one
    can be judged a second signal (the trainer covers its step boundary's all-reduce: lmforge.train.interrupts)."""

    def __init__(self):
        self._sig: int | None = None
        self._at = -float("inf")

    def repeat(self, signum: int) -> bool:
        """Whether `signum` is the signal before delivered again (the same one within SIGNAL_ECHO_S of it); if not,
        it becomes the signal before."""
        now = time.monotonic()
        if signum == self._sig and now - self._at < SIGNAL_ECHO_S:
            return True
        self._sig, self._at = signum, now
        return False


LAUNCHER_PID_ENV = "LMFORGE_LAUNCHER_PID"
"""names, to torchrun's process of an `--nproc` launch, the launcher it must not outlive (end_with_launcher)"""


def end_with_launcher() -> None:
    """In torchrun's process: a SIGTERM when the launcher that started it ends (Linux's parent-death signal). A launcher
    SIGKILLed (`kill -9`, a harness's subprocess timeout) passes nothing on, and torchrun, in a session of its own,
    went on training with no one to stop it (holding the run_dir's lock); told, it passes the SIGTERM to the
    workers, which stop at a step boundary with a checkpoint. Elsewhere (no launcher named, not Linux) nothing."""
    import ctypes
    import signal
    import sys

    launcher = os.environ.pop(LAUNCHER_PID_ENV, None)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != int(launcher):  # it ended before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def end_quietly(signum, frame) -> None:
    """A signal handler: end this process at once with exit code 128 + signum, printing nothing."""
    os._exit(128 + signum)


@contextlib.contextmanager
def quiet_signals():
    """While the block runs, SIGINT, SIGTERM, SIGHUP and SIGQUIT end this process at once and quietly (end_quietly),
    then their handlers are as they were; a signal ignored stays ignored. For a process of an `--nproc N` launch
    that has nothing to save yet: a Ctrl-C while it imported torch printed Python's traceback, an "Exception ignored
    ... KeyboardInterrupt" (after which the import went on), or aborted inside torch's C++. Python runs the handler
    between bytecodes, never inside C++; the Trainer puts its own in place while it trains (interrupts.py). Off the
    main thread (which alone may set handlers, and alone gets signals) it changes nothing."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with handling_stop_signals(end_quietly, keep_ignored=True):
        yield


@contextlib.contextmanager
def handling_stop_signals(handler, keep_ignored: bool = False):
    """While the block runs, `handler` takes SIGINT, SIGTERM, SIGHUP and SIGQUIT (the signals a terminal, a job
    scheduler or a container's stop ends a run with), then each has its handler as before; `keep_ignored`: a
    signal this process ignores stays ignored."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    for s, was in before.items():
        if not (keep_ignored and was is signal.SIG_IGN):
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, was in before.items():
            signal.signal(s, was if was is not None else signal.SIG_DFL)


def run_passing_signals(argv: list[str]) -> int:
    """Run `argv` (the torchrun command of torchrun_argv) to its end, in a process group of its own, passing every
    SIGINT, SIGTERM, SIGHUP and SIGQUIT this process gets on to the processes it runs; its exit code, or
    KeyboardInterrupt once it has ended after a signal. A signal goes to torchrun's workers (each leads a session
    of its own, out of a terminal's reach), which stop at a step boundary, write a checkpoint
    (lmforge.train.interrupts) and end; torchrun sees them end. Not to torchrun: told, it passes the signal on and
    SIGKILLs the workers 30 s later (its shutdown timeout), which lost a checkpoint whose step and write took
    longer. Only before torchrun has started workers does it get the signal (and ends, with nothing to save).
    Without this, a signal to the launcher alone (`kill PID`, a container's stop: SIGTERM to its first process)
    ended it and left torchrun training with no one to stop it. A terminal's Ctrl-C reaches only this process
    (torchrun is not in the terminal's group), so the workers get it once, not twice. A second signal goes to the
    workers too, and whatever still runs SECOND_SIGNAL_GRACE seconds later is killed (a rank that stops at once
    leaves the others waiting inside its collectives, where no signal reaches them). The same signal within
    SIGNAL_ECHO_S of the one before is that one again (`timeout`'s), and is not passed on (SIGINT then SIGTERM
    is). Where this process dies without a word
    (SIGKILL), torchrun gets a SIGTERM (end_with_launcher)."""
    import subprocess

    passed: list[int] = []
    echo = SignalEcho()
    proc = None

    def pass_on(signum, frame) -> None:
        if echo.repeat(signum):  # the signal before, delivered twice
            return
        passed.append(signum)
        if proc is not None and proc.poll() is None:
            workers = child_pids(proc.pid)
            for pid in workers:
                _signal_group(pid, signum)
            if not workers:
                proc.send_signal(signum)

    # (set before the start: a signal between the two would leave torchrun running; SIGHUP, a closed terminal, and
    # SIGQUIT are signals torchrun stops its workers on, which its own session no longer gets from the terminal)
    with handling_stop_signals(pass_on):
        proc = subprocess.Popen(argv, start_new_session=True, env={**os.environ, LAUNCHER_PID_ENV: str(os.getpid())})
        if passed:  # (a signal while it started)
            proc.send_signal(passed[-1])
        rc = _wait_or_kill(proc, passed)
    if passed:
        raise KeyboardInterrupt
    return rc


def _wait_or_kill(proc, passed: list[int]) -> int:
    """proc's exit code; SECOND_SIGNAL_GRACE seconds after a second signal, proc's workers (its children, each
    with the process group it leads: a data loader's workers too) and proc's own group are SIGKILLed first."""
    import signal
    import subprocess
    import sys

    deadline = None
    while True:
        try:
            return proc.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            pass
        if len(passed) < 2:
            continue
        deadline = deadline or time.monotonic() + SECOND_SIGNAL_GRACE
        if time.monotonic() >= deadline:
            print(f"the processes did not stop within {SECOND_SIGNAL_GRACE:g} s of a second signal: killing them",
                  file=sys.stderr)
            for pid in [*child_pids(proc.pid), proc.pid]:  # the workers first: once torchrun dies, they are lost
                _signal_group(pid, signal.SIGKILL)
            return proc.wait()


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid`, read from /proc ([] where there is none: not Linux)."""
    from lmforge.utils import proc_stat

    children = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = proc_stat(entry.name)  # (None: ended while read)
        if fields and len(fields) > 1 and fields[1] == str(pid):
            children.append(int(entry.name))
    return children


def _signal_group(pid: int, signum: int) -> None:
    """Send `signum` to the process group `pid` leads (torchrun and its workers each lead one), else to `pid`."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # it has ended


def _worker(rank: int, fn: Callable, world: int, store: str, out_dir: str, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    except BaseException:  # the exit below skips Python's own report: print it here
        import traceback

        traceback.print_exc()
    finally:
        # a forked child can deadlock in teardown (locks of the parent's threads copied mid-use, seen once in
        # a full test run): tear down with a time limit, then leave without running exit handlers
        import threading

        t = threading.Thread(target=dist.destroy_process_group, daemon=True)
        t.start()
        t.join(timeout=10)
        os._exit(0 if (Path(out_dir) / f"rank{rank}.pt").exists() else 1)


def run_local(fn: Callable[..., Any], world_size: int, *args, timeout: float = 120.0,
              start_method: str = "spawn") -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` local processes joined by gloo; return the ranks'
    results (tensors, numbers, dicts of them) in rank order. fn must be importable (module level).
    start_method="fork" starts faster (tests use it); it becomes "spawn" on a machine with a GPU."""
    import torch
    import torch.multiprocessing as mp

    if start_method == "fork" and torch.cuda.is_available():
        # where there is a GPU, the parent's first backward (even of CPU tensors) starts autograd's device
        # threads, and a child forked after that can run no backward ("Unable to handle autograd's threading
        # in combination with fork-based multiprocessing"), nor CUDA once the parent has; spawned ones can
        start_method = "spawn"
    with tempfile.TemporaryDirectory(prefix="lmforge_dist_") as tmp:
        ctx = mp.start_processes(_worker, args=(fn, world_size, f"{tmp}/store", tmp, args), nprocs=world_size,
                                 join=False, start_method=start_method)
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise LmforgeError(f"distributed run of {fn.__name__} on {world_size} processes passed its "
                                       f"{timeout:.0f} s limit")
        finally:
            for p in ctx.processes:  # SIGTERM may be handled (the Trainer stops at a step boundary): then kill
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=5)
                if p.is_alive():
                    p.kill()
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(world_size)]


if __name__ == "__main__":  # `python -m lmforge.parallel.launch TORCHRUN-ARGS`: what torchrun_argv runs
    import sys

    end_with_launcher()
    sys.exit(torchrun(sys.argv[1:]))
