"""Benchmarks that train models do so through the one Trainer; their training must equal the plain
loop each documents (bench/speculative.py; bench/align_common.py and lmforge.optim.benchmark have their
own tests)."""

import copy

import pytest
import torch

from bench import speculative as S
from lmforge.optim.adamw import AdamW
from lmforge.optim.groups import role_groups
from lmforge.train.loss import lm_loss


def _setup(steps: int):
    args = S.parse(["--quick", "--max-steps", str(steps), "--warmup", "3", "--seq-len", "16", "--batch-size", "4",
                    "--eval-batches", "1"])
    data = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(1)).to(torch.int16)
    torch.manual_seed(0)
    model = S.Transformer(S.llama_config(32, 1, args.vocab, 64))
    return args, data, model


def test_speculative_training_equals_a_plain_loop():
    """With the clock's decay made negligible (a 1e9 s budget), train_for = AdamW (decay 0.1) with a linear
    warm-up, clipping at 1.0, on the same random windows, for --max-steps steps."""
    args, data, model = _setup(6)
    ref = copy.deepcopy(model)
    res = S.train_for("t", model, data, data, 1e9, 3e-3, args, torch.device("cpu"))
    assert res["steps"] == 6

    opt = AdamW(role_groups(ref, 0.1), lr=3e-3, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(6):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 3)
        x, y = S.windows(data, torch.randint(0, len(data) - 17, (4,), generator=gen), 16)
        lm_loss(ref(x), y)[0].backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_speculative_training_stops_when_the_clock_runs_out():
    """A spent budget ends training after the first (untimed) step and one more."""
    args, data, model = _setup(100)
    assert S.train_for("t", model, data, data, 0.0, 3e-3, args, torch.device("cpu"))["steps"] == 2


def _run_script(monkeypatch, module, *argv: str) -> None:
    """A bench script whose main() reads sys.argv, run in this process."""
    import importlib

    monkeypatch.setattr("sys.argv", [f"bench/{module}.py", *argv])
    importlib.import_module(f"bench.{module}").main()


def test_posttrain_smoke_times_every_layout(tmp_path, monkeypatch):
    """bench/posttrain.py --smoke: packed and padded SFT batches give the same loss and every layout is timed (a
    layout that fails is caught into its row)."""
    import json

    _run_script(monkeypatch, "posttrain", "--smoke", "--out", str(tmp_path / "posttrain.json"))
    out = json.loads((tmp_path / "posttrain.json").read_text())
    assert out["check"] == "ok" and out["loss_diff"] < 1e-4
    assert set(out["results"]) == {"padded", "length-grouped", "packed"}
    assert all(r["real_tok_per_s"] > 0 for r in out["results"].values())


def test_parallel_smoke_trains_every_layout_alike(tmp_path, monkeypatch):
    """bench/parallel.py --smoke (a process group of one, gloo): every FSDP2 / activation-checkpointing variant
    trains and its losses equal the plain model's (a variant that fails is caught into its row)."""
    import json

    from bench import parallel

    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", torch._dynamo.config.cache_size_limit)  # restored
    try:
        _run_script(monkeypatch, "parallel", "--smoke", "--out", str(tmp_path / "parallel.json"))
    finally:  # the script ends its group; one cut short must not leave it to the next test
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    rows = json.loads((tmp_path / "parallel.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == list(parallel.VARIANTS)
    assert all(r.get("ok") for r in rows), [r.get("error") for r in rows]


def test_speculative_quick_table_decodes_every_variant_exactly(tmp_path, monkeypatch):
    """bench/speculative.py --quick's table (a few training steps here): every drafter, alone and in the engine,
    chain and token tree, gives the no-draft greedy tokens; a variant that fails is caught into an error row."""
    import json

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # --quick's, for the rest of this process
    S.main(["--quick", "--max-steps", "3", "--warmup", "1", "--eval-batches", "1", "--prompts", "1",
            "--new-tokens", "8", "--ks", "2", "--trees", "2,1"])
    rows = json.loads((tmp_path / "speculative_quick.json").read_text())["rows"]
    assert len(rows) == 6 and not [r["error"] for r in rows if "error" in r]
    assert all(r["equal"] == "1/1" for r in rows)


@pytest.mark.filterwarnings("ignore:optim.warmup_steps")  # nanoGPT's 100 warmup steps, past these 2
def test_shakespeare_runs_fewer_steps_than_four(tmp_path, monkeypatch):
    """bench/shakespeare.py --steps 2 (a check of the script): it evaluated every steps // 4 = 0 steps, which
    TrainConfig refuses, so a short run ended in a traceback."""
    import json
    import math

    from bench import shakespeare
    from tests.conftest import shared_data

    monkeypatch.setattr(shakespeare, "DATA", shared_data("tinyshakespeare", "input.txt"))
    _run_script(monkeypatch, "shakespeare", "--steps", "2", "--variants", "llama", "--out", str(tmp_path / "s.json"))
    [row] = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert row["steps"] == 2 and math.isfinite(row["val_loss"])
