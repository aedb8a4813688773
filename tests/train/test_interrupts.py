"""Ctrl-C / SIGTERM at many points of a step: the checkpoint is the state at a step boundary, so the
resumed run's losses equal the uninterrupted run's bit for bit (issue 16 §1)."""

import dataclasses
import signal
import time
from pathlib import Path

import pytest

from lmforge import checkpoint as ckpt
from lmforge.errors import ConfigError
from lmforge.optim.config import OptimConfig
from lmforge.parallel import launch
from lmforge.parallel.launch import SIGNAL_ECHO_S
from lmforge.train.metrics import read_metrics
from lmforge.train.trainer import Trainer, train

from .helpers import make_shard, metric_rows, tiny_config

K = 7  # the step during which the interrupt lands (off any eval/checkpoint boundary)


@pytest.fixture(autouse=True)
def python_signal_defaults():
    """Python's own handlers for the tests' duration: a process started in the background (nohup, `cmd &`
    from a script) inherits SIGINT ignored, and the Trainer rightly leaves ignored signals alone."""
    old = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                               (signal.SIGTERM, signal.SIG_DFL))}
    yield
    for s, h in old.items():
        signal.signal(s, h)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupts")
    shard = make_shard(tmp / "t.bin")
    full = _losses(train(tiny_config(shard, tmp / "full", max_steps=20, eval_every=10, ckpt_every=100)))
    return shard, full


def _losses(result):
    return [r["loss"] for r in result.history if "loss" in r]


class _Interrupt:
    """At step K, `fire()` delivers `kind`: a real signal (SIGINT/SIGTERM, once, "twice" as a person's second
    Ctrl-C, "echoed" as one delivered by two routes at once) or a KeyboardInterrupt raised in place."""

    def __init__(self, tr, kind, after_step=K):
        self.tr, self.kind, self.after_step, self.done = tr, kind, after_step, False

    def fire(self):
        if self.done or self.tr.step != self.after_step:
            return
        self.done = True
        if self.kind == "raise":
            raise KeyboardInterrupt
        sig = {"sigterm": signal.SIGTERM, "echoed": signal.SIGTERM, "sighup": signal.SIGHUP,
               "sigquit": signal.SIGQUIT}.get(self.kind, signal.SIGINT)
        signal.raise_signal(sig)
        if self.kind == "twice":
            time.sleep(SIGNAL_ECHO_S + 0.05)  # (sooner, it is the first one delivered twice)
        if self.kind in ("twice", "echoed"):
            signal.raise_signal(sig)


def _wrap(obj, name, before, intr):
    real = getattr(obj, name)

    def wrapped(*a, **k):
        if before:
            intr.fire()
        out = real(*a, **k)
        if not before:
            intr.fire()
        return out

    setattr(obj, name, wrapped)


class _Hook:
    def __init__(self, intr, name):
        setattr(self, name, lambda trainer, *a: intr.fire())


def _arm(tr, point, intr):
    if point == "next_batch":
        _wrap(tr.data, "next_batch", False, intr)  # after the sampler drew the batch
    elif point == "forward":
        _wrap(tr, "loss_fn", True, intr)
    elif point == "backward":
        tr.model.tok_emb.weight.register_hook(lambda g: intr.fire())
    elif point == "before_optimizer":
        _wrap(tr.optimizer, "step", True, intr)
    elif point == "after_optimizer":
        _wrap(tr.optimizer, "step", False, intr)
    elif point == "eval":
        intr.after_step = 10
        _wrap(tr, "evaluator", True, intr)
    else:  # a hook point
        tr.hooks.append(_Hook(intr, point))


def _interrupted_run(shard, run_dir, point, kind):
    cfg = tiny_config(shard, run_dir, max_steps=20, eval_every=10, ckpt_every=100)
    tr = Trainer(cfg)
    intr = _Interrupt(tr, kind)
    _arm(tr, point, intr)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert intr.done
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    return cfg


SIGNAL_POINTS = ["next_batch", "forward", "backward", "before_optimizer", "after_optimizer", "on_step_end",
                 "on_log", "eval"]


@pytest.mark.parametrize("point", SIGNAL_POINTS)
def test_a_signal_anywhere_in_a_step_checkpoints_the_step_boundary(setup, tmp_path, point):
    shard, full = setup
    cfg = _interrupted_run(shard, tmp_path / "run", point, "sigint")
    # the step in flight finishes, then the loop stops (hooks and eval run after step K's update)
    want = {"eval": 10, "on_step_end": K, "on_log": K}.get(point, K + 1)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == [f"step_{want:06d}"]
    assert _losses(train(cfg)) == full


@pytest.mark.parametrize("kind", ["sigterm", "twice"])
def test_sigterm_is_ctrl_c_and_a_second_signal_stops_at_once(setup, tmp_path, kind):
    shard, full = setup
    cfg = _interrupted_run(shard, tmp_path / "run", "forward", kind)
    # SIGTERM waits for the step to end; a second SIGINT interrupts the forward: rolled back to step K
    want = K + 1 if kind == "sigterm" else K
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == [f"step_{want:06d}"]
    assert _losses(train(cfg)) == full


def test_one_signal_delivered_by_two_routes_is_one_graceful_stop(setup, tmp_path, monkeypatch):
    """SLURM's scancel (`kill -TERM` to a group) signals every process of an `--nproc` run, which the launcher and
    torchrun pass on again: each rank took the second SIGTERM as "stop at once" and left its step without a
    checkpoint ("rank 0 stopped inside step 6; no checkpoint of this run is complete"). Within SIGNAL_ECHO_S it is
    the first one again: the step ends and is checkpointed, as for one SIGTERM."""
    monkeypatch.setattr(launch, "SIGNAL_ECHO_S", 5.0)  # (a busy machine's delay is not a second signal)
    shard, full = setup
    cfg = _interrupted_run(shard, tmp_path / "run", "forward", "echoed")
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == [f"step_{K + 1:06d}"]
    assert _losses(train(cfg)) == full


@pytest.mark.parametrize("again", [signal.SIGTERM, signal.SIGINT])
def test_a_copy_handled_late_after_the_boundary_all_reduce_is_not_a_second_signal(monkeypatch, again):
    """Python runs a handler only when the C call in flight returns: the copy of a SIGTERM that reached a rank while
    it waited in the step boundary's all-reduce for a slower rank was handled when that returned, later than
    SIGNAL_ECHO_S, and raised "stop at once" before the stop was agreed (no checkpoint, the others hung in the save).
    While the all-reduce carries this rank's flag for the signal, a repeat of it is that signal; another is a second."""
    import torch

    from lmforge.train import distributed as ddp
    from lmforge.train.interrupts import Interrupts

    def slow_all_reduce(code, group):  # a slower rank: the copy arrives now, its handler runs as the wait ends
        time.sleep(SIGNAL_ECHO_S + 0.05)
        signal.raise_signal(again)
        return code

    monkeypatch.setattr(ddp, "max_over_ranks", slow_all_reduce)
    interrupts = Interrupts(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    with interrupts.deferred_signals():
        signal.raise_signal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            interrupts.at_boundary(runner=type("Runner", (), {"cpu_group": None})())
    assert interrupts.signal == signal.SIGTERM
    assert interrupts.agreed is (again == signal.SIGTERM)  # agreed: the interrupt's checkpoint is written


@pytest.mark.parametrize("kind", ["sighup", "sigquit"])
def test_sighup_and_sigquit_stop_at_a_step_boundary_as_sigterm_does(setup, tmp_path, kind):
    """The --nproc launcher passes SIGHUP (a closed terminal) and SIGQUIT (Ctrl-\\) on to every process as it does
    SIGINT and SIGTERM, but the Trainer took only those two: a launched process then ended at once, mid-step,
    with no checkpoint. They now wait for the step to end and checkpoint it."""
    shard, full = setup
    def unhandled(signum, frame):  # (what reached no Trainer handler: a failure here, not a killed test run)
        raise RuntimeError(f"{signal.Signals(signum).name} was not handled by the Trainer")

    old = {s: signal.signal(s, unhandled) for s in (signal.SIGHUP, signal.SIGQUIT)}
    try:
        cfg = _interrupted_run(shard, tmp_path / "run", "forward", kind)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == [f"step_{K + 1:06d}"]
    assert _losses(train(cfg)) == full


@pytest.mark.parametrize("point", ["next_batch", "forward", "backward", "before_optimizer", "after_optimizer"])
def test_an_interrupt_raised_in_a_step_goes_to_a_boundary(setup, tmp_path, point):
    """Raised before the update: the step is rolled back; after it: the step is completed."""
    shard, full = setup
    cfg = _interrupted_run(shard, tmp_path / "run", point, "raise")
    want = K + 1 if point == "after_optimizer" else K
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == [f"step_{want:06d}"]
    assert _losses(train(cfg)) == full


@pytest.mark.parametrize("point", ["on_step_end", "on_log", "eval"])
def test_an_evaluation_the_interrupt_cut_off_runs_at_resume(setup, tmp_path, point):
    """A KeyboardInterrupt between step 10's update and its evaluation (a second Ctrl-C in a hook, the log or
    the evaluation itself) checkpoints step 10 without its val_loss row: the resumed run evaluates first, so the
    run's metrics (losses and validation losses, row for row) equal the uninterrupted run's."""
    shard, _ = setup
    full = metric_rows(train(tiny_config(shard, tmp_path / "full", max_steps=20, eval_every=10, ckpt_every=100)))
    cfg = tiny_config(shard, tmp_path / "run", max_steps=20, eval_every=10, ckpt_every=100)
    tr = Trainer(cfg)
    intr = _Interrupt(tr, "raise", after_step=10)
    _arm(tr, point, intr)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == ["step_000010"]
    assert not [r for r in read_metrics(tmp_path / "run") if r["step"] == 10 and "val_loss" in r]
    assert metric_rows(train(cfg)) == full


def test_an_interrupt_inside_the_update_writes_no_checkpoint(setup, tmp_path):
    shard, _ = setup
    tr = Trainer(tiny_config(shard, tmp_path / "run", max_steps=20, ckpt_every=100))
    intr = _Interrupt(tr, "raise")
    tr.optimizer.register_step_pre_hook(lambda *_: intr.fire())  # runs after the trainer's own pre-hook
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert intr.done and ckpt.checkpoint_dirs(tmp_path / "run") == []


def test_resuming_with_another_optimizer_refuses_unless_asked(setup, tmp_path):
    shard, _ = setup
    cfg = tiny_config(shard, tmp_path / "run", max_steps=4, ckpt_every=4)
    train(cfg)
    for name in ("lion", "muon"):
        other = dataclasses.replace(cfg, max_steps=6, optim=dataclasses.replace(cfg.optim, name=name))
        with pytest.raises(ConfigError, match=f"trained with optimizer adamw/AdamW but the config says {name}/"):
            Trainer(other)
    fresh = Trainer(dataclasses.replace(other, reset_optimizer=True))
    assert fresh.step == 4 and not fresh.optimizer.state  # weights and step restored, optimizer fresh
    fresh.fit()
    assert fresh.step == 6


def test_partial_checkpoint_folders_are_removed_at_resume(setup, tmp_path):
    shard, _ = setup
    cfg = tiny_config(shard, tmp_path / "run", max_steps=4, ckpt_every=4)
    train(cfg)
    junk = tmp_path / "run" / "checkpoints" / ".tmp_step_000008_999999999"
    junk.mkdir()
    (junk / "model.safetensors").write_bytes(b"\0" * 100)
    Trainer(cfg)
    assert not junk.exists()


def _val_steps(run_dir):
    return [r["step"] for r in read_metrics(run_dir) if "val_loss" in r]


def test_an_owed_evaluation_is_logged_once_however_often_the_run_resumes(setup, tmp_path):
    """The resume that logs step 10's owed evaluation rewrites step 10's checkpoint, so a later resume from it
    (after a kill before the next checkpoint, or the finished run started again) does not log it again."""
    shard, _ = setup
    full_cfg = tiny_config(shard, tmp_path / "full", max_steps=20, eval_every=10, ckpt_every=10)
    full = metric_rows(train(full_cfg))
    cfg = dataclasses.replace(full_cfg, run_dir=str(tmp_path / "run"))
    tr = Trainer(cfg)
    _arm(tr, "on_step_end", _Interrupt(tr, "raise", after_step=10))
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert ckpt.load_train_state(ckpt.checkpoint_dirs(tmp_path / "run")[-1])["evaluated_step"] == 0
    for _ in range(2):  # resumed at step 10 = max_steps: the owed evaluation, then nothing to do
        train(dataclasses.replace(cfg, max_steps=10))
    assert _val_steps(tmp_path / "run") == [0, 10]
    assert ckpt.load_train_state(ckpt.checkpoint_dirs(tmp_path / "run")[-1])["evaluated_step"] == 10
    assert metric_rows(train(cfg)) == full
    assert ckpt.load_train_state(ckpt.checkpoint_dirs(tmp_path / "run")[-1])["evaluated_step"] == 20


def test_an_interrupt_while_a_log_row_is_built_keeps_the_row(setup, tmp_path):
    """A second Ctrl-C inside the data source's log_stats (after the step's metrics were read): the row is
    still written before the checkpoint, so the resumed run's rows equal the uninterrupted run's."""
    shard, _ = setup
    full = metric_rows(train(tiny_config(shard, tmp_path / "full", max_steps=20, eval_every=10, ckpt_every=100)))
    cfg = tiny_config(shard, tmp_path / "run", max_steps=20, eval_every=10, ckpt_every=100)
    tr = Trainer(cfg)
    intr = _Interrupt(tr, "raise")
    tr.data.log_stats = lambda: intr.fire() or {"data/extra": 1.0}
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert intr.done and [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == [f"step_{K:06d}"]
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == list(range(1, K + 1))
    assert metric_rows(train(cfg)) == full


def test_a_second_trainer_on_a_run_dir_in_use_is_refused(setup, tmp_path):
    """Two processes on one run_dir would interleave metrics.jsonl and checkpoints: the second is refused,
    naming the holder's PID, until the first one's fit ends (or close())."""
    import os

    shard, _ = setup
    cfg = tiny_config(shard, tmp_path / "run", max_steps=4, ckpt_every=4, optim=OptimConfig(lr=3e-3, warmup_steps=2))
    first = Trainer(cfg)
    with pytest.raises(ConfigError, match=rf"in use by another training process \(PID {os.getpid()}\)"):
        Trainer(dataclasses.replace(cfg, resume=True))
    assert first.fit().steps == 4  # the refused one touched nothing
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2, 3, 4]
    again = Trainer(dataclasses.replace(cfg, max_steps=6))  # fit released the run_dir
    assert again.step == 4
    again.close()
    assert Trainer(dataclasses.replace(cfg, max_steps=6)).fit().steps == 6


def test_a_trainer_nothing_refers_to_gives_its_run_dir_to_the_next(setup, tmp_path):
    """A Trainer sits in a reference cycle, so `del` did not release its run_dir lock (only a later garbage
    collection did): a new Trainer on that run_dir in the same process (a notebook cell run again) was refused,
    naming this very process (review, 2026-12-05). The lock's owner is collected first now. (A fresh interpreter:
    pytest's own references keep the first Trainer out of a plain cycle.)"""
    import subprocess
    import sys

    shard, _ = setup
    code = (f"import gc, sys; sys.path.insert(0, {str(Path(__file__).parents[2])!r})\n"
            "from pathlib import Path\nfrom tests.train.helpers import tiny_config\n"
            "from lmforge.train.trainer import Trainer\n"
            f"cfg = tiny_config(Path({str(shard)!r}), Path({str(tmp_path / 'run')!r}), max_steps=2)\n"
            "gc.disable()\nt = Trainer(cfg)\ndel t\nprint(Trainer(cfg).fit().steps)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "2"


class _Adaptive:
    """An objective whose state its begin_step moves (an adaptive KL coefficient's update): the LM loss x beta."""

    def __init__(self, inner):
        self.inner, self.beta = inner, 1.0

    def begin_step(self, trainer):
        self.beta *= 0.5

    def loss(self, model, batch):
        loss, metrics = self.inner.loss(model, batch)
        return loss * self.beta, {**metrics, "beta": self.beta}

    def state_dict(self):
        return {"beta": self.beta}

    def load_state_dict(self, state):
        self.beta = state["beta"]


def test_an_interrupt_raised_in_a_step_rolls_the_objectives_state_back(setup, tmp_path):
    """A KeyboardInterrupt inside step 3 (after its begin_step hooks moved the objective's beta) rolled the data
    source and the RNG back but not the objective: the step-2 checkpoint held step 3's beta and the resumed run
    applied begin_step twice. The objective's state is rolled back with the rest: bit-exact resume."""
    import torch

    from lmforge.train.pretrain import pretraining_parts

    shard, _ = setup

    def run(name, interrupt=False):
        model, opt, data, obj, config, *_ = pretraining_parts(
            tiny_config(shard, tmp_path / name, max_steps=5, eval_every=100, ckpt_every=100))
        tr = Trainer(model, opt, data, _Adaptive(obj), config=config)
        if interrupt:
            intr = _Interrupt(tr, "raise", after_step=2)
            _wrap(tr.data, "next_batch", True, intr)
            with pytest.raises(KeyboardInterrupt):
                tr.fit()
            assert tr.objective.beta == 0.25  # as at step 2's end
            return None
        return tr, tr.fit()

    full, full_res = run("full")
    run("run", interrupt=True)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == ["step_000002"]
    resumed, res = run("run")
    assert resumed.objective.beta == full.objective.beta == 0.5 ** 5
    assert metric_rows(res) == metric_rows(full_res)
    assert all(torch.equal(p, q) for p, q in zip(full.model.parameters(), resumed.model.parameters()))


@pytest.mark.parametrize("kind", ["sigint", "sigterm", "sighup", "sigquit"])
def test_a_second_signal_during_the_interrupts_checkpoint_names_the_resume_point(setup, tmp_path, monkeypatch, capsys,
                                                                                  kind):
    """A second Ctrl-C while the interrupt's checkpoint is written (a slow disk) aborts the write; the previous
    checkpoint survives, and one line names it as the one a run started again resumes from. A second SIGTERM (SIGHUP,
    SIGQUIT) met its default handler, back after the loop's, and ended the process without a word: the same now."""
    shard, full = setup
    cfg = tiny_config(shard, tmp_path / "run", max_steps=20, eval_every=10, ckpt_every=5)
    tr = Trainer(cfg)
    _arm(tr, "forward", _Interrupt(tr, kind))
    from lmforge.checkpoint import save  # (where save_checkpoint calls _write)

    real, sig = save._write, getattr(signal, kind.upper())

    def slow_write(tmp, step, *a):
        real(tmp, step, *a)
        if step == K + 1:  # the interrupt's checkpoint: written but not yet renamed into place
            time.sleep(SIGNAL_ECHO_S + 0.05)  # (sooner, it is the first signal delivered twice)
            signal.raise_signal(sig)

    def unhandled(signum, frame):  # (stands for SIG_DFL: a failure here, not a killed test run)
        raise RuntimeError(f"{signal.Signals(signum).name} reached the handler it had before fit")

    monkeypatch.setattr(save, "_write", slow_write)
    before = signal.signal(sig, unhandled) if sig != signal.SIGINT else None
    try:
        with pytest.raises(KeyboardInterrupt):
            tr.fit()
    finally:
        if before is not None:
            signal.signal(sig, before)
    last = tmp_path / "run" / "checkpoints" / "step_000005"
    assert ckpt.checkpoint_dirs(tmp_path / "run") == [last]
    out = capsys.readouterr().out
    assert (f"stopped while writing the step {K + 1} checkpoint, which was not kept: the last complete checkpoint "
            f"is step 5 ({last}); run the same command again to resume from it") in out
    monkeypatch.setattr(save, "_write", real)
    assert _losses(train(cfg)) == full


def test_the_first_signals_echo_during_the_interrupts_checkpoint_keeps_the_write(setup, tmp_path, monkeypatch):
    """The echo of the first SIGTERM (SignalEcho) landing while its checkpoint is written is not a second signal:
    the write completes and is kept."""
    monkeypatch.setattr(launch, "SIGNAL_ECHO_S", 5.0)  # (a busy machine's delay is not a second signal)
    shard, full = setup
    cfg = tiny_config(shard, tmp_path / "run", max_steps=20, eval_every=10, ckpt_every=100)
    tr = Trainer(cfg)
    _arm(tr, "forward", _Interrupt(tr, "sigterm"))
    from lmforge.checkpoint import save  # (where save_checkpoint calls _write)

    real = save._write

    def echoed_write(tmp, step, *a):
        real(tmp, step, *a)
        signal.raise_signal(signal.SIGTERM)  # (at once: within SIGNAL_ECHO_S of the first)

    monkeypatch.setattr(save, "_write", echoed_write)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == [f"step_{K + 1:06d}"]
    monkeypatch.setattr(save, "_write", real)
    assert _losses(train(cfg)) == full


def test_a_rank_that_stops_at_once_before_any_checkpoint_says_the_run_starts_again(tmp_path, capsys):
    """A rank of an `--nproc` run a second signal stopped inside a step before any checkpoint said
    "rank 1 stopped inside step 25; resume from None"; it names what the same command does instead."""
    import types

    import torch

    from lmforge.train.interrupts import Interrupts

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    trainer = types.SimpleNamespace(runner=object(), rank=1, step=24, last_checkpoint=None, run_dir=tmp_path / "run")
    Interrupts(opt).interrupted(trainer, None, 0.0)
    assert capsys.readouterr().out == ("stopped at once inside step 25; no checkpoint of this run is complete; "
                                       "running the same command again starts it from step 0\n")


def test_ranks_a_second_signal_stopped_inside_a_step_say_so_once(tmp_path, capsys):
    """A second Ctrl-C to `lmforge train --nproc 2` reaches every rank inside a step: each printed "rank R stopped
    inside step 3; ..." (N lines saying one thing). Said once for the launch (report_once)."""
    import types

    import torch

    from lmforge.parallel.reports import shared_reports
    from lmforge.train.interrupts import Interrupts

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with shared_reports():  # (what the launcher sets up for the processes it starts)
        for rank in range(2):
            trainer = types.SimpleNamespace(runner=object(), rank=rank, step=2, last_checkpoint=None,
                                            run_dir=tmp_path / "run")
            Interrupts(opt).interrupted(trainer, None, 0.0)
    assert capsys.readouterr().out == ("stopped at once inside step 3; no checkpoint of this run is complete; "
                                       "running the same command again starts it from step 0\n")


def test_an_interrupt_in_the_first_step_says_the_run_starts_again(setup, tmp_path, capsys):
    """A Ctrl-C inside step 1 (rolled back to step 0, nothing to save) said "interrupted at step 0; checkpoint None"."""
    shard, _ = setup
    tr = Trainer(tiny_config(shard, tmp_path / "run", max_steps=20, eval_every=10, ckpt_every=100))
    _arm(tr, "forward", _Interrupt(tr, "raise", after_step=0))
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert ("interrupted at step 0; no checkpoint of this run is complete; running the same command again starts it "
            "from step 0\n") in capsys.readouterr().out
