"""`lmforge demo` end to end at toy size: corpus, BPE, shards, training, samples."""

import math

import pytest
import torch

from lmforge.cli import main
from lmforge.demo import MARKER, DemoConfig, check_corpus_size, claim_out_dir, run_demo, stdlib_corpus
from lmforge.errors import ConfigError


def test_stdlib_corpus_is_real_python():
    docs = stdlib_corpus(200_000)
    assert 199_000 <= sum(len(d.encode()) for d in docs) <= 200_000
    assert sum(d.count("def ") for d in docs) > 100


def test_stdlib_corpus_is_the_size_asked_for():
    """--corpus-mb 0.1 used 0.33 MB: whole files were added until the size was passed, and the 11th file is
    228 kB. The last file is now cut at a line end, so the corpus is the size asked for (within a line)."""
    for max_bytes in (1_000, 100_000, 500_000):
        docs = stdlib_corpus(max_bytes)
        assert max_bytes - 1_000 <= sum(len(d.encode()) for d in docs) <= max_bytes
        assert all(d.endswith("\n") for d in docs)
    assert len(stdlib_corpus(10)) == 1  # below one line: the first line, not an empty corpus


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
               batch_size=4, device="cpu")
    run_demo(DemoConfig(steps=6, samples=0, **cfg))
    assert "[4/4] samples: none (--samples 0)" in capsys.readouterr().out
    assert (tmp_path / "demo" / MARKER).is_file()  # what lets the re-run clear it
    run_demo(DemoConfig(steps=3, samples=3, **cfg))  # fewer steps: its checkpoint must not lose to the old step_000006
    from lmforge.checkpoint import checkpoint_dirs
    from lmforge.train.metrics import read_metrics

    assert [p.name for p in checkpoint_dirs(tmp_path / "demo")] == ["step_000003"]
    assert max(r["step"] for r in read_metrics(tmp_path / "demo")) == 3
    # --samples 3 prints three (prompted "def ", "class ", "def "), each between rules of dashes
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("[4/4] samples (temperature 0.8, top-k 50):")
    rules = [i for i, line in enumerate(lines) if line == "-" * 60]
    assert len(rules) == 4 and rules[0] == start + 1
    assert [lines[i + 1].split(" ")[0] for i in rules[:3]] == ["def", "class", "def"]


def _training_run(path):
    """A directory that looks like another command's training run: checkpoints, a metrics log, a config."""
    (path / "checkpoints" / "step_000004").mkdir(parents=True)
    (path / "checkpoints" / "step_000004" / "model.safetensors").write_bytes(b"weights")
    (path / "metrics.jsonl").write_text('{"step": 4, "loss": 2.5}\n')
    (path / "config.json").write_text("{}\n")
    return path


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_demo_refuses_an_out_it_did_not_make_and_keeps_it(tmp_path, capsys):
    """--out pointed at a training run deleted its checkpoints/ and metrics.jsonl before anything else (found
    2026-12): a non-empty directory without the demo's marker, or a file, is refused in one line and left as it
    was."""
    run = _training_run(tmp_path / "run")
    before = _tree(run)
    assert main(["demo", "--out", str(run), "--steps", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == (f"lmforge demo: error: --out {run} is not empty and was not made by lmforge demo; "
                                   "give a new or empty directory (another --out), so that nothing in it is "
                                   "overwritten")
    assert _tree(run) == before
    afile = tmp_path / "notes.txt"
    afile.write_text("notes\n")
    fix = "set --out to a new or empty directory"  # the words of lmforge.utils.check_output_path, the one check
    cases = [(afile, f"--out '{afile}' is an existing file, not a directory; {fix}, or move the file away"),
             (afile / "sub", f"--out '{afile / 'sub'}' lies under '{afile}', an existing file, not a directory; {fix}, "
                             "or move the file away"),
             ("", f"--out is empty; {fix}")]  # it was the current directory
    for out, message in cases:
        with pytest.raises(ConfigError) as e:
            run_demo(DemoConfig(out=str(out), steps=1, device="cpu"))
        assert str(e.value) == message
    assert afile.read_text() == "notes\n" and capsys.readouterr().out == ""
    old_demo = tmp_path / "old_demo"  # a demo's directory made before the marker: its shard says whose it is
    (old_demo / "data").mkdir(parents=True)
    (old_demo / "data" / "stdlib.bin").write_bytes(b"")
    (old_demo / "metrics.jsonl").write_text("{}\n")
    claim_out_dir(old_demo)
    assert (old_demo / ".lmforge-demo").is_file() and not (old_demo / "metrics.jsonl").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_demo_checks_the_device_before_any_work(tmp_path, capsys):
    """--device cuda without CUDA failed only in training, after the corpus, tokenizer and shards (and the clearing
    of --out): now before anything is read or written."""
    with pytest.raises(ConfigError, match="device 'cuda': CUDA is not available"):
        run_demo(DemoConfig(out=str(tmp_path / "demo"), device="cuda"))
    assert not (tmp_path / "demo").exists() and capsys.readouterr().out == ""


def test_demo_corpus_too_small_names_the_demo_flags(tmp_path, capsys):
    """--corpus-mb 0.0001 said "raise data.val_fraction, give data.val shards, or lower data.seq_len", options the
    demo does not have: now its own flags, with the --corpus-mb that would do."""
    cfg = DemoConfig(out=str(tmp_path / "d"), corpus_mb=0.001, seq_len=128)
    check_corpus_size(cfg, 2580, 10_000)  # 5% of 2580 = 129 = seq_len + 1 tokens: just enough
    # 2580 tokens at 10_000/2579 bytes each = 0.010004 MB, rounded up to two digits
    with pytest.raises(ConfigError, match=r"^--corpus-mb 0.001 gives 2,579 tokens, too few for a 5% validation split "
                                          r"of one --seq-len 128 sequence \(129 tokens\); raise --corpus-mb to at "
                                          r"least 0.011 or lower --seq-len$"):
        check_corpus_size(cfg, 2579, 10_000)
    argv = ["demo", "--out", str(tmp_path / "d"), "--corpus-mb", "0.0001", "--tokenizer", "byte", "--seq-len", "512",
            "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "raise --corpus-mb to at least" in err and "or lower --seq-len" in err and "data.val_fraction" not in err


def test_demo_refuses_negative_samples():
    with pytest.raises(ConfigError, match="--samples must be >= 0 \\(0 prints none\\), got -1"):
        DemoConfig(samples=-1)
