"""Pieces for benchmarks that train through the one Trainer (lmforge.train.trainer): a DataSource over
fixed batches, a hook that times optimizer steps, and a Trainer whose run directory is thrown away.

A benchmark trains with the same loop as `lmforge train` and `lmforge sft`, so what it measures is what
users run; these pieces only hand the loop its batches, read its clock and discard its run directory:

    timer = StepTimer()
    scratch_fit(model, optimizer, FixedBatches(batches), SFTObjective(), LoopConfig(max_steps=len(batches)),
                hooks=[timer])
    timer.times          # seconds of each timed step, the device synchronised at every step end

Throughput benchmarks that need neither evaluation nor the final checkpoint call `Trainer.train_step()`
(one optimizer step, hooks included) of a `scratch_trainer` a fixed number of times instead of `fit()`,
as bench/train_throughput.py does.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import warnings
from dataclasses import replace
from typing import Any, Callable, Iterable, Iterator

import torch

from lmforge.errors import ConfigWarning
from lmforge.train.config import LoopConfig
from lmforge.train.objective import Batch, DataSource, Objective
from lmforge.train.trainer import Trainer, TrainResult


class FixedBatches:
    """A DataSource over a given list of batches, served in order and cycled; the state is the position.
    Batches stay where they are (CPU tensors: the Trainer moves them to its device)."""

    def __init__(self, batches: list[Batch]):
        if not batches:
            raise ValueError("FixedBatches needs at least one batch")
        self.batches, self.i = list(batches), 0

    def next_batch(self) -> Batch:
        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.i = state["i"]


class StepTimer:
    """Trainer hook: seconds per optimizer step, measured between step ends with the device synchronised.

    The clock starts at the first step's end, so that step (allocation, kernel selection, compilation)
    is a warm-up and is not timed, unless an evaluation ran before it (fit() evaluates at step 0 when it
    has an evaluator). Evaluations and checkpoint writes are not counted: the clock restarts after each.
    Logging (every log_every steps: one host sync and a metrics.jsonl line) is counted in its step."""

    def __init__(self):
        self.times: list[float] = []
        self._last: float | None = None

    @staticmethod
    def _now(trainer: Trainer) -> float:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        return time.perf_counter()

    def on_step_end(self, trainer: Trainer, stats: dict) -> None:
        now = self._now(trainer)
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now

    def on_eval(self, trainer: Trainer, metrics: dict) -> None:
        self._last = self._now(trainer)

    def on_save(self, trainer: Trainer, path) -> None:
        self._last = self._now(trainer)

    @property
    def total(self) -> float:
        return sum(self.times)


@contextlib.contextmanager
def scratch_trainer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: DataSource,
                    objective: Objective, config: LoopConfig, *, hooks: Iterable[Any] = (),
                    evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None) -> Iterator[Trainer]:
    """A Trainer whose run directory is temporary, deleted on exit (with the metrics and checkpoint
    `fit()` writes there). The run starts fresh (resume off) with no progress bar and no plot; every
    other setting comes from `config`."""
    with tempfile.TemporaryDirectory(prefix="lmforge_scratch_") as run_dir:
        with warnings.catch_warnings():  # (the caller's config warned of its settings when it was built)
            warnings.simplefilter("ignore", ConfigWarning)
            cfg = replace(config, run_dir=run_dir, resume=False, progress=False, plot=False)
        yield Trainer(model, optimizer, data, objective, config=cfg, hooks=hooks, evaluator=evaluator)


def scratch_fit(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: DataSource, objective: Objective,
                config: LoopConfig, *, hooks: Iterable[Any] = (),
                evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None) -> TrainResult:
    """`fit()` of a scratch_trainer: the metrics rows come back in the result's history; the checkpoint
    written at the last step is not kept."""
    with scratch_trainer(model, optimizer, data, objective, config, hooks=hooks, evaluator=evaluator) as trainer:
        return trainer.fit()
