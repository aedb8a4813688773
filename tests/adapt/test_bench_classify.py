"""bench/classify.py at toy size: the three regimes run through the Trainer and count what they train."""

import pytest

from bench import classify


def test_smoke(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OUT", str(tmp_path))
    result = classify.main(["--smoke"])
    rows = {r["variant"]: r for r in result["rows"]}
    d, d_ff, r = 32, 128, 8  # --smoke: d 32, one layer, SwiGLU width 4d; LoRA rank 8
    head = 2 * d + 2
    assert rows["head"]["trainable"] == head
    assert rows["lora"]["trainable"] == head + r * (4 * 2 * d + 3 * (d + d_ff))  # wq wk wv wo, gate up down
    vocab = 257  # the byte tokenizer's; the backbone's LM head (vocab x d) is frozen: a classifier never reads it
    total = rows["full"]["trainable"] / rows["full"]["fraction"]
    assert rows["full"]["trainable"] == pytest.approx(total - vocab * d)
    assert all(0 <= row["accuracy"] <= 1 and row["tokens_per_s"] > 0 for row in rows.values())
    assert (tmp_path / "classify.json").exists() and "lora" in capsys.readouterr().out
    assert 0.4 < result["majority"] < 0.7  # a fair coin picks correct or near-miss answers
