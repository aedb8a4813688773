"""Rotary position embedding forward and backward in Triton, both channel layouts of
lmforge.model.layers.rope (whose apply_rope is the reference):

    'half'         pairs (j, j + hd/2)   (GPT-NeoX, Llama, HF)
    'interleaved'  pairs (2j, 2j + 1)    (RoFormer, GPT-J)

    forward   (y1, y2) = (x1·c - x2·s,  x1·s + x2·c)
    backward  the rotation's transpose, i.e. by -angle: (dx1, dx2) = (dy1·c + dy2·s, -dy1·s + dy2·c)

One program rotates BLOCK_H heads of one (batch, position), so the position's cos/sin row is read once for
all of them. q/k arrive as (B, H, T, hd) views of a (B, T, H, hd) projection; the kernel takes their
strides (last dim contiguous), so no copy is made. Angles are fp32 tables (RotaryEmbedding.cos_sin).
"""

from __future__ import annotations

import torch

from lmforge.kernels.decode import available, falls_back, triton
from lmforge.model.layers.rope import apply_rope

if triton is not None:
    import triton.language as tl

__all__ = ["available", "rope", "rope_ref"]

rope_ref = apply_rope  # x (B, H, T, hd), cos/sin (B, T, hd/2), layout -> rotated x (fp32 inside)


if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, H, T, sxb, sxh, sxt, syb, syh, syt, scb, sct,
                     SIGN: tl.constexpr, INTERLEAVED: tl.constexpr, HALF: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_J: tl.constexpr):
        bt = tl.program_id(0)
        b, t = bt // T, bt % T
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        j = tl.arange(0, BLOCK_J)
        jm = j < HALF
        c = tl.load(cos_ptr + b * scb + t * sct + j, mask=jm, other=0.0)
        s = tl.load(sin_ptr + b * scb + t * sct + j, mask=jm, other=0.0) * SIGN
        if INTERLEAVED:
            o1, o2 = 2 * j, 2 * j + 1
        else:
            o1, o2 = j, j + HALF
        m = (heads[:, None] < H) & jm[None, :]
        xrow = x_ptr + b.to(tl.int64) * sxb + t.to(tl.int64) * sxt + heads[:, None].to(tl.int64) * sxh
        yrow = y_ptr + b.to(tl.int64) * syb + t.to(tl.int64) * syt + heads[:, None].to(tl.int64) * syh
        x1 = tl.load(xrow + o1[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xrow + o2[None, :], mask=m, other=0.0).to(tl.float32)
        ty = y_ptr.dtype.element_ty
        tl.store(yrow + o1[None, :], (x1 * c[None, :] - x2 * s[None, :]).to(ty), mask=m)
        tl.store(yrow + o2[None, :], (x1 * s[None, :] + x2 * c[None, :]).to(ty), mask=m)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str, sign: float) -> torch.Tensor:
    B, H, T, hd = x.shape
    if x.numel() == 0:  # no heads or positions: nothing to launch
        return torch.empty_like(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty_like(x)  # same strides as x where x is dense (the usual transposed view)
    if y.stride(-1) != 1:
        y = torch.empty(B, H, T, hd, device=x.device, dtype=x.dtype)
    cos, sin = cos.expand(B, T, hd // 2).float(), sin.expand(B, T, hd // 2).float()
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    block_h = min(triton.next_power_of_2(H), 16)
    _rope_kernel[(B * T, triton.cdiv(H, block_h))](
        x, cos, sin, y, H, T, *(x.stride(i) for i in range(3)), *(y.stride(i) for i in range(3)),
        cos.stride(0), cos.stride(1), SIGN=sign, INTERLEAVED=layout == "interleaved", HALF=hd // 2,
        BLOCK_H=block_h, BLOCK_J=triton.next_power_of_2(hd // 2), num_warps=4)
    return y


class _RopeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, layout: str):
        ctx.save_for_backward(cos, sin)
        ctx.layout = layout
        return _rotate(x, cos, sin, layout, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate(dy, cos, sin, ctx.layout, -1.0), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """Drop-in for apply_rope: x (B, H, T, hd), cos/sin (B, T, hd/2) fp32 -> rotated x in x's dtype;
    differentiable in x (the angles are constants)."""
    if layout not in ("half", "interleaved"):
        raise ValueError(f"unknown rope layout {layout!r}: 'half' or 'interleaved'")
    if x.dim() != 4 or x.shape[-1] % 2 or cos.shape[-1] != x.shape[-1] // 2:
        raise ValueError(f"fused RoPE takes x (B, H, T, hd) with an even head dim and cos/sin (B, T, hd/2); got x "
                         f"{tuple(x.shape)}, cos {tuple(cos.shape)}")
    if falls_back(x.device, "fused RoPE"):
        return rope_ref(x, cos, sin, layout)
    return _RopeFn.apply(x, cos, sin, layout)
