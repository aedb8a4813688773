"""bench/decode_mlp.py's prototypes: the decode-step MLP in one launch - gate/up + SwiGLU + down with atomic adds into
rotating residual buffers (W_down as stored and transposed), and the ticketed launch (gate/up units, then down
units that wait for them on a counter) - equals the kernel step's two kernels over a chain of layers (Triton's
interpreter on CPU; the GPU timing is the bench's)."""

import pytest
import torch

from bench import decode_mlp as M
from lmforge.kernels import decode as kd

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kd.available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def test_fused_mlp_equals_two_kernels_over_layers():
    torch.manual_seed(0)
    layers = M.build(3, 64, 80, torch.bfloat16, DEV)  # d_ff not a multiple of the row block
    x0 = torch.randn(64, device=DEV)
    # few programs per launch (the interpreter runs them one by one): row blocks of 32 and 64 (80 rows: a partial
    # last block), two column steps (32 of 64) and one; the reference's configs are candidates of the kernel step's
    variants = [M.fused_variant(False, (32, 32, 32, 4)), M.fused_variant(True, (32, 32, 32, 4)),
                M.fused_variant(True, (64, 64, 16, 4)), M.flow_variant((32, 16, 32, 4)), M.flow_variant((8, 16, 64, 4))]
    assert M.check(layers, x0, variants, kd.GEMV_CONFIGS[4], kd.ADD_CONFIGS[10]) < 1e-5
    # and against the plain definition, one layer: x + W_d (silu(W_g x̂) * W_u x̂), h rounded to bf16 (a sum
    # order different from the reference's can flip one bf16 ulp of h: ~4e-3 here, in both kernel paths)
    p = layers[0]
    xn = (x0 * torch.rsqrt(x0.square().mean() + 1e-5) * p["g"].float())
    gate, up = p["wg"].float() @ xn, p["wu"].float() @ xn
    want = x0 + p["wd"].float() @ (torch.nn.functional.silu(gate) * up).to(torch.bfloat16).float()
    R = [x0.clone(), torch.zeros_like(x0), torch.full_like(x0, 7.0)]
    got = M.run_fused(layers[:1], R, True, (32, 32, 32, 4))
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert torch.equal(R[2], torch.zeros_like(x0))  # the buffer two layers on is zeroed for the next launch
    sync = torch.zeros(2, dtype=torch.int32, device=DEV)
    got = M.run_flow(layers[:1], x0.clone(), torch.empty(80, device=DEV, dtype=torch.bfloat16), sync, (32, 16, 32, 4))
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert sync.tolist() == [3 + 4, 3]  # every unit took a ticket; every gate/up unit counted itself done
