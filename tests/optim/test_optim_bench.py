"""The optimizer benchmark's measurements: interpolated steps/time to target, and a short real run."""

from __future__ import annotations

import math

import pytest

from lmforge.optim.benchmark import OptimBenchConfig, format_table, run_benchmark, to_target


def test_to_target_interpolates_between_evaluations():
    curve = [{"step": 0, "val_loss": 5.0, "time": 0.0}, {"step": 10, "val_loss": 3.0, "time": 2.0},
             {"step": 20, "val_loss": 2.0, "time": 4.0}]
    assert to_target(curve, 2.5) == pytest.approx((15.0, 3.0))
    assert to_target(curve, 3.0) == pytest.approx((10.0, 2.0))
    assert to_target(curve, 1.0) == (math.inf, math.inf)


def test_a_target_the_first_evaluation_already_meets_is_reached_there_and_a_bad_target_is_refused():
    """A --target-loss above the loss at step 0 interpolated back from the first pair of evaluations: step -5
    (and time -1 s) for this curve. A NaN target was taken as given and nothing reached it."""
    from lmforge.errors import ConfigError

    curve = [{"step": 0, "val_loss": 5.0, "time": 0.0}, {"step": 10, "val_loss": 3.0, "time": 2.0}]
    assert to_target(curve, 6.0) == (0.0, 0.0)
    assert to_target(curve, 5.0) == (0.0, 0.0)
    for bad in (math.nan, -1.0, math.inf):
        with pytest.raises(ConfigError, match=f"target_loss must be a finite loss >= 0 .*got {bad}"):
            OptimBenchConfig(target_loss=bad)


def test_short_benchmark_reports_memory_and_speedup(tmp_path):
    cfg = OptimBenchConfig(optimizers=("adamw", "lion"), depth=1, seq_len=16, batch_size=4, steps=12,
                           warmup_steps=2, lr_points=1, eval_every=6, eval_batches=2, out=str(tmp_path))
    result = run_benchmark(cfg, log=lambda s: None)
    by = {s["optimizer"]: s for s in result["summary"]}
    assert by["adamw"]["state_bytes_per_param"] == pytest.approx(8.0)  # fp32 m and v
    assert by["lion"]["state_bytes_per_param"] == pytest.approx(4.0)
    assert by["adamw"]["speedup_vs_ref"] == 1.0 and by["adamw"]["steps_to_target"] == 12
    for r in result["runs"]:
        assert r["curve"][-1]["val_loss"] < r["curve"][0]["val_loss"]
    assert "| adamw |" in format_table(result)
    assert (tmp_path / "partial.json").is_file()  # written after every run


def test_runs_train_through_the_trainer_like_a_plain_loop():
    """run_one (the Trainer) = a plain loop: cosine schedule with warm-up, clipping at 1.0, evaluations
    every eval_every steps on the same batches."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.optim import build_optimizer, lr_multiplier
    from lmforge.optim.benchmark import _batches, corpus_bytes, run_one
    from lmforge.optim.config import OptimConfig

    cfg = OptimBenchConfig(optimizers=("lion",), depth=1, seq_len=16, batch_size=4, steps=8, warmup_steps=2,
                           eval_every=4, eval_batches=2, device="cpu")
    ids = corpus_bytes()[:20000]
    train, val = _batches(ids, cfg.steps, cfg, 0), _batches(ids, cfg.eval_batches, cfg, 1)
    got = run_one(cfg, "lion", 1e-3, train, val)

    torch.manual_seed(cfg.seed)
    model = Transformer(ModelConfig.from_depth(1, vocab_size=257, max_seq_len=16))
    ocfg = OptimConfig(name="lion", lr=1e-3, weight_decay=0.0, warmup_steps=2, min_lr_ratio=0.1)
    opt = build_optimizer(model, ocfg)

    def val_loss() -> float:
        with torch.no_grad():
            return float(np.mean([F.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["targets"].flatten()).item()
                                  for b in val]))

    want = [val_loss()]
    for step, b in enumerate(train):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_multiplier(ocfg, step, cfg.steps)
        F.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["targets"].flatten()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if (step + 1) % 4 == 0:
            want.append(val_loss())
    assert [p["step"] for p in got["curve"]] == [0, 4, 8]
    assert [p["val_loss"] for p in got["curve"]] == pytest.approx(want, rel=1e-5)
    assert got["final_val_loss"] == got["curve"][-1]["val_loss"] and got["wall_time"] > 0


def test_an_optimizer_that_never_reaches_the_target_reads_so_and_an_empty_list_is_refused():
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="optimizers is empty"):
        OptimBenchConfig(optimizers=())
    row = dict(best_lr=1e-3, final_val_loss=3.0, min_val_loss=2.9, min_val_step=10, steps_to_target=math.inf,
               speedup_vs_ref=0.0, time_to_target=math.inf, wall_time=1.0, state_bytes_per_param=8.0)
    result = {"target_loss": 2.0, "reference": "adamw", "tokens": 1, "n_params": 1, "device": "cpu",
              "summary": [dict(row, optimizer="lion")]}
    assert "| not reached | not reached | not reached |" in format_table(result)


def test_negative_threads_are_refused_by_name():
    """--threads -1 reached torch.set_num_threads, whose RuntimeError was a traceback."""
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"threads must be >= 0 \(0 = torch's default\), got -1"):
        OptimBenchConfig(threads=-1)


def test_a_benchmark_text_that_is_no_file_is_refused(tmp_path):
    """`lmforge bench optimizers --data typo.txt` trained on the fallback text in silence."""
    from lmforge.errors import DataError
    from lmforge.optim.benchmark import corpus_bytes

    with pytest.raises(DataError, match=r"--data .*typo.txt: no such file"):
        corpus_bytes(str(tmp_path / "typo.txt"))
    with pytest.raises(DataError, match=r"--data .*: a directory, not a file"):
        corpus_bytes(str(tmp_path))
    (tmp_path / "t.txt").write_bytes(b"abc")
    assert corpus_bytes(str(tmp_path / "t.txt")).tolist() == [97, 98, 99]


def test_a_merge_file_that_is_no_results_file_is_refused_before_any_run(tmp_path):
    """A mistyped --merge raised FileNotFoundError after the whole sweep had trained (its summary lost)."""
    from lmforge.errors import DataError

    cfg = OptimBenchConfig(optimizers=("lion",), depth=1, seq_len=16, batch_size=2, steps=2, lr_points=1,
                           eval_every=2, eval_batches=1, device="cpu", out=str(tmp_path / "out"),
                           merge=str(tmp_path / "typo.json"))
    with pytest.raises(DataError, match=r"--merge .*typo.json: not a readable results.json"):
        run_benchmark(cfg, log=lambda s: None)
    assert not (tmp_path / "out" / "partial.json").exists()  # refused before the first run
    (tmp_path / "typo.json").write_text('{"summary": []}')
    with pytest.raises(DataError, match="not a readable results.json"):
        run_benchmark(cfg, log=lambda s: None)


def test_a_text_too_short_for_one_window_is_refused_in_one_line(tmp_path):
    """numpy's 'high <= 0' from drawing a window start in a text shorter than a window."""
    from lmforge.errors import DataError

    (tmp_path / "t.txt").write_bytes(b"hello world")
    cfg = OptimBenchConfig(optimizers=("lion",), depth=1, seq_len=16, batch_size=2, steps=2, lr_points=1,
                           eval_every=2, eval_batches=1, device="cpu", out=str(tmp_path / "out"),
                           data=str(tmp_path / "t.txt"))
    with pytest.raises(DataError, match=r"^the text \(--data\) has 11 bytes, too few .* at least 180 bytes, or a "
                                        r"shorter --seq-len$"):
        run_benchmark(cfg, log=lambda s: None)


def test_a_reference_that_diverged_at_every_rate_hands_the_target_to_the_best_finisher(tmp_path):
    """AdamW's final loss inf (diverged at each rate) was the target: every curve 'reached' it at step -inf, and
    the plot's axis limits (inf) raised after the whole sweep."""
    from lmforge.optim.benchmark import plot_curves, summarize

    def run(name, final, losses):
        return {"optimizer": name, "lr": 1e-3, "final_val_loss": final, "wall_time": 1.0, "n_params": 10,
                "state_bytes_per_param": 4.0,
                "curve": [{"step": 10 * i, "val_loss": v, "time": float(i)} for i, v in enumerate(losses)]}

    result = summarize([run("adamw", math.inf, [5.0, 4.0]), run("lion", 3.0, [5.0, 4.0, 3.0]),
                        run("muon", 3.5, [5.0, 2.0, 3.5])])
    assert (result["target_loss"], result["reference"]) == (3.0, "lion")
    by = {s["optimizer"]: s for s in result["summary"]}
    assert by["lion"]["steps_to_target"] == 20.0 and by["lion"]["speedup_vs_ref"] == 1.0
    assert by["muon"]["steps_to_target"] == pytest.approx(20 / 3) and by["muon"]["speedup_vs_ref"] == pytest.approx(3)
    assert by["adamw"]["steps_to_target"] == math.inf and by["adamw"]["speedup_vs_ref"] == 0.0
    assert plot_curves(result, tmp_path / "c.png").is_file()
    everyone_diverged = summarize([run("adamw", math.inf, [5.0, 4.0])])
    assert everyone_diverged["summary"][0]["steps_to_target"] == math.inf
    assert plot_curves(everyone_diverged, tmp_path / "d.png").is_file()


def test_what_the_runs_settings_warn_of_is_said_once(tmp_path):
    """`lmforge bench optimizers --steps 10` said "optim.warmup_steps=20 > max_steps=10" once per run and per copy of
    its loop config (scratch_fit's), and the WSD and inverse_sqrt warnings the same way: run_benchmark builds one
    run's loop config first, and the runs ignore the ConfigWarning category."""
    import warnings

    for schedule, warmup, want in (
            ("cosine", 6, "optim.warmup_steps=6 > max_steps=4: the learning rate never reaches optim.lr"),
            ("wsd", 4, "optim.warmup_steps=4 runs into the WSD decay")):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            cfg = OptimBenchConfig(optimizers=("adamw", "lion"), depth=1, seq_len=16, batch_size=2, steps=4,
                                   lr_points=1, eval_every=2, eval_batches=1, warmup_steps=warmup, schedule=schedule,
                                   out=str(tmp_path / schedule))
            run_benchmark(cfg, log=lambda s: None)
        said = [str(w.message) for w in got if "warmup" in str(w.message)]
        assert len(said) == 1 and said[0].startswith(want), said
