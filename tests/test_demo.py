"""`lmforge demo` end to end at toy size: corpus, BPE, shards, training, samples."""

import math

from lmforge.demo import DemoConfig, run_demo, stdlib_corpus


def test_stdlib_corpus_is_real_python():
    docs = stdlib_corpus(200_000)
    assert sum(len(d.encode()) for d in docs) >= 200_000
    assert sum(d.count("def ") for d in docs) > 100


def test_demo_runs_and_loss_falls(tmp_path, capsys):
    out = run_demo(DemoConfig(out=str(tmp_path / "demo"), corpus_mb=0.2, vocab_size=512, steps=40, depth=2,
                              seq_len=64, batch_size=8, samples=1, device="cpu"))
    text = capsys.readouterr().out
    assert "run directory" in text and "samples" in text
    assert out["val_loss"] < math.log(512) - 1.0  # well below the uniform-guess loss
    assert 0 < out["val_bpb"] < 8
    assert (tmp_path / "demo" / "loss.png").is_file() and (tmp_path / "demo" / "tokenizer").is_dir()


def test_demo_rerun_in_same_directory_keeps_the_new_run(tmp_path, capsys):
    cfg = dict(out=str(tmp_path / "demo"), corpus_mb=0.05, tokenizer="byte", depth=1, seq_len=32,
               batch_size=4, samples=1, device="cpu")
    run_demo(DemoConfig(steps=6, **cfg))
    run_demo(DemoConfig(steps=3, **cfg))  # fewer steps: its checkpoint must not lose to the old step_000006
    from lmforge.checkpoint import checkpoint_dirs
    from lmforge.train.metrics import read_metrics

    assert [p.name for p in checkpoint_dirs(tmp_path / "demo")] == ["step_000003"]
    assert max(r["step"] for r in read_metrics(tmp_path / "demo")) == 3
