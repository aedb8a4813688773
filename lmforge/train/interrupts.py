"""Stopping the one training loop at a step boundary: the `Interrupts` a lmforge.train.trainer.Trainer owns.

SIGINT (Ctrl-C), SIGTERM (what job schedulers send), SIGHUP and SIGQUIT only set a flag while `fit` runs; the
loop stops at the next step boundary, writes a checkpoint of that state and raises KeyboardInterrupt, so resuming is
bit-exact. On N processes the ranks all-reduce their flags at every step boundary (one tiny CPU
all-reduce), so a signal reaching any one rank stops all of them at the same step, with one checkpoint.
A second signal stops at once (one while the interrupt's checkpoint is written leaves the previous one, and
says which that is); the same signal within SIGNAL_ECHO_S of the one before is that one delivered by a second route
(a scheduler that signals every process of a job reaches an `--nproc` run's processes directly and through the
launcher), not a second (lmforge.parallel.launch.SignalEcho). The window is timed when Python runs the handler,
which it does only once the C call in flight returns: a copy that arrives while this rank waits in the step boundary's
all-reduce for a slower rank is handled when that returns, often later than SIGNAL_ECHO_S, so while that all-reduce
carries this rank's flag for a signal, a repeat of that signal is never a second (`at_boundary`). What remains: a
copy that arrives in one long C call mid-step (a big matmul, another collective) and is handled more than
SIGNAL_ECHO_S after the first still counts as a second signal. A hook's Trainer.request_stop travels in the same
all-reduce and ends `fit` as a last step would.

A KeyboardInterrupt raised inside a step (a second Ctrl-C, or one raised by code) lands in one of the
step's phases, which this object tracks:

    None       at a step boundary
    "micro"    the step's begin_step hooks, forward/   -> roll back: grads and the MoE expert loads counted
               backward of the micro-batches              so far dropped, data-source, objective and RNG
                                                          state restored from the step-start snapshot
    "update"   inside optimizer.step, or the Trainer's -> no consistent state: no checkpoint is written, and
               own changes after it (the aux-loss-free    `fit` refuses to go on (a new Trainer resumes from
               MoE bias, MuonClip's QK-clip)              the last checkpoint)
    "updated"  weights updated, counters not yet       -> roll forward: the step is finished

On N processes a rank that leaves inside a step writes no checkpoint either (the others are inside its
collectives).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import torch
from tqdm.auto import tqdm

from lmforge import checkpoint as ckpt
from lmforge.errors import ConfigError
from lmforge.model.layers.moe import MoE
from lmforge.parallel.launch import SignalEcho, handling_stop_signals
from lmforge.parallel.reports import report_once
from lmforge.train import distributed as ddp

if TYPE_CHECKING:
    from lmforge.train.trainer import Trainer


def rng_state() -> dict[str, Any]:
    """The CPU (and CUDA) generator states: part of a checkpoint and of the step-start snapshot. CUDA's
    only where this process has started CUDA (a run on the GPU has, by moving its model there): reading it
    would otherwise start CUDA in a CPU run, which fails in a process forked from one that had started it."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(state["cuda_rng"])  # a GPU run has started CUDA before it resumes


class Interrupts:
    """The stop flags of one `fit` and the phase of the step in flight (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, post_update: bool = False):
        """post_update: the Trainer changes the weights again after optimizer.step (the aux-loss-free MoE bias,
        the QK-clip), so the update ends at `end_update`, not when optimizer.step returns."""
        self.phase: str | None = None
        self.snapshot: dict[str, Any] = {}
        self.signal: int | None = None  # the first SIGINT/SIGTERM received
        self.reason: str | None = None  # why a hook asked to stop (Trainer.request_stop)
        self.agreed = False  # the KeyboardInterrupt is the stop all ranks agreed on at a step boundary
        self._carried: int | None = None  # the signal whose flag the boundary all-reduce in flight carries
        self._echo = SignalEcho()
        self._step_hooks = hasattr(optimizer, "register_step_pre_hook")
        if self._step_hooks:  # torch optimizers: know exactly when the weights start and stop changing
            optimizer.register_step_pre_hook(self._set_phase("update"))
            if not post_update:
                optimizer.register_step_post_hook(self._set_phase("updated"))

    def _set_phase(self, phase: str) -> Callable:
        def hook(*_):
            self.phase = phase
        return hook

    def reset(self, trainer: Trainer) -> None:
        """A new `fit`: no signal, no agreed stop, no hook's request. Refused after an interrupt inside an
        update, whose half-updated weights no step may build on."""
        if self.phase == "update":
            where = (f"resume from {trainer.last_checkpoint}" if trainer.last_checkpoint is not None
                     else "start the run again with a new model and optimizer (no checkpoint was written)")
            raise ConfigError(f"step {trainer.step + 1} was interrupted inside its optimizer update, which left the "
                              f"weights half-updated, so this Trainer cannot go on; build a new Trainer to {where}")
        self.signal, self.agreed, self.reason, self._echo = None, False, None, SignalEcho()

    # the step's phases ----------------------------------------------------------------------------
    def begin_step(self, data, objective) -> None:
        """Snapshot (small: generator states, positions, the objective's state such as an adaptive KL
        coefficient) for rolling the step back; taken before the step's begin_step hooks run."""
        self.snapshot = {"data": data.state_dict(), "objective": objective.state_dict(), **rng_state()}
        self.phase = "micro"

    def begin_update(self) -> None:
        if not self._step_hooks:  # otherwise the optimizer's pre-hook says so from inside optimizer.step
            self.phase = "update"

    def end_update(self) -> None:
        self.phase = "updated"

    def to_boundary(self, trainer: Trainer) -> bool:
        """After an interrupt inside a step: back to the step's start while the weights are untouched,
        forward to its end once the update is complete; False inside the update (no consistent state)."""
        if self.phase == "update":
            return False
        if self.phase == "updated":
            trainer._finish_step()
        elif self.phase == "micro":
            trainer.optimizer.zero_grad(set_to_none=True)
            for m in trainer.model.modules():  # the loads the step's finished micro-batches counted
                if isinstance(m, MoE):
                    m.step_load.zero_()
            trainer.data.load_state_dict(self.snapshot["data"])
            trainer.objective.load_state_dict(self.snapshot["objective"])
            set_rng_state(self.snapshot)
            self.phase = None
        return True

    # signals and stop requests ----------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        # the first one again, by another route: one graceful stop (repeat first: a copy that is not within
        # SIGNAL_ECHO_S, yet carried, re-times the window for the copies after it)
        if self._echo.repeat(signum) or signum == self._carried:
            return
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum
        say = f"{signal.Signals(signum).name}: stopping at the end of this step (again to stop at once)"
        if report_once(say):  # (the N processes of one --nproc launch: once)
            tqdm.write(say)

    def deferred_signals(self) -> contextlib.AbstractContextManager:
        """SIGINT, SIGTERM, SIGHUP and SIGQUIT (the stop signals the --nproc launcher passes on to every process:
        launch.handling_stop_signals) set a flag the loop reads at step boundaries."""
        return _stop_signals_to(self._on_signal)

    def at_boundary(self, runner) -> bool:
        """At a step boundary: raise KeyboardInterrupt if a signal arrived, else say whether a hook asked to
        stop; on N processes both are all-reduced over the ranks in one call, so all ranks agree."""
        code = 2 * (self.signal is not None) + (self.reason is not None)
        # while the all-reduce carries this rank's signal, and until the stop is agreed, a repeat of it is that signal
        # (its handler runs only when the all-reduce returns, or at the first bytecode after it): see _on_signal
        self._carried = self.signal
        try:
            if runner is not None:
                code = ddp.max_over_ranks(code, runner.cpu_group)
            if code & 1 and self.reason is None:
                self.reason = "requested by a hook on another rank"
            if code & 2:
                self.agreed = True
                raise KeyboardInterrupt
        finally:
            self._carried = None
        return bool(code & 1)

    def interrupted(self, trainer: Trainer, bar, t_start: float) -> None:
        """After a KeyboardInterrupt left the loop: to the nearest step boundary, its pending log row,
        and a checkpoint of it where one is consistent (and not already written)."""
        if trainer.runner is not None and not self.agreed:
            # this rank left a step on its own (a second signal): the others wait inside its collectives, so no
            # common state can be saved; under torchrun they fail in turn and torchrun ends them. Every rank a
            # second signal reached says the same line: once (report_once; it named each rank, N lines)
            say = f"stopped at once inside step {trainer.step + 1}; {resume_point(trainer.run_dir)}"
            if report_once(say):  # (the N processes of one --nproc launch: once)
                tqdm.write(say)
            return
        # deferred_signals has given each signal its handler back: Ctrl-C's raises KeyboardInterrupt, but SIGTERM's
        # (SIGHUP's, SIGQUIT's) ended the process without a word while the checkpoint was written; all four raise
        with _stop_signals_to(self._stop_at_once):
            consistent = self.to_boundary(trainer)
            row_owed = trainer._pending or (trainer._logged_stats is not None
                                            and trainer._logged_stats[0] == trainer.step)
            if row_owed and trainer._logged_step != trainer.step and trainer._is_log_step():
                trainer._log_step(bar, t_start)  # a step completed by to_boundary, or interrupted before its log
            trainer.elapsed = time.perf_counter() - t_start
            trainer.flush()
            if not consistent:
                say = (f"interrupted inside the optimizer update of step {trainer.step + 1}: no consistent state to "
                       f"save; {resume_point(trainer.run_dir)}")
                if report_once(say):  # (the N processes of one --nproc launch: once)
                    tqdm.write(say)
                return  # the line above names the resume point; the ones below would say it again
            if trainer.step > 0 and not trainer.has_current_checkpoint():
                try:
                    trainer.save()
                except KeyboardInterrupt:  # a second signal: the write is atomic, so nothing of it was kept
                    self._say_resume_point(trainer)
                    raise
        if trainer.rank == 0 and trainer.last_checkpoint is None:  # (step 0: nothing to save)
            tqdm.write(f"interrupted at step {trainer.step}; {resume_point(trainer.run_dir)}")
        elif trainer.rank == 0:
            tqdm.write(f"interrupted at step {trainer.step}; checkpoint {trainer.last_checkpoint}; "
                       "run the same command again to resume")

    def _stop_at_once(self, signum, frame) -> None:
        """While the interrupt's checkpoint is written: a second signal stops the write; the first one's echo
        (SignalEcho) does not."""
        if not self._echo.repeat(signum):
            raise KeyboardInterrupt

    @staticmethod
    def _say_resume_point(trainer: Trainer) -> None:
        """After a second signal stopped the interrupt's checkpoint mid-write: which checkpoint a run started again
        resumes from (the newest complete one on disk, as lmforge.train.resume takes it)."""
        say = (f"stopped while writing the step {trainer.step} checkpoint, which was not kept: "
               f"{resume_point(trainer.run_dir)}")
        if report_once(say):  # (the N processes of one --nproc launch: once)
            tqdm.write(say)


def resume_point(run_dir) -> str:
    """Which checkpoint the same command resumes from: the newest complete one on disk (as lmforge.train.resume
    takes it), or none."""
    found = ckpt.checkpoint_dirs(run_dir)
    if not found:
        return "no checkpoint of this run is complete; running the same command again starts it from step 0"
    return (f"the last complete checkpoint is step {int(found[-1].name.removeprefix('step_'))} ({found[-1]}); "
            "run the same command again to resume from it")


@contextlib.contextmanager
def _stop_signals_to(handler: Callable):
    """While the block runs, `handler` takes SIGINT, SIGTERM, SIGHUP and SIGQUIT (main thread only; elsewhere
    Python delivers signals to the main thread anyway). A signal the process was started ignoring (SIGINT of a
    background job) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with handling_stop_signals(handler, keep_ignored=True):
        yield
