"""Mid-training data mixture: rows follow the phase weights (all from the high-quality source once its
phase starts), token counts per source are logged, and a mixed run resumes bit-exactly."""

import dataclasses

import pytest

from lmforge.errors import ConfigError
from lmforge.train.config import DataConfig, PhaseConfig, SourceConfig
from lmforge.train.trainer import Trainer, train

from .helpers import fit_interrupted_at, make_shard, tiny_config


def _mixed(tmp_path, run, **over):
    web = make_shard(tmp_path / "web.bin", "abcdefghijklm " * 400)
    hq = make_shard(tmp_path / "hq.bin", "nopqrstuvwxyz " * 400)
    base = tiny_config(web, tmp_path / run, max_steps=10, eval_every=5, ckpt_every=100)
    data = DataConfig(seq_len=32, batch_size=8, sources=(SourceConfig(name="web", train=(str(web),)),
                                                         SourceConfig(name="hq", train=(str(hq),))),
                      phases=(PhaseConfig(start=0.0, weights=(3.0, 1.0)), PhaseConfig(start=0.6, weights=(0.0, 1.0))))
    return dataclasses.replace(base, data=data, **over)


def test_rows_follow_the_phases_and_token_counts_are_logged(tmp_path):
    tr = Trainer(_mixed(tmp_path, "run"))
    seen = []
    for step in range(10):
        x = tr.data.next_batch()["input_ids"]
        hq_rows = int(((x >= ord("n")) & (x <= ord("z"))).any(-1).sum())
        seen.append(hq_rows)
    assert seen[6:] == [8, 8, 8, 8]  # phase 2 (from step 0.6 * 10 = 6): only the high-quality source
    assert 0 < sum(seen[:6]) < 48  # phase 1: both sources
    stats = tr.data.log_stats()
    assert stats["tokens/hq"] == 32 * sum(seen) and stats["tokens/web"] == 32 * (80 - sum(seen))
    assert stats["mix_phase"] == 1


def test_the_logged_phase_is_the_logged_steps_and_a_phase_covering_no_step_warns(tmp_path):
    tr = Trainer(_mixed(tmp_path, "run"))
    phases = []
    for _ in range(10):
        tr.data.next_batch()
        phases.append(tr.data.log_stats()["mix_phase"])
    assert phases == [0] * 6 + [1] * 4  # the batch just drawn: steps 0-5 are phase 0, phase 1 starts at step 6
    cfg = _mixed(tmp_path, "w")
    data = dataclasses.replace(cfg.data, phases=(PhaseConfig(start=0.0, weights=(1.0, 1.0)),
                                                 PhaseConfig(start=0.04, weights=(0.0, 1.0))))
    with pytest.warns(UserWarning, match=r"data.phases\[0\] \(start 0.0\) covers no step of max_steps=10"):
        Trainer(dataclasses.replace(cfg, data=data))


def test_a_mixed_run_resumes_bit_exactly(tmp_path):
    full = train(_mixed(tmp_path, "a"))
    rows = [r for r in full.history if "tokens/hq" in r]
    assert rows[-1]["tokens/hq"] + rows[-1]["tokens/web"] == rows[-1]["tokens"]
    cfg = _mixed(tmp_path, "b")
    fit_interrupted_at(Trainer(cfg), 4)
    again = train(cfg)
    assert [r["loss"] for r in again.history if "loss" in r] == [r["loss"] for r in full.history if "loss" in r]


def test_bad_mixtures_are_refused():
    src = (SourceConfig(name="a", train=("x",)),)
    with pytest.raises(ConfigError, match=r"data.phases\[0\].weights must be 1 non-negative"):
        DataConfig(sources=src, phases=(PhaseConfig(start=0.0, weights=(1.0, 2.0)),))
    with pytest.raises(ConfigError, match="starts must begin at 0"):
        DataConfig(sources=src, phases=(PhaseConfig(start=0.5, weights=(1.0,)),))
    with pytest.raises(ConfigError, match="replaces data.train"):
        DataConfig(train=("y",), sources=src, phases=(PhaseConfig(weights=(1.0,)),))


def test_a_resume_with_another_grad_accum_keeps_the_phases_at_their_steps(tmp_path):
    """Stopped at step 4 with grad_accum 1 and resumed with 2: phase 1 still starts at step 6 (the mixture
    counted steps as batches drawn // grad_accum, so the 4 batches drawn read as step 2 and every later phase
    started late)."""
    cfg = _mixed(tmp_path, "run", grad_accum=1)
    fit_interrupted_at(Trainer(cfg), 4)
    res = Trainer(dataclasses.replace(cfg, grad_accum=2)).fit()
    rows = [r for r in res.history if r["step"] > 4 and "mix_phase" in r]
    assert [r["step"] for r in rows] == [5, 6, 7, 8, 9, 10]
    assert [r["mix_phase"] for r in rows] == [0, 0, 1, 1, 1, 1]
    hq = [r["tokens/hq"] for r in rows]
    assert [b - a for a, b in zip(hq[1:], hq[2:])] == [2 * 8 * 32] * 4  # steps 7-10: every row from hq


def test_a_resume_with_sources_added_and_moved_keeps_each_sources_place(tmp_path):
    """A source added on resume crashed the run at its first row (IndexError: its token count lay past the saved
    list), and a moved one took another's position: the states are keyed by name now. The added source starts at
    its beginning, counted from 0."""
    cfg = _mixed(tmp_path, "run", max_steps=4, ckpt_every=4)
    first = Trainer(cfg)
    first.fit()
    extra = make_shard(tmp_path / "extra.bin", "0123456789 " * 400)
    web, hq = cfg.data.sources
    data = dataclasses.replace(cfg.data, sources=(hq, SourceConfig(name="extra", train=(str(extra),)), web),
                               phases=tuple(dataclasses.replace(p, weights=(p.weights[1], 1.0, p.weights[0]))
                                            for p in cfg.data.phases))
    resumed = Trainer(dataclasses.replace(cfg, data=data, max_steps=8))
    assert resumed.data.names == ["hq", "extra", "web"]
    assert resumed.data.tokens == [first.data.tokens[1], 0, first.data.tokens[0]]
    for now, before in ((0, 1), (2, 0)):
        assert resumed.data.samplers[now].gen.get_state().equal(first.data.samplers[before].gen.get_state())
    rows = [r for r in resumed.fit().history if "tokens/extra" in r]
    assert rows[-1]["step"] == 8 and rows[-1]["tokens/extra"] > 0
