"""The persistent one-launch decoder layer (lmforge/kernels/decode_layer.py) against the composition of the
five-kernel step's plain references (qkv_rope_ref, paged_decode_attention_ref, gemv_ref). On CPU it runs in
Triton's interpreter as five launches, one phase each (the interpreter runs programs one after another, so
a grid barrier would never open); on a GPU also as one launch with its grid barriers."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels import decode as kd
from lmforge.kernels import decode_layer as dl
from lmforge.kernels.paged_attention import paged_decode_attention_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kd.available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def _layer(H, KV, hd, D, FF, n_old, bs, seed, dtype=torch.float32):
    """Random weights (separate q/k/v and gate/up tensors, as an unfused model holds them), a shuffled
    paged pool holding n_old earlier keys, RoPE tables and the fp32 residual x."""
    from lmforge.model.layers.rope import RotaryEmbedding

    g = torch.Generator().manual_seed(seed)
    w = lambda n, k: (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(DEV)  # noqa: E731
    gain = lambda n: (1 + 0.2 * torch.randn(n, generator=g)).to(dtype).to(DEV)  # noqa: E731
    n_blocks = -(-(n_old + 1) // bs)
    pool = n_blocks + 3
    table = torch.randperm(pool, generator=g)[:n_blocks + 1].to(torch.int32)[None].to(DEV)
    cache = lambda: torch.randn(pool, bs, KV, hd, generator=g).to(dtype).to(DEV)  # noqa: E731
    rope = RotaryEmbedding(hd, max_seq_len=n_old + 8)
    return dict(x=torch.randn(D, generator=g).to(DEV), g1=gain(D), wqkv=(w(H * hd, D), w(KV * hd, D), w(KV * hd, D)),
                cos=rope.cos_table.to(DEV), sin=rope.sin_table.to(DEV), k_cache=cache(), v_cache=cache(),
                block_table=table, wo=w(D, H * hd), g2=gain(D), wgu=(w(FF, D), w(FF, D)), wd=w(D, FF))


def _reference(t, pos, eps, scale, softcap=0.0, window=0, sinks=None):
    """x after the layer, and the caches with the new token's k and v (copies: the inputs stay as they are)."""
    kc, vc = t["k_cache"].clone(), t["v_cache"].clone()
    H = t["wqkv"][0].shape[0] // kc.shape[3]
    q = kd.qkv_rope_ref(t["x"], t["wqkv"], t["g1"], eps, t["cos"], t["sin"], pos, 0, H, kc.shape[2], kc, vc,
                        t["block_table"])
    ctx = torch.tensor([pos + 1], dtype=torch.int32, device=DEV)
    o = paged_decode_attention_ref(q.view(1, H, -1), kc, vc, t["block_table"], ctx, scale=scale, softcap=softcap,
                                   window=window, sinks=sinks)
    x = kd.gemv_ref(o.reshape(-1), t["wo"], residual=t["x"])
    h = kd.gemv_ref(x, t["wgu"][0], up=t["wgu"][1], norm=t["g2"], eps=eps, glu=True)
    return kd.gemv_ref(h, t["wd"], residual=x), kc, vc


def _run(t, pos, config, eps, scale, split=None, n_programs=None, **attn):
    c = t["k_cache"]
    H, FF = t["wqkv"][0].shape[0] // c.shape[3], t["wgu"][0].shape[0]
    work = dl.workspace(1, H, c.shape[3], FF, t["wqkv"][0].dtype, DEV)
    x, kc, vc = t["x"].clone(), c.clone(), t["v_cache"].clone()
    p = torch.tensor([pos], device=DEV)
    dl.decode_layer(x, t["g1"], t["wqkv"], t["cos"], t["sin"], p, kc, vc, t["block_table"], t["wo"], t["g2"],
                    t["wgu"], t["wd"], work, 0, eps=eps, scale=scale, config=config, split=split,
                    n_programs=n_programs, **attn)
    assert int(work.counts.abs().sum()) == 0  # the attention counters are left at zero for the next layer
    return x, kc, vc


@pytest.mark.parametrize("H,KV,hd,D,FF,n_old", [(4, 2, 16, 64, 48, 9), (3, 1, 32, 48, 80, 20), (2, 2, 16, 40, 40, 0)])
def test_decode_layer_matches_the_references(H, KV, hd, D, FF, n_old):
    """GQA, MQA (a group of 3) and MHA; heads x head_dim != d_model; widths that are not powers of two; a first
    token (no earlier keys). Row ranges that end mid-tile, tiles that span heads, several K tiles in the down
    projection, slices left empty, one query head per unit and whole kv groups."""
    t = _layer(H, KV, hd, D, FF, n_old, bs=4, seed=H * D + n_old)
    eps, scale = 1e-5, hd ** -0.5
    want, kc, vc = _reference(t, n_old, eps, scale)
    for config in ((4, 8, 4, 8, 32, 4, 16, 4, 1, 3, 1), (2, 4, 2, 4, 16, 2, 16, 4, 2, 1, 1),
                   (1, 16, 8, 16, 128, 1, 32, 4, 1, 2, 1)):
        n_programs = 3 if config[-2] == 3 else 5  # (the interpreter's time grows with programs and launches)
        x, kc2, vc2 = _run(t, n_old, config, eps, scale, n_programs=n_programs)
        torch.testing.assert_close(x, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(kc2, kc, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vc2, vc, atol=1e-5, rtol=1e-5)


def test_decode_layer_attention_options():
    """Soft-capping, a sliding window and learned sinks, as the paged attention kernel has them."""
    t = _layer(4, 2, 16, 32, 48, 13, bs=4, seed=7)  # (narrow MLP: the interpreter's time grows with its rows)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(1)).to(DEV)
    for attn in (dict(softcap=3.0), dict(window=5), dict(sinks=sinks)):
        want = _reference(t, 13, 1e-5, 0.25, **attn)[0]
        got = _run(t, 13, (4, 8, 4, 8, 32, 4, 16, 4, 1, 1, 1), 1e-5, 0.25, n_programs=4, **attn)[0]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_decode_layer_refuses_bad_configs():
    t = _layer(4, 2, 16, 64, 96, 3, bs=4, seed=1)
    with pytest.raises(ValueError, match="slices a power of two"):
        _run(t, 3, (4, 8, 4, 8, 32, 3, 16, 4, 1, 1, 1), 1e-5, 0.25)
    with pytest.raises(ValueError, match="contiguous"):
        t["wo"] = t["wo"].t()
        _run(t, 3, None, 1e-5, 0.25)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the grid barriers need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_launch_equals_the_phase_by_phase_launches(dtype):
    """On a GPU, at a 1B Llama's layer shape (300 cached keys): the one-launch layer (grid barriers, one
    program per SM) = the five launches of the same phases, and both = the references; in bf16 for every
    candidate configuration (each JIT-compiles: about as long as the rest of the test)."""
    t = _layer(32, 4, 64, 2048, 5632, 300, bs=16, seed=3, dtype=dtype)
    eps, scale = 1e-5, 0.125
    want, kc, vc = _reference(t, 300, eps, scale)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    split = _run(t, 300, dl.LAYER_CONFIGS[0], eps, scale, split=True)
    for config in dl.LAYER_CONFIGS[:1] if dtype == torch.float32 else dl.LAYER_CONFIGS:
        one = _run(t, 300, config, eps, scale, split=False)
        torch.testing.assert_close(one[0], want, atol=tol, rtol=tol)
        torch.testing.assert_close(one[1].float(), kc.float(), atol=tol, rtol=tol)
        if config == dl.LAYER_CONFIGS[0]:  # same phases, same order of arithmetic: equal up to the atomics-free
            torch.testing.assert_close(one[0], split[0], atol=1e-6, rtol=1e-6)  # tiling, i.e. bit for bit
