"""Resuming with changed settings: what the resume says changed is what the resumed run trains with (the
optimizer's settings come from the new config, its per-parameter state and counters from the checkpoint)."""

import dataclasses
import shutil

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.optim.config import OptimConfig
from lmforge.train.param_groups import GROUP_START, group_start, keep_group_settings
from lmforge.train.trainer import Trainer

from .helpers import make_shard, tiny_config


def _weights(run_dir):
    return ckpt.load_model(run_dir)[0].state_dict()


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_a_resume_with_a_new_lr_and_weight_decay_trains_with_them(tmp_path, capsys, name):
    """Stop at step 4 with lr 3e-3 and weight decay 0.1, resume with 3e-4 and 0: the resumed run equals one that
    resumed with the old settings and had its optimizer groups set to the new ones by hand (the checkpoint's
    param_groups used to win, so the run went on at lr 3e-3 although the resume said 'optim.lr 0.003 ->
    0.0003'). The logged lr is the new one."""
    shard = make_shard(tmp_path / "t.bin")
    old = OptimConfig(name=name, lr=3e-3, schedule="constant", warmup_steps=0, weight_decay=0.1)
    new = dataclasses.replace(old, lr=3e-4, weight_decay=0.0)
    cfg = tiny_config(shard, tmp_path / "a", max_steps=4, ckpt_every=4, eval_every=100, optim=old)
    Trainer(cfg).fit()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    capsys.readouterr()

    resumed = Trainer(dataclasses.replace(cfg, max_steps=8, optim=new))
    assert "optim.lr 0.003 -> 0.0003, optim.weight_decay 0.1 -> 0.0" in capsys.readouterr().out
    got = resumed.fit()

    by_hand = Trainer(dataclasses.replace(cfg, run_dir=str(tmp_path / "b"), max_steps=8))
    for g in by_hand.optimizer.param_groups:  # every group: the new config's lr (muon: also its AdamW groups')
        g["lr"] = g["base_lr"] = 3e-4
        g["weight_decay"] = 0.0
    want = by_hand.fit()

    assert [r["lr"] for r in got.history if r["step"] > 4 and "lr" in r] == [3e-4] * 4
    ours, theirs = _weights(got.run_dir), _weights(want.run_dir)
    assert all(ours[k].equal(theirs[k]) for k in theirs)
    assert not all(ours[k].equal(v) for k, v in _weights(tmp_path / "a" / "checkpoints" / "step_000004").items())


def test_per_parameter_state_and_group_counters_stay_as_loaded():
    """Only settings come from the new optimizer: its moments, step counts (per parameter) and a step count an
    optimizer keeps in its groups are the checkpoint's."""
    p = torch.nn.Parameter(torch.ones(3))
    before = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.1)
    before.param_groups[0]["step"] = 5  # an optimizer that counts per group
    p.grad = torch.ones(3)
    before.step()
    state = before.state_dict()
    after = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.0, betas=(0.8, 0.9))
    after.param_groups[0]["step"] = 0
    settings = [{k: v for k, v in g.items() if k != "params"} for g in after.param_groups]
    after.load_state_dict(state)
    keep_group_settings(after, settings)
    g = after.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"], g["step"]) == (1e-3, 0.0, (0.8, 0.9), 5)
    assert after.state[p]["exp_avg"].equal(before.state[p]["exp_avg"]) and int(after.state[p]["step"]) == 1


class CountingSGD(torch.optim.Optimizer):
    """An optimizer that counts in its param_groups, with the counters among its constructor defaults (as
    schedule-free AdamW keeps k, weight_sum and lr_max there, Prodigy d and d_max): its steps shrink as k grows."""

    def __init__(self, params, lr=1e-2, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, k=0, weight_sum=0.0))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            g["k"] += 1
            g["weight_sum"] += g["lr"]
            for p in g["params"]:
                if p.grad is not None:
                    p.mul_(1 - g["lr"] * g["weight_decay"]).add_(p.grad, alpha=-g["lr"] / g["k"] ** 0.5)


def _counting_trainer(cfg, weight_decay):
    from lmforge.train.pretrain import pretraining_parts

    parts = pretraining_parts(cfg)
    opt = CountingSGD(parts.model.parameters(), lr=cfg.optim.lr, weight_decay=weight_decay)
    return Trainer(parts.model, opt, parts.data, parts.objective, config=parts.config, evaluator=parts.evaluator,
                   tokenizer=parts.tokenizer)


def test_counters_an_optimizer_keeps_in_its_groups_resume_and_new_settings_apply(tmp_path):
    """A resume keeps the group counters of the run (k = 4 after 4 steps, their weight_sum) and takes the new
    config's settings (weight_decay 0.1 -> 0): the resumed run equals an uninterrupted one whose weight decay
    was set to 0 at step 4. Counters other than 'step' used to restart at their initial values (k = 0: the
    steps' size jumped back to the first step's), as the settings do."""
    shard = make_shard(tmp_path / "t.bin")
    cfg = tiny_config(shard, tmp_path / "a", max_steps=4, ckpt_every=4, eval_every=100,
                      optim=OptimConfig(lr=3e-2, schedule="constant", warmup_steps=0))
    _counting_trainer(cfg, 0.1).fit()
    resumed = _counting_trainer(dataclasses.replace(cfg, max_steps=8), 0.0)
    g = resumed.optimizer.param_groups[0]
    assert (g["k"], g["weight_sum"], g["weight_decay"]) == (4, pytest.approx(4 * 3e-2), 0.0)
    assert g[GROUP_START]["weight_decay"] == 0.0 and g[GROUP_START]["k"] == 0  # this run's start, for its resumes
    got = resumed.fit()
    assert resumed.optimizer.param_groups[0]["k"] == 8

    through = _counting_trainer(dataclasses.replace(cfg, run_dir=str(tmp_path / "b"), max_steps=8), 0.1)
    real = through.train_step

    def train_step():
        if through.step == 4:
            through.optimizer.param_groups[0]["weight_decay"] = 0.0
        return real()

    through.train_step = train_step
    want = through.fit()
    ours, theirs = _weights(got.run_dir), _weights(want.run_dir)
    assert all(ours[k].equal(theirs[k]) for k in theirs)


def test_which_group_keys_a_resume_keeps_from_the_checkpoint():
    """A key the checkpoint's run moved from its start is a counter (kept) unless this run's config starts it
    elsewhere (the config wins); lr is the Trainer's (scheduled from base_lr); a checkpoint saved before the
    groups kept their start keeps only 'step'."""
    p = torch.nn.Parameter(torch.ones(3))

    def opt(lr=1e-2, weight_decay=0.1):
        o = CountingSGD([p], lr=lr, weight_decay=weight_decay)
        o.param_groups[0][GROUP_START] = group_start(o.param_groups[0])  # as the Trainer does
        return o

    before = opt()
    p.grad = torch.ones(3)
    before.step()
    before.step()
    before.param_groups[0]["lr"] = 5e-3  # the schedule's
    saved = before.state_dict()

    after = opt(weight_decay=0.0)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in after.param_groups]
    after.load_state_dict(saved)
    keep_group_settings(after, settings)
    g = after.param_groups[0]
    assert (g["k"], g["weight_sum"], g["weight_decay"], g["lr"]) == (2, 2e-2, 0.0, 1e-2)
    assert g[GROUP_START] == settings[0][GROUP_START]

    other = CountingSGD([p], lr=1e-2)  # a new start for k (a setting the config changed): the config's
    other.param_groups[0]["k"] = 10
    other.param_groups[0][GROUP_START] = group_start(other.param_groups[0])
    settings = [{k: v for k, v in g.items() if k != "params"} for g in other.param_groups]
    other.load_state_dict(saved)
    keep_group_settings(other, settings)
    assert other.param_groups[0]["k"] == 10

    old = {**saved, "param_groups": [{k: v for k, v in g.items() if k != GROUP_START} for g in saved["param_groups"]]}
    for g in old["param_groups"]:
        g["step"] = 7
    legacy = opt()
    settings = [{k: v for k, v in g.items() if k != "params"} for g in legacy.param_groups]
    legacy.load_state_dict(old)
    keep_group_settings(legacy, settings)
    assert (legacy.param_groups[0]["k"], legacy.param_groups[0]["step"]) == (0, 7)


@pytest.mark.parametrize("name", ["adamw", "torch_adamw", "lion", "adafactor", "shampoo", "soap", "muon", "dion"])
def test_lmforge_optimizers_keep_no_counters_in_their_groups(name):
    """Every lmforge optimizer keeps its counters in the per-parameter state: stepping moves no param_group key
    (a resume takes all of them from the new config, none from the checkpoint)."""
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.optim import build_optimizer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, max_seq_len=8))
    o = build_optimizer(model, OptimConfig(name=name, lr=1e-3))
    start = [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
    for _ in range(3):
        for q in model.parameters():
            q.grad = torch.randn_like(q)
        o.step()
    assert [{k: v for k, v in g.items() if k != "params"} for g in o.param_groups] == start


def test_a_new_seed_says_it_does_not_reorder_a_resumed_run(tmp_path, capsys):
    shard = make_shard(tmp_path / "t.bin")
    cfg = tiny_config(shard, tmp_path / "run", max_steps=2, ckpt_every=2, eval_every=100, optim=dict(warmup_steps=1))
    Trainer(cfg).fit()
    capsys.readouterr()
    Trainer(dataclasses.replace(cfg, seed=3)).close()
    out = capsys.readouterr().out
    assert "seed 0 -> 3 (the data order and random state continue from the checkpoint, not from the new seed" in out


def test_a_checkpoint_written_before_a_model_field_existed_resumes(tmp_path, capsys):
    """A checkpoint's model config is compared with the run's as load_model reads it, a field the writer's lmforge
    did not have taking its default: compared raw, every run written before `model.norm_offset` (2026-12-06) was
    refused at its resume ('model.norm_offset=None but the config says 0.0'). A real difference is still refused,
    and the resume's notice of changed settings leaves out the fields that are new, not changed."""
    import json

    from lmforge.errors import ConfigError

    shard = make_shard(tmp_path / "t.bin")
    cfg = tiny_config(shard, tmp_path / "run", max_steps=4, ckpt_every=2, eval_every=100)
    whole = Trainer(dataclasses.replace(cfg, run_dir=str(tmp_path / "whole"))).fit()
    Trainer(dataclasses.replace(cfg, max_steps=2)).fit()  # warmup_steps=5: the same rates whatever max_steps
    step = ckpt.checkpoint_dirs(tmp_path / "run")[-1]
    meta = json.loads((step / "config.json").read_text())
    del meta["model"]["norm_offset"]  # as lmforge wrote it before the field
    (step / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    ckpt._seal(step)  # its manifest, as that writer sealed it
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    del run["config"]["model"]["norm_offset"], run["config"]["compile_cudagraphs"]
    (tmp_path / "run" / "config.json").write_text(json.dumps(run))
    capsys.readouterr()
    resumed = Trainer(cfg).fit()
    out = capsys.readouterr().out
    assert "settings changed since the run's last start: max_steps 2 -> 4 (" in out
    assert "norm_offset" not in out and "compile_cudagraphs" not in out
    assert resumed.steps == 4 and [r["loss"] for r in resumed.history if "loss" in r] == \
        [r["loss"] for r in whole.history if "loss" in r]
    with pytest.raises(ConfigError, match=r"^checkpoint was made with model.d_model=32 but the config says 64"):
        Trainer(dataclasses.replace(cfg, max_steps=6, model=dataclasses.replace(cfg.model, d_model=64)))
