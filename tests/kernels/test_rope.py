"""Triton RoPE (lmforge/kernels/rope.py) against apply_rope: both layouts, values and gradients, on the
(B, H, T, hd) views attention passes (transposed from (B, T, H, hd))."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels import rope as kp
from lmforge.model.layers.rope import RotaryEmbedding

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kp.available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def _check(B, H, T, hd, layout, dtype, tol):
    rot = RotaryEmbedding(hd, 10000.0, layout=layout, max_seq_len=64).to(DEV)
    pos = torch.arange(3, 3 + T, device=DEV).expand(B, T)
    cos, sin = rot.cos_sin(pos, 3 + T)
    x = torch.randn(B, T, H, hd, device=DEV, dtype=dtype).transpose(1, 2)  # as attention's view
    dy = torch.randn(B, H, T, hd, device=DEV, dtype=dtype)
    outs = []
    for fn in (kp.rope_ref, kp.rope):
        xi = x.detach().clone().requires_grad_()
        y = fn(xi, cos, sin, layout)
        y.backward(dy)
        outs.append((y, xi.grad))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("B,H,T,hd", [(2, 3, 5, 16), (1, 20, 4, 8)])
def test_rope_matches_reference(layout, B, H, T, hd):
    _check(B, H, T, hd, layout, torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_bf16_gpu(layout):
    _check(4, 16, 512, 128, layout, torch.bfloat16, 1e-2)


def test_rope_rejects_odd_head_dim():
    x = torch.randn(1, 2, 3, 5, device=DEV)
    with pytest.raises(ValueError, match=r"even head dim.*\(1, 2, 3, 5\)"):
        kp.rope(x, torch.ones(1, 3, 2, device=DEV), torch.zeros(1, 3, 2, device=DEV))
