"""Post-training on 2 gloo processes (CPU) through the one Trainer: SFT under FSDP2 and DPO under DDP (its
frozen reference replicated on both ranks) and a reward model under FSDP2 and under DDP give the 1-process loss
curve and final validation metrics on the same global batch, rank 0 writes each checkpoint once, and the
2-process step-3 checkpoint resumes in one process with the rest of the uninterrupted curve; `lmforge sft
--nproc 2` runs under torchrun. tp / pp / cp are refused in the config, and --help marks them pretraining only.

Tolerance: 1e-4 absolute, as for pretraining (tests/train/test_distributed.py): the ranks' gradients are
summed in another order than one process's (about 1e-7 relative) and Adam's normalised step carries that
into the weights. SFT's packed rows hold unequal numbers of trained tokens per rank: the Trainer weighs
each rank's token-mean loss by its share of the global batch's tokens, so the curve still matches.
"""

from __future__ import annotations

import json
import shutil
import tomllib

import numpy as np
import pytest
from safetensors.torch import load_file

from lmforge.checkpoint import checkpoint_dirs
from lmforge.config import from_dict
from lmforge.errors import ConfigError
from lmforge.parallel.launch import run_local
from lmforge.train import posttrain as PT

from . import test_trainer_objectives as objectives

base = objectives.base  # the fixture: the tiny checkpoint and JSONL files

ATOL = 1e-4
LAYOUT = {"sft": {"dp_shard": 2}, "dpo": {"dp_replicate": 2}, "rm": {"dp_shard": 2}, "kto": {"dp_shard": 2}}
DATA = {"sft": "chat", "kto": "unpaired"}
BATCH_LEVEL = {"val_min_reward", "val_max_reward",  # the ranks' shares' weighted mean (see ObjectiveEvaluator)
               # KTO's per-label means: a share without one label has NaN there (val_loss and val_kl are checked)
               "val_rewards/chosen", "val_rewards/rejected", "val_rewards/margins", "val_logps/chosen",
               "val_logps/rejected"}


def _cfg(base: str, run: str, objective: str, parallel: dict | None = None):
    data = tomllib.loads(f"""
init = "{base}/base"
run_dir = "{run}"
max_steps = 6
eval_every = 3
eval_batches = 2
log_every = 1
ckpt_every = 3
device = "cpu"
progress = false
plot = false
seed = 0
[optim]
lr = 3e-3
warmup_steps = 2
[data]
train = ["{base}/{DATA.get(objective, 'pairs')}.jsonl"]
template = "plain"
seq_len = 64
batch_size = 4
val_fraction = 0.25
""")
    data["parallel"] = parallel or {}
    return from_dict(PT.config_class(objective), data)


def _losses(result) -> list[float]:
    return [r["loss"] for r in result.history if "loss" in r]


def _worker(rank: int, world: int, base: str, run: str, objective: str, layout: dict) -> dict:
    res = PT.posttrain(_cfg(base, run, objective, layout))
    return {"losses": _losses(res), "final_eval": res.final_eval, "counts": _counts(res)}


def _counts(result) -> list[tuple]:
    """Each logged step's tokens so far and its objective's counts (num_*), e.g. SFT's trained tokens."""
    return [(r["tokens"], *(r[k] for k in sorted(r) if k.startswith("num_"))) for r in result.history if "loss" in r]


# a reward model under DDP too: its backbone's LM head gets no gradient (frozen: DDP waited for it and raised)
@pytest.mark.parametrize("objective,layout", [*LAYOUT.items(), ("rm", {"dp_replicate": 2})],
                         ids=[*LAYOUT, "rm_ddp"])
def test_two_processes_match_one_and_resume_in_one(base, tmp_path, objective, layout):
    ref = PT.posttrain(_cfg(str(base), str(tmp_path / "one"), objective))
    ref_losses = _losses(ref)
    run = tmp_path / "two"
    got = run_local(_worker, 2, str(base), str(run), objective, layout, timeout=120, start_method="fork")
    assert len(ref_losses) == 6 and got[1]["losses"] == []  # only rank 0 logs
    np.testing.assert_allclose(got[0]["losses"], ref_losses, atol=ATOL, rtol=0)
    assert got[0]["counts"] == _counts(ref)  # the global batch's tokens and counts, however the ranks split it
    for r in got:  # every rank gets the same final validation metrics: the 1-process ones
        assert r["final_eval"].keys() == ref.final_eval.keys() and len(ref.final_eval) >= 2
        for k in ref.final_eval.keys() - BATCH_LEVEL:
            assert r["final_eval"][k] == pytest.approx(ref.final_eval[k], abs=ATOL), k
        assert all(np.isfinite(v) for v in r["final_eval"].values())  # a share lacking a label adds no NaN
    assert [p.name for p in checkpoint_dirs(run)] == ["step_000003", "step_000006"]  # written once, by rank 0
    a, b = (load_file(r / "checkpoints" / "step_000006" / "model.safetensors") for r in (run, tmp_path / "one"))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < ATOL
    meta = [json.loads((r / "checkpoints" / "step_000006" / "config.json").read_text())
            for r in (run, tmp_path / "one")]
    assert meta[0].get("model") == meta[1].get("model") and meta[0].get("model_class") == meta[1].get("model_class")
    assert meta[0].get("head") == meta[1].get("head") == ({"kind": "sequence", "out_dim": 1, "train_backbone": True}
                                                          if objective == "rm" else None)
    # the 2-process step-3 checkpoint resumes in one process: the rest of the uninterrupted curve
    shutil.rmtree(run / "checkpoints" / "step_000006")
    resumed = _losses(PT.posttrain(_cfg(str(base), str(run), objective)))
    np.testing.assert_allclose(resumed, ref_losses[-len(resumed):], atol=ATOL, rtol=0)
    assert len(resumed) >= 3


def test_tensor_pipeline_context_parallel_are_refused(base, tmp_path):
    with pytest.raises(ConfigError, match="data parallel only.*'tp': 2"):
        _cfg(str(base), str(tmp_path), "sft", {"tp": 2})


PRETRAINING_ONLY = ("tp", "pp", "cp", "pp-schedule", "microbatches", "sequence-parallel", "loss-parallel")


@pytest.mark.parametrize("objective", ["sft", "dpo", "rm", "distill", "kto", "orpo"])
def test_the_help_marks_the_layouts_post_training_refuses(objective, capsys, monkeypatch):
    """`lmforge sft --help` (dpo, rm, ...) listed --parallel.tp / pp / cp and their options as if they served,
    though any of tp, pp, cp > 1 is refused ("post-training runs data parallel only"): each says it is pretraining
    only; the data-parallel ones do not."""
    from lmforge.align.config import config_class
    from lmforge.cli.common import parse_config

    monkeypatch.setenv("COLUMNS", "80")  # one column: each flag's help on the lines below it
    with pytest.raises(SystemExit):
        parse_config(config_class(objective), ["--help"], prog=f"lmforge {objective}", description="")
    lines = [line.strip("│ ") for line in capsys.readouterr().out.splitlines()]
    helps, flag = {}, None
    for line in lines:
        if line.startswith("--"):
            flag = line.split()[0]
        if flag is not None:
            helps[flag] = helps.get(flag, "") + " " + line
    helps = {k: " ".join(v.split()) for k, v in helps.items()}
    for name in PRETRAINING_ONLY:
        assert "pretraining only (lmforge train)" in helps[f"--parallel.{name}"], helps[f"--parallel.{name}"]
    for name in ("dp-shard", "dp-replicate", "param-dtype"):
        assert "pretraining only" not in helps[f"--parallel.{name}"]


def test_lmforge_sft_nproc_2_runs_under_torchrun(base, tmp_path):
    """`lmforge sft --nproc 2` re-runs itself on 2 processes: one run directory, one report line."""
    import subprocess
    import sys

    from .test_trainer_objectives import REPO, _toml

    (tmp_path / "sft.toml").write_text(_toml(base, tmp_path / "run", max_steps=2))
    out = subprocess.run([sys.executable, "-m", "lmforge", "sft", "--config", str(tmp_path / "sft.toml"),
                          "--nproc", "2"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("done: 2 steps") == 1
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_000002"]


CHILD = """
import os, signal, sys, time
from pathlib import Path
log = Path(sys.argv[1])
def stop(signum, frame):
    with open(log, "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    time.sleep(0.3)  # a checkpoint being written
    with open(log, "a") as f:
        f.write("stopped\\n")
    sys.exit(0)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGHUP, stop)
log.write_text(f"ready {os.getpid()}\\n")
time.sleep(30)
"""

LAUNCHER = """
import sys, types
from lmforge.cli import train as T
from lmforge.parallel import launch
launch.torchrun_argv = lambda n, argv: [sys.executable, sys.argv[1], sys.argv[2]]  # torchrun's stand-in
try:
    rc, _ = T.relaunch("sft", ["--nproc", "2"], lambda a: types.SimpleNamespace(device="cpu"))
    print("rc", rc)
except KeyboardInterrupt:
    print("interrupted")
    sys.exit(130)
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_signal_to_the_nproc_launcher_alone_reaches_the_processes_that_train(tmp_path, sig):
    """`lmforge sft --nproc N` re-runs itself under torchrun. A SIGTERM to the launcher alone (`kill PID`, a
    container's stop) ended it and left torchrun training with no one to stop it; a SIGINT SIGKILLed torchrun
    (subprocess.call), its workers left running; a closed terminal's SIGHUP (torchrun in a session of its own no
    longer gets it) ended the launcher alone. The launcher passes each on to torchrun (here a stand-in that
    records what reaches it), waits for it to stop, and says it was interrupted."""
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "child.py").write_text(CHILD)
    log = tmp_path / "log"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tmp_path / "child.py"), str(log)],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
    child = None
    try:
        for _ in range(300):
            if log.exists() and log.read_text().startswith("ready"):
                child = int(log.read_text().split()[1])
                break
            time.sleep(0.05)
        assert child is not None, "the stand-in never started"
        os.kill(launcher.pid, getattr(signal, sig))  # the launcher alone, not its process group
        out, _ = launcher.communicate(timeout=20)
        assert log.read_text().splitlines()[1:] == [sig, "stopped"]  # it got the signal once and stopped itself
        assert (launcher.returncode, out.strip()) == (130, "interrupted")
    finally:
        launcher.kill()
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)  # (left running without the fix)
            except ProcessLookupError:
                pass
