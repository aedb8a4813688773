"""Data-parallel pretraining through the one Trainer on 2 gloo processes (CPU): the same loss curve as one
process on the same global batch (FSDP2 and DDP layouts), and checkpoints written by 2 processes resume in
1 process, and by 1 process in 2, with the uninterrupted run's losses.

Tolerance: 1e-4 absolute on each step's loss. The ranks' gradients are summed in another order than one
process's batch (about 1e-7 relative); Adam's normalised step carries that into the weights.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from lmforge.checkpoint import load_model
from lmforge.errors import ConfigError
from lmforge.parallel.config import ParallelConfig
from lmforge.parallel.launch import run_local
from lmforge.train.trainer import train

from .helpers import make_shard, tiny_config

ATOL = 1e-4
STEPS = dict(max_steps=10, eval_every=5, ckpt_every=5, keep_last=3)


def _losses(history):
    return [r["loss"] for r in history if "loss" in r]


def _train_worker(rank: int, world: int, shard: str, run_dir: str, layout: dict) -> list[float]:
    res = train(tiny_config(shard, run_dir, parallel=ParallelConfig(**layout), **STEPS))
    return _losses(res.history)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    shard = make_shard(tmp / "t.bin")
    return shard, _losses(train(tiny_config(shard, tmp / "run", **STEPS)).history), tmp / "run"


@pytest.mark.parametrize("layout", [{"dp_shard": 2}, {"dp_replicate": 2}], ids=["fsdp2", "ddp"])
def test_two_processes_match_one_and_resume_in_one(single, tmp_path, layout):
    shard, ref, ref_run = single
    run = tmp_path / "run"
    got = run_local(_train_worker, 2, str(shard), str(run), layout, timeout=120, start_method="fork")
    assert got[1] == []  # only rank 0 reads (and writes) the metrics
    assert len(got[0]) == len(ref) == STEPS["max_steps"]
    np.testing.assert_allclose(got[0], ref, atol=ATOL, rtol=0)
    # an ordinary checkpoint (what LLM.load opens) with the 1-process run's weights
    a, b = (load_model(r / "checkpoints" / "step_000005")[0].state_dict() for r in (run, ref_run))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < ATOL
    # resume the 2-process step-5 checkpoint in one process: the rest of the uninterrupted curve
    shutil.rmtree(run / "checkpoints" / "step_000010")
    resumed = _losses(train(tiny_config(shard, run, **STEPS)).history)
    np.testing.assert_allclose(resumed, ref, atol=ATOL, rtol=0)
    # and the other way: the 1-process step-5 checkpoint resumes on 2 processes (weights and optimizer sharded)
    from1 = tmp_path / "from1"
    shutil.copytree(ref_run, from1)
    shutil.rmtree(from1 / "checkpoints" / "step_000010")
    got = run_local(_train_worker, 2, str(shard), str(from1), layout, timeout=120, start_method="fork")
    np.testing.assert_allclose(got[0], ref, atol=ATOL, rtol=0)


def test_trainer_refuses_model_parallel_layouts(tmp_path):
    with pytest.raises(ConfigError, match="data-parallel layouts only.*dp_shard"):
        tiny_config(tmp_path / "t.bin", tmp_path / "run", parallel=ParallelConfig(tp=2))


def test_cli_nproc_launches_torchrun(single, tmp_path):
    """`lmforge train --nproc 2` re-runs itself under torchrun: the metrics equal the 1-process curve."""
    import os
    import subprocess
    import sys

    from lmforge.train.metrics import read_metrics

    shard, ref, _ = single
    toml = tmp_path / "run.toml"
    toml.write_text(f"""run_dir = "{tmp_path / 'run'}"
max_steps = 10
eval_every = 5
eval_batches = 4
log_every = 1
ckpt_every = 5
keep_last = 3
seed = 0
device = "cpu"
progress = false
plot = false
[model]
vocab_size = 257
d_model = 32
n_layers = 2
n_heads = 2
max_seq_len = 32
[data]
train = ["{shard}"]
seq_len = 32
batch_size = 8
[optim]
lr = 3e-3
warmup_steps = 5
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "lmforge", "train", "--config", str(toml), "--nproc", "2"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("done: 10 steps") == 1  # rank 0 reports
    np.testing.assert_allclose(_losses(read_metrics(tmp_path / "run")), ref, atol=ATOL, rtol=0)
