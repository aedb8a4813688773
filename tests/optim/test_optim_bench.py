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
