"""The trainer: loss falls, resume is bit-exact, the golden curve holds, bad input is refused cleanly."""

import dataclasses
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.shards import TokenFile, write_tokens
from lmforge.errors import CheckpointError, ConfigError, DataError, TrainingDiverged
from lmforge import checkpoint as ckpt
from lmforge.train.trainer import Trainer, train

from .helpers import fit_interrupted_at, make_shard, tiny_config

GOLDEN = Path(__file__).with_name("golden_loss.json")


def _losses(result):
    return [r["loss"] for r in result.history if "loss" in r]


def test_loss_falls_and_metrics_are_written(tmp_path):
    shard = make_shard(tmp_path / "t.bin")
    res = train(tiny_config(shard, tmp_path / "run", max_steps=60, eval_every=30))
    evals = [r for r in res.history if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[0]["val_loss"] > 5.0  # ln(257) = 5.55 at init
    assert res.final_val_loss < 2.6
    # byte-level: bits-per-byte = loss / ln 2 (the separator token counts no bytes, so slightly above)
    assert res.final_val_bpb == pytest.approx(res.final_val_loss / math.log(2), rel=0.05)
    assert (tmp_path / "run" / "config.json").is_file()
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["config"]["model"]["d_model"] == 32 and "git_hash" in meta and "lmforge_version" in meta
    row = next(r for r in res.history if "tok_per_s" in r)
    assert row["tok_per_s"] > 0 and ("mfu" not in row or 0 < row["mfu"] < 1)  # no MFU where no peak is known


def test_resume_is_bitwise_exact(tmp_path):
    shard = make_shard(tmp_path / "t.bin")
    full = _losses(train(tiny_config(shard, tmp_path / "a")))
    cfg = tiny_config(shard, tmp_path / "b", ckpt_every=100)
    fit_interrupted_at(Trainer(cfg), 13)  # Ctrl-C at step 13, off any eval/checkpoint boundary
    resumed = train(cfg)  # same run_dir: resumes from step 13
    assert _losses(resumed) == full  # bitwise: same floats, and metrics.jsonl has no duplicate rows


def test_golden_curve(tmp_path):
    """A fixed-seed CPU run's losses must stay on the stored curve: an accidental change to the model,
    optimizer, schedule or data order shows up here. Tolerance 2e-3 absolute (fp32 kernels may differ
    in the last bits across CPUs). Regenerate with LMFORGE_REGEN_GOLDEN=1 after an intended change."""
    import os

    shard = make_shard(tmp_path / "t.bin")
    losses = _losses(train(tiny_config(shard, tmp_path / "g", max_steps=30)))
    if os.environ.get("LMFORGE_REGEN_GOLDEN"):
        GOLDEN.write_text(json.dumps({"losses": losses}, indent=1))
    golden = json.loads(GOLDEN.read_text())["losses"]
    assert len(losses) == len(golden)
    np.testing.assert_allclose(losses, golden, atol=2e-3, rtol=0)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    shard = make_shard(tmp_path / "t.bin")
    tr = Trainer(tiny_config(shard, tmp_path / "run", max_steps=30, ckpt_every=10))
    real = tr.train_step

    def poisoned():
        if tr.step == 14:
            with torch.no_grad():
                tr.model.tok_emb.weight.fill_(float("nan"))
        return real()

    tr.train_step = poisoned
    with pytest.raises(TrainingDiverged, match="step 15.*step_000010"):
        tr.fit()
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == ["step_000010"]


def test_ctrl_c_writes_checkpoint(tmp_path):
    shard = make_shard(tmp_path / "t.bin")
    fit_interrupted_at(Trainer(tiny_config(shard, tmp_path / "run", max_steps=30, ckpt_every=100)), 7)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == ["step_000007"]
    assert Trainer(tiny_config(shard, tmp_path / "run", max_steps=30)).step == 7


def test_bad_token_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        TokenFile(tmp_path / "missing.bin")
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a shard")
    with pytest.raises(DataError, match="bad magic"):
        TokenFile(tmp_path / "junk.bin")
    shard = make_shard(tmp_path / "t.bin")
    data = shard.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-100])
    with pytest.raises(DataError, match="truncated"):
        TokenFile(tmp_path / "cut.bin")
    big = write_tokens(tmp_path / "big.bin", [1, 2, 300, 4] * 100, vocab_size=400, tokenizer="byte")
    with pytest.raises(DataError, match="token id 300.*vocab_size is 257"):
        Trainer(tiny_config(big, tmp_path / "r"))


def test_checkpoint_refusals(tmp_path):
    shard = make_shard(tmp_path / "t.bin")
    cfg = tiny_config(shard, tmp_path / "run", max_steps=10, ckpt_every=10)
    train(cfg)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=64))
    with pytest.raises(ConfigError, match="model.d_model=32"):
        Trainer(other)
    path = ckpt.checkpoint_dirs(tmp_path / "run")[-1]
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match="truncated"):
        Trainer(cfg)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        ckpt.load_model(tmp_path / "nowhere")


def test_load_model_round_trip(tmp_path):
    shard = make_shard(tmp_path / "t.bin")
    res = train(tiny_config(shard, tmp_path / "run", max_steps=5, ckpt_every=5))
    model, tok = ckpt.load_model(tmp_path / "run")
    assert tok is not None and tok.decode(tok.encode("héllo")) == "héllo"
    tr = Trainer(tiny_config(shard, tmp_path / "run", max_steps=5))
    for (n, a), b in zip(tr.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    assert res.checkpoint.name == "step_000005"


def test_grad_accum_equals_big_batch(tmp_path):
    """Two micro-batches of 4 give the same update as one batch of 8 (same windows, mean loss)."""
    shard = make_shard(tmp_path / "t.bin")
    cfg = tiny_config(shard, tmp_path / "a", max_steps=1, data=dataclasses.replace(
        tiny_config(shard, tmp_path).data, batch_size=8, sampling="sequential"))
    a = Trainer(cfg)
    a.train_step()
    cfg2 = dataclasses.replace(cfg, run_dir=str(tmp_path / "b"), grad_accum=2,
                               data=dataclasses.replace(cfg.data, batch_size=4))
    b = Trainer(cfg2)
    b.train_step()
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_sdpa_backend_choice_gives_the_same_losses(tmp_path):
    shard = make_shard(tmp_path / "t.bin")
    a = _losses(train(tiny_config(shard, tmp_path / "a", max_steps=5)))
    b = _losses(train(tiny_config(shard, tmp_path / "b", max_steps=5, sdpa_backend="math")))
    np.testing.assert_allclose(a, b, rtol=1e-4)


def test_fresh_run_refuses_a_directory_with_another_runs_checkpoints(tmp_path):
    shard = make_shard(tmp_path / "t.bin")
    train(tiny_config(shard, tmp_path / "run", max_steps=4, ckpt_every=4))
    with pytest.raises(ConfigError, match="already holds checkpoints.*resume"):
        Trainer(tiny_config(shard, tmp_path / "run", max_steps=4, resume=False))
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == ["step_000004"]  # nothing lost


def test_rerun_of_a_finished_run_reports_its_validation_loss(tmp_path):
    shard = make_shard(tmp_path / "t.bin")
    cfg = tiny_config(shard, tmp_path / "run", max_steps=6, ckpt_every=6)
    first = train(cfg)
    again = train(cfg)  # resumes at step 6 = max_steps: no training, same final evaluation
    assert again.steps == 6 and again.final_val_loss == pytest.approx(first.final_val_loss, rel=1e-6)


def test_a_nan_gradient_under_a_finite_loss_stops_before_its_checkpoint(tmp_path):
    """Step 10's loss is finite but its gradient is NaN (the update poisons the weights): the step-10
    checkpoint must not be written; step 5's stays the last good one."""
    shard = make_shard(tmp_path / "t.bin")
    tr = Trainer(tiny_config(shard, tmp_path / "run", max_steps=30, ckpt_every=5))
    tr.model.tok_emb.weight.register_hook(lambda g: g * float("nan") if tr.step == 9 else g)
    with pytest.raises(TrainingDiverged, match="grad_norm became nan at step 10.*step_000005"):
        tr.fit()
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "run")] == ["step_000005"]


def test_objective_mistakes_are_one_line_errors(tmp_path):
    from lmforge.train.objective import checked_loss, checked_metrics

    x = torch.ones(2, requires_grad=True)
    ok = checked_loss(lambda m, b: (x.sum(), {"acc": 0.5, "n": torch.tensor([3.0])}), "Mine")
    loss, metrics = ok(None, {})
    assert loss.shape == () and metrics["acc"].item() == 0.5 and metrics["n"].shape == ()
    for out, msg in ((x.sum(), "Mine.loss must return \\(loss, metrics\\), got Tensor"),
                     ((x, {}), "loss must be a scalar tensor, got \\(2,\\)"),
                     ((x.sum(), {"m": x}), "metric 'm' must be one number \\(a 0-d tensor\\), got \\(2,\\)"),
                     ((x.sum(), [1]), "must return its metrics as a dict")):
        with pytest.raises(ConfigError, match=msg):
            checked_loss(lambda m, b, out=out: out, "Mine")(None, {})
    assert checked_metrics({"val_loss": torch.tensor(1.5)}, "the evaluator") == {"val_loss": 1.5}
    with pytest.raises(ConfigError, match="the evaluator must return its metrics as a dict"):
        checked_metrics(torch.tensor(1.5), "the evaluator")
    shard = make_shard(tmp_path / "t.bin")
    tr = Trainer(tiny_config(shard, tmp_path / "run", max_steps=4, log_every=4))
    real = tr.loss_fn
    tr.loss_fn = lambda m, b: (lambda l, mt: (l, {**mt, **({"extra": l.detach()} if tr.step == 1 else {})}))(*real(m, b))
    with pytest.raises(ConfigError, match="metrics changed between steps: step 2 logged"):
        tr.fit()


def test_count_metrics_add_up_over_micro_batches(tmp_path):
    shard = make_shard(tmp_path / "t.bin")
    tr = Trainer(tiny_config(shard, tmp_path / "run", max_steps=2, grad_accum=2))
    real = tr.loss_fn
    tr.loss_fn = lambda m, b: (lambda l, mt: (l, {**mt, "num_rows": torch.tensor(float(b["input_ids"].shape[0])),
                                                  "rows": torch.tensor(float(b["input_ids"].shape[0]))}))(*real(m, b))
    res = tr.fit()
    row = next(r for r in res.history if "num_rows" in r)
    assert row["num_rows"] == 16 and row["rows"] == 8  # a count sums over the 2 x 8 rows, a mean does not


def test_resuming_says_what_changed_and_a_finished_run_logs_nothing_twice(tmp_path, capsys):
    shard = make_shard(tmp_path / "t.bin")
    train(tiny_config(shard, tmp_path / "run", max_steps=10, eval_every=10))
    rows = (tmp_path / "run" / "metrics.jsonl").read_text()
    res = train(tiny_config(shard, tmp_path / "run", max_steps=10, eval_every=10))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == rows and res.final_val_loss is not None
    train(tiny_config(shard, tmp_path / "run", max_steps=5, eval_every=10))
    assert "already at step 10 >= max_steps=5: nothing to train" in capsys.readouterr().out
    train(tiny_config(shard, tmp_path / "run", max_steps=12, eval_every=10, seed=3))
    assert "settings changed since the run's last start: max_steps 5 -> 12, seed 0 -> 3" in capsys.readouterr().out


def test_undefined_metrics_are_written_as_null(tmp_path):
    from lmforge.train.metrics import MetricsLog, read_metrics

    log = MetricsLog(tmp_path)
    log.log({"step": 1, "loss": 2.0, "kto/undesirable": float("nan"), "x": float("inf")})
    line = json.loads((tmp_path / "metrics.jsonl").read_text())  # strict JSON
    assert line["kto/undesirable"] is None and line["x"] is None
    back = read_metrics(tmp_path)[0]
    assert back["loss"] == 2.0 and math.isnan(back["kto/undesirable"])
    log.log({"step": 2, "loss": 1.0})
    log.truncate_after(1)  # a resume rewrites the rows it keeps: null stays null (it was written as bare NaN)
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == [json.dumps(
        {"step": 1, "loss": 2.0, "kto/undesirable": None, "x": None})]


def test_warmup_longer_than_the_run_warns_and_a_damaged_checkpoint_says_how_to_go_back(tmp_path):
    with pytest.warns(UserWarning, match="warmup_steps=50 > max_steps=10: the learning rate never reaches"):
        tiny_config(tmp_path / "t.bin", tmp_path / "w", max_steps=10, optim=dict(lr=1e-3, warmup_steps=50))
    with pytest.warns(UserWarning, match="warmup_steps=90 runs into the WSD decay, which starts at step 80 of "):
        tiny_config(tmp_path / "t.bin", tmp_path / "w", max_steps=100,
                    optim=dict(lr=1e-3, warmup_steps=90, schedule="wsd", decay_fraction=0.2))
    with warnings.catch_warnings():  # a warmup that ends where the decay starts is fine
        warnings.simplefilter("error")
        tiny_config(tmp_path / "t.bin", tmp_path / "w", max_steps=100,
                    optim=dict(lr=1e-3, warmup_steps=80, schedule="wsd", decay_fraction=0.2))
        tiny_config(tmp_path / "t.bin", tmp_path / "w", max_steps=1000,
                    optim=dict(lr=1e-3, warmup_steps=100, schedule="inverse_sqrt"))
    # inverse_sqrt without a warmup: 1/sqrt(step + 1) from step 0, at the 0.1 floor from step 99 of 1000, in silence
    with pytest.warns(UserWarning, match=r"^optim.schedule='inverse_sqrt' with optim.warmup_steps=0 decays from the "
                                         r"first step as 1/sqrt\(step \+ 1\): half of optim.lr by step 3, 0.1 of it "
                                         r"for the last of max_steps=1000; set optim.warmup_steps"):
        tiny_config(tmp_path / "t.bin", tmp_path / "w", max_steps=1000, optim=dict(lr=1e-3, schedule="inverse_sqrt"))
    shard = make_shard(tmp_path / "t.bin")
    train(tiny_config(shard, tmp_path / "run", max_steps=4, ckpt_every=2))
    newest = ckpt.checkpoint_dirs(tmp_path / "run")[-1]
    with open(newest / "model.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="corrupted.*move this one out of checkpoints/ \\(a run resumes from "
                                              "the newest"):
        Trainer(tiny_config(shard, tmp_path / "run", max_steps=6))


def test_qk_clip_in_the_trainer_shrinks_heads_above_tau_and_only_those(tmp_path):
    """optim.qk_clip_tau (MuonClip) through the Trainer: a tau no logit reaches changes nothing (bit-exact with
    tau = 0); a small tau clips heads every step and changes the weights; the step's largest logit and the
    heads clipped are logged. (It did nothing before: the Trainer never recorded the logits.)"""
    from lmforge.optim.config import OptimConfig

    shard = make_shard(tmp_path / "t.bin")

    def run(name, tau):
        res = train(tiny_config(shard, tmp_path / name, max_steps=4, optim=OptimConfig(
            name="muon", lr=0.02, warmup_steps=1, qk_clip_tau=tau)))
        return res, ckpt.load_model(res.run_dir)[0].state_dict()

    _, off = run("off", 0.0)
    huge, same = run("huge", 1e9)
    small, clipped = run("small", 0.02)  # this tiny model's largest logits are ~0.04-0.05
    assert all(torch.equal(off[k], same[k]) for k in off)
    assert any(not torch.equal(off[k], clipped[k]) for k in off if ".attn.wq" in k)
    rows = [r for r in small.history if "qk/max_logit" in r]
    assert rows and all(r["qk/max_logit"] > 0.02 and r["qk/clipped_heads"] > 0 for r in rows)
    assert all(r["qk/clipped_heads"] == 0 for r in huge.history if "qk/clipped_heads" in r)
    with pytest.raises(ConfigError, match="qk_clip_tau is MuonClip's QK-clip: it needs optim.name='muon'"):
        OptimConfig(name="adamw", qk_clip_tau=5.0)


def test_moe_training_logs_expert_loads(tmp_path):
    from lmforge.model.config import ModelConfig, MoEConfig

    shard = make_shard(tmp_path / "t.bin")
    model = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, mlp="moe",
                        moe=MoEConfig(n_experts=4, top_k=2, aux_loss=0.01))
    res = train(tiny_config(shard, tmp_path / "run", model=model, max_steps=3))
    row = next(r for r in res.history if "moe/load_max_over_mean" in r)
    assert sum(row[f"moe/load_e{i}"] for i in range(4)) == pytest.approx(1.0, abs=1e-5)
    assert row["moe/load_max_over_mean"] >= 1.0 and row["moe/dropped_frac"] == 0.0
    assert row["moe/aux_loss"] == pytest.approx(row["aux_loss"], rel=1e-4)  # no MTP: aux_loss is all balancing


def test_settings_one_process_or_a_tied_head_would_ignore_say_so(tmp_path):
    from lmforge.model.config import ModelConfig, MoEConfig
    from lmforge.parallel.config import ParallelConfig

    shard = make_shard(tmp_path / "t.bin")
    with pytest.warns(UserWarning, match="activation_checkpoint='full' is applied by the parallel runner"):
        Trainer(tiny_config(shard, tmp_path / "ac", parallel=ParallelConfig(activation_checkpoint="full")))
    with pytest.warns(UserWarning, match=r"parallel.compile = true compiles each block in the parallel runner, which "
                      "one process does not use: training uncompiled; set compile = true"):  # (it said nothing)
        Trainer(tiny_config(shard, tmp_path / "pc", parallel=ParallelConfig(compile=True)))
    with pytest.raises(ConfigError, match=r"^compile = true compiles the model and loss as one, which the pipeline's "
                       r"stages \(parallel.pp=2\) never run: it compiled nothing; set compile = false and \[parallel\] "
                       "compile = true"):
        tiny_config(shard, tmp_path / "pp", compile=True, parallel=ParallelConfig(pp=2))
    tied = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, tie_embeddings=True)
    with pytest.warns(UserWarning, match="optim.head_lr has no effect with model.tie_embeddings"):
        tiny_config(shard, tmp_path / "t", model=tied, optim=dict(lr=1e-3, head_lr=1e-2))
    moe = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, mlp="moe",
                      moe=MoEConfig(n_experts=4, top_k=2, bias_update_rate=1e-3))
    # the aux-free bias moves once per step (lmforge.model.layers.moe.update_expert_biases), so a recomputed
    # forward routes as the first one did: activation checkpointing with it is no longer refused
    ParallelConfig(dp_shard=2, activation_checkpoint="full").validate(2, moe)


def test_aux_free_moe_bias_moves_once_per_step_by_all_micro_batches(tmp_path):
    """DeepSeek-V3's aux-loss-free bias: one move per optimizer step by the sign of the load of all its
    micro-batches (it moved after each micro-batch before)."""
    from lmforge.model.config import ModelConfig, MoEConfig
    from lmforge.model.layers.moe import MoE

    moe = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, mlp="moe",
                      moe=MoEConfig(n_experts=4, top_k=1, score="sigmoid", bias_update_rate=0.25))
    tr = Trainer(tiny_config(make_shard(tmp_path / "t.bin"), tmp_path / "run", model=moe, grad_accum=3,
                             optim=dict(lr=3e-3), max_steps=2, eval_every=100, ckpt_every=100))
    layers = [m for m in tr.model.modules() if isinstance(m, MoE)]
    loads: dict[int, list] = {i: [] for i in range(len(layers))}
    for i, m in enumerate(layers):
        m.register_forward_hook(lambda mod, a, out, i=i: loads[i].append(mod.last_stats["load"].clone()))
    for _ in range(2):
        before = [m.e_bias.clone() for m in layers]
        for v in loads.values():
            v.clear()
        tr.train_step()
        for i, m in enumerate(layers):
            assert len(loads[i]) == 3
            n = sum(loads[i])
            torch.testing.assert_close(m.e_bias, before[i] + 0.25 * torch.sign(n.mean() - n))


class Hooked:
    """A data source with a begin_step hook (where an RL source samples): data's batches, begin(trainer) once
    per optimizer step, on_batch() before each batch."""

    def __init__(self, data, begin, on_batch=lambda: None):
        self.data, self.begin, self.on_batch = data, begin, on_batch

    def begin_step(self, trainer):
        self.begin(trainer)

    def next_batch(self):
        self.on_batch()
        return self.data.next_batch()

    def state_dict(self):
        return self.data.state_dict()

    def load_state_dict(self, state):
        self.data.load_state_dict(state)


def test_begin_step_comes_before_each_steps_batches_and_outside_parameters_are_refused(tmp_path):
    """A data source's begin_step(trainer) (where an RL source samples its rollouts) runs once per optimizer
    step, before that step's grad_accum batches, with the step number and the training forward's context at
    hand; an optimizer holding a parameter the model does not own (a value head kept beside it) is refused
    at once, not after training until the first checkpoint."""
    from lmforge.train.pretrain import pretraining_parts

    shard = make_shard(tmp_path / "t.bin")
    model, opt, data, obj, config, *_ = pretraining_parts(tiny_config(shard, tmp_path / "run", max_steps=3,
                                                                      grad_accum=2))
    events = []

    def begin(trainer):
        with trainer.forward_context():
            events.append(("begin", trainer.step))

    Trainer(model, opt, Hooked(data, begin, lambda: events.append("batch")), obj, config=config).fit()
    assert events[:9] == [("begin", 0), "batch", "batch", ("begin", 1), "batch", "batch", ("begin", 2), "batch", "batch"]
    head = torch.nn.Linear(4, 1)
    outside = torch.optim.AdamW([*model.parameters(), *head.parameters()])
    with pytest.raises(ConfigError, match=r"optimizer holds a parameter of shape \(1, 4\) that is not in the model"):
        Trainer(model, outside, data, obj, config=dataclasses.replace(config, run_dir=str(tmp_path / "run2")))


def test_begin_step_time_is_left_out_of_the_throughput(tmp_path):
    """The time a begin_step hook takes (an RL source sampling its rollouts) is not training: tok_per_s and MFU
    leave it out, and each log row says how long the hooks took since the previous one (begin_step_s)."""
    import json
    import time

    from lmforge.train.pretrain import pretraining_parts

    shard = make_shard(tmp_path / "t.bin")
    model, opt, data, obj, config, *_ = pretraining_parts(tiny_config(shard, tmp_path / "run", max_steps=4,
                                                                      log_every=2))

    Trainer(model, opt, Hooked(data, lambda trainer: time.sleep(0.25)), obj, config=config).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tok_per_s" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for prev, row in zip([{"tokens": 0}] + rows, rows):
        assert 0.5 <= row["begin_step_s"] < 1.0  # two hooks of 0.25 s since the last row
        # with the sleeps counted, tok/s could not pass tokens / 0.5 s
        assert row["tok_per_s"] > 2 * (row["tokens"] - prev["tokens"]) / 0.5


def test_evaluation_and_checkpoint_time_are_left_out_of_the_throughput(tmp_path, monkeypatch):
    """The row after an evaluation or a checkpoint counted their time as training: its tok_per_s (and MFU) fell to a
    third of the others' on a tiny CPU run (9,796 between 32,000s). Here each evaluation and each save sleeps 0.25 s;
    with either counted, tok/s could not pass the row's tokens / 0.25 s."""
    import json
    import time

    from lmforge.train.pretrain import pretraining_parts

    shard = make_shard(tmp_path / "t.bin")
    model, opt, data, obj, config, evaluator, *_ = pretraining_parts(tiny_config(
        shard, tmp_path / "run", max_steps=6, log_every=2, eval_every=2, ckpt_every=2))

    def slow_eval(m):
        time.sleep(0.25)
        return evaluator(m)

    tr = Trainer(model, opt, data, obj, config=config, evaluator=slow_eval)
    save = tr.save
    monkeypatch.setattr(tr, "save", lambda: (time.sleep(0.25), save())[1])
    tr.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tok_per_s" in r]
    assert [r["step"] for r in rows] == [2, 4, 6]
    for prev, row in zip([{"tokens": 0}] + rows, rows):  # the first: after the step-0 evaluation
        assert row["tok_per_s"] > (row["tokens"] - prev["tokens"]) / 0.25


@pytest.mark.parametrize("progress", [False, True])
def test_without_the_bar_each_log_step_and_evaluation_is_a_plain_line(tmp_path, capsys, progress):
    """progress=false, or output that is no terminal (a batch job writing a log file; pytest's capture): the
    metrics still show, one line per log step and per evaluation, instead of nothing until the end or a
    bar's carriage-return updates."""
    shard = make_shard(tmp_path / "t.bin")
    train(tiny_config(shard, tmp_path / "run", max_steps=4, log_every=2, eval_every=4, progress=progress))
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("step") and "| loss" in line]
    assert [s.split("|")[0].split()[1] for s in steps] == ["2/4", "4/4"] and all("tok_s" in s for s in steps)
    assert any(line.startswith("step      4 | val_loss") for line in lines)


def test_aux_free_moe_bias_ignores_the_load_of_a_repeated_batch(tmp_path):
    """A rank's Repeated batch (lmforge.train.distributed.RankRows: rows another rank trains on, run at weight 0
    only to join the collectives) adds nothing to the step's expert load: the bias moves by the real
    micro-batch's load alone (the repeated tokens used to count, and here would flip the move)."""
    from lmforge.model.config import ModelConfig, MoEConfig
    from lmforge.model.layers.moe import MoE
    from lmforge.model.transformer import Transformer
    from lmforge.optim import build_optimizer
    from lmforge.optim.config import OptimConfig
    from lmforge.train.config import LoopConfig
    from lmforge.train.distributed import Repeated
    from lmforge.train.harness import FixedBatches
    from lmforge.train.loss import LMObjective

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=41, d_model=16, n_layers=1, n_heads=2, max_seq_len=32, mlp="moe",
                                    moe=MoEConfig(n_experts=4, top_k=1, score="sigmoid", bias_update_rate=0.25)))
    g = torch.Generator().manual_seed(1)
    real, repeated = torch.randint(0, 41, (1, 9), generator=g), torch.randint(0, 41, (8, 9), generator=g)
    data = FixedBatches([{"input_ids": real[:, :-1], "targets": real[:, 1:]},
                         Repeated({"input_ids": repeated[:, :-1], "targets": repeated[:, 1:]})])
    cfg = LoopConfig(optim=OptimConfig(lr=1e-2, warmup_steps=0), run_dir=str(tmp_path), max_steps=1, grad_accum=2,
                     log_every=1, eval_every=100, ckpt_every=100, device="cpu", dtype="fp32", progress=False,
                     plot=False)

    class Counting(LMObjective):  # an objective with a count (num_*), as SFT's trained tokens
        def loss(self, model, batch):
            loss, metrics = super().loss(model, batch)
            return loss, {**metrics, "num_rows": torch.tensor(float(len(batch["input_ids"])))}

    tr = Trainer(model, build_optimizer(model, cfg.optim), data, Counting(), config=cfg)
    layer = next(m for m in tr.model.modules() if isinstance(m, MoE))
    loads = []
    layer.register_forward_hook(lambda mod, a, out: loads.append(mod.last_stats["load"].clone()))
    stats = tr.train_step()
    (n_real, n_repeated) = loads
    counted = n_real * 8 + n_repeated * 64  # assignments: 8 and 64 tokens at top_k=1
    assert not torch.equal(torch.sign(counted.mean() - counted), torch.sign(n_real.mean() - n_real))
    torch.testing.assert_close(layer.e_bias, 0.25 * torch.sign(n_real.mean() - n_real))
    assert layer.step_load.tolist() == [0, 0, 0, 0]
    # nor are they the step's tokens or counts (they were: 72 tokens, 9 rows)
    assert tr.tokens == 8 and float(stats["num_rows"]) == 1.0


def _tiny_run(tmp_path, data, objective=None, name="run", optimizer=None, model=None, **loop):
    """A Trainer over a tiny Transformer (vocab 41) with `data` (a DataSource or a list of batches, cycled)."""
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.optim import build_optimizer
    from lmforge.optim.config import OptimConfig
    from lmforge.train.config import LoopConfig
    from lmforge.train.harness import FixedBatches
    from lmforge.train.loss import LMObjective

    torch.manual_seed(0)
    model = model or Transformer(ModelConfig(vocab_size=41, d_model=16, n_layers=1, n_heads=2, max_seq_len=32))
    base = dict(optim=OptimConfig(lr=1e-2, warmup_steps=0), run_dir=str(tmp_path / name), max_steps=1,
                log_every=1, eval_every=100, ckpt_every=100, device="cpu", dtype="fp32", progress=False, plot=False)
    cfg = LoopConfig(**{**base, **loop})
    data = FixedBatches(data) if isinstance(data, list) else data
    return Trainer(model, optimizer or build_optimizer(model, cfg.optim), data, objective or LMObjective(), config=cfg)


def _rows(seed, n=2, T=8, trained=True):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 41, (n, T + 1), generator=g)
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:] if trained else torch.full((n, T), -100)}


def test_a_micro_batch_with_nothing_to_train_adds_nothing_and_a_step_of_them_updates_nothing(tmp_path):
    """A micro-batch whose batch_weight is 0 (every target -100: an RL source's filtered-out group) has a loss
    of NaN (a mean over nothing); it used to turn the whole step's gradients NaN. It adds nothing: the step equals
    the step without it, bit for bit, and its metrics stay finite. A step of only such micro-batches makes no
    update (weights and optimizer state unchanged), counts as a step and logs loss null, not a divergence."""
    from .helpers import MaskedMean

    a, empty = _rows(1), _rows(2, trained=False)
    alone = _tiny_run(tmp_path, [a], MaskedMean(), name="alone")
    alone.train_step()
    both = _tiny_run(tmp_path, [a, empty], MaskedMean(), name="both", grad_accum=2)
    stats = both.train_step()
    assert all(p.equal(q) for p, q in zip(alone.model.parameters(), both.model.parameters()))
    assert float(stats["loss"]) == float(alone.flush()["loss"]) and math.isfinite(float(stats["grad_norm"]))

    tr = _tiny_run(tmp_path, [empty, empty, a, a], name="noop", grad_accum=2, max_steps=2)
    before = [p.detach().clone() for p in tr.model.parameters()]
    after_1 = []

    class Watch:
        def on_step_end(self, trainer, stats):
            if trainer.step == 1:
                after_1.append(all(p.equal(q) for p, q in zip(before, trainer.model.parameters()))
                               and not trainer.optimizer.state)

    tr.hooks.append(Watch())
    res = tr.fit()  # step 2 trains; step 1's undefined loss is no divergence
    rows = [r for r in res.history if "loss" in r]
    assert after_1 == [True] and res.steps == 2 and [r["step"] for r in rows] == [1, 2]
    assert math.isnan(rows[0]["loss"]) and rows[0]["grad_norm"] == 0.0 and rows[1]["loss"] > 0
    assert not all(p.equal(q) for p, q in zip(before, tr.model.parameters()))


def test_counts_of_a_micro_batch_with_nothing_to_train_still_add_up(tmp_path):
    """num_* counts add up over a step's micro-batches also where one has nothing to train (batch_weight 0: its
    count is 0, not left out), so a step of only such micro-batches logs num_tokens 0, not null."""
    from .helpers import MaskedMean

    class Counted(MaskedMean):
        def loss(self, model, batch):
            loss, metrics = super().loss(model, batch)
            return loss, {**metrics, "num_tokens": (batch["targets"] != -100).sum().float()}

    a, empty = _rows(1), _rows(2, trained=False)
    res = _tiny_run(tmp_path, [empty, empty, a, empty], Counted(), grad_accum=2, max_steps=2).fit()
    rows = [r for r in res.history if "loss" in r]
    assert [r["num_tokens"] for r in rows] == [0.0, 16.0]


def test_a_constant_loss_for_an_empty_micro_batch_is_refused_under_a_runner(tmp_path):
    """Under [parallel] a micro-batch with nothing to train still runs forward and backward on every rank (the
    collectives), its output gradient zeroed: a constant loss there failed in the runner's backward with torch's
    raw 'does not require grad'; it is a one-line error saying to compute it from the model's forward."""
    from .helpers import MaskedMean

    class ConstWhenEmpty(MaskedMean):
        def loss(self, model, batch):
            if not (batch["targets"] != -100).any():
                return torch.tensor(float("nan")), {"loss": torch.tensor(float("nan"))}
            return super().loss(model, batch)

    tr = _tiny_run(tmp_path, [_rows(1)], ConstWhenEmpty())
    with pytest.raises(ConfigError, match=r"ConstWhenEmpty.loss returned a constant for a batch with nothing to "
                                          r"train .* compute it from the model's forward"):
        tr._empty_loss(tr.model, _rows(2, trained=False))
    loss, _ = tr._empty_loss(tr.model, _rows(1))  # a forward's loss: its gradient reaches the model as zeros
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in tr.model.parameters())


def test_a_loss_without_gradient_says_to_skip_with_batch_weight_zero(tmp_path):
    """An objective returning a constant loss to skip a batch crashed in backward with torch's raw 'does not
    require grad'; it is a one-line error saying how to skip one (batch_weight 0)."""
    class Constant:
        def loss(self, model, batch):
            return torch.zeros(()), {}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    tr = _tiny_run(tmp_path, [_rows(1)], Constant())
    with pytest.raises(ConfigError, match=r"Constant.loss returned a loss that does not depend on the trained "
                                          r"parameters .*return 0 from the objective's batch_weight\(batch\)"):
        tr.train_step()


def test_a_metric_a_micro_batch_cannot_define_is_averaged_over_those_that_do(tmp_path):
    """A mean over a sub-population (KTO's rewards/chosen over the desirable rows) is NaN in a micro-batch that
    lacks it; the step's value used to be NaN whenever one micro-batch lacked it. It is the mean over the
    micro-batches that define it, as for one batch of their rows, by the rule the post-training evaluator
    (ObjectiveEvaluator) also applies."""
    from lmforge.align.sft import ObjectiveEvaluator
    from lmforge.train.loss import LMObjective

    class PerLabel(LMObjective):  # the targets' mean over the rows labelled 1 (NaN where there is none)
        def loss(self, model, batch):
            loss, metrics = super().loss(model, batch)
            mine = batch["label"].bool()
            return loss, {**metrics, "labelled/mean_target": batch["targets"][mine].float().mean()}

    a, b = {**_rows(1), "label": torch.tensor([0, 0])}, {**_rows(2), "label": torch.tensor([1, 1])}
    one = {k: torch.cat([a[k], b[k]]) for k in a}
    whole = _tiny_run(tmp_path, [one], PerLabel(), name="whole").fit().history[0]
    accum = _tiny_run(tmp_path, [a, b], PerLabel(), name="accum", grad_accum=2).fit().history[0]
    assert accum["labelled/mean_target"] == pytest.approx(whole["labelled/mean_target"])
    assert accum["loss"] == pytest.approx(whole["loss"])
    with torch.no_grad():
        val = ObjectiveEvaluator(PerLabel(), [a, b])(_tiny_run(tmp_path, [a], name="ev").model)
    assert val["val_labelled/mean_target"] == pytest.approx(accum["labelled/mean_target"])


def test_a_finite_data_source_ends_the_run_as_max_steps_would(tmp_path, capsys):
    """A data source that raises StopIteration at its end (one epoch) used to let it escape fit() with no final
    evaluation, checkpoint or TrainResult. The run ends at the last whole step: a step the data cannot fill is
    rolled back (its micro-batches left untrained), it is evaluated and checkpointed, one line says why, and
    resuming the run ends there again."""
    class Finite:
        def __init__(self, n):
            self.n, self.i = n, 0

        def next_batch(self):
            if self.i >= self.n:
                raise StopIteration
            self.i += 1
            return _rows(self.i)

        def state_dict(self):
            return {"i": self.i}

        def load_state_dict(self, state):
            self.i = state["i"]

    evaluated = []
    tr = _tiny_run(tmp_path, Finite(5), grad_accum=2, max_steps=10)
    tr.evaluator = lambda model: evaluated.append(1) or {"val_x": 1.0}
    res = tr.fit()
    assert res.steps == 2 and res.stop_reason.startswith("the data ended")
    assert "step 3 are left untrained" in res.stop_reason and res.final_eval == {"val_x": 1.0}
    assert res.checkpoint.name == "step_000002" and len(evaluated) == 2  # steps 0 and 2
    assert "stopped at step 2: the data ended (its next_batch raised StopIteration; the 1 micro-batch(es) drawn" \
        in capsys.readouterr().out
    assert tr.data.i == 4  # rolled back to the step's start: a resume sees the same end
    again = _tiny_run(tmp_path, Finite(5), grad_accum=2, max_steps=10, resume=True).fit()
    assert again.steps == 2 and again.stop_reason.startswith("the data ended")


def test_non_tensor_batch_values_reach_the_objective_unchanged(tmp_path):
    """RL metadata in a batch (the prompts' texts) used to fail deep in _to_device; tensors are moved, other
    values are passed through as they are."""
    from lmforge.train.loss import LMObjective

    seen = []

    class Reading(LMObjective):
        def loss(self, model, batch):
            seen.append(batch["prompts"])
            return super().loss(model, batch)

    _tiny_run(tmp_path, [{**_rows(1), "prompts": ["a", "b"]}], Reading()).fit()
    assert seen == [["a", "b"]]


def test_an_optimizer_built_before_apply_lora_is_refused(tmp_path):
    """An optimizer built before apply_lora holds the frozen base and none of the adapters: every step trained
    nothing, silently. Refused in one line, naming what it lacks and the fix."""
    from lmforge.adapt.lora import LoRAConfig, apply_lora
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.optim import build_optimizer
    from lmforge.optim.config import OptimConfig

    model = Transformer(ModelConfig(vocab_size=41, d_model=16, n_layers=1, n_heads=2, max_seq_len=32))
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=("wq", "wv")))
    with pytest.raises(ConfigError, match=r"the optimizer lacks 4 of the model's trainable parameters "
                                          r"\(blocks.0.attn.wq.lora_A, blocks.0.attn.wq.lora_B, "
                                          r"blocks.0.attn.wv.lora_A, \.\.\.\).*build the optimizer after apply_lora"):
        _tiny_run(tmp_path, [_rows(1)], model=model, optimizer=opt)
    _tiny_run(tmp_path, [_rows(1)], model=model, name="ok").fit()  # built after apply_lora: accepted


def test_the_run_summary_says_a_compiled_first_step_compiles(tmp_path):
    """With compile = true the first step sat for a minute (CPU, toy model) with nothing printed and the bar at 0:
    a hang to the eye. The line printed before training says so; without compile it says nothing of it."""
    from lmforge.cli.train import model_summary

    cfg = tiny_config(tmp_path / "t.bin", tmp_path / "run")
    assert model_summary(cfg) == ("model: 0.05M parameters (0.04M without embeddings), 2 layers, d_model 32, vocab "
                                  "257; 40 steps x 256 tokens = 10,240 tokens")
    assert model_summary(dataclasses.replace(cfg, compile=True)) == model_summary(cfg) + (
        "; compile = true: the first step compiles the model first (a minute or more, the bar still)")
