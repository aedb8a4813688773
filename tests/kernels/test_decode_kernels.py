"""Batch-1 decode kernels (lmforge/kernels/decode.py) against their plain references. Without a GPU they
run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels import decode as kd

pytestmark = pytest.mark.skipif(not kd.available("cuda" if torch.cuda.is_available() else "cpu"),
                                reason="needs triton (the `kernels` extra): a GPU, or TRITON_INTERPRET=1 on CPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("N,K", [(24, 40), (64, 256), (37, 600)])
@pytest.mark.parametrize("norm,glu,residual", [(False, False, False), (True, False, False), (True, True, False),
                                               (False, False, True)])
def test_gemv_matches_reference(N, K, norm, glu, residual):
    g = torch.Generator().manual_seed(N * K)
    x = torch.randn(K, generator=g).to(DEV)
    w = (torch.randn(2 * N if glu else N, K, generator=g) / K ** 0.5).to(DEV)
    gain = (1 + 0.1 * torch.randn(K, generator=g)).to(DEV) if norm else None
    r = torch.randn(N, generator=g).to(DEV) if residual else None
    want = kd.gemv_ref(x, w, norm=gain, glu=glu, residual=r)
    got = kd.gemv(x, w, norm=gain, glu=glu, residual=r.clone() if r is not None else None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_residual_in_place(dtype):
    """fp32 residual: split-K atomic accumulation (_gemv_add_kernel); bf16: the plain kernel's epilogue."""
    x, w = torch.randn(600, device=DEV), torch.randn(24, 600, device=DEV).to(dtype)
    r = torch.randn(24, device=DEV).to(dtype)
    want = kd.gemv_ref(x, w, residual=r)
    kd.gemv(x, w, residual=r, out=r)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding step of values ~30
    torch.testing.assert_close(r, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("pad", [0, 3])
def test_qkv_rope_and_attend_match_reference(pad):
    from lmforge.model.layers.rope import RotaryEmbedding

    H, KV, hd, S, pos, d = 8, 2, 16, 40, 29, 48
    g = torch.Generator().manual_seed(pad)
    rope = RotaryEmbedding(hd, 10000.0, max_seq_len=S).to(DEV)
    x = torch.randn(d, generator=g).to(DEV)
    w = (torch.randn((H + 2 * KV) * hd, d, generator=g) / d ** 0.5).to(DEV)
    gain = (1 + 0.1 * torch.randn(d, generator=g)).to(DEV)
    caches = [torch.randn(KV, S, hd, generator=g).to(DEV) for _ in range(2)]
    ref_k, ref_v = caches[0].clone(), caches[1].clone()
    q_ref = kd.qkv_rope_ref(x, w, gain, 1e-5, rope.cos_table, rope.sin_table, pos, pad, H, KV, ref_k, ref_v)
    k, v = caches[0].clone(), caches[1].clone()
    pos_t, pad_t = torch.tensor([pos], device=DEV), torch.tensor([pad], device=DEV)
    q = kd.qkv_rope(x, w, gain, 1e-5, rope.cos_table, rope.sin_table, pos_t, pad_t, H, KV, k, v)
    torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=1e-5)  # slot pos written, the rest untouched
    torch.testing.assert_close(v, ref_v, atol=1e-5, rtol=1e-5)
    for cfg in ((4, 8, 1), (16, 64, 2), (32, 16, 1)):  # several blocks per slice; one; empty slices
        out = kd.attend(q, k, v, pos_t, pad_t, scale=hd ** -0.5, config=cfg)
        torch.testing.assert_close(out, kd.attend_ref(q_ref, ref_k, ref_v, pos, pad, hd ** -0.5), atol=1e-5, rtol=1e-5)


def test_rope_cache_reference_equals_the_model_rope():
    """The reference rotation is the model's own apply_rope at position pos - pad."""
    from lmforge.model.layers.rope import RotaryEmbedding, apply_rope

    H, KV, hd = 4, 2, 8
    rope = RotaryEmbedding(hd, 500.0, max_seq_len=16)
    qkv = torch.randn((H + 2 * KV) * hd)
    k, v = torch.zeros(KV, 16, hd), torch.zeros(KV, 16, hd)
    q = kd.rope_cache_ref(qkv, rope.cos_table, rope.sin_table, 9, 2, H, KV, k, v)
    cos, sin = rope.cos_sin(torch.tensor([[7]]))
    want = apply_rope(qkv[: H * hd].view(1, H, 1, hd), cos, sin)  # (B, H, T, hd)
    torch.testing.assert_close(q, want.view(H, hd), atol=1e-6, rtol=1e-6)


def test_embed_and_bump():
    emb = torch.randn(11, 24, device=DEV)
    out = torch.zeros(24, device=DEV)
    kd.embed(torch.tensor([7], device=DEV), emb, out)
    torch.testing.assert_close(out, emb[7])
    pos = torch.tensor([5], device=DEV)
    x, w = torch.randn(24, device=DEV), torch.randn(9, 24, device=DEV)
    torch.testing.assert_close(kd.gemv(x, w, bump=pos), kd.gemv_ref(x, w), atol=1e-5, rtol=1e-5)
    assert int(pos) == 6  # incremented once, whatever the number of programs
