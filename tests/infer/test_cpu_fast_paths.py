"""CPU fast paths against the code they replaced, kept here as references, compared bit for bit: the paged
decode reference's gather (the old one here verbatim) and per-step mask, the lazily zeroed KV pools, and a CPU
engine built without importing Triton."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import lmforge.infer.kv.paged as paged
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.kv.paged import decode_mask, paged_decode_reference, pool_zeros
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import run_requests, tiny_model


def old_gather(cache, block_tables, dtype):
    """paged.gather_blocks before 2026-12-05: advanced indexing of a permuted view of the pool."""
    B, (KV, hd) = block_tables.shape[0], cache.shape[2:]
    return cache.permute(2, 0, 1, 3)[:, block_tables.long()].reshape(KV * B, -1, hd).to(dtype)


def old_paged_decode_reference(*args, **kw):
    """paged_decode_reference before 2026-12-05: the old gather, and its own mask in every call (a caller's
    once-per-step mask ignored)."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(paged, "gather_blocks", old_gather)
        return paged_decode_reference(*args, **{**kw, "mask": None})


def _tables(B, nb, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(nb, generator=g)[:width] for _ in range(B)]).int()


@pytest.mark.parametrize("kw", [dict(), dict(window=5), dict(softcap=2.0), dict(sinks=True), dict(first_key=4),
                                dict(tree=True), dict(dtype=torch.bfloat16), dict(dtype=torch.float8_e4m3fn),
                                dict(H=2, KV=2), dict(mask=True)])
def test_paged_decode_reference_equals_the_old_gather_bit_for_bit(kw):
    torch.manual_seed(0)
    kw = dict(kw)
    nb, bs, hd, B = 24, 4, 8, 3
    H, KV, dtype = kw.pop("H", 6), kw.pop("KV", 2), kw.pop("dtype", torch.float32)
    kc, vc = torch.randn(nb, bs, KV, hd).to(dtype), torch.randn(nb, bs, KV, hd).to(dtype)
    tables = _tables(B, nb, 6)[:, :5]  # a column slice, as a decode group's table is
    lens = torch.tensor([3, 20, 9], dtype=torch.int32)
    q = torch.randn(B, H, hd)
    if kw.pop("sinks", False):
        kw["sinks"] = torch.randn(H)
    if kw.pop("tree", False):
        kw["tree"] = (lens.long() - 3, torch.tensor([0b101, 0b111, 0b011]))
    if kw.pop("mask", False):
        kw["mask"] = decode_mask(lens, tables.shape[1] * bs, 0)
    seen = []
    got = paged_decode_reference(q, kc, vc, tables, lens, scale=0.3, probs_hook=seen.append, **kw)
    want = old_paged_decode_reference(q, kc, vc, tables, lens, scale=0.3, probs_hook=seen.append, **kw)
    assert torch.equal(got, want)
    assert torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_pool_zeros_are_zeros(dtype):
    got, want = pool_zeros((5, 4, 2, 3), torch.device("cpu"), dtype), torch.zeros(5, 4, 2, 3, dtype=dtype)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))  # +0.0 in every byte, as torch.zeros
    got[1, 2] = 1.0  # a written pool reads back what was written, the rest stays zero
    assert float(got.float().sum()) == 2 * 3 and float(got[1, 2].float().sum()) == 2 * 3


def _requests():
    prompts = [[3, 1, 4, 1, 5], list(range(40, 77)), [9] * 14, list(range(100, 121))]
    sps = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2),
           SamplingParams(temperature=0.9, top_k=20, max_tokens=20, ignore_eos=True, seed=5, logprobs=1),
           SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True, logprobs=0),
           SamplingParams(temperature=0.7, top_p=0.9, max_tokens=18, ignore_eos=True, seed=9)]
    return list(zip(prompts, sps))


def _outputs(outs):
    return [(c.token_ids, c.logprobs, c.top_logprobs) for o in outs for c in o.outputs]


@pytest.mark.parametrize("overrides", [dict(), dict(sliding_window=9, layer_types=("sliding", "full"),
                                                    attn_sinks=True)])
def test_cpu_engine_outputs_equal_the_old_paths_bit_for_bit(tok, monkeypatch, overrides):
    """Seeded and unseeded requests of several lengths (several decode groups), every fast path on, against the
    old decode reference (one mask per layer) and torch.zeros pools: tokens and log-probs equal."""
    model = tiny_model("llama", **overrides)
    config = EngineConfig(block_size=4, max_num_seqs=4)
    calls = []

    def old_reference(*a, **kw):
        calls.append(1)
        return old_paged_decode_reference(*a, **kw)

    got = {}
    for name in ("old", "new", "old"):
        with monkeypatch.context() as m:
            if name == "old":
                m.setattr(paged, "paged_decode_reference", old_reference)
                m.setattr(paged, "pool_zeros", lambda shape, device, dtype: torch.zeros(shape, device=device,
                                                                                        dtype=dtype))
            torch.manual_seed(1)
            engine = Engine(model, tok, config)
            out = _outputs(run_requests(engine, _requests()))
            got.setdefault(name, out)
            assert out == got[name]
    assert calls  # the old reference ran
    assert got["new"] == got["old"]


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          check=True).stdout


def test_a_cpu_engine_does_not_import_triton():
    out = _run("""
        import sys
        from lmforge.infer.engine import Engine, EngineConfig
        from lmforge.infer.detok import IdTokenizer
        from lmforge.model.config import ModelConfig
        from lmforge.model.transformer import Transformer
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=32)
        Engine(Transformer(cfg).eval(), IdTokenizer(64), EngineConfig(max_num_seqs=2, num_kv_tokens=64))
        print(sorted(m for m in sys.modules if m.startswith("lmforge.kernels.")))
    """)  # (not Triton itself: torch imports it at startup where it is installed, e.g. torch._native.ops)
    assert out.strip() == "[]"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_a_cpu_pool_takes_no_resident_memory_until_written():
    out = _run("""
        import os, torch
        from lmforge.infer.kv.paged import pool_zeros
        rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        before = rss()
        pool = pool_zeros((2048, 16, 8, 128), torch.device("cpu"), torch.bfloat16)  # 64 MiB
        print(rss() - before, pool.numel() * pool.element_size())
    """)
    grown, size = map(int, out.split())
    assert grown < size // 4, f"resident memory grew {grown} bytes for a {size}-byte pool"
