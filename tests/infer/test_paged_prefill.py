"""Batched prefill in the paged cache (lmforge.infer.kv.paged): every prefill chunk of a step in one call
of the Triton FlashAttention-2 kernel in varlen form (on the GPU where there is one, else in Triton's
interpreter on the CPU) against the
per-sequence reference path, for fresh prompts, chunks continuing a cached context and decode rows in
the same step (the engine on this path, every attention variant: tests/infer/test_attention_variants.py)."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.kv import paged
from lmforge.model.cache import CacheSpec, LayerCacheSpec
from lmforge.model.layers.attention import AttnSpec
from lmforge.model.meta import AttnMetadata

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
from lmforge.kernels.decode import available  # noqa: E402

KERNEL = pytest.mark.skipif(not available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")
TOL = 2e-5 if DEV == "cpu" else 5e-3  # the kernel's fp32 dots run in tf32 on the GPU

BS, H, KV, HD = 4, 4, 2, 64


def step_meta(tables: list[list[int]], before: list[int], qlens: list[int], num_decodes: int,
              device: str = DEV) -> AttnMetadata:
    """The engine's varlen metadata for sequences with `before` cached tokens each getting qlens[i] new ones,
    on `device` (this module's kernels run on the GPU where there is one; other users keep the CPU)."""
    slots = [t[p // BS] * BS + p % BS for t, b, n in zip(tables, before, qlens) for p in range(b, b + n)]
    width = max(map(len, tables))
    ctx = [b + n for b, n in zip(before, qlens)]
    return AttnMetadata(slot_mapping=torch.tensor(slots, device=device), block_size=BS, num_decodes=num_decodes,
                        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                                  device=device),
                        context_lens=torch.tensor(ctx, dtype=torch.int32, device=device), query_lens_host=tuple(qlens),
                        context_lens_host=tuple(ctx))


def caches(dtype=torch.float32):
    spec = CacheSpec(layers=(LayerCacheSpec(kind="full", kv_heads=KV, query_heads=H, head_dim=HD),), dtype=dtype,
                     max_seq_len=64, vocab_size=8)
    made = {mode: paged.PagedKVCache(spec, 24, BS, device=DEV, prefill=mode, decode="reference")
            for mode in ("kernel", "reference")}
    g = torch.Generator().manual_seed(1)
    for pool in made["kernel"].pools():  # the cached contexts: the same random keys in both
        pool.copy_(torch.randn(pool.shape, generator=g).to(DEV))
    for a, b in zip(made["kernel"].pools(), made["reference"].pools()):
        b.copy_(a)
    return made


@KERNEL
@pytest.mark.parametrize("window,softcap,sinks", [(0, 0.0, False), (5, 0.0, False), (0, 4.0, True)])
@pytest.mark.parametrize("before", [[9, 0, 6, 0, 13], [9, 0, 0, 0, 0]], ids=["continued", "fresh"])
def test_batched_prefill_matches_per_sequence_reference(window, softcap, sinks, before):
    """One decode row, then prefill chunks: a fresh prompt, a chunk continuing a 6-token context across a
    block boundary, a one-token fresh prompt, a chunk after 13 cached tokens ("fresh": every chunk is a
    whole prompt, so the kernel reads the step's own keys, no gather)."""
    tables = [[3, 7, 1], [2, 5], [9, 0, 4], [6], [11, 12, 13, 14, 15]]
    qlens = [1, 7, 5, 1, 6]
    meta = step_meta(tables, before, qlens, num_decodes=1)
    g = torch.Generator().manual_seed(2)
    N = sum(qlens)
    q = torch.randn(1, H, N, HD, generator=g).to(DEV)
    k, v = torch.randn(1, KV, N, HD, generator=g).to(DEV), torch.randn(1, KV, N, HD, generator=g).to(DEV)
    spec = AttnSpec(scale=0.2, window=window, softcap=softcap,
                    sinks=torch.randn(H, generator=g).to(DEV) if sinks else None)
    out = {}
    for mode, cache in caches().items():
        with torch.no_grad():
            out[mode] = cache.attend(0, q, k, v, spec, meta)
        assert (cache.prefill_kernel is not None) == (mode == "kernel")
    layout = paged.prefill_layout(meta, BS)  # built by the first layer's call, kept for the others
    assert (layout["slots"] is None) == (before[1:] == [0] * 4)
    assert layout["cu_k"].tolist() == [0, *torch.tensor([b + n for b, n in zip(before, qlens)][1:]).cumsum(0).tolist()]
    torch.testing.assert_close(out["kernel"], out["reference"], atol=TOL, rtol=TOL)


def test_kernel_mode_names_what_it_cannot_take():
    spec = CacheSpec(layers=(LayerCacheSpec(kind="full", kv_heads=KV, query_heads=H, head_dim=8),),
                     dtype=torch.float32, max_seq_len=64, vocab_size=8)
    cache = paged.PagedKVCache(spec, 8, BS, device=DEV, prefill="kernel")
    meta = step_meta([[1, 2]], [0], [5], num_decodes=0)
    q, k = torch.randn(1, H, 5, 8, device=DEV), torch.randn(1, KV, 5, 8, device=DEV)
    with pytest.raises(paged.LmforgeError, match="head dims"):
        cache.attend(0, q, k, k, AttnSpec(scale=0.3), meta)
    with pytest.raises(paged.LmforgeError, match="prefill attention must be one of"):
        paged.PagedKVCache(spec, 8, BS, prefill="fast")


def test_a_failing_prefill_kernel_warns_and_falls_back():
    made = caches()
    meta = step_meta([[1, 2, 3]], [4], [6], num_decodes=0)
    q, k = torch.randn(1, H, 6, HD, device=DEV), torch.randn(1, KV, 6, HD, device=DEV)

    class Broken:
        unsupported = staticmethod(lambda *a: None)

        @staticmethod
        def flash_attention(*args, **kw):
            raise RuntimeError("does not compile")

    made["kernel"].prefill_kernel = Broken
    with pytest.warns(UserWarning, match="paged prefill kernel failed .*does not compile"):
        got = made["kernel"].attend(0, q, k, k, AttnSpec(scale=0.3), meta)
    assert made["kernel"].prefill_kernel is None
    torch.testing.assert_close(got, made["reference"].attend(0, q, k, k, AttnSpec(scale=0.3), meta))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [0, 256])
def test_gpu_batched_prefill_bf16(window):
    """64 sequences, half continuing cached contexts of up to 1000 tokens, hd 128, bf16: the varlen kernel
    against the per-sequence reference (SDPA)."""
    g = torch.Generator().manual_seed(3)
    before = [int(x) * (i % 2) for i, x in enumerate(torch.randint(0, 1000, (64,), generator=g))]
    qlens = [int(x) for x in torch.randint(1, 300, (64,), generator=g)]
    bs, hd, nb = 16, 128, 0
    tables = []
    for b, n in zip(before, qlens):
        need = -(-(b + n) // bs)
        tables.append(list(range(nb, nb + need)))
        nb += need
    spec = CacheSpec(layers=(LayerCacheSpec(kind="full", kv_heads=2, query_heads=16, head_dim=hd),),
                     dtype=torch.bfloat16, max_seq_len=2048, vocab_size=8)
    made = {m: paged.PagedKVCache(spec, nb, bs, "cuda", prefill=m) for m in ("kernel", "reference")}
    for a, b in zip(made["kernel"].pools(), made["reference"].pools()):
        a.normal_()
        b.copy_(a)
    slots = [t[p // bs] * bs + p % bs for t, b, n in zip(tables, before, qlens) for p in range(b, b + n)]
    width = max(map(len, tables))
    ctx = [b + n for b, n in zip(before, qlens)]
    meta = AttnMetadata(slot_mapping=torch.tensor(slots, device="cuda"), block_size=bs,
                        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                                  device="cuda"),
                        context_lens=torch.tensor(ctx, dtype=torch.int32, device="cuda"),
                        query_lens_host=tuple(qlens), context_lens_host=tuple(ctx))
    N = sum(qlens)
    q = torch.randn(1, 16, N, hd, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, N, hd, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    spec_ = AttnSpec(scale=hd ** -0.5, window=window)
    with torch.no_grad():
        got, want = (made[m].attend(0, q, k, v, spec_, meta) for m in ("kernel", "reference"))
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
