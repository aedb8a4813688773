"""Sweep planning, a tiny end-to-end sweep through the trainer, and `lmforge scaling fit` on a table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.scaling.sweep import SweepConfig, plan
from lmforge.scaling.table import write_rows

from .test_scaling_fits import A_TRUE, _isoflop_rows


def test_plan_allocates_tokens_by_budget():
    cfg = SweepConfig(budgets=(1e10, 1e11), depths=(1, 2, 3), min_steps=1, max_steps=10**6)
    rows = plan(cfg)
    assert len(rows) == 6
    for r in rows:
        # D = C / (6N), rounded to whole steps of seq_len x batch_size tokens
        assert abs(6 * r["N"] * r["D"] - r["budget"]) <= 6 * r["N"] * cfg.tokens_per_step / 2
    short = plan(SweepConfig(budgets=(1e10,), depths=(1, 6), min_steps=50))
    assert [r["depth"] for r in short] == [1]  # depth 6 would get < 50 steps


def test_tiny_sweep_through_trainer(tmp_path):
    pytest.importorskip("lmforge.train.trainer")
    from lmforge.scaling.sweep import main_sweep

    cfg = SweepConfig(budgets=(2e8,), depths=(1, 2), width=8, min_steps=3, seq_len=16, batch_size=4,
                      evals=2, eval_batches=1, out=str(tmp_path / "sw"))
    rows = main_sweep(cfg)
    assert [r["depth"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["loss"] < np.log(257) + 0.5  # trained (a little) from the uniform-guess loss
        assert r["C"] == 6 * r["N"] * r["D"] and r["C_exact"] > 0
    curves = json.loads((tmp_path / "sw" / "curves.json").read_text())
    assert len(curves) == 2 and all(len(c["curve"]) >= 2 for c in curves)
    again = main_sweep(cfg)  # finished runs are reused, not retrained
    assert [r["loss"] for r in again] == [r["loss"] for r in rows]


def test_fit_command_writes_report_and_plots(tmp_path, capsys):
    from lmforge.cli.scaling import main

    table = write_rows(_isoflop_rows(), tmp_path / "runs.csv")
    assert main(["fit", "--table", str(table), "--bootstrap", "0", "--predict", "1e21",
                 "--inference_tokens", "1e12"]) == 0
    report = json.loads((tmp_path / "fit.json").read_text())
    assert report["approach2"]["a"] == pytest.approx(A_TRUE, abs=0.02)
    assert report["approach3"]["a"] == pytest.approx(A_TRUE, abs=0.02)
    assert report["inference_aware"]["N"] < report["predictions"]["approach3"][0]["N_opt"]
    assert {Path(p).name for p in report["plots"]} == {"isoflop.png", "frontier.png", "predicted_vs_observed.png"}
    assert "approach1" not in report  # no curves.json beside the table


def test_sweep_names_the_points_it_leaves_out_and_a_fit_of_few_runs_skips_approach_3(tmp_path, capsys):
    from lmforge.errors import ConfigError
    from lmforge.scaling.report import run_fits
    from lmforge.scaling.sweep import main_sweep

    with pytest.raises(ConfigError, match="no run of the grid fits"):
        main_sweep(SweepConfig(budgets=(1e3,), depths=(1,), out=str(tmp_path / "none"), dry_run=True))
    assert "left out: C=1.0e+03 depth=1" in capsys.readouterr().err
    main_sweep(SweepConfig(budgets=(1e10,), depths=(1, 6), min_steps=50, out=str(tmp_path / "d"), dry_run=True))
    err = capsys.readouterr().err
    assert "left out: C=1.0e+10 depth=6" in err and "< min_steps=50 (budget too small for this model)" in err
    table = write_rows(_isoflop_rows()[:4], tmp_path / "runs.csv")
    from lmforge.scaling.report import FitConfig

    report = run_fits(FitConfig(table=str(table), bootstrap=0))
    assert "approach 3) needs at least 5 runs, got 4" in report["skipped"]["approach3"] and "kaplan" in report
