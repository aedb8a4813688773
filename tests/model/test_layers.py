"""Each spine layer against a plain-math reference on random inputs (fp32, tight tolerance)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.layers.attention import attention, math_attention
from lmforge.model.layers.mlp import MLP
from lmforge.model.layers.norm import LayerNorm, RMSNorm
from lmforge.model.layers.position import SinusoidalPositions
from lmforge.model.layers.rope import RotaryEmbedding, apply_rope


def test_rmsnorm_matches_formula():
    x = torch.randn(3, 5, 16)
    n = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        n.weight.copy_(torch.randn(16))
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_matches_formula(bias):
    x = torch.randn(4, 7, 12)
    n = LayerNorm(12, eps=1e-5, bias=bias)
    with torch.no_grad():
        n.weight.copy_(torch.randn(12))
        if bias:
            n.bias.copy_(torch.randn(12))
    mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + 1e-5) * n.weight + (n.bias if bias else 0)
    torch.testing.assert_close(n(x), ref, rtol=1e-5, atol=1e-5)


def _rope_complex(x, positions, theta, layout):
    """Reference: RoPE as multiplication of complex numbers z_i · e^{i·pos·θ_i}."""
    hd = x.shape[-1]
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = positions.double()[:, None, :, None] * freqs  # (B, 1, T, hd/2)
    xd = x.double()
    if layout == "half":
        z = torch.complex(xd[..., : hd // 2], xd[..., hd // 2:])
        r = z * torch.polar(torch.ones_like(ang), ang)
        return torch.cat([r.real, r.imag], -1).float()
    z = torch.complex(xd[..., 0::2], xd[..., 1::2])
    r = z * torch.polar(torch.ones_like(ang), ang)
    return torch.stack([r.real, r.imag], -1).flatten(-2).float()


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_matches_complex_rotation(layout):
    B, H, T, hd = 2, 3, 9, 8
    x = torch.randn(B, H, T, hd)
    pos = torch.stack([torch.arange(T), torch.arange(5, 5 + T)])
    rope = RotaryEmbedding(hd, theta=500.0, layout=layout)
    out = apply_rope(x, *rope.cos_sin(pos), layout)
    torch.testing.assert_close(out, _rope_complex(x, pos, 500.0, layout), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    hd = 16
    rope = RotaryEmbedding(hd)
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)

    def score(i, j):
        qi = apply_rope(q, *rope.cos_sin(torch.tensor([[i]])))
        kj = apply_rope(k, *rope.cos_sin(torch.tensor([[j]])))
        return float((qi * kj).sum())

    assert score(3, 1) == pytest.approx(score(10, 8), abs=1e-4)
    assert score(0, 0) == pytest.approx(float((q * k).sum()), abs=1e-5)


def test_sinusoidal_table_matches_formula():
    pe = SinusoidalPositions(50, 10)(torch.arange(50)[None])[0]
    p, i = 17, 3
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(p / 10000 ** (2 * i / 10)), abs=1e-6)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(p / 10000 ** (2 * i / 10)), abs=1e-6)


REF_ACT = {
    "relu": lambda x: x.clamp(min=0),
    "gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
    "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x / (1 + torch.exp(-x)),
    "relu2": lambda x: x.clamp(min=0) ** 2,
}


@pytest.mark.parametrize("act", ["relu", "gelu", "gelu_tanh", "silu", "relu2", "swiglu", "geglu"])
def test_mlp_matches_formula(act):
    m = MLP(8, 24, act, bias=True)
    x = torch.randn(2, 5, 8)
    up = x @ m.up.weight.T + m.up.bias
    if act in ("swiglu", "geglu"):
        gate = x @ m.gate.weight.T + m.gate.bias
        h = REF_ACT["silu" if act == "swiglu" else "gelu"](gate) * up
    else:
        h = REF_ACT[act](up)
    ref = h @ m.down.weight.T + m.down.bias
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)


def _naive_attention(q, k, v, offset, softcap=0.0):
    """Loop over query positions: softmax over keys 0..offset+i, in float64."""
    B, H, T, hd = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    out = torch.zeros(B, H, T, hd, dtype=torch.float64)
    for i in range(T):
        s = (q[:, :, i: i + 1].double() @ k[:, :, : offset + i + 1].transpose(-1, -2)) / math.sqrt(hd)
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        out[:, :, i: i + 1] = torch.softmax(s, -1) @ v[:, :, : offset + i + 1]
    return out.float()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("offset", [0, 5])  # prefill from empty, or new queries after cached keys
@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_attention_matches_naive(kv_heads, offset, impl):
    B, H, T, hd = 2, 4, 6, 8
    q = torch.randn(B, H, T, hd)
    k, v = torch.randn(B, kv_heads, offset + T, hd), torch.randn(B, kv_heads, offset + T, hd)
    out = attention(q, k, v, "causal", scale=1 / math.sqrt(hd), impl=impl)
    torch.testing.assert_close(out, _naive_attention(q, k, v, offset), rtol=1e-5, atol=1e-5)


def test_attention_softcap_and_explicit_mask():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out = math_attention(q, k, v, "causal", scale=1 / math.sqrt(8), softcap=2.0)
    torch.testing.assert_close(out, _naive_attention(q, k, v, 0, softcap=2.0), rtol=1e-5, atol=1e-5)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(attention(q, k, v, mask, scale=0.3), attention(q, k, v, "causal", scale=0.3))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(math_attention(q, k, v, mask, scale=0.3), ref, rtol=1e-5, atol=1e-6)


def test_rope_tables_equal_the_formula_and_grow_past_max_seq_len():
    rope = RotaryEmbedding(16, 500.0, max_seq_len=8)
    pos = torch.tensor([[0, 3, 7, 20]])  # 20 is past the table: it grows
    cos, sin = rope.cos_sin(pos)
    angles = pos.double()[..., None] * (1.0 / 500.0 ** (torch.arange(0, 16, 2).double() / 16))
    torch.testing.assert_close(cos.double(), angles.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), angles.sin(), atol=1e-6, rtol=0)
    assert rope.cos_table.shape[0] >= 21
    rope = rope.to(torch.bfloat16)  # a bf16 model keeps fp32 angles and tables
    assert rope.cos_table.dtype == rope.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rope.cos_sin(pos)[0].double(), angles.cos(), atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [RMSNorm, LayerNorm])
def test_norms_one_launch_on_cuda_equal_the_fp32_upcast_reference(cls):
    """On CUDA with input and weight in one dtype the norms call PyTorch's kernel directly (fp32 inside):
    outputs and gradients equal the explicit upcast-then-cast path to bf16 rounding."""
    torch.manual_seed(0)
    norm = cls(256).cuda().to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    b = norm.bias.float() if getattr(norm, "bias", None) is not None else None
    ref = (F.rms_norm(ref_x.float(), (256,), norm.weight.float(), norm.eps) if cls is RMSNorm else
           F.layer_norm(ref_x.float(), (256,), norm.weight.float(), b, norm.eps)).to(torch.bfloat16)
    out = norm(x)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, atol=3e-2, rtol=3e-2)
