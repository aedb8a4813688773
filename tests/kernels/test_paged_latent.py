"""MLA's attention over the paged latent cache (lmforge/kernels/paged_latent.py): the Triton kernel against its
reference, for decode rows (slices and their combine, windows, soft-capping, token-tree rows, head groups, narrower
caches) and varlen rows (a step's chunks, padding tokens and tiles); the reference against a per-row loop of the
plain formula. On CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.kernels.decode import available
from lmforge.kernels.paged_latent import paged_latent_attention, paged_latent_reference

from .test_paged_attention import shuffled_pool

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def _cache(lens, bs, R, DR, dtype, g):
    """Latent and rope-key pools (strided views of a shuffled pool's blocks) and the rows' tables."""
    k, v, tables = shuffled_pool(lens, bs, 1, R, dtype, g, spare=4, fill=0)
    return k[:, :, 0], v[:, :, 0, :DR], tables


def _loop(q_lat, q_rope, c, kr, tables, seq, own, scale, softcap=0.0, window=0, tree=None):
    """Row by row, slot by slot: the definition."""
    bs, out = c.shape[1], torch.zeros(q_lat.shape, dtype=torch.float64)
    for n in range(q_lat.shape[0]):
        o = int(own[n])
        slots = [j for j in range(o + 1) if not window or j > o - window]
        if tree is not None:
            st, bits = int(tree[0][n]), int(tree[1][n])
            slots = [j for j in slots if j < st or (bits >> (j - st)) & 1]
        if not slots:
            continue
        blk = [int(tables[int(seq[n]), j // bs]) for j in slots]
        cs = torch.stack([c[b, j % bs] for b, j in zip(blk, slots)]).double()
        ks = torch.stack([kr[b, j % bs] for b, j in zip(blk, slots)]).double()
        s = (q_lat[n].double() @ cs.T + q_rope[n].double() @ ks.T) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        out[n] = torch.softmax(s, -1) @ cs
    return out


def _decode(B, H, R, DR, bs, lens, dtype=torch.float32, cache_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, kr, tables = _cache(lens, bs, R, DR, cache_dtype or dtype, g)
    q_lat, q_rope = torch.randn(B, H, R, generator=g).to(dtype), torch.randn(B, H, DR, generator=g).to(dtype)
    return [t.to(DEV) for t in (q_lat, q_rope, c, kr, tables, torch.tensor(lens, dtype=torch.int32))]


def test_reference_matches_the_definition():
    q_lat, q_rope, c, kr, tables, ctx = _decode(3, 4, 32, 16, 4, [1, 9, 14])
    scale = 1 / math.sqrt(48)
    own = ctx.long() - 1
    tree = (torch.tensor([0, 5, 10], device=DEV), torch.tensor([1, 0b1011, 0b1101], device=DEV))
    for kw in (dict(), dict(softcap=5.0), dict(window=4), dict(tree=tree)):
        got = paged_latent_reference(q_lat, q_rope, c, kr, tables, ctx, scale=scale, **kw)
        want = _loop(q_lat.cpu(), q_rope.cpu(), c.cpu(), kr.cpu(), tables.cpu(), torch.arange(3), own.cpu(), scale,
                     **{k: (tuple(t.cpu() for t in v) if k == "tree" else v) for k, v in kw.items()})
        torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("H,R,DR,lens,config", [
    (4, 32, 16, [1, 7, 40, 100], (1, 16, 4, 16)),  # one slice per row, one head group (heads padded to 16)
    (16, 64, 16, [3, 50, 90], (4, 16, 4, 16)),  # rows split in up to four slices: the last program combines
    (20, 32, 8, [33, 70], (2, 32, 4, 16)),  # two head groups, the second partly padding, each in two slices
    (4, 48, 16, [65], None),  # default config, a rank that is no power of two
])
def test_kernel_decode_rows_match_reference(H, R, DR, lens, config):
    q_lat, q_rope, c, kr, tables, ctx = _decode(len(lens), H, R, DR, 8, lens)
    for kw in (dict(), dict(softcap=3.0), dict(window=37)):
        got = paged_latent_attention(q_lat, q_rope, c, kr, tables, ctx, scale=0.2, config=config, **kw)
        want = paged_latent_reference(q_lat, q_rope, c, kr, tables, ctx, scale=0.2, **kw)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@needs_triton
def test_kernel_tree_rows_match_reference():
    """Rows of a token tree: each sees its context below the tree and its own ancestors' slots only (some tiles
    hold no visible key), with slices."""
    lens = [20, 20, 20, 53]
    q_lat, q_rope, c, kr, tables, ctx = _decode(4, 8, 32, 16, 4, lens, seed=3)
    start = torch.tensor([16, 16, 16, 2], device=DEV)
    bits = torch.tensor([0b0001, 0b0011, 0b1001, (1 << 50) | 1], device=DEV)
    for config in ((1, 16, 4, 16), (4, 16, 4, 16)):
        got = paged_latent_attention(q_lat, q_rope, c, kr, tables, ctx, scale=0.3, tree=(start, bits), config=config)
        want = paged_latent_reference(q_lat, q_rope, c, kr, tables, ctx, scale=0.3, tree=(start, bits))
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@needs_triton
@pytest.mark.parametrize("dtype,cache_dtype,tol", [(torch.bfloat16, None, 2e-2), (torch.float16, None, 4e-3),
                                                    (torch.float32, torch.bfloat16, 2e-5)])
def test_kernel_dtypes(dtype, cache_dtype, tol):
    """Half-precision queries and caches, and a bf16 cache under fp32 queries (read in the queries' dtype)."""
    q_lat, q_rope, c, kr, tables, ctx = _decode(2, 16, 64, 32, 16, [50, 150], dtype, cache_dtype, seed=1)
    got = paged_latent_attention(q_lat, q_rope, c, kr, tables, ctx, scale=0.1, config=(4, 32, 4, 16))
    want = paged_latent_reference(q_lat, q_rope, c, kr, tables, ctx, scale=0.1)
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@needs_triton
@pytest.mark.parametrize("window", [0, 6])
def test_kernel_varlen_rows_match_reference(window):
    """A mixed step's chunks back to back (decodes are one-token chunks) and padding tokens past cu_q[-1]: each
    token sees its sequence's slots up to its own; padding gets zeros."""
    chunks = [(1, 30), (17, 17), (5, 40), (1, 1), (20, 45)]  # (new tokens, context after them)
    g = torch.Generator().manual_seed(2)
    c, kr, tables = _cache([ctx for _, ctx in chunks], 4, 32, 16, torch.float32, g)
    N, pad = sum(n for n, _ in chunks), 3
    q_lat, q_rope = torch.randn(N + pad, 8, 32, generator=g), torch.randn(N + pad, 8, 16, generator=g)
    cu = torch.tensor([0, *torch.tensor([n for n, _ in chunks]).cumsum(0).tolist()], dtype=torch.int32)
    ctx = torch.tensor([x for _, x in chunks], dtype=torch.int32)
    q_lat, q_rope, c, kr, tables, cu, ctx = (t.to(DEV) for t in (q_lat, q_rope, c, kr, tables, cu, ctx))
    got = paged_latent_attention(q_lat, q_rope, c, kr, tables, ctx, scale=0.25, window=window, cu_q=cu)
    want = paged_latent_reference(q_lat, q_rope, c, kr, tables, ctx, scale=0.25, window=window, cu_q=cu)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert got[N:].abs().max() == 0
    seq = torch.repeat_interleave(torch.arange(len(chunks)), torch.tensor([n for n, _ in chunks]))
    own = torch.cat([torch.arange(x - n, x) for n, x in chunks])
    loop = _loop(q_lat[:N].cpu(), q_rope[:N].cpu(), c.cpu(), kr.cpu(), tables.cpu(), seq, own, 0.25, window=window)
    torch.testing.assert_close(want[:N].cpu().double(), loop, atol=1e-5, rtol=1e-5)


@needs_triton
def test_bad_shapes_and_configs_are_named():
    q_lat, q_rope, c, kr, tables, ctx = _decode(2, 4, 32, 16, 4, [5, 6])
    with pytest.raises(ValueError, match="q_lat"):
        paged_latent_attention(q_lat, q_rope[:, :2], c, kr, tables, ctx, scale=1.0)
    with pytest.raises(ValueError, match="config"):
        paged_latent_attention(q_lat, q_rope, c, kr, tables, ctx, scale=1.0, config=(3, 16, 4, 16))
    with pytest.raises(ValueError, match="tree"):
        paged_latent_attention(q_lat, q_rope, c, kr, tables, ctx, scale=1.0, cu_q=torch.tensor([0, 1, 2], device=DEV),
                               tree=(ctx, ctx))
