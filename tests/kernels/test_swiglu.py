"""Triton SwiGLU (lmforge/kernels/swiglu.py) against silu(gate) * up: values and gradients, including
gate/up as the two halves of one fused gate_up output, and the MLP swap."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels import swiglu as ks

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not ks.available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def _check(M, N, dtype, tol):
    gu = (torch.randn(M, 2 * N, device=DEV) * 3).to(dtype)
    dh = torch.randn(M, N, device=DEV).to(dtype)
    outs = []
    for fn in (ks.swiglu_ref, ks.swiglu):
        a = gu.clone().requires_grad_()
        h = fn(*a.chunk(2, dim=-1))  # strided halves, as MLP.gate_up produces
        h.backward(dh)
        outs.append((h, a.grad))
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("M,N", [(5, 24), (3, 300)])
def test_swiglu_matches_reference(M, N):
    _check(M, N, torch.float32, 1e-5)


def test_fused_mlp_matches_mlp():
    from lmforge.model.layers.mlp import MLP

    ref = MLP(16, 40, "swiglu").to(DEV)
    fused = ks.FusedSwiGLUMLP(16, 40, "swiglu").to(DEV)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16, device=DEV)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
    ref.fuse(), fused.fuse()
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_swiglu_bf16_gpu():
    _check(4096, 5632, torch.bfloat16, 2e-2)
