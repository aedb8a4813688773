"""bench/common.py and the checks the bench scripts gate their timings on: the weight bytes of the batch-1 decode
roofline (one embedding row, not the table), --sections refused when unknown, and bench/train_kernels.py marking a
kernel whose output or gradients disagree with the reference FAIL instead of timing it."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch

from bench import common
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

LLAMA_1B = dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632, max_seq_len=512,
                pos_emb="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False)  # bench/decode.py's


def test_decode_weight_bytes_counts_one_embedding_row():
    """The 1.1B Llama shape in bf16: 2,069,028,864 bytes read per token (the whole-table count was 2,200,096,768);
    a head tied to the embedding reads the whole table, once."""
    cfg = ModelConfig(**LLAMA_1B)
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    table = cfg.vocab_size * cfg.d_model * 2
    assert sum(p.numel() * 2 for p in model.parameters()) == 2_200_096_768
    assert common.decode_weight_bytes(model) == 2_200_096_768 - table + cfg.d_model * 2 == 2_069_028_864
    with torch.device("meta"):
        tied = Transformer(dataclasses.replace(cfg, tie_embeddings=True)).to(torch.bfloat16)
    assert common.decode_weight_bytes(tied) == sum(p.numel() * 2 for p in tied.parameters())  # the table once
    with torch.device("meta"):
        learned = Transformer(dataclasses.replace(cfg, pos_emb="learned")).to(torch.bfloat16)
    assert common.decode_weight_bytes(learned) == 2_069_028_864 + cfg.d_model * 2  # one position row too


def test_decode_parts_kinds_add_up_to_the_roofline_bytes():
    from bench.decode_parts import weight_bytes

    with torch.device("meta"):
        model = Transformer(ModelConfig(**LLAMA_1B)).to(torch.bfloat16)
    kinds = weight_bytes(model)
    norms = sum(p.numel() * 2 for n, p in model.named_parameters() if "norm" in n)
    assert kinds["embed"] == 2048 * 2 and sum(kinds.values()) + norms == common.decode_weight_bytes(model)


def test_unknown_sections_are_refused_before_anything_runs(capsys):
    ap = argparse.ArgumentParser(prog="bench/x.py")
    assert common.parse_sections(ap, "b,a", ("a", "b", "c")) == ["b", "a"]
    with pytest.raises(SystemExit) as e:
        common.parse_sections(ap, "a,generate,compile", ("a", "b"))
    assert e.value.code == 2
    assert "--sections: unknown 'generate', 'compile'; known: a, b" in capsys.readouterr().err


def test_verdict_names_what_failed_and_nan_fails():
    assert common.verdict({"forward": 1e-6, "gradient": 2e-5}, 1e-4) == "ok"
    assert common.verdict({"forward": 1e-6, "gradient": 0.5}, 1e-4) == "FAIL (gradient 0.5 > 0.0001)"
    assert common.verdict({"forward": float("nan")}, 1e-4).startswith("FAIL (forward nan")


def test_train_kernels_times_only_kernels_that_agree(monkeypatch):
    """A fast path with a wrong forward (rope + 1) or a right forward but wrong gradient (swiglu) is marked FAIL and
    not timed; a correct one (rmsnorm = its reference) is timed with check 'ok'."""
    from bench import train_kernels as tk
    from lmforge.kernels import rmsnorm, rope, swiglu

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)  # Inductor's CPU compile is not what is tested
    monkeypatch.setattr(rmsnorm, "rms_norm", rmsnorm.rms_norm_ref)
    monkeypatch.setattr(rope, "rope", lambda x, c, s, layout: rope.rope_ref(x, c, s, layout) + 1.0)
    monkeypatch.setattr(swiglu, "swiglu", lambda g, u: swiglu.swiglu_ref(g, u) + (g - g.detach()))
    rows = tk.bench_kernels(tk.SIZES["smoke"], "cpu", torch.float32, argparse.Namespace(budget=1e9))
    triton = {r["kernel"]: r for r in rows if r["variant"] == "triton"}
    assert triton["rmsnorm"]["check"] == "ok" and "fwd_bwd_ms" in triton["rmsnorm"]
    for name in ("rope (half)", "rope (interleaved)"):
        assert triton[name]["check"].startswith("FAIL (forward") and "fwd_ms" not in triton[name]
    assert triton["swiglu"]["check"].startswith("FAIL (gradient") and "fwd_ms" not in triton["swiglu"]
    assert triton["swiglu"]["max_rel_err"] == 0.0
    assert all(r["check"] == "ok" and "fwd_bwd_ms" in r for r in rows if r["variant"] != "triton")


def _rows(path) -> list[dict]:
    import json

    return json.loads(path.read_text())["rows"]


def test_decode_quick_reaches_every_section(tmp_path, monkeypatch):
    """bench/decode.py --quick (its CPU check) through the plain, kernel-step and speculative rows: the kernel-step
    rows died with a TypeError on the GPU (kernel_step_available() had come to take the engine's device) and no
    test ran the script. TRITON_INTERPRET=0: the kernel step is asked whether it runs and says why not, in seconds."""
    from bench import decode

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    decode.main(["--quick", "--batches", "1", "--prompt-len", "8", "--new-tokens", "4",
                 "--sections", "plain,kernels,spec"])
    rows = {r["variant"]: r for r in _rows(tmp_path / "decode_quick.json")}
    assert rows["engine, plain eager paged steps"]["agree"] == 1.0
    assert rows["Triton kernel step"]["note"].startswith("skipped: ")
    spec = [r for name, r in rows.items() if name.startswith("speculative")]
    assert spec and all(r["agree"] == 1.0 for r in spec)  # greedy drafts never change the output


BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("script, out, n_rows", [("prefill_attention", "prefill_attention_smoke.json", 4),
                                                 ("paged_attention", "paged_attention.json", 4),
                                                 ("paged_latent", "paged_latent.json", 15)])
def test_attention_benches_smoke(script, out, n_rows, tmp_path, monkeypatch):
    """The decode- and prefill-attention benches' --smoke (their CPU check, kernels in Triton's interpreter): every
    row runs and every kernel row matches its reference. The scripts catch a failing row and go on (a note, or
    the row left out), so a stale call shows in the rows, not in an exit status."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCH))  # prefill_attention imports bench/attention.py as its sibling
    monkeypatch.setenv("OUT", str(tmp_path))
    importlib.import_module(f"bench.{script}").main(["--smoke"])
    rows = _rows(tmp_path / out)
    failed = [r for r in rows if "FAILED" in r.get("note", "") or "Error" in r.get("note", "")]
    assert len(rows) == n_rows and not failed
    errs = [r[k] for r in rows for k in ("err", "max_err", "default_err") if k in r]
    assert errs and max(errs) < 1e-5  # fp32
