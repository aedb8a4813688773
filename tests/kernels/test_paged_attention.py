"""Paged decode attention (lmforge/kernels/paged_attention.py): the Triton kernel against the plain
gather-then-attend reference, and the reference against dense attention over a contiguous cache. On CPU
the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels.decode import available
from lmforge.model.layers.attention import math_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def shuffled_pool(lens, bs, KV, hd, dtype, g, spare: int, fill: int | None = None):
    """(k_cache, v_cache, tables) for rows of `lens` keys: blocks handed out in a shuffled (non-contiguous) order
    from a pool with `spare` unused blocks of garbage; tables (rows, longest + 1) hold `fill` past each row's end
    (None: an out-of-range id, which must never be read)."""
    need = [-(-n // bs) for n in lens]
    n_blocks = sum(need) + spare
    perm = torch.randperm(n_blocks, generator=g)
    tables = torch.full((len(lens), max(need) + 1), n_blocks + 7 if fill is None else fill, dtype=torch.int32)
    used = 0
    for b, k in enumerate(need):
        tables[b, :k] = perm[used:used + k].to(torch.int32)
        used += k
    k_cache = torch.randn(n_blocks, bs, KV, hd, generator=g).to(dtype)
    v_cache = torch.randn(n_blocks, bs, KV, hd, generator=g).to(dtype)
    return k_cache, v_cache, tables


def _paged(B, H, KV, hd, bs, lens, dtype=torch.float32, seed=0):
    """Random q and a pool of blocks handed out to the rows in a shuffled (non-contiguous) order, with
    unused blocks in between holding garbage; max_blocks covers the longest row plus one spare column."""
    from lmforge.kernels import paged_attention as pa  # noqa: F401  (import check)

    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables = shuffled_pool(lens, bs, KV, hd, dtype, g, spare=5)
    q = torch.randn(B, H, hd, generator=g).to(dtype)
    to = lambda t: t.to(DEV)  # noqa: E731
    return to(q), to(k_cache), to(v_cache), to(tables), to(torch.tensor(lens, dtype=torch.int32))


def _check(args, tol, **kw):
    from lmforge.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    want = paged_decode_attention_ref(*args, **kw)
    # default; one slice; a slice per tile up to 4 (rows of one tile: no partial results); one query head per
    # program; one tile at a time; the software pipeline
    for config in (None, (1, 16, 4), (4, 32, 4), (4, 16, 2, 1), (4, 16, 4, 0, 1), (2, 16, 4, 0, 3)):
        got = paged_decode_attention(*args, config=config, **kw)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # the kernel step's form: positions instead of lengths, old keys and the new one read separately; the new
    # key in a slice's first tile or in a later one (2 x 16: rows of 37 and 70 keys), and whole rows in one tile
    for config in ((2, 16, 4, 1), (2, 16, 4, 0, 1), (1, 128, 4, 1, 1)):
        got = paged_decode_attention(*args, config=config, early_positions=(args[4] - 1).long(), **kw)
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("H,KV,hd,bs", [(2, 2, 16, 16), (4, 2, 128, 32), (3, 1, 64, 16)])
def test_paged_kernel_matches_reference(H, KV, hd, bs):
    """MHA, GQA, MQA (group 3: no power of two, padded to 16 rows), head dims 16/64/128, block sizes 16/32; rows
    of different lengths: partial last blocks, a single key, exact block multiples. (Few heads: the interpreter's
    time grows with programs, and a one-head-per-program config runs one per query head.)"""
    lens = [37, 1, 2 * bs, 70]
    _check(_paged(4, H, KV, hd, bs, lens, seed=H + hd), 1e-4, scale=hd ** -0.5)


@pytest.mark.parametrize("softcap,window,sinks", [(5.0, 20, False), (0.0, 0, True), (30.0, 9, True)])
def test_paged_kernel_softcap_window_sinks(softcap, window, sinks):
    """A strong soft-cap with a window over two tiles, sinks alone, and all three together."""
    args = _paged(3, 4, 2, 64, 16, [45, 5, 33], seed=int(softcap) + window)
    s = torch.randn(4, generator=torch.Generator().manual_seed(3)).to(DEV) if sinks else None
    _check(args, 1e-4, scale=0.125, softcap=softcap, window=window, sinks=s)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_kernel_half_precision(dtype):
    args = _paged(2, 4, 2, 64, 16, [50, 19], dtype=dtype, seed=4)
    _check(args, 2e-2, scale=0.125)


def test_empty_row_gives_zeros():
    """A padding row of a batch bucket (context 0) must not produce NaN."""
    from lmforge.kernels.paged_attention import paged_decode_attention

    q, k, v, t, lens = _paged(2, 4, 2, 16, 16, [20, 1], seed=5)
    lens[1] = 0
    for config in ((1, 16, 4), (4, 16, 4), (4, 16, 4, 1)):
        out = paged_decode_attention(q, k, v, t, lens, scale=0.25, config=config)
        assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_reference_equals_dense_attention():
    """The reference's gathering is right: a paged cache holding the same keys as a contiguous one gives
    the model's attention of the last query over all keys (and over the last `window` ones)."""
    from lmforge.kernels.paged_attention import paged_decode_attention_ref

    q, k, v, t, lens = _paged(1, 4, 2, 16, 16, [41], seed=6)
    blocks = t[0, :3].long()
    kd, vd = k[blocks].flatten(0, 1)[:41], v[blocks].flatten(0, 1)[:41]  # (S, KV, hd)
    for window in (0, 10):
        keep = slice(41 - window, 41) if window else slice(0, 41)
        want = math_attention(q[:, :, None], kd[keep].transpose(0, 1)[None], vd[keep].transpose(0, 1)[None], None,
                              scale=0.25)
        got = paged_decode_attention_ref(q, k, v, t, lens, scale=0.25, window=window)
        torch.testing.assert_close(got, want[:, :, 0])


def test_static_cache_layout_with_left_padding():
    """A static cache row (KV, S, hd) seen as one block of S slots (permuted strides), keys from `start`."""
    from lmforge.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    g = torch.Generator().manual_seed(7)
    KV, S, hd, H, pad, n = 2, 48, 16, 4, 5, 30
    k, v = torch.randn(KV, S, hd, generator=g).to(DEV), torch.randn(KV, S, hd, generator=g).to(DEV)
    q = torch.randn(1, H, hd, generator=g).to(DEV)
    view = lambda t: t.permute(1, 0, 2)[None]  # noqa: E731  (1 block, S slots, KV, hd), not contiguous
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEV)
    lens = torch.tensor([n], dtype=torch.int32, device=DEV)
    got = paged_decode_attention(q, view(k), view(v), table, lens, scale=0.25, config=(2, 16, 4),
                                 start=torch.tensor([pad], dtype=torch.int32, device=DEV))
    want = paged_decode_attention_ref(q, view(k[:, pad:]), view(v[:, pad:]), table, lens - pad, scale=0.25)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_bad_shapes_are_named():
    from lmforge.kernels.paged_attention import paged_decode_attention

    q, k, v, t, lens = _paged(2, 4, 2, 16, 16, [5, 9], seed=8)
    with pytest.raises(ValueError, match="multiple of 3 kv heads"):
        paged_decode_attention(q, k[:, :, :1].expand(-1, -1, 3, -1), v[:, :, :1].expand(-1, -1, 3, -1), t, lens,
                               scale=1.0)
    with pytest.raises(ValueError, match="caches"):
        paged_decode_attention(q, k[..., :8], v[..., :8], t, lens, scale=1.0)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, k, v, t[:1], lens, scale=1.0)
    with pytest.raises(ValueError, match="stages 0 .* a pipeline of 2 to 8"):
        paged_decode_attention(q, k, v, t, lens, scale=1.0, config=(1, 16, 4, 0, -1))
    with pytest.raises(ValueError, match="early_positions needs stages 0 or 1"):
        paged_decode_attention(q, k, v, t, lens, scale=1.0, config=(1, 16, 4, 0, 2), early_positions=lens.long() - 1)


def _tree_rows_ref(q, k_cache, v_cache, tables, lens, start, bits, scale):
    """Each row attends to its keys below `start` and to tree slot start + i where bit i of `bits` is set:
    those keys gathered one by one, then the model's math attention."""
    bs, out = k_cache.shape[1], torch.zeros_like(q)
    for b in range(q.shape[0]):
        n, s0 = int(lens[b]), int(start[b])
        keep = [t for t in range(n) if t < s0 or (int(bits[b]) >> (t - s0)) & 1]
        slots = torch.tensor([int(tables[b, t // bs]) * bs + t % bs for t in keep])
        k = k_cache.flatten(0, 1)[slots].transpose(0, 1)[None].float()
        v = v_cache.flatten(0, 1)[slots].transpose(0, 1)[None].float()
        out[b] = math_attention(q[b][None, :, None].float(), k, v, None, scale=scale)[0, :, 0].to(q.dtype)
    return out


def test_tree_rows_see_their_ancestors_only():
    """Rows of a token tree (AttnMetadata.tree_rows: first tree slot and ancestor bits): the kernel in every
    config - several slices, where some hold no visible key at all (node 39's 29 siblings before it) - and the
    engine's reference decode path equal keys gathered by hand; a row with start = its length is a plain row."""
    from lmforge.infer.kv.paged import paged_decode_reference
    from lmforge.kernels.paged_attention import paged_decode_attention

    parents = [-1, -1, 0, 0, 1, 2, 2, 3, 4, 5] + [-1] * 30  # 30 more children of the root: node 39 sees itself
    anc = []
    for i, p in enumerate(parents):
        anc.append((1 << i) | (anc[p] if p >= 0 else 0))
    ctx = 25  # keys before the tree; row j of the tree sits at slot ctx + j
    rows = [3, 9, 17, 39]  # tree nodes 3, 9, 17, 39
    lens = [ctx + j + 1 for j in rows] + [30]
    q, k, v, tables, lens_t = _paged(len(lens), 4, 2, 64, 16, lens, seed=11)
    start = torch.tensor([ctx] * len(rows) + [30], device=DEV)
    bits = torch.tensor([anc[j] for j in rows] + [0], device=DEV)
    want = _tree_rows_ref(q.cpu(), k.cpu(), v.cpu(), tables.cpu(), lens, start.cpu(), bits.cpu(), 0.125)
    gathered = torch.where(tables < k.shape[0], tables, 0)  # (the reference gathers whole tables)
    ref = paged_decode_reference(q, k, v, gathered, lens_t, scale=0.125, tree=(start, bits))
    torch.testing.assert_close(ref.cpu(), want, atol=1e-5, rtol=1e-5)
    for config in (None, (1, 16, 4), (4, 16, 4), (4, 16, 2, 1), (4, 16, 4, 0, 1), (2, 16, 4, 0, 3)):
        got = paged_decode_attention(q, k, v, tables, lens_t, scale=0.125, config=config, tree=(start, bits))
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_paged_kernel_reads_a_narrower_cache(cache_dtype):
    """A cache kept narrower than the model (EngineConfig.kv_cache_dtype: bf16 or fp8 keys under an fp32 model; on a
    GPU also fp8 under bf16) is read in q's dtype: the kernel equals the reference over the same rounded keys."""
    from lmforge.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    q, k, v, tables, lens = _paged(3, 4, 2, 64, 16, [45, 5, 33], seed=7)
    for qd in (torch.float32, torch.bfloat16) if DEV == "cuda" else (torch.float32,):
        args = (q.to(qd), k.to(cache_dtype), v.to(cache_dtype), tables, lens)
        want = paged_decode_attention_ref(*args, scale=0.125)
        tol = 1e-4 if qd == torch.float32 else 2e-2
        for config in (None, (1, 16, 4), (4, 16, 4, 0, 1)):
            torch.testing.assert_close(paged_decode_attention(*args, scale=0.125, config=config).float(), want.float(),
                                       atol=tol, rtol=tol)
