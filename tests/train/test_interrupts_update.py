"""Interrupts around a step's update (lmforge.train.interrupts): the Trainer's own weight changes after
optimizer.step (the aux-loss-free MoE bias, MuonClip's QK-clip) belong to the update, a rolled-back step leaves
no MoE expert load behind, and a Trainer whose update was cut off refuses to go on."""

import dataclasses

import pytest

from lmforge import checkpoint as ckpt
from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.model.layers.moe import MoE
from lmforge.optim.config import OptimConfig
from lmforge.train import trainer as trainer_module
from lmforge.train.trainer import Trainer, train

from .helpers import make_shard, metric_rows, tiny_config

MOE = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, mlp="moe",
                  moe=MoEConfig(n_experts=4, top_k=1, d_expert=16, score="sigmoid", bias_update_rate=0.01))
MUON_CLIP = OptimConfig(name="muon", lr=0.02, warmup_steps=1, qk_clip_tau=0.02)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return make_shard(tmp_path_factory.mktemp("update") / "t.bin")


def _config(shard, run_dir, which, **over):
    extra = {"moe": {"model": MOE}, "qk_clip": {"optim": MUON_CLIP}, "dense": {}}[which]
    return tiny_config(shard, run_dir, **{"max_steps": 6, "eval_every": 100, "ckpt_every": 2, **extra, **over})


@pytest.mark.parametrize("which", ["moe", "qk_clip"])
def test_an_interrupt_in_the_trainers_post_update_work_is_inside_the_update(shard, tmp_path, monkeypatch, which):
    """A KeyboardInterrupt while the expert biases move (or the QK-clip runs), after optimizer.step returned:
    the step is not complete, so no checkpoint of it is written (it was rolled forward, its checkpoint lacking
    the bias move or the clip); the same Trainer refuses to go on, and a new one resumes from the last
    checkpoint onto the uninterrupted run."""
    full = metric_rows(train(_config(shard, tmp_path / "full", which)))
    cfg = _config(shard, tmp_path / "run", which)
    tr = Trainer(cfg)
    if which == "moe":
        real = trainer_module.update_expert_biases

        def flaky(model, world=False):
            if tr.step == 3:
                raise KeyboardInterrupt
            return real(model, world)

        monkeypatch.setattr(trainer_module, "update_expert_biases", flaky)
    else:
        real_clip = tr._clip_qk

        def flaky():
            if tr.step == 3:
                raise KeyboardInterrupt
            return real_clip()

        tr._clip_qk = flaky
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == ["step_000002"]
    with pytest.raises(ConfigError, match="step 4 was interrupted inside its optimizer update.*build a new Trainer "
                                          "to resume from .*step_000002"):
        tr.fit()
    monkeypatch.undo()
    assert metric_rows(train(cfg)) == full  # a new Trainer: from step 2, as if never interrupted


def test_fit_after_an_interrupt_inside_optimizer_step_is_refused(shard, tmp_path):
    """Inside optimizer.step some parameters are updated and others not: fit() again would train on from those
    weights (every later loss off the uninterrupted run's), so it refuses in one line."""
    tr = Trainer(_config(shard, tmp_path / "run", "dense"))
    fire = {"armed": True}

    def interrupt(*_):
        if tr.step == 3 and fire["armed"]:
            fire["armed"] = False
            raise KeyboardInterrupt

    tr.optimizer.register_step_pre_hook(interrupt)  # runs after the trainer's own pre-hook
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert tr.step == 3 and tr.interrupts.phase == "update"
    with pytest.raises(ConfigError, match="step 4 was interrupted inside its optimizer update, which left the "
                                          "weights half-updated"):
        tr.fit()
    assert tr.step == 3  # nothing trained


def test_an_interrupt_inside_the_first_update_names_the_resume_point_once(shard, tmp_path, capsys):
    """Inside optimizer.step of step 1 (no checkpoint yet): the 'no consistent state' line names where the run
    resumes; a second 'interrupted at step 0' line said the same again."""
    tr = Trainer(_config(shard, tmp_path / "run", "dense"))

    def interrupt(*_):
        raise KeyboardInterrupt

    tr.optimizer.register_step_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    out = capsys.readouterr().out
    assert out.count("running the same command again starts it from step 0") == 1, out
    assert ("interrupted inside the optimizer update of step 1: no consistent state to save; no checkpoint of this "
            "run is complete; running the same command again starts it from step 0\n") in out
    from lmforge.parallel.reports import shared_reports

    with shared_reports():  # the N ranks of one --nproc launch: said once, not once per rank
        for rank in range(2):
            tr = Trainer(_config(shard, tmp_path / f"rank{rank}", "dense"))
            tr.optimizer.register_step_pre_hook(interrupt)
            with pytest.raises(KeyboardInterrupt):
                tr.fit()
    assert capsys.readouterr().out.count("interrupted inside the optimizer update") == 1


def test_a_step_rolled_back_in_its_micro_batches_leaves_no_expert_load(shard, tmp_path):
    """An interrupt in micro-batch 2 of step 2 rolls the step back; fit() again on the same Trainer (a notebook
    after Ctrl-C) ends on the uninterrupted run's weights and metrics bit for bit: the rolled-back micro-batch's
    expert loads would otherwise move the aux-loss-free bias of the redone step."""
    cfg = _config(shard, tmp_path / "full", "moe", grad_accum=2, ckpt_every=100)
    moe = dataclasses.replace(MOE, moe=dataclasses.replace(MOE.moe, n_experts=8, top_k=2))
    cfg = dataclasses.replace(cfg, model=moe)
    full = train(cfg)
    tr = Trainer(dataclasses.replace(cfg, run_dir=str(tmp_path / "run")))
    real, calls = tr.loss_fn, []

    def flaky(model, batch):
        if tr.step == 1:
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
        return real(model, batch)

    tr.loss_fn = flaky
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    assert tr.step == 1
    assert all(int(m.step_load.sum()) == 0 for m in tr.model.modules() if isinstance(m, MoE))
    again = tr.fit()
    assert metric_rows(again) == metric_rows(full)
    ours, theirs = ckpt.load_model(again.run_dir)[0].state_dict(), ckpt.load_model(full.run_dir)[0].state_dict()
    assert all(ours[k].equal(theirs[k]) for k in theirs)
