"""Varlen attention over a paged cache from device metadata (lmforge/kernels/paged_varlen.py:
paged_varlen_attention, the mixed steps of the engine's CUDA graphs): the Triton kernel against its reference
(each query a decode row of its sequence), and that reference against dense causal attention per sequence.
On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels.decode import available
from lmforge.model.cache import contiguous_mask
from lmforge.model.layers.attention import math_attention

from .test_paged_attention import shuffled_pool

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def _step(H, KV, hd, bs, chunks, dtype=torch.float32, seed=0, pad=0):
    """A step's chunks (new tokens n, context after them ctx) over a shuffled pool of blocks: q (N + pad, H, hd),
    caches, tables (S, W), cu_q (S + 1,), context lengths (S,)."""
    g = torch.Generator().manual_seed(seed)
    # (tables hold block 0 past each row's end: the reference gathers whole tables and masks what it read)
    k_cache, v_cache, tables = shuffled_pool([ctx for _, ctx in chunks], bs, KV, hd, dtype, g, spare=3, fill=0)
    N = sum(n for n, _ in chunks)
    q = torch.randn(N + pad, H, hd, generator=g).to(dtype)
    cu = torch.tensor([0, *torch.tensor([n for n, _ in chunks]).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor([c for _, c in chunks], dtype=torch.int32)
    return [t.to(DEV) for t in (q, k_cache, v_cache, tables, cu, ctx)]


def _dense(q, k_cache, v_cache, tables, cu, ctx, scale, softcap=0.0, window=0, sinks=None):
    """Per sequence: its keys gathered in order, its chunk's queries bottom-right causal (the eager engine's mask)."""
    out = torch.zeros_like(q)
    bs = k_cache.shape[1]
    for s in range(len(ctx)):
        a, b, c = int(cu[s]), int(cu[s + 1]), int(ctx[s])
        blocks = tables[s, :-(-c // bs)].long()
        k = k_cache[blocks].flatten(0, 1)[:c].transpose(0, 1)[None].float()
        v = v_cache[blocks].flatten(0, 1)[:c].transpose(0, 1)[None].float()
        mask = contiguous_mask(b - a, c, window, q.device)
        o = math_attention(q[a:b].transpose(0, 1)[None].float(), k, v, mask, scale=scale, softcap=softcap, sinks=sinks)
        out[a:b] = o[0].transpose(0, 1).to(q.dtype)
    return out


CHUNKS = [(1, 37), (20, 20), (5, 45), (1, 1), (40, 70), (17, 17)]
"""decodes (one query), whole prompts, and chunks after cached keys; chunks longer than a tile of 16 queries"""


@pytest.mark.parametrize("H,KV,hd,bs", [(4, 4, 64, 16), (8, 2, 128, 32), (6, 1, 40, 16), (4, 2, 16, 8)])
def test_reference_is_causal_attention_per_sequence(H, KV, hd, bs):
    from lmforge.kernels.paged_varlen import paged_varlen_reference

    args = _step(H, KV, hd, bs, CHUNKS, seed=H + hd, pad=5)
    got = paged_varlen_reference(*args, scale=hd ** -0.5)
    torch.testing.assert_close(got, _dense(*args, scale=hd ** -0.5), atol=1e-5, rtol=1e-5)
    assert (got[-5:] == 0).all()  # padding tokens


@needs_triton
@pytest.mark.parametrize("H,KV,hd,bs", [(4, 4, 64, 16), (8, 2, 128, 32), (6, 1, 40, 16), (4, 2, 16, 8)])
def test_kernel_matches_reference(H, KV, hd, bs):
    """MHA, GQA, MQA with a group of 6 (padded), head dims 16-128 (40 padded), block sizes 8-32; tiles padded to a
    larger static grid and padding tokens, as a CUDA graph's bucket holds them."""
    from lmforge.kernels.paged_varlen import (paged_varlen_attention, paged_varlen_reference, varlen_programs,
                                                 varlen_tiles)

    args = _step(H, KV, hd, bs, CHUNKS, seed=H + hd, pad=5)
    tiles = varlen_tiles([n for n, _ in CHUNKS], varlen_programs(len(args[0]), 8))
    tiles = tuple(torch.tensor(t, dtype=torch.int32, device=DEV) for t in tiles)
    want = paged_varlen_reference(*args, scale=hd ** -0.5)
    got = paged_varlen_attention(*args, tiles, scale=hd ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("softcap,window,sinks", [(5.0, 0, False), (0.0, 9, False), (0.0, 0, True), (30.0, 20, True)])
def test_kernel_softcap_window_sinks(softcap, window, sinks):
    """A window shorter than a chunk (rows of one tile see different key ranges; some tiles hold no key a row
    sees), soft-capping and learned sinks: the reference's and dense attention's values."""
    from lmforge.kernels.paged_varlen import paged_varlen_attention, paged_varlen_reference, varlen_tiles

    args = _step(8, 2, 64, 16, CHUNKS, seed=int(softcap) + window)
    s = torch.randn(8, generator=torch.Generator().manual_seed(3)).to(DEV) if sinks else None
    kw = dict(scale=0.125, softcap=softcap, window=window, sinks=s)
    tiles = tuple(torch.tensor(t, dtype=torch.int32, device=DEV) for t in varlen_tiles([n for n, _ in CHUNKS]))
    want = paged_varlen_reference(*args, **kw)
    torch.testing.assert_close(want, _dense(*args, **kw), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paged_varlen_attention(*args, tiles, **kw), want, atol=1e-4, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision(dtype):
    from lmforge.kernels.paged_varlen import paged_varlen_attention, paged_varlen_reference, varlen_tiles

    args = _step(8, 2, 64, 16, CHUNKS, dtype=dtype, seed=4)
    tiles = tuple(torch.tensor(t, dtype=torch.int32, device=DEV) for t in varlen_tiles([n for n, _ in CHUNKS]))
    got = paged_varlen_attention(*args, tiles, scale=0.125)
    torch.testing.assert_close(got.float(), paged_varlen_reference(*args, scale=0.125).float(), atol=2e-2, rtol=2e-2)


def test_tiles_cover_every_query_once():
    from lmforge.kernels.paged_varlen import VARLEN_TILE, varlen_programs, varlen_tiles

    lens = [1, 16, 17, 40, 1]
    seqs, firsts = varlen_tiles(lens, varlen_programs(sum(lens), len(lens)))
    covered = sorted((s, q) for s, q0 in zip(seqs, firsts) if s >= 0 for q in range(q0, min(q0 + VARLEN_TILE, lens[s])))
    assert covered == [(s, q) for s, n in enumerate(lens) for q in range(n)]
    with pytest.raises(ValueError, match="do not fit"):
        varlen_tiles(lens, 3)


@needs_triton
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_kernel_reads_a_narrower_cache(cache_dtype):
    """Keys and values kept in bf16 or fp8 under an fp32 model: read in q's dtype, as the reference does."""
    from lmforge.kernels.paged_varlen import paged_varlen_attention, paged_varlen_reference, varlen_tiles

    q, k, v, tables, cu, ctx = _step(8, 2, 64, 16, CHUNKS, seed=5)
    args = (q, k.to(cache_dtype), v.to(cache_dtype), tables, cu, ctx)
    tiles = tuple(torch.tensor(t, dtype=torch.int32, device=DEV) for t in varlen_tiles([n for n, _ in CHUNKS]))
    want = paged_varlen_reference(*args, scale=0.125)
    torch.testing.assert_close(paged_varlen_attention(*args, tiles, scale=0.125), want, atol=1e-4, rtol=1e-4)


@needs_triton
def test_bad_inputs_are_named():
    """Mismatched metadata is a one-line ValueError naming the shapes, not a kernel fault."""
    from lmforge.kernels.paged_varlen import paged_varlen_attention, varlen_tiles

    q, k, v, tables, cu, ctx = _step(4, 2, 16, 8, CHUNKS, seed=9)
    tiles = tuple(torch.tensor(t, dtype=torch.int32, device=DEV) for t in varlen_tiles([n for n, _ in CHUNKS]))
    with pytest.raises(ValueError, match="multiple of 3 kv heads"):
        paged_varlen_attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1), tables, cu,
                               ctx, tiles, scale=1.0)
    for bad in (dict(cu_q=cu[:-1]), dict(block_tables=tables[:2]), dict(context_lens=ctx.float()),
                dict(tiles=(tiles[0], tiles[1][:1]))):
        args = dict(block_tables=tables, cu_q=cu, context_lens=ctx, tiles=tiles) | bad
        with pytest.raises(ValueError, match="paged_varlen_attention wants integer block_tables"):
            paged_varlen_attention(q, k, v, scale=1.0, **args)
