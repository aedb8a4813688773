"""Sweep planning, a tiny end-to-end sweep through the trainer, and `lmforge scaling fit` on a table."""

from __future__ import annotations

import json
import re
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
    out = capsys.readouterr()
    assert json.loads(out.out)["approach2"]["a"] == report["approach2"]["a"]  # stdout is the JSON alone: pipe it
    assert f"wrote {tmp_path / 'fit.json'}" in out.err
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
    table = write_rows(_isoflop_rows()[:5], tmp_path / "runs.csv")
    from lmforge.scaling.report import FitConfig

    report = run_fits(FitConfig(table=str(table), bootstrap=0))
    # 5 runs for 5 parameters: an interpolation (it fitted beta ~ 30), skipped with the reason
    assert "more runs than its 5 parameters (at least 6), got 5" in report["skipped"]["approach3"]
    assert "kaplan" in report and "approach3" not in report


def test_sweep_names_each_budget_exactly_and_refuses_a_record_of_another_run(tmp_path):
    """Run directories were named by the budget to one digit: 2e8 and 2.4e8 shared one, and the second budget's
    row was the first's record. A record trained with other settings (a width, an lr) was reused silently; it is
    refused, naming the directory and what differs, before anything trains."""
    pytest.importorskip("lmforge.train.trainer")
    from lmforge.errors import ConfigError
    from lmforge.scaling.sweep import main_sweep

    out = tmp_path / "sw"
    base = dict(depths=(1,), min_steps=3, seq_len=16, batch_size=4, evals=2, eval_batches=1, out=str(out))
    rows = main_sweep(SweepConfig(budgets=(2e8, 2.4e8), width=8, **base))
    assert [r["budget"] for r in rows] == [2e8, 2.4e8] and rows[0]["D"] < rows[1]["D"]
    assert sorted(p.name for p in out.glob("C*")) == ["C2.4e+08_d1", "C2e+08_d1"]
    assert "settings" not in rows[0] and json.loads((out / "C2e+08_d1" / "result.json").read_text())["settings"][
        "width"] == 8
    with pytest.raises(ConfigError, match=r"C2e\+08_d1/result.json records another run than this sweep plans "
                                          r"\(N \d+ -> \d+, steps \d+ -> \d+, D \d+ -> \d+, width 8 -> 12\): sweep "
                                          r"into a new --out, or remove .*C2e\+08_d1 to train it again"):
        main_sweep(SweepConfig(budgets=(3e8, 2e8), width=12, **base))
    assert not (out / "C3e+08_d1").exists()  # refused before the new budget trained
    with pytest.raises(ConfigError, match=r"\(lr 0.003 -> 0.001\)"):
        main_sweep(SweepConfig(budgets=(2e8,), width=8, lr=1e-3, **base))
    # a record written before settings were recorded is reused when its row of the plan matches
    done = out / "C2e+08_d1" / "result.json"
    rec = json.loads(done.read_text())
    done.write_text(json.dumps({k: v for k, v in rec.items() if k != "settings"} | {"loss": 9.5}))
    assert main_sweep(SweepConfig(budgets=(2e8,), width=8, lr=1e-3, **base))[0]["loss"] == 9.5
    # 2.4e8's record under its old one-digit name (C2e+08_d1, an earlier sweep's) is found there, not retrained
    done = out / "C2.4e+08_d1" / "result.json"
    rec = json.loads(done.read_text())
    (out / "C2.4e+08_d1").rename(tmp_path / "moved")
    (out / "C2e+08_d1" / "result.json").write_text(json.dumps(rec | {"loss": 7.25}))
    assert main_sweep(SweepConfig(budgets=(2.4e8,), width=8, **base))[0]["loss"] == 7.25
    assert not (out / "C2.4e+08_d1").exists()


@pytest.mark.parametrize("name, text", [("wrongkey.json", '{"rows": []}'), ("broken.json", '[{"N": 1,'),
                                        ("scalar.json", "5"), ("string.json", '{"runs": "x"}'),
                                        ("lists.json", "[[1e6, 1e9, 3.0]]")])
def test_fit_names_a_malformed_json_table_and_the_form_it_should_hold(tmp_path, capsys, name, text):
    from lmforge.cli import main

    (tmp_path / name).write_text(text)
    assert main(["scaling", "fit", "--table", str(tmp_path / name), "--bootstrap", "0", "--plots", "false"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{tmp_path / name} is not" in err
    assert 'it should hold a list of run objects ({"N": ..., "D": ..., "loss": ...}) or {"runs": [...]}' in err


def test_fit_names_a_malformed_curves_json(tmp_path):
    from lmforge.errors import DataError
    from lmforge.scaling.report import FitConfig, run_fits

    table = write_rows(_isoflop_rows()[:5], tmp_path / "runs.csv")
    (tmp_path / "curves.json").write_text('{"curves": []}')  # picked up beside the table
    with pytest.raises(DataError, match=r"curves.json is not a curves file .* it should hold a list of "):
        run_fits(FitConfig(table=str(table), bootstrap=0))


def test_infinite_budgets_are_refused(capsys):
    from lmforge.cli import main
    from lmforge.errors import ConfigError
    from lmforge.scaling.report import FitConfig

    # one line (it was the parser's error box; before that an OverflowError traceback)
    assert main(["scaling", "sweep", "--budgets", "inf", "--dry_run", "true"]) == 2
    assert "budgets must be finite and > 0, got (inf,)" in capsys.readouterr().err.splitlines()[0]
    with pytest.raises(ConfigError, match=r"predict budgets must be finite and > 0, got \(1e\+21, inf\)"):
        FitConfig(predict=(1e21, float("inf")))  # wrote Infinity (not JSON) into fit.json
    with pytest.raises(ConfigError, match="inference_tokens must be finite and >= 0, got inf"):
        FitConfig(inference_tokens=float("inf"))
    with pytest.raises(ConfigError, match="inference_tokens needs a predict budget"):
        FitConfig(predict=(), inference_tokens=1e12)


def test_inference_target_is_the_loss_of_the_largest_predict_budget(tmp_path):
    from lmforge.scaling.report import FitConfig, run_fits

    table = write_rows(_isoflop_rows(), tmp_path / "runs.csv")
    reports = [run_fits(FitConfig(table=str(table), predict=p, bootstrap=0, inference_tokens=1e12))
               for p in ((1e21, 1e22), (1e22, 1e21))]  # the second took the last budget's, 1e21's, loss
    for r in reports:
        at_largest = next(p["loss"] for p in r["predictions"]["approach3"] if p["C"] == 1e22)
        assert r["inference_aware"]["target_loss"] == at_largest
    assert reports[1]["inference_aware"]["N"] == pytest.approx(reports[0]["inference_aware"]["N"], rel=1e-9)


@pytest.mark.parametrize("what", ["one budget", "equal losses"])
def test_fit_skips_approaches_the_table_cannot_determine(tmp_path, what):
    """One IsoFLOP budget (log D = log(C/6) - log N) gave approach 3 parameters far from the truth; equal losses
    gave both approaches 2 and 3 a frontier fitted to rounding noise. Both are skipped with the reason."""
    from lmforge.scaling.report import FitConfig, run_fits

    rows = ([r for r in _isoflop_rows() if r["budget"] == 1e20] if what == "one budget"
            else [dict(r, loss=3.0) for r in _isoflop_rows()])
    report = run_fits(FitConfig(table=str(write_rows(rows, tmp_path / "runs.csv")), bootstrap=0))
    assert report["predictions"] == {} and "approach2" not in report and "approach3" not in report
    skipped = report["skipped"]
    if what == "one budget":
        assert "approach 3 needs runs at 2 or more FLOP budgets, got one (C=1e+20)" in skipped["approach3"]
        assert "approach 2 needs at least 2 budgets" in skipped["approach2"]
    else:
        assert "the losses do not depend on N, so N_opt and D_opt are undetermined" in skipped["approach3"]
        assert "the parabola is flat: the losses span only 0" in skipped["approach2"]


def test_a_bom_csv_table_reads_and_a_missing_curves_file_is_named(tmp_path):
    """A spreadsheet's UTF-8 byte-order mark read as part of the first column's name ("lacks column(s) ['N']");
    an explicit --curves path that does not exist was ignored (approach 1 silently left out)."""
    from lmforge.errors import DataError
    from lmforge.scaling.report import FitConfig, run_fits
    from lmforge.scaling.table import load_runs

    table = write_rows(_isoflop_rows(), tmp_path / "runs.csv")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())
    assert load_runs(bom).n.tolist() == load_runs(table).n.tolist()
    with pytest.raises(DataError, match=r"run table .* is a directory, not a .csv or .json file: give .*runs.csv$"):
        load_runs(tmp_path)  # a directory: it said "not found"
    with pytest.raises(DataError, match=r"curves file not found: .*nope.json \(--curves; leave it out"):
        run_fits(FitConfig(table=str(table), curves=str(tmp_path / "nope.json"), bootstrap=0))


def test_fit_without_matplotlib_stops_before_fitting_and_names_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    from lmforge.cli import main
    from lmforge.scaling import report

    table = write_rows(_isoflop_rows(), tmp_path / "runs.csv")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setattr(report, "run_fits", lambda cfg: pytest.fail("fitted before checking the plot extra"))
    assert main(["scaling", "fit", "--table", str(table)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'lmforge[plot]', or pass --plots False" in err and len(err.strip().splitlines()) == 2


def test_a_table_with_misnamed_columns_names_the_columns_it_found(tmp_path, capsys):
    from lmforge.cli import main

    (tmp_path / "semi.csv").write_text("N;D;loss\n1e6;1e9;3.1\n")  # a spreadsheet's ';'-separated export
    (tmp_path / "lower.csv").write_text("n,d,Loss\n1e6,1e9,3.1\n")
    assert main(["scaling", "fit", "--table", str(tmp_path / "semi.csv")]) == 2
    assert "lacks column(s) ['N', 'D', 'loss']" in (err := capsys.readouterr().err) and "found ['N;D;loss']" in err
    assert main(["scaling", "fit", "--table", str(tmp_path / "lower.csv")]) == 2
    assert "found ['n', 'd', 'Loss']" in capsys.readouterr().err


def test_fit_shows_progress_over_the_bootstrap_resamples(tmp_path, capsys):
    from lmforge.cli import main

    table = write_rows(_isoflop_rows(), tmp_path / "runs.csv")
    assert main(["scaling", "fit", "--table", str(table), "--bootstrap", "3", "--plots", "False"]) == 0
    err = capsys.readouterr().err
    # each bar over the 3 resamples (its last state may go unshown: tqdm draws at most every 0.1 s and a bar with
    # leave=False is cleared when done, so a fast machine ends at "2/3" or less)
    assert "bootstrap approach 2:   0%" in err and "bootstrap approach 3:   0%" in err and err.count("0/3") == 2
    assert main(["scaling", "fit", "--table", str(table), "--bootstrap", "3", "--plots", "False",
                 "--progress", "False"]) == 0
    assert "bootstrap" not in capsys.readouterr().err


def test_flops_command_counts_a_llama_shape_from_a_run_config_or_a_preset(tmp_path, capsys):
    from lmforge.cli import main

    # Llama-3-8B's shape as a run config's [model] section; N and the FLOPs counted here by hand
    (tmp_path / "run.toml").write_text(
        'max_steps = 10\n[model]\nvocab_size = 128256\nd_model = 4096\nn_layers = 32\nn_heads = 32\nn_kv_heads = 8\n'
        'd_ff = 14336\nmax_seq_len = 8192\nactivation = "swiglu"\n[data]\nseq_len = 8192\n')
    d, kv, ff, v, t = 4096, 8 * 128, 14336, 128256, 8192
    layer = 2 * d * d + 2 * d * kv + 3 * d * ff  # q, o; k, v; gate, up, down
    forward = 32 * (2 * layer + 4 * d * t) + 2 * d * v  # + QK^T and AV at context t; + the output head
    assert main(["scaling", "flops", "--model", str(tmp_path / "run.toml"), "--tokens", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "N = 8,030,261,248 " in out  # Meta's published count
    assert f"6ND         = {6 * 8_030_261_248 * 1e9:.4g}" in out
    assert f"exact count = {3 * forward * 1e9:.4g} FLOPs (seq_len 8192)" in out
    assert main(["scaling", "flops", "--model", "llama-small"]) == 0
    assert "(seq_len 2048)" in capsys.readouterr().out  # the preset's own context
    assert main(["scaling", "flops", "--model", "llama-smal"]) == 2
    assert "--model 'llama-smal' is neither a preset (" in capsys.readouterr().err


def test_flops_of_a_run_config_count_the_rows_it_trains_on(tmp_path, capsys):
    """A run config's [data] seq_len is the context its attention term is counted at (it was the model's
    max_seq_len, whatever the run trained on); --seq-len still overrides it."""
    from lmforge.cli import main
    from lmforge.model.config import ModelConfig
    from lmforge.scaling.flops import flops_per_token

    (tmp_path / "run.toml").write_text('[model]\nvocab_size = 256\nd_model = 64\nn_layers = 2\nn_heads = 4\n'
                                       'max_seq_len = 1024\n[data]\ntrain = ["t.bin"]\nseq_len = 128\n')
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=1024)
    assert f"{flops_per_token(cfg, 128):.4g}" != f"{flops_per_token(cfg, 1024):.4g}"  # (attention grows with t)
    run = ["scaling", "flops", "--model", str(tmp_path / "run.toml"), "--tokens", "1e6"]
    assert main(run) == 0
    assert f"exact count = {flops_per_token(cfg, 128) * 1e6:.4g} FLOPs (seq_len 128)" in capsys.readouterr().out
    assert main([*run, "--seq-len", "512"]) == 0
    assert f"exact count = {flops_per_token(cfg, 512) * 1e6:.4g} FLOPs (seq_len 512)" in capsys.readouterr().out
    (tmp_path / "bad.toml").write_text('[model]\nd_model = 64\nn_heads = 4\n[data]\nseq_len = "128"\n')
    assert main(["scaling", "flops", "--model", str(tmp_path / "bad.toml")]) == 2
    assert "bad.toml: data.seq_len must be a positive integer, got '128'" in capsys.readouterr().err


def test_sweep_refuses_a_data_file_that_does_not_exist(tmp_path, capsys):
    from lmforge.cli import main

    # a typo'd --data trained the whole grid on Python's own sources instead, the table none the wiser
    assert main(["scaling", "sweep", "--budgets", "2e8", "--depths", "1", "--width", "8", "--min-steps", "3",
                 "--seq-len", "16", "--batch-size", "4", "--out", str(tmp_path / "sw"),
                 "--data", str(tmp_path / "corpus.txt")]) == 2
    assert f"--data {tmp_path / 'corpus.txt'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_fit_says_on_stderr_which_approaches_it_skipped_and_that_nothing_was_predicted(tmp_path, capsys):
    from lmforge.cli import main

    rows = [dict(r, N=1e6) for r in _isoflop_rows()[::3]]  # one model size
    assert main(["scaling", "fit", "--table", str(write_rows(rows, tmp_path / "runs.csv")), "--plots", "False"]) == 0
    err = capsys.readouterr().err.splitlines()[1:]  # after 'wrote .../fit.json'
    assert err[0].startswith("lmforge scaling fit: skipped approach2: approach 2 needs at least 2 budgets")
    assert err[1].startswith("lmforge scaling fit: skipped approach3: approach 3 needs runs at several model sizes")
    assert err[2].startswith("lmforge scaling fit: no approach fitted the compute-optimal frontier")


def test_flops_of_a_run_config_without_data_seq_len_count_the_default_it_trains_at(tmp_path, capsys):
    """A run config whose [data] table has no seq_len (or which has no [data]) trains at DataConfig's default
    seq_len; the count used the model's max_seq_len (1024 here) instead. A checkpoint's config.json counts at it."""
    from lmforge.cli import main
    from lmforge.model.config import ModelConfig
    from lmforge.scaling.flops import flops_per_token
    from lmforge.train.config import DataConfig, TrainConfig

    model = 'vocab_size = 256\nd_model = 64\nn_layers = 2\nn_heads = 4\nmax_seq_len = 1024\n'
    (tmp_path / "run.toml").write_text(f'[model]\n{model}[data]\ntrain = ["t.bin"]\n')
    trains_at = TrainConfig(data=DataConfig(train=("t.bin",))).data.seq_len
    assert trains_at == 256
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=1024)
    assert main(["scaling", "flops", "--model", str(tmp_path / "run.toml"), "--tokens", "1e6"]) == 0
    assert f"exact count = {flops_per_token(cfg, 256) * 1e6:.4g} FLOPs (seq_len 256)" in capsys.readouterr().out
    (tmp_path / "run.toml").write_text(f'max_steps = 10\n[model]\n{model}')  # no [data]: shards given at launch
    assert main(["scaling", "flops", "--model", str(tmp_path / "run.toml"), "--tokens", "1e6"]) == 0
    assert "(seq_len 256)" in capsys.readouterr().out
    (tmp_path / "config.json").write_text('{"vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4, '
                                          '"max_seq_len": 1024}')  # a model's keys at top level: its own context
    assert main(["scaling", "flops", "--model", str(tmp_path / "config.json"), "--tokens", "1e6"]) == 0
    assert "(seq_len 1024)" in capsys.readouterr().out
    # an lmforge checkpoint's config.json ({"step", "model": {...}, "dtype", ...}, as the Trainer writes it)
    import json

    from lmforge.checkpoint import model_meta
    from lmforge.model.transformer import Transformer

    (tmp_path / "config.json").write_text(json.dumps({"step": 3, **model_meta(Transformer(cfg))}))
    assert main(["scaling", "flops", "--model", str(tmp_path / "config.json"), "--tokens", "1e6"]) == 0
    assert "(seq_len 1024)" in capsys.readouterr().out


def test_sweep_dry_run_refuses_a_missing_data_file_and_an_out_that_is_a_file(tmp_path, capsys):
    from lmforge.cli import main

    # the dry run printed its plan for a typo'd --data, and an --out naming a file ended in NotADirectoryError
    small = ["scaling", "sweep", "--budgets", "2e8", "--depths", "1", "--width", "8", "--min-steps", "3",
             "--seq-len", "16", "--batch-size", "4"]
    assert main(small + ["--dry-run", "--data", str(tmp_path / "corpus.txt"), "--out", str(tmp_path / "sw")]) == 2
    assert f"--data {tmp_path / 'corpus.txt'}: no such file" in capsys.readouterr().err
    assert main(small + ["--dry-run", "--data", str(tmp_path), "--out", str(tmp_path / "sw")]) == 2
    assert f"--data {tmp_path}: a directory, not a file" in capsys.readouterr().err
    (tmp_path / "taken").write_text("x")
    assert main(small + ["--out", str(tmp_path / "taken")]) == 2
    assert f"--out '{tmp_path / 'taken'}' is an existing file" in capsys.readouterr().err


def test_fit_refuses_an_out_that_is_a_file_before_fitting(tmp_path, capsys):
    from lmforge.cli import main

    table = write_rows(_isoflop_rows(), tmp_path / "runs.csv")
    before = table.read_text()
    assert main(["scaling", "fit", "--table", str(table), "--out", str(table), "--bootstrap", "0"]) == 2
    assert f"--out '{table}' is an existing file" in capsys.readouterr().err
    assert table.read_text() == before


@pytest.mark.parametrize("name, data, message", [
    ("utf16.csv", "N,D,loss\n1,2,3\n".encode("utf-16"), "is not a UTF-8 CSV file"),
    ("bool.json", b'[{"N": 1e6, "D": 1e9, "loss": true}]', "column 'loss' must be numeric; row 0 has True"),
])
def test_fit_names_a_table_it_cannot_read_in_one_line(tmp_path, capsys, name, data, message):
    from lmforge.cli import main

    (tmp_path / name).write_bytes(data)
    assert main(["scaling", "fit", "--table", str(tmp_path / name), "--bootstrap", "0", "--plots", "False"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "batch_size must be >= 1, got 0"),  # was ZeroDivisionError in the plan
    ("--threads", "-1", "threads must be >= 0 (0 = torch's default), got -1"),  # was torch's RuntimeError
    ("--warmup-frac", "-1", "warmup_frac must lie in [0, 1] (of each run's steps), got -1.0"),  # trained in silence
    ("--seq-len", "0", "seq_len must be >= 1, got 0"),
    ("--depths", "1 1", "depths repeats a value: (1, 1); give each once"),  # two equal rows in runs.csv
])
def test_sweep_refuses_a_bad_setting_by_its_name(tmp_path, capsys, flag, value, message):
    from lmforge.cli import main

    assert main(["scaling", "sweep", "--budgets", "2e8", "--depths", "1", "--out", str(tmp_path / "sw"), flag,
                 *value.split()]) == 2
    assert message in capsys.readouterr().err.splitlines()[0]  # (one line; it was tyro's box)


def test_sweep_refuses_a_bad_optimizer_or_device_before_writing_its_shards(tmp_path, capsys):
    from lmforge.cli import main

    small = ["scaling", "sweep", "--budgets", "2e8", "--depths", "1", "--width", "8", "--min-steps", "3",
             "--seq-len", "16", "--batch-size", "4", "--out", str(tmp_path / "sw")]
    assert main(small + ["--optimizer", "bogus"]) == 2
    assert "optim.name='bogus' is unknown" in capsys.readouterr().err
    assert main(small + ["--device", "nosuch"]) == 2
    assert not (tmp_path / "sw").exists()  # the shards were written (and the data read) before either was refused


def test_a_sweep_checks_its_inputs_once_and_bad_input_is_one_line(tmp_path, monkeypatch, capsys):
    """main_sweep checked --data and --out, then run_sweep checked them again: each path checks them once (a dry run
    in main_sweep, a sweep in run_sweep, before torch is imported), and a missing --data is one line."""
    import lmforge.scaling.sweep as sweep
    from lmforge.cli import main

    calls = []
    check = sweep.check_inputs
    monkeypatch.setattr(sweep, "check_inputs", lambda cfg: (calls.append(cfg.out), check(cfg))[1])

    def stop(cfg):  # the first write of a sweep: every check is behind it
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "_write_shards", stop)
    base = dict(budgets=(2e8,), depths=(1,), width=8, min_steps=3, seq_len=16, batch_size=4, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        sweep.main_sweep(SweepConfig(**base, out=str(tmp_path / "a")))
    sweep.main_sweep(SweepConfig(**base, out=str(tmp_path / "b"), dry_run=True))
    assert calls == [str(tmp_path / "a"), str(tmp_path / "b")]
    capsys.readouterr()
    assert main(["scaling", "sweep", "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    want = (f"lmforge scaling: error: --data {tmp_path / 'missing.txt'}: no such file; give a text file, or leave "
            "--data out to train on the default text")
    assert [line for line in err.splitlines() if "error" in line] == [want]
    assert err.count("no such file") == 1 and "Traceback" not in err and not (tmp_path / "c").exists()


def test_fit_of_a_table_no_approach_fits_still_plots_its_losses(tmp_path, capsys):
    """A first CPU sweep too small for any approach (2 budgets, 1-2 sizes each) wrote fit.json and no plot at all,
    and said nothing of it: the IsoFLOP profile of the measured losses, which shows why, is written whatever fits."""
    pytest.importorskip("matplotlib")
    from lmforge.cli.scaling import main

    rows = _isoflop_rows()
    rows = [r for r in rows if r["budget"] == 1e18][:1] + [r for r in rows if r["budget"] == 1e19][:2]
    table = write_rows(rows, tmp_path / "runs.csv")
    assert main(["fit", "--table", str(table), "--bootstrap", "0", "--progress", "False"]) == 0
    report = json.loads((tmp_path / "fit.json").read_text())
    assert report["predictions"] == {} and {"approach2", "approach3"} <= set(report["skipped"])
    assert report["plots"] == [str(tmp_path / "isoflop.png")]
    assert (tmp_path / "isoflop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "frontier.png").exists()


def test_a_diverged_sweep_run_is_named_with_the_sweeps_own_flags(tmp_path):
    """A sweep point that diverged stopped the sweep with the trainer's "Lower optim.lr or raise optim.warmup_steps":
    keys `lmforge scaling sweep` does not take, and no word of which (budget, depth) it was."""
    from lmforge.errors import TrainingDiverged
    from lmforge.scaling.sweep import main_sweep

    cfg = SweepConfig(budgets=(2e8,), depths=(1,), width=8, min_steps=3, seq_len=16, batch_size=4, lr=1e6,
                      evals=1, eval_batches=1, out=str(tmp_path / "sw"))
    run_dir = re.escape(str(tmp_path / "sw" / "C2e+08_d1"))
    with pytest.raises(TrainingDiverged, match=rf"^the sweep's run C=2.0e\+08 depth=1 \({run_dir}\) "
                                               r"diverged: (loss|grad_norm) became (nan|inf) at step \d+; lower --lr "
                                               r"or raise --warmup-frac, with a new --out \(the runs finished in this "
                                               r"one keep their settings\)$"):
        main_sweep(cfg)


def test_flops_says_the_tokens_it_counts_for(capsys):
    """`lmforge scaling flops --model run.toml` printed FLOPs for --tokens' default 1e9 with no word of D: read as
    the run's own training FLOPs, which its max_steps x tokens per step are not."""
    from lmforge.cli import main

    assert main(["scaling", "flops", "--model", "llama-tiny"]) == 0
    assert "\nD = 1e+09 training tokens (--tokens)\n" in capsys.readouterr().out
    assert main(["scaling", "flops", "--model", "llama-tiny", "--tokens", "3.5e6"]) == 0
    assert "\nD = 3.5e+06 training tokens (--tokens)\n" in capsys.readouterr().out


def test_a_sweep_text_too_short_is_refused_with_the_sweeps_flags(tmp_path):
    """A --data text too short for the held-out 10% stopped the sweep with the trainer's "raise data.val_fraction,
    give data.val shards, or lower data.seq_len": keys `lmforge scaling sweep` does not take."""
    from lmforge.errors import DataError
    from lmforge.scaling.sweep import main_sweep

    (tmp_path / "t.txt").write_bytes(b"x" * 100)
    cfg = SweepConfig(budgets=(2e8,), depths=(1,), width=8, min_steps=3, seq_len=16, batch_size=4, evals=1,
                      eval_batches=1, data=str(tmp_path / "t.txt"), out=str(tmp_path / "sw"))
    with pytest.raises(DataError, match=r"^the text \(--data\) has 100 bytes, too few for a training and a validation "
                                        r"window of --seq-len 16 \(its last 10% is held out\): give a text of at least "
                                        r"180 bytes, or a shorter --seq-len$"):
        main_sweep(cfg)
    assert not (tmp_path / "sw" / "C2e+08_d1").exists()


def test_flops_of_an_moe_count_6nd_with_its_active_parameters(capsys):
    """`lmforge scaling flops --model mixtral-tiny` put all 29.8M parameters into 6ND, though a token runs 2 of
    each layer's 8 experts: 2.3x the exact count. N active (the parameters a token's forward multiplies by, as
    routed-model scaling laws count compute) is printed, and is the N of 6ND, said so."""
    from lmforge.cli import main
    from lmforge.model.config import ModelConfig
    from lmforge.scaling.flops import active_params, num_params

    skipped = 4 * (8 - 2) * 3 * 256 * 512  # 4 MoE layers x 6 experts not run x (gate, up, down) of 256 x 512
    assert active_params(ModelConfig.preset("mixtral-tiny")) == 29_763_840 - skipped == 20_326_656
    assert active_params(ModelConfig.preset("llama-tiny")) == num_params(ModelConfig.preset("llama-tiny"))
    assert main(["scaling", "flops", "--model", "mixtral-tiny", "--tokens", "1e9"]) == 0
    out = capsys.readouterr().out
    assert "N = 29,763,840 " in out and "N active = 20,326,656 per token" in out
    assert (f"6ND         = {6 * 20_326_656 * 1e9:.4g} FLOPs (N = the 20,326,656 active parameters, not all "
            "29,763,840)") in out
    assert main(["scaling", "flops", "--model", "llama-tiny"]) == 0
    out = capsys.readouterr().out
    assert "N active" not in out and "(N = all 19,335,424 parameters)" in out


def test_flops_builds_the_model_once_and_counts_as_the_functions_do(capsys, monkeypatch):
    """`scaling flops` built the meta model four times (num_params twice, active_params, flops_per_token); once now,
    with the same counts as those functions give."""
    from lmforge.cli import main
    from lmforge.model.config import ModelConfig
    from lmforge.scaling import flops

    cfg = ModelConfig.preset("mixtral-tiny")
    n, active, per_token = flops.num_params(cfg), flops.active_params(cfg), flops.flops_per_token(cfg, 128)
    built = []
    real = flops.build_meta_model
    monkeypatch.setattr(flops, "build_meta_model", lambda c: built.append(c) or real(c))
    assert main(["scaling", "flops", "--model", "mixtral-tiny", "--tokens", "1e6", "--seq-len", "128"]) == 0
    out = capsys.readouterr().out
    assert len(built) == 1
    assert f"N = {n:,} ({flops.num_params(cfg, exclude_embeddings=True):,} without embeddings)" in out
    assert f"N active = {active:,} per token" in out
    assert f"exact count = {per_token * 1e6:.4g} FLOPs (seq_len 128)" in out


def test_flops_of_a_depth_count_from_depth_or_with_width_the_model_the_sweep_trains(capsys):
    """`scaling flops --depth` builds from_depth's model (64 channels per layer of depth) and had no way to count the
    sweep's models (`--width`, 16 by default): with --width it builds flops.depth_model, the sweep's one builder."""
    from lmforge.cli import main
    from lmforge.model.config import ModelConfig
    from lmforge.scaling.flops import num_params
    from lmforge.scaling.sweep import SweepConfig, grid

    assert main(["scaling", "flops", "--depth", "3", "--vocab-size", "257", "--seq-len", "64"]) == 0
    n = num_params(ModelConfig.from_depth(3, vocab_size=257, max_seq_len=64))
    assert f"N = {n:,} " in capsys.readouterr().out
    for width in (SweepConfig().width, 8):
        sweep = SweepConfig(depths=(3,), seq_len=64, width=width)
        assert main(["scaling", "flops", "--depth", "3", "--vocab-size", "257", "--seq-len", "64",
                     "--width", str(width)]) == 0
        assert f"N = {grid(sweep)[0]['N']:,} " in capsys.readouterr().out
    assert main(["scaling", "flops", "--width", "3"]) == 2
    assert "--width must be even and >= 2 (or 0: from_depth's model), got 3" in capsys.readouterr().err
