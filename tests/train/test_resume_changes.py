"""Resuming with changed settings: what the resume says changed is what the resumed run trains with (the
optimizer's settings come from the new config, its per-parameter state and counters from the checkpoint)."""

import dataclasses
import shutil

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.optim.config import OptimConfig
from lmforge.train.trainer import Trainer, _keep_group_settings

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
    _keep_group_settings(after, settings)
    g = after.param_groups[0]
    assert (g["lr"], g["weight_decay"], g["betas"], g["step"]) == (1e-3, 0.0, (0.8, 0.9), 5)
    assert after.state[p]["exp_avg"].equal(before.state[p]["exp_avg"]) and int(after.state[p]["step"]) == 1


def test_a_new_seed_says_it_does_not_reorder_a_resumed_run(tmp_path, capsys):
    shard = make_shard(tmp_path / "t.bin")
    cfg = tiny_config(shard, tmp_path / "run", max_steps=2, ckpt_every=2, eval_every=100, optim=dict(warmup_steps=1))
    Trainer(cfg).fit()
    capsys.readouterr()
    Trainer(dataclasses.replace(cfg, seed=3)).close()
    out = capsys.readouterr().out
    assert "seed 0 -> 3 (the data order and random state continue from the checkpoint, not from the new seed" in out
