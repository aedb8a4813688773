"""SwiGLU's gated activation h = silu(gate) · up (Shazeer 2020) forward and backward in Triton.

    forward   h  = g·σ(g) · u
    backward  dg = dh · u · σ(g)·(1 + g·(1 - σ(g))),   du = dh · g·σ(g)

The backward recomputes σ(g) from the saved inputs instead of saving silu(g) (one fewer activation of
the MLP's widest shape kept for backward). gate and up may be the two halves of one fused gate_up output:
the kernel takes row strides, so they are read in place. Reference: lmforge.model.layers.mlp.glu("swiglu").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.kernels.decode import available, falls_back, triton
from lmforge.model.layers.mlp import MLP

if triton is not None:
    import triton.language as tl

__all__ = ["available", "swiglu", "swiglu_ref", "FusedSwiGLUMLP"]


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _swiglu_kernel(g_ptr, u_ptr, dh_ptr, h_ptr, dg_ptr, du_ptr, N, s_g, s_u, s_dh, s_h, s_dg, s_du, u_off,
                       du_off, BACKWARD: tl.constexpr, BLOCK: tl.constexpr, DU_IN_DG: tl.constexpr):
        """u_off / du_off: where up and dup start in their tensors (columns; nonzero when they are the second
        half of the same tensor as gate / dgate). DU_IN_DG: dup is written into dg_ptr's tensor at du_off (du_ptr
        unused), so the kernel writes through one pointer only."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < N
        g = tl.load(g_ptr + row * s_g + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + u_off + row * s_u + cols, mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        if BACKWARD:
            dh = tl.load(dh_ptr + row * s_dh + cols, mask=m, other=0.0).to(tl.float32)
            dg = dh * u * sig * (1.0 + g * (1.0 - sig))
            tl.store(dg_ptr + row * s_dg + cols, dg.to(dg_ptr.dtype.element_ty), mask=m)
            du = dh * g * sig
            if DU_IN_DG:
                tl.store(dg_ptr + du_off + row * s_dg + cols, du.to(dg_ptr.dtype.element_ty), mask=m)
            else:
                tl.store(du_ptr + du_off + row * s_du + cols, du.to(du_ptr.dtype.element_ty), mask=m)
        else:
            tl.store(h_ptr + row * s_h + cols, (g * sig * u).to(h_ptr.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> a (M, N) view with unit column stride (copying only if there is none)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(g2, u2, dh2, h2, dg2, du2, backward: bool, n: int | None = None, u_off: int = 0,
            du_off: int = 0) -> None:
    """Rows of 2-D tensors with unit column stride; n columns (g2's by default). up and dup may be the
    second halves of gate's and dgate's own tensors: pass those whole, with the column offsets u_off / du_off
    (a kernel that writes into views of one tensor is copied around by torch.compile's functionalization).
    The kernel is handed each tensor it writes once (dup into dgate's own tensor through one pointer: a tensor
    passed as two written arguments is cloned for one of them under torch.compile); arguments it does not use
    get a tensor it only reads."""
    M, N = g2.shape[0], n or g2.shape[1]
    block = min(triton.next_power_of_2(N), 2048)
    t = lambda a: a.stride(0) if a is not None else 0  # noqa: E731
    same = backward and du2 is dg2
    _swiglu_kernel[(M, triton.cdiv(N, block))](
        g2, u2, dh2 if backward else g2, h2 if not backward else g2, dg2 if backward else g2,
        du2 if backward and not same else g2, N, t(g2), t(u2), t(dh2), t(h2), t(dg2), t(du2), u_off, du_off,
        BACKWARD=backward, BLOCK=block, DU_IN_DG=same, num_warps=4 if block <= 1024 else 8)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        g2, u2 = _rows(gate), _rows(up)
        h = torch.empty(g2.shape, device=gate.device, dtype=torch.promote_types(gate.dtype, up.dtype))
        if h.numel():
            _launch(g2, u2, None, h, None, None, backward=False)
        ctx.save_for_backward(g2, u2)
        ctx.shape, ctx.dtypes = gate.shape, (gate.dtype, up.dtype)
        return h.view(gate.shape)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        M, N = g2.shape
        dg = torch.empty(M, N, device=g2.device, dtype=ctx.dtypes[0])
        du = torch.empty(M, N, device=g2.device, dtype=ctx.dtypes[1])
        if dg.numel():
            _launch(g2, u2, _rows(dh), None, dg, du, backward=True)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up, computed in fp32 and stored in the inputs' (promoted) dtype; differentiable. gate and up
    have one shape (no broadcasting: the kernel reads both row by row)."""
    if gate.shape != up.shape:
        raise ValueError(f"fused SwiGLU takes gate and up of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}; "
                         "use lmforge.kernels.swiglu.swiglu_ref (F.silu(gate) * up) to broadcast")
    if falls_back(gate.device, "fused SwiGLU"):
        return swiglu_ref(gate, up)
    return _SwiGLUFn.apply(gate, up)


class FusedSwiGLUMLP(MLP):
    """MLP whose SwiGLU activation runs in the Triton kernel; same submodules and state-dict names
    (lmforge.kernels.apply_fused_kernels swaps it in for activation == 'swiglu')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            h = swiglu(*self.gate_up(x).chunk(2, dim=-1))
        else:
            h = swiglu(self.gate(x), self.up(x))
        return self.dropout(self.down(h))
