"""RMSNorm forward and backward in Triton (Zhang & Sennrich 2019), beside the plain reference.

    y  = x · r · g,          r = 1 / sqrt(mean(x²) + eps)     (per row, fp32)
    dx = r · (dy·g - x̂ · mean(dy·g·x̂)),   x̂ = x · r
    dg = Σ_rows dy · x̂

The forward saves only x and r (one fp32 per row); the backward recomputes x̂. Each backward program walks
a contiguous run of rows and keeps its partial dg in registers, so the weight gradient costs one (P, D)
fp32 write and a sum over P programs instead of an atomic add per row. Statistics are fp32 whatever the
input dtype; the output has the input's dtype, as lmforge.model.layers.norm.RMSNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.kernels.decode import available, falls_back, triton
from lmforge.model.layers.norm import RMSNorm

if triton is not None:
    import triton.language as tl

__all__ = ["available", "rms_norm", "rms_norm_ref", "FusedRMSNorm"]


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The definition (RMSNorm.forward): fp32 statistics, cast back to x's dtype."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


if triton is not None:

    @triton.jit
    def _fwd_kernel(x_ptr, w_ptr, y_ptr, r_ptr, M, D, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        m = (rows[:, None] < M) & (cols[None, :] < D)
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        tl.store(y_ptr + offs, (x * r[:, None] * w[None, :]).to(y_ptr.dtype.element_ty), mask=m)
        tl.store(r_ptr + rows, r, mask=rows < M)

    @triton.jit
    def _bwd_kernel(dy_ptr, x_ptr, w_ptr, r_ptr, dx_ptr, dw_ptr, M, D, rows_per_prog,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        first = pid * rows_per_prog
        last = tl.minimum(first + rows_per_prog, M)
        for r0 in range(first, last, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)
            m = (rows[:, None] < last) & (cols[None, :] < D)
            offs = rows[:, None].to(tl.int64) * D + cols[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + rows, mask=rows < last, other=0.0)
            xh = x * r[:, None]
            wdy = dy * w[None, :]
            c = tl.sum(xh * wdy, 1) / D
            tl.store(dx_ptr + offs, ((wdy - xh * c[:, None]) * r[:, None]).to(dx_ptr.dtype.element_ty), mask=m)
            dw += tl.sum(dy * xh, 0)
        tl.store(dw_ptr + pid * D + cols, dw, mask=cols < D)


def _blocks(D: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_D >= D, warps): about 4k elements per program - one row of d=4096, 32 of hd=128."""
    block_d = triton.next_power_of_2(D)
    block_m = max(1, min(64, 4096 // block_d))
    return block_m, block_d, 4 if block_d <= 1024 else 8


MAX_DIM = 65536  # one row per program in registers/shared memory; wider rows need a two-pass kernel

# backward programs: a few per SM of an H100/H200 (132 SMs); a constant rather than a device query, which
# torch.compile would have to trace
_BWD_PROGRAMS = 528


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        D = x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        M = x2.shape[0]
        y = torch.empty_like(x2)
        r = torch.empty(M, device=x.device, dtype=torch.float32)
        bm, bd, warps = _blocks(D)
        _fwd_kernel[(triton.cdiv(M, bm),)](x2, weight, y, r, M, D, eps, BLOCK_M=bm, BLOCK_D=bd, num_warps=warps)
        ctx.save_for_backward(x2, weight, r)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, r = ctx.saved_tensors
        M, D = x2.shape
        dy2 = dy.reshape(M, D).contiguous()
        dx = torch.empty_like(x2)
        bm, bd, warps = _blocks(D)
        rows_per_prog = triton.cdiv(triton.cdiv(M, _BWD_PROGRAMS), bm) * bm
        P = triton.cdiv(M, rows_per_prog) if M else 1
        dw = torch.zeros(P, D, device=x2.device, dtype=torch.float32)
        if M:
            _bwd_kernel[(P,)](dy2, x2, weight, r, dx, dw, M, D, rows_per_prog, BLOCK_M=bm, BLOCK_D=bd,
                              num_warps=warps)
        return dx.view(ctx.shape), dw.sum(0).to(weight.dtype), None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D) in x's dtype; differentiable in x and weight."""
    if weight.shape != (x.shape[-1],) or not 0 < x.shape[-1] <= MAX_DIM:
        raise ValueError(f"fused RMSNorm takes x (..., D) with 0 < D <= {MAX_DIM} and weight (D,); got x "
                         f"{tuple(x.shape)}, weight {tuple(weight.shape)}: use lmforge.model.layers.norm.RMSNorm for "
                         "other shapes")
    if falls_back(x.device, "fused RMSNorm"):
        return rms_norm_ref(x, weight, eps)
    return _RMSNormFn.apply(x, weight.contiguous(), eps)  # the kernels read the weight as one contiguous row


class FusedRMSNorm(RMSNorm):
    """RMSNorm computed by the Triton kernels; same parameters and state-dict names
    (lmforge.kernels.apply_fused_kernels swaps it in). An offset norm's gain (offset + w) reaches the kernels
    as one fp32 row, its gradient flowing back to w through the add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.gain(), self.eps)
