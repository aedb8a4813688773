"""Triton RMSNorm (lmforge/kernels/rmsnorm.py) against the plain definition: values and gradients of x and
the weight. Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels import rmsnorm as kr

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kr.available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def _grads(fn, x, w, dy):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(x, w)
    y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("shape", [(3, 5, 48), (7, 100), (2, 3, 4, 16)])
def test_rmsnorm_matches_reference_fp32(shape):
    x = torch.randn(shape, device=DEV) * 3
    w = 1 + 0.1 * torch.randn(shape[-1], device=DEV)
    dy = torch.randn(shape, device=DEV)
    want = _grads(lambda a, b: kr.rms_norm_ref(a, b, 1e-5), x, w, dy)
    got = _grads(lambda a, b: kr.rms_norm(a, b, 1e-5), x, w, dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_rmsnorm_module_swap_keeps_state_and_output():
    from lmforge.model.layers.norm import RMSNorm

    ref = RMSNorm(32, eps=1e-6).to(DEV)
    with torch.no_grad():
        ref.weight.normal_(1, 0.1)
    fused = kr.FusedRMSNorm(32, eps=1e-6).to(DEV)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(4, 9, 32, device=DEV)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rmsnorm_bf16_gpu():
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(2048, device="cuda"))
    dy = torch.randn_like(x)
    want = _grads(lambda a, b: kr.rms_norm_ref(a, b, 1e-5), x, w, dy)
    got = _grads(lambda a, b: kr.rms_norm(a, b, 1e-5), x, w, dy)
    for g, r in zip(got[:2], want[:2]):
        torch.testing.assert_close(g.float(), r.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got[2], want[2], atol=1e-1, rtol=1e-2)  # sum of 4096 rows of bf16 products


def test_rmsnorm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match=r"weight \(7,\)"):
        kr.rms_norm(torch.randn(2, 8, device=DEV), torch.ones(7, device=DEV))
