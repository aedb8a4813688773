"""Multi-process pretraining through the one Trainer on gloo processes (CPU): the same loss curve and
validation loss as one process on the same global batch for FSDP2, DDP, tensor, context and pipeline
parallel on 2 processes and FSDP x TP on 4; checkpoints written by one layout resume in another (2
processes -> 1, tp=2 -> 1, pp=2 -> 1, 1 -> 2, 1 -> pp=2) with the uninterrupted run's losses; validation
splits the rows over the ranks instead of repeating them; a SIGTERM to one rank stops both at the same step
with one checkpoint, and the resumed run equals the uninterrupted one bit for bit.

Tolerance: 1e-4 absolute on each step's loss and validation loss. The ranks' gradients are summed in
another order than one process's batch (about 1e-7 relative); Adam's normalised step carries that into the
weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from lmforge.checkpoint import load_model
from lmforge.errors import ConfigError
from lmforge.parallel.config import ParallelConfig
from lmforge.parallel.launch import run_local
from lmforge.train.trainer import Trainer, train

from .helpers import make_shard, tiny_config

ATOL = 1e-4
STEPS = dict(max_steps=10, eval_every=5, ckpt_every=5, keep_last=3)


def _losses(history):
    return [r["loss"] for r in history if "loss" in r]


def _val(history):
    return [r["val_loss"] for r in history if "val_loss" in r]


def _train_worker(rank: int, world: int, shard: str, run_dir: str, layout: dict) -> list[float]:
    res = train(tiny_config(shard, run_dir, parallel=ParallelConfig(**layout), **STEPS))
    return _losses(res.history) + [res.final_val_loss]


def _layouts_worker(rank: int, world: int, shard: str, root: str, layouts: dict) -> dict:
    """Each layout (a ParallelConfig's fields, and grad_accum) trains the tiny model for STEPS; per layout:
    (losses, validation losses, rows this rank fed the model in one more evaluation)."""
    out = {}
    for name, layout in layouts.items():
        layout = dict(layout)
        accum = layout.pop("grad_accum", 1)
        tr = Trainer(tiny_config(shard, f"{root}/{name}", parallel=ParallelConfig(**layout), grad_accum=accum,
                                 **STEPS))
        res = tr.fit()
        rows = []
        hook = tr.model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]) if args else None)
        tr.evaluate()
        hook.remove()
        out[name] = (_losses(res.history), _val(res.history), sum(rows),
                     [r["grad_norm"] for r in res.history if "grad_norm" in r])
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    shard = make_shard(tmp / "t.bin")
    res = train(tiny_config(shard, tmp / "run", **STEPS))
    return shard, _losses(res.history), tmp / "run", _val(res.history)


@pytest.mark.parametrize("layout", [{"dp_shard": 2}, {"dp_replicate": 2}], ids=["fsdp2", "ddp"])
def test_two_processes_match_one_and_resume_in_one(single, tmp_path, layout):
    shard, ref, ref_run, ref_val = single
    run = tmp_path / "run"
    got = run_local(_train_worker, 2, str(shard), str(run), layout, timeout=120, start_method="fork")
    # every rank gets the final validation loss; only rank 0 reads (and writes) the metrics
    assert got[1] == [pytest.approx(got[0][-1], abs=1e-12)]
    assert len(got[0]) == len(ref) + 1 == STEPS["max_steps"] + 1
    np.testing.assert_allclose(got[0], ref + ref_val[-1:], atol=ATOL, rtol=0)
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
    np.testing.assert_allclose(got[0], ref + ref_val[-1:], atol=ATOL, rtol=0)


def _resume_in_one_process(shard, run: Path, ref: list[float]) -> None:
    """The layout's step-5 checkpoint, resumed in one process: the rest of the uninterrupted curve."""
    shutil.rmtree(run / "checkpoints" / "step_000010")
    np.testing.assert_allclose(_losses(train(tiny_config(shard, run, **STEPS)).history), ref, atol=ATOL, rtol=0)


def _same_as_one_process(got, ref, ref_val, rows_per_rank: int) -> None:
    losses, val, rows = got[:3]
    assert len(losses) == STEPS["max_steps"] and len(val) == 3  # evaluated at steps 0, 5, 10
    np.testing.assert_allclose(losses, ref, atol=ATOL, rtol=0)
    np.testing.assert_allclose(val, ref_val, atol=ATOL, rtol=0)
    assert rows == rows_per_rank * 4  # eval_batches=4: this rank's rows of each, not the whole batch


LAYOUTS_2 = {"tp": dict(tp=2), "cp": dict(cp=2), "pp": dict(pp=2),
             "cp_accum": dict(cp=2, grad_accum=2),  # FSDP over the cp ranks reduce-scatters on the last micro-batch
             "pp_accum": dict(pp=2, grad_accum=2)}  # the schedule must not divide the accumulated gradients again


def test_tensor_context_pipeline_parallel_match_one_process_and_resume_in_one(single, tmp_path):
    """tp=2, cp=2, pp=2 (and cp=2 with 2 micro-batches a step) through the Trainer: one process's losses and
    validation losses; a validation batch's
    8 rows are split between the cp ranks (4 each) and shared by the tp ranks and the pipeline (which splits
    them into micro-batches: the first stage is called once per micro-batch of 2 rows); the tp=2 and pp=2
    step-5 checkpoints resume in one process, and the 1-process step-5 checkpoint resumes as pp=2."""
    shard, ref, ref_run, ref_val = single
    from1 = tmp_path / "from1"
    shutil.copytree(ref_run, from1)
    shutil.rmtree(from1 / "checkpoints" / "step_000010")
    layouts = {**LAYOUTS_2, "from1": dict(pp=2)}
    got = run_local(_layouts_worker, 2, str(shard), str(tmp_path), layouts, timeout=120, start_method="fork")[0]
    for name, rows in (("tp", 8), ("cp", 4), ("pp", 8)):
        _same_as_one_process(got[name], ref, ref_val, rows)
    accum = train(tiny_config(shard, tmp_path / "accum", grad_accum=2, **STEPS)).history
    _same_as_one_process(got["cp_accum"], _losses(accum), _val(accum), 4)
    _same_as_one_process(got["pp_accum"], _losses(accum), _val(accum), 8)
    np.testing.assert_allclose(got["pp_accum"][3], [r["grad_norm"] for r in accum if "grad_norm" in r], rtol=1e-4)
    np.testing.assert_allclose(got["from1"][0], ref, atol=ATOL, rtol=0)  # steps 1-5 from the copied log
    for name in ("tp", "pp"):
        _resume_in_one_process(shard, tmp_path / name, ref)


def test_fsdp_x_tp_on_four_processes_matches_one_process(single, tmp_path):
    shard, ref, _, ref_val = single
    got = run_local(_layouts_worker, 4, str(shard), str(tmp_path), {"fsdp_tp": dict(dp_shard=2, tp=2, loss_parallel=True)},
                    timeout=150, start_method="fork")[0]
    _same_as_one_process(got["fsdp_tp"], ref, ref_val, 4)


def test_layout_is_checked_against_model_and_batch_in_the_config(tmp_path):
    from lmforge.model.config import ModelConfig

    tied = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, tie_embeddings=True)
    with pytest.raises(ConfigError, match="tie_embeddings"):
        tiny_config(tmp_path / "t.bin", tmp_path / "run", model=tied, parallel=ParallelConfig(pp=2))
    with pytest.raises(ConfigError, match="batch_size=8 must be divisible by the data-parallel size 1 x microbatches=16"):
        tiny_config(tmp_path / "t.bin", tmp_path / "run", parallel=ParallelConfig(pp=2, microbatches=16))


_SET_AFTER_IMPORT: list[int] = []


def _sees_parent_state(rank: int, world: int) -> bool:
    return bool(_SET_AFTER_IMPORT)  # a forked child copies the parent's memory; a spawned one imports afresh


def test_fork_becomes_spawn_on_a_machine_with_a_gpu(monkeypatch):
    """There a forked child can run no backward once the parent has run one (autograd's device threads) and no
    CUDA once the parent has started it (the whole suite on a GPU machine failed so), so run_local spawns."""
    import torch

    _SET_AFTER_IMPORT.append(1)
    try:
        for gpu, forked in ((False, True), (True, False)):
            monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
            assert run_local(_sees_parent_state, 1, timeout=60, start_method="fork") == [forked]
    finally:
        _SET_AFTER_IMPORT.clear()


def test_pipeline_refuses_other_objectives(single, tmp_path):
    got = run_local(_refusal_worker, 2, str(single[0]), str(tmp_path), timeout=60, start_method="fork")
    assert "parallel.pp=2 trains the plain LM loss" in got[0] and "z_loss" in got[0]


def _refusal_worker(rank: int, world: int, shard: str, run_dir: str) -> str:
    from lmforge.model.config import ModelConfig

    model = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, z_loss=1e-4)
    try:
        Trainer(tiny_config(shard, run_dir, model=model, parallel=ParallelConfig(pp=2), **STEPS))
    except ConfigError as e:
        return str(e)
    return ""


def _sigterm_worker(rank: int, world: int, shard: str, root: str, part: str) -> dict:
    """part 'first': an uninterrupted run, then one whose rank 1 alone gets a SIGTERM during step 5;
    part 'resume': the interrupted run again, from its checkpoint."""
    import signal

    cfg = dict(STEPS, ckpt_every=100, parallel=ParallelConfig(dp_shard=2))
    if part == "resume":
        return {"losses": _losses(train(tiny_config(shard, f"{root}/cut", **cfg)).history)}

    class SigtermRank1:
        def on_step_end(self, trainer, stats):
            if rank == 1 and trainer.step == 4:
                signal.raise_signal(signal.SIGTERM)

    full = _losses(train(tiny_config(shard, f"{root}/full", **cfg)).history)
    tr = Trainer(tiny_config(shard, f"{root}/cut", **cfg))
    tr.hooks.append(SigtermRank1())
    try:
        tr.fit()
    except KeyboardInterrupt:
        pass
    return {"full": full, "stopped_at": tr.step, "checkpoint": str(tr.last_checkpoint)}


def test_sigterm_to_one_rank_stops_all_at_one_step_and_resumes_bit_exactly(single, tmp_path):
    shard = str(single[0])
    got = run_local(_sigterm_worker, 2, shard, str(tmp_path), "first", timeout=120, start_method="fork")
    assert [g["stopped_at"] for g in got] == [4, 4]
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step_000004"]
    resumed = run_local(_sigterm_worker, 2, shard, str(tmp_path), "resume", timeout=120, start_method="fork")
    assert resumed[0]["losses"] == got[0]["full"]  # bit for bit (read back from the metrics log)


def test_cli_nproc_launches_torchrun(single, tmp_path):
    """`lmforge train --nproc 2` re-runs itself under torchrun: the metrics equal the 1-process curve."""
    import os
    import subprocess
    import sys

    from lmforge.train.metrics import read_metrics

    shard, ref, _, _ = single
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


def test_a_sigterm_to_every_process_of_an_nproc_run_is_one_graceful_stop(tmp_path):
    """SLURM's scancel signals every process of a job: an `--nproc 2` run's workers got the SIGTERM directly and
    again from the launcher and torchrun, took the repeat as "stop at once", and left their step without a
    checkpoint ("rank 0 stopped inside step 6; no checkpoint of this run is complete"). Now it is one stop at a step
    boundary, checkpointed."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from lmforge.parallel.launch import child_pids

    shard = make_shard(tmp_path / "t.bin")
    toml = tmp_path / "run.toml"
    toml.write_text(f"""run_dir = "{tmp_path / 'run'}"
max_steps = 100000
eval_every = 100000
ckpt_every = 100000
device = "cpu"
progress = false
plot = false
[model]
vocab_size = 257
d_model = 16
n_layers = 1
n_heads = 2
max_seq_len = 32
[data]
train = ["{shard}"]
seq_len = 32
batch_size = 4
""")
    launcher = subprocess.Popen([sys.executable, "-m", "lmforge", "train", "--config", str(toml), "--nproc", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):  # (training, past step 1)
            assert time.monotonic() < deadline and launcher.poll() is None, "the run never started training"
            time.sleep(0.05)
        tree, i = [launcher.pid], 0
        while i < len(tree):
            tree += child_pids(tree[i])
            i += 1
        assert len(tree) >= 4  # the launcher, torchrun, 2 workers
        for pid in tree:  # as scancel does: every process, one after another
            os.kill(pid, signal.SIGTERM)
        out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert "inside step" not in out, out[-1000:]  # (a rank that stopped at once says so)
    saved = list((tmp_path / "run" / "checkpoints").iterdir())
    assert len(saved) == 1 and f"checkpoint {saved[0]}" in out, (out[-1000:], err[-1000:])
    assert launcher.returncode == 130


def _tiny_lm():
    import torch

    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=41, d_model=16, n_layers=1, n_heads=2, max_seq_len=32))


def _fit_four_steps(run_dir: str, model, data, runner) -> list[float]:
    """4 optimizer steps of the one Trainer (LM loss, fp32, CPU) over `data`; the logged losses."""
    from lmforge.optim import build_optimizer
    from lmforge.optim.config import OptimConfig
    from lmforge.train.config import LoopConfig
    from lmforge.train.loss import LMObjective

    cfg = LoopConfig(optim=OptimConfig(lr=1e-2, warmup_steps=0), run_dir=run_dir, max_steps=4, log_every=1,
                     eval_every=100, ckpt_every=100, device="cpu", dtype="fp32", progress=False, plot=False)
    trainer = Trainer(model, build_optimizer(model, cfg.optim), data, LMObjective(), config=cfg, runner=runner)
    return _losses(trainer.fit().history)


def _short_batches_fit(run_dir: str, layout: dict | None) -> list[float]:
    """4 steps over batches of 4, 1, 4 and 1 rows (a post-training epoch's short last batch) with the
    one Trainer: on one process, or on this rank's rows through RankRows and a ParallelRunner."""
    import torch

    from lmforge.train.distributed import RankRows
    from lmforge.train.harness import FixedBatches

    model = _tiny_lm()
    g = torch.Generator().manual_seed(1)
    batches = []
    for rows in (4, 1, 4, 1):
        ids = torch.randint(0, 41, (rows, 9), generator=g)
        batches.append({"input_ids": ids[:, :-1], "targets": ids[:, 1:]})
    data, runner = FixedBatches(batches), None
    if layout is not None:
        from lmforge.parallel.runner import ParallelRunner

        runner = ParallelRunner(model, ParallelConfig(**layout), device="cpu")
        model, data = runner.model, RankRows(data, runner.dp_rank, runner.dp_size, 4)
    return _fit_four_steps(run_dir, model, data, runner)


def _short_batches_worker(rank: int, world: int, run_dir: str, layout: dict) -> list[float]:
    return _short_batches_fit(run_dir, layout)


@pytest.mark.parametrize("layout", [dict(dp_replicate=2), dict(dp_shard=2)])
def test_batch_with_fewer_rows_than_ranks_trains_as_one_process(tmp_path, layout):
    """The 1-row batches: rank 0 trains on the row, rank 1 repeats it at weight 0 (both must join DDP's
    all-reduce / FSDP's collectives), so the loss curve is one process's (it used to stop the run)."""
    ref = _short_batches_fit(str(tmp_path / "one"), None)
    got = run_local(_short_batches_worker, 2, str(tmp_path / "two"), layout, timeout=120, start_method="fork")
    assert len(ref) == 4 and got[1] == []  # only rank 0 logs
    np.testing.assert_allclose(got[0], ref, atol=1e-5, rtol=0)


def _layout_trainer(model, batches: list[dict], layout: dict | None, run_dir: str, objective, max_steps: int):
    """A Trainer (grad_accum 2, fp32 CPU) over `batches` of 4 rows: on one process, or on this rank's rows through
    RankRows and a ParallelRunner of `layout`."""
    from lmforge.optim import build_optimizer
    from lmforge.optim.config import OptimConfig
    from lmforge.train.config import LoopConfig
    from lmforge.train.distributed import RankRows
    from lmforge.train.harness import FixedBatches

    data, runner = FixedBatches(batches), None
    if layout is not None:
        from lmforge.parallel.runner import ParallelRunner

        runner = ParallelRunner(model, ParallelConfig(**layout), device="cpu")
        model, data = runner.model, RankRows(data, runner.dp_rank, runner.dp_size, 4)
    cfg = LoopConfig(optim=OptimConfig(lr=1e-2, warmup_steps=0), run_dir=run_dir, max_steps=max_steps, grad_accum=2,
                     log_every=1, eval_every=100, ckpt_every=100, device="cpu", dtype="fp32", progress=False,
                     plot=False)
    return Trainer(model, build_optimizer(model, cfg.optim), data, objective, config=cfg, runner=runner)


def _empty_rows_fit(run_dir: str, layout: dict | None) -> tuple[list[float], list[float]]:
    """4 steps of grad_accum 2 over micro-batches of 4 rows where some rows have nothing to train (targets all
    -100): one micro-batch is empty on rank 1 only (its rows 2-3), another on every rank; one process or 2 ranks
    through RankRows and a ParallelRunner. The logged losses and gradient norms."""
    import torch

    from .helpers import MaskedMean

    model = _tiny_lm()
    g = torch.Generator().manual_seed(3)
    batches = []
    for masked in ((), (2, 3), (), (0, 1, 2, 3)):
        ids = torch.randint(0, 41, (4, 9), generator=g)
        targets = ids[:, 1:].clone()
        targets[list(masked)] = -100
        batches.append({"input_ids": ids[:, :-1], "targets": targets})
    history = _layout_trainer(model, batches, layout, run_dir, MaskedMean(), max_steps=4).fit().history
    return _losses(history), [r["grad_norm"] for r in history if "grad_norm" in r]


def _empty_rows_worker(rank: int, world: int, run_dir: str, layout: dict) -> tuple[list[float], list[float]]:
    return _empty_rows_fit(run_dir, layout)


@pytest.mark.parametrize("layout", [dict(dp_replicate=2), dict(dp_shard=2)])
def test_a_rank_with_nothing_to_train_in_a_micro_batch_adds_nothing(tmp_path, layout):
    """A rank whose share of a micro-batch has no trained token (batch_weight 0, a loss of NaN: a mean over
    nothing) still joins the forward and backward's collectives, with the gradient reaching the model's outputs
    zeroed: the run trains as one process (the NaN used to reach every rank's gradients)."""
    ref = _empty_rows_fit(str(tmp_path / "one"), None)
    got = run_local(_empty_rows_worker, 2, str(tmp_path / "two"), layout, timeout=120, start_method="fork")
    assert len(ref[0]) == 4 and all(np.isfinite(ref[0] + ref[1]))
    np.testing.assert_allclose(got[0][0], ref[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[0][1], ref[1], atol=1e-5, rtol=0)


def _repeated_row_bias(run_dir: str, layout: dict | None) -> tuple[list[float], int]:
    """The aux-loss-free MoE bias and the tokens counted after one step of two micro-batches, of 4 rows and of 1
    row, with the one Trainer: on one process, or through RankRows and a ParallelRunner (on 2 ranks the 1-row
    micro-batch is rank 1's Repeated batch)."""
    import torch

    from lmforge.model.config import ModelConfig, MoEConfig
    from lmforge.model.layers.moe import MoE
    from lmforge.model.transformer import Transformer
    from lmforge.train.loss import LMObjective

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=41, d_model=16, n_layers=1, n_heads=2, max_seq_len=32, mlp="moe",
                                    moe=MoEConfig(n_experts=4, top_k=1, score="sigmoid", bias_update_rate=0.25)))
    g = torch.Generator().manual_seed(7)
    batches = [{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
               for ids in (torch.randint(0, 41, (rows, 9), generator=g) for rows in (4, 1))]
    trainer = _layout_trainer(model, batches, layout, run_dir, LMObjective(), max_steps=1)
    trainer.train_step()
    return next(m for m in trainer.model.modules() if isinstance(m, MoE)).e_bias.tolist(), trainer.tokens


def _repeated_row_bias_worker(rank: int, world: int, run_dir: str, layout: dict) -> tuple[list[float], int]:
    return _repeated_row_bias(run_dir, layout)


@pytest.mark.parametrize("layout", [dict(dp_replicate=2), dict(dp_shard=2)])
def test_repeated_rows_add_nothing_to_the_moe_load(tmp_path, layout):
    """Rank 1's copy of the 1-row micro-batch (a Repeated batch, weight 0) is no token of the step: the bias
    moves by the step's load over its 5 real rows, as on one process. Counted, the row's load doubled and
    moved two experts the other way (seed 7). The step's tokens are its 5 rows' 40 on every rank, as on one
    process (rank 0's 3 rows x 8 tokens were counted twice: 48)."""
    ref = _repeated_row_bias(str(tmp_path / "one"), None)
    assert ref[1] == 5 * 8
    got = run_local(_repeated_row_bias_worker, 2, str(tmp_path / "two"), layout, timeout=120, start_method="fork")
    assert got[0] == got[1] == ref


def _dion_worker(rank: int, world: int, shard: str, run_dir: str) -> list[float]:
    from lmforge.optim.config import OptimConfig

    res = train(tiny_config(shard, run_dir, parallel=ParallelConfig(dp_shard=2), optim=OptimConfig(
        name="dion", lr=0.02, warmup_steps=2), **STEPS))
    return _losses(res.history)


def test_dion_steps_on_fsdp_shards_as_on_one_process(single, tmp_path):
    """Under FSDP the Trainer's Dion is its distributed form (ShardedDion: rank-r factors travel): the losses
    of one process (it crashed on DTensors before)."""
    from lmforge.optim.config import OptimConfig

    shard = single[0]
    ref = _losses(train(tiny_config(shard, tmp_path / "one", optim=OptimConfig(name="dion", lr=0.02, warmup_steps=2),
                                    **STEPS)).history)
    got = run_local(_dion_worker, 2, str(shard), str(tmp_path / "two"), timeout=120, start_method="fork")[0]
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


def test_launch_checks_the_layout_size_and_the_optimizer_before_any_process(tmp_path):
    from lmforge.cli.train import check_launch
    from lmforge.optim.config import OptimConfig

    shard = make_shard(tmp_path / "t.bin")
    cfg = tiny_config(shard, tmp_path / "r", parallel=ParallelConfig(dp_shard=2))
    check_launch(cfg, 2)
    with pytest.raises(ConfigError, match=r"layout \(dp_shard=2\) needs 2 processes: launch with --nproc 2$"):
        check_launch(cfg, 1)
    with pytest.raises(ConfigError, match="needs 2 processes: launch with --nproc 2, not 4"):
        check_launch(cfg, 4)
    for name in ("shampoo", "soap", "adafactor"):
        with pytest.raises(ConfigError, match=f"optim.name='{name}' does not run on sharded parameters"):
            check_launch(tiny_config(shard, tmp_path / "r", optim=OptimConfig(name=name)), 2)  # FSDP by default
    check_launch(tiny_config(shard, tmp_path / "r", optim=OptimConfig(name="shampoo"),
                             parallel=ParallelConfig(dp_replicate=2)), 2)
    with pytest.raises(ConfigError, match="'dion' runs on FSDP's row shards, not tensor-parallel ones"):
        check_launch(tiny_config(shard, tmp_path / "r", optim=OptimConfig(name="dion"), parallel=ParallelConfig(tp=2)), 2)


def _qk_clip_worker(rank: int, world: int, shard: str, run_dir: str, layout: dict) -> list[float]:
    from lmforge.optim.config import OptimConfig

    res = train(tiny_config(shard, run_dir, parallel=ParallelConfig(**layout), optim=OptimConfig(
        name="muon", lr=0.02, warmup_steps=2, qk_clip_tau=0.02), **STEPS))
    return _losses(res.history) + [r["qk/clipped_heads"] for r in res.history if "qk/clipped_heads" in r]


@pytest.mark.parametrize("layout", [{"dp_shard": 2}, {"dp_replicate": 2}], ids=["fsdp2", "ddp"])
def test_qk_clip_on_two_processes_matches_one(single, tmp_path, layout):
    """MuonClip through the Trainer on FSDP2 shards (each rank scales its own rows) and DDP replicas: the max
    logits are all-reduced over the ranks, so the clipped run equals one process's."""
    from lmforge.optim.config import OptimConfig

    shard = single[0]
    res = train(tiny_config(shard, tmp_path / "one", optim=OptimConfig(name="muon", lr=0.02, warmup_steps=2,
                                                                        qk_clip_tau=0.02), **STEPS))
    ref = _losses(res.history) + [r["qk/clipped_heads"] for r in res.history if "qk/clipped_heads" in r]
    assert sum(ref[STEPS["max_steps"]:]) > 0  # heads were clipped
    got = run_local(_qk_clip_worker, 2, str(shard), str(tmp_path / "two"), layout, timeout=120, start_method="fork")[0]
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=0)


class _RankShare:
    """A per_rank source: each rank makes only its own rows of every global batch (as an RL source samples its
    share of the rollouts), learning its rank in begin_step; the state (one counter) is every rank's."""

    per_rank = True

    def __init__(self, batches):
        self.batches, self.i, self.part = batches, 0, (0, 1)

    def begin_step(self, trainer):
        if trainer.runner is not None:
            self.part = (trainer.runner.dp_rank, trainer.runner.dp_size)

    def next_batch(self):
        batch, (r, n) = self.batches[self.i], self.part
        self.i += 1
        return {k: v.tensor_split(n)[r] for k, v in batch.items()}

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def _per_rank_fit(run_dir: str, layout: dict | None) -> list[float]:
    import torch

    from lmforge.train.distributed import RankRows, distribute

    model = _tiny_lm()
    g = torch.Generator().manual_seed(1)
    batches = [dict(zip(("input_ids", "targets"), (lambda ids: (ids[:, :-1], ids[:, 1:]))(
        torch.randint(0, 41, (4, 9), generator=g)))) for _ in range(4)]
    par = ParallelConfig(**layout) if layout else None
    model, data, runner = distribute(model, _RankShare(batches), par, device="cpu", seq_len=8, batch_size=4)
    assert type(data) is _RankShare and not isinstance(data, RankRows)
    return _fit_four_steps(run_dir, model, data, runner)


def _per_rank_worker(rank: int, world: int, run_dir: str, layout: dict) -> list[float]:
    return _per_rank_fit(run_dir, layout)


def test_a_per_rank_source_makes_its_own_rows_and_trains_as_one_process(tmp_path):
    """distribute() leaves a per_rank source uncut: each rank yields half of every 4-row batch (not all of it,
    as RankRows would need), and the loss curve is one process's on the whole batches."""
    ref = _per_rank_fit(str(tmp_path / "one"), None)
    got = run_local(_per_rank_worker, 2, str(tmp_path / "two"), dict(dp_replicate=2), timeout=120, start_method="fork")
    assert len(ref) == 4 and got[1] == []
    np.testing.assert_allclose(got[0], ref, atol=1e-5, rtol=0)


def test_rank_rows_refuse_a_value_without_rows_in_one_line():
    """One process passes a batch's non-tensor values (an RL source's prompt texts) to the objective as they are;
    cutting a global batch into ranks' rows (RankRows, eval_rows) cannot, and says so naming the key (it failed
    deep inside with AttributeError: 'list' object has no attribute 'tensor_split')."""
    import torch

    from lmforge.train.distributed import RankRows, eval_rows
    from lmforge.train.harness import FixedBatches

    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long), "prompts": ["a", "b", "c", "d"]}
    with pytest.raises(ConfigError, match=r"RankRows splits .* batch\['prompts'\] is a list, not a tensor of rows"):
        RankRows(FixedBatches([batch]), 0, 2, 4).next_batch()

    class Runner:
        eval_size, eval_rank = 2, 1

    with pytest.raises(ConfigError, match=r"eval_rows splits .* batch\['prompts'\] is a list"):
        eval_rows(Runner(), batch)
    got = RankRows(FixedBatches([{"input_ids": torch.arange(8).view(4, 2)}]), 1, 2, 4).next_batch()
    assert got["input_ids"].tolist() == [[4, 5], [6, 7]]


def _masked_cp_fit(shard: str, run_dir: str, layout: dict | None) -> tuple[list[float], list[float]]:
    """Five steps with ignored targets (-100), (losses, grad norms): steps 1, 3 and 5 ignore targets 0-11 of every
    32-token row (prompt-like: cp rank 0 of 2 holds 4 trained targets of its 16, rank 1 all 16), steps 2 and 4
    targets 8-23 (all that cp rank 1 holds: its mean is over nothing)."""
    par = dict(parallel=ParallelConfig(**layout)) if layout else {}
    tr = Trainer(tiny_config(shard, run_dir, max_steps=5, eval_every=100, ckpt_every=100, **par))
    draw = tr.data.next_batch

    def next_batch():
        batch = dict(draw())
        y = batch["targets"].clone()
        y[:, slice(0, 12) if tr.step % 2 == 0 else slice(8, 24)] = -100
        return {**batch, "targets": y}

    tr.data.next_batch = next_batch
    res = tr.fit()
    return _losses(res.history), [float(r["grad_norm"]) for r in res.history if "grad_norm" in r]


def _masked_cp_worker(rank: int, world: int, shard: str, run_dir: str) -> tuple[list[float], list[float]]:
    return _masked_cp_fit(shard, run_dir, dict(cp=2))


def test_context_parallel_trainer_with_ignored_targets_matches_one_process(single, tmp_path):
    """The Trainer's cp path (objective_step) weighs each cp rank's mean by its share of the trained targets: the
    loss and gradient are the rows' token mean, as on one process (they were the mean of the ranks' means: a loss
    off by 1e-3 and a grad norm by 2%, and NaN with half the gradient where a cp rank held no trained target)."""
    shard = str(single[0])
    want = _masked_cp_fit(shard, str(tmp_path / "one"), None)
    got = run_local(_masked_cp_worker, 2, shard, str(tmp_path / "cp"), timeout=120, start_method="fork")[0]
    assert len(got[0]) == 5 and all(np.isfinite(got[0]))
    np.testing.assert_allclose(got[0], want[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4)
