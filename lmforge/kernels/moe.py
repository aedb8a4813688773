"""Dropless MoE training kernels (MegaBlocks-style, Gale et al. 2023): grouped GEMM in Triton, forward and
backward, over variable-sized expert groups - no padding to a capacity, no token dropped, no host sync.

The assignments (token, expert) are sorted by expert, so expert e owns rows [o_e, o_e + n_e) of the
permuted activations X (M = N·k rows). One projection of every expert is then one launch:

    forward   Y[g_e]  = X[g_e] W_e^T          W (E, out, in)
    backward  dX[g_e] = dY[g_e] W_e           (the same kernel, W read untransposed)
              dW_e    = dY[g_e]^T X[g_e]      (one reduction over the group's rows per output tile)

Row tiles never straddle two experts: expert e gets ceil(n_e / BM) tiles, so the launch has at most
ceil(M / BM) + E row tiles; each program finds its expert by scanning the E counts on the GPU (the
counts never visit the host, unlike a tile list built in Python). `grouped_mm` is model.moe.gemm='triton';
its reference is lmforge.model.layers.moe.grouped_mm_loop.

TritonMoE (swapped in by lmforge.kernels.apply_fused_kernels) keeps MoE's dropless dispatch and runs its
other steps as Triton kernels: the routing after the router's matmul (softmax or sigmoid, + bias, top-k,
renormalisation: one kernel forward and one backward where PyTorch launches ~8 each), the un-permutation
with the router weighting (one gather pass, no atomics), the gather's backward (the same kernel with unit
weights), and SwiGLU on the fused [gate | up] rows straight into one fused gradient. gemm 'auto' (MoE's)
is torch._grouped_mm where that runs CUTLASS without a host sync (sm90/sm100, bf16; and CPU), else the Triton
grouped GEMM on a GPU. The per-expert loop stays the reference.
"""

from __future__ import annotations

import torch

from lmforge.kernels.decode import available, falls_back, interpreting, triton
from lmforge.kernels.swiglu import _launch as _swiglu_launch
from lmforge.model.layers.moe import MoE, glu_fused, grouped_mm_loop

if triton is not None:
    import triton.language as tl

__all__ = ["available", "grouped_mm", "grouped_mm_trusted", "TritonMoE"]


def _configs(names: tuple[str, str, str]) -> list:
    """Autotuning candidates for bf16 on Hopper (one small config in the CPU interpreter)."""
    if interpreting():
        return [triton.Config(dict(zip(names, (16, 16, 16))), num_warps=1)]
    shapes = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]  # few: each is compiled and timed per new shape
    return [triton.Config(dict(zip(names, s[:3])), num_warps=s[3], num_stages=s[4]) for s in shapes]


if triton is not None:

    @triton.autotune(configs=_configs(("BM", "BN", "BK")), key=["N", "K", "s_bk"])
    @triton.jit
    def _gmm_kernel(a_ptr, b_ptr, c_ptr, counts_ptr, M, N, K, E, s_am, s_be, s_bk, s_bn, s_cm,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                    PRECISION: tl.constexpr):
        """C[g_e] = A[g_e] @ B_e, B_e[k, n] at b_ptr + e·s_be + k·s_bk + n·s_bn; A, C row-major."""
        # programs sweep all column tiles of GROUP_M row tiles before moving on, so those rows of A stay
        # in L2 while they are reused (row-major order would re-read all of A once per column tile)
        n_m, n_n = tl.cdiv(M, BM) + E, tl.cdiv(N, BN)
        pid = tl.program_id(0)
        first_m = (pid // (GROUP_M * n_n)) * GROUP_M
        group_m = tl.minimum(n_m - first_m, GROUP_M)
        tile = first_m + (pid % (GROUP_M * n_n)) % group_m
        tile_n = (pid % (GROUP_M * n_n)) // group_m
        expert, row0, row_end = -1, 0, 0
        seen, start = 0, 0
        for e in range(E):  # which expert owns row tile `tile`: tiles are numbered expert by expert
            cnt = tl.load(counts_ptr + e)
            nt = tl.cdiv(cnt, BM)
            hit = (tile >= seen) & (tile < seen + nt)
            expert = tl.where(hit, e, expert)
            row0 = tl.where(hit, start + (tile - seen) * BM, row0)
            row_end = tl.where(hit, start + cnt, row_end)
            seen += nt
            start += cnt
        if expert >= 0:
            rows = row0 + tl.arange(0, BM)
            cols = tile_n * BN + tl.arange(0, BN)
            kk = tl.arange(0, BK)
            a_rows = a_ptr + rows[:, None].to(tl.int64) * s_am
            b_base = b_ptr + expert.to(tl.int64) * s_be + cols[None, :] * s_bn
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for k0 in range(0, K, BK):
                a = tl.load(a_rows + (k0 + kk)[None, :], mask=(rows[:, None] < row_end) & (k0 + kk[None, :] < K),
                            other=0.0)
                b = tl.load(b_base + (k0 + kk)[:, None] * s_bk, mask=(k0 + kk[:, None] < K) & (cols[None, :] < N),
                            other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
            tl.store(c_ptr + rows[:, None].to(tl.int64) * s_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                     mask=(rows[:, None] < row_end) & (cols[None, :] < N))

    @triton.autotune(configs=_configs(("BO", "BI", "BR")), key=["OUT", "IN"])
    @triton.jit
    def _gmm_wgrad_kernel(x_ptr, dy_ptr, dw_ptr, counts_ptr, OUT, IN, E, s_x, s_dy,
                          BO: tl.constexpr, BI: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr):
        """dW[e] (OUT, IN) = dY[g_e]^T X[g_e]: program (e, out tile) x (in tile) sums over the group's rows."""
        n_o = tl.cdiv(OUT, BO)
        e = tl.program_id(0) // n_o
        o = (tl.program_id(0) % n_o) * BO + tl.arange(0, BO)
        i = tl.program_id(1) * BI + tl.arange(0, BI)
        start = 0
        for j in range(e):
            start += tl.load(counts_ptr + j)
        end = start + tl.load(counts_ptr + e)
        r = tl.arange(0, BR)
        acc = tl.zeros([BO, BI], dtype=tl.float32)
        for r0 in range(start, end, BR):
            rr = r0 + r
            dyt = tl.load(dy_ptr + rr[None, :].to(tl.int64) * s_dy + o[:, None],
                          mask=(rr[None, :] < end) & (o[:, None] < OUT), other=0.0)  # (BO, BR): dY^T
            x = tl.load(x_ptr + rr[:, None].to(tl.int64) * s_x + i[None, :],
                        mask=(rr[:, None] < end) & (i[None, :] < IN), other=0.0)
            acc = tl.dot(dyt, x, acc, input_precision=PRECISION)
        tl.store(dw_ptr + e.to(tl.int64) * OUT * IN + o[:, None] * IN + i[None, :],
                 acc.to(dw_ptr.dtype.element_ty), mask=(o[:, None] < OUT) & (i[None, :] < IN))

    @triton.jit
    def _combine_kernel(y_ptr, w_ptr, inv_ptr, out_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
        """out[t] = Σ_j w[t, j] · y[inv[t·K + j]]: un-permute and router weighting in one pass over y."""
        t = tl.program_id(0).to(tl.int64)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for j in tl.static_range(K):
                row = tl.load(inv_ptr + t * K + j)
                yj = tl.load(y_ptr + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
                acc += tl.load(w_ptr + t * K + j) * yj
            tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=cols < D)

    @triton.jit
    def _combine_bwd_kernel(g_ptr, y_ptr, w_ptr, inv_ptr, dy_ptr, dw_ptr, D, K: tl.constexpr, BLOCK_D: tl.constexpr):
        """dy[inv[t·K + j]] = w[t, j] · g[t] (each row of dy written once: no atomics); dw[t, j] = <g[t], y[...]>."""
        t = tl.program_id(0).to(tl.int64)
        for j in tl.static_range(K):
            row = tl.load(inv_ptr + t * K + j)
            wj = tl.load(w_ptr + t * K + j)
            dot = tl.zeros([BLOCK_D], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                g = tl.load(g_ptr + t * D + cols, mask=cols < D, other=0.0).to(tl.float32)
                y = tl.load(y_ptr + row * D + cols, mask=cols < D, other=0.0).to(tl.float32)
                tl.store(dy_ptr + row * D + cols, (wj * g).to(dy_ptr.dtype.element_ty), mask=cols < D)
                dot += g * y
            tl.store(dw_ptr + t * K + j, tl.sum(dot, 0))


if triton is not None:
    @triton.jit
    def _route_kernel(x_ptr, bias_ptr, idx_ptr, w_ptr, s_ptr, N, E, scale, K: tl.constexpr, KP: tl.constexpr,
                      SOFTMAX: tl.constexpr, NORM: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr):
        """Rows of the router logits x (N, E) -> scores s (softmax or sigmoid, fp32), the top-K ids of s + bias
        (the lowest id on a tie), and their scores, renormalised to sum to one (NORM) and scaled."""
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        cols = tl.arange(0, BE)
        kk = tl.arange(0, KP)
        inside = (rows[:, None] < N) & (cols[None, :] < E)
        offs = rows[:, None].to(tl.int64) * E + cols[None, :]
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        x = tl.where(cols[None, :] < E, x, -float("inf"))  # padded experts out (padded rows stay finite)
        if SOFTMAX:
            p = tl.exp(x - tl.max(x, 1)[:, None])
            s = p / tl.sum(p, 1)[:, None]
        else:
            s = tl.sigmoid(x)
        tl.store(s_ptr + offs, s, mask=inside)
        bias = tl.load(bias_ptr + cols, mask=cols < E, other=0.0)
        choice = tl.where(cols[None, :] < E, s + bias[None, :], -float("inf"))
        ids = tl.zeros([BN, KP], dtype=tl.int64)
        w = tl.zeros([BN, KP], dtype=tl.float32)
        for j in tl.static_range(K):
            best = tl.max(choice, 1)
            pick = tl.min(tl.where(choice == best[:, None], cols[None, :], BE), 1)
            hit = cols[None, :] == pick[:, None]
            ids = tl.where(kk[None, :] == j, pick[:, None].to(tl.int64), ids)
            w = tl.where(kk[None, :] == j, tl.sum(tl.where(hit, s, 0.0), 1)[:, None], w)
            choice = tl.where(hit, -float("inf"), choice)
        if NORM:
            w = w / (tl.sum(w, 1)[:, None] + 1e-20)
        out = rows[:, None].to(tl.int64) * K + kk[None, :]
        kept = (rows[:, None] < N) & (kk[None, :] < K)
        tl.store(idx_ptr + out, ids, mask=kept)
        tl.store(w_ptr + out, w * scale, mask=kept)

    @triton.jit
    def _route_bwd_kernel(s_ptr, idx_ptr, dw_ptr, ds_ptr, dx_ptr, N, E, scale, HAS_DW: tl.constexpr,
                          HAS_DS: tl.constexpr, K: tl.constexpr, SOFTMAX: tl.constexpr, NORM: tl.constexpr,
                          BN: tl.constexpr, BE: tl.constexpr):
        """dx (N, E) from the gradients of the scores (ds: the balancing losses) and of the chosen weights (dw):
        with S = Σ_chosen s, w_c = scale·s_c/S gives ds_m += scale·(dw_m - Σ_c dw_c s_c/S)/S for chosen m
        (scale·dw_m without NORM); then through the softmax (s·(ds - Σ s·ds)) or the sigmoid (ds·s·(1 - s))."""
        rows = tl.program_id(0) * BN + tl.arange(0, BN)
        cols = tl.arange(0, BE)
        inside = (rows[:, None] < N) & (cols[None, :] < E)
        offs = rows[:, None].to(tl.int64) * E + cols[None, :]
        s = tl.load(s_ptr + offs, mask=inside, other=0.0)
        if HAS_DS:
            ds = tl.load(ds_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        else:
            ds = tl.zeros([BN, BE], dtype=tl.float32)
        if HAS_DW:
            r64 = rows.to(tl.int64) * K
            total = tl.zeros([BN], dtype=tl.float32)
            dot = tl.zeros([BN], dtype=tl.float32)
            for j in tl.static_range(K):
                idj = tl.load(idx_ptr + r64 + j, mask=rows < N, other=-1)
                sj = tl.sum(tl.where(cols[None, :] == idj[:, None], s, 0.0), 1)
                total += sj
                dot += tl.load(dw_ptr + r64 + j, mask=rows < N, other=0.0).to(tl.float32) * sj
            total += 1e-20
            for j in tl.static_range(K):
                idj = tl.load(idx_ptr + r64 + j, mask=rows < N, other=-1)
                dwj = tl.load(dw_ptr + r64 + j, mask=rows < N, other=0.0).to(tl.float32)
                if NORM:
                    dsj = scale * (dwj - dot / total) / total
                else:
                    dsj = scale * dwj
                ds += tl.where(cols[None, :] == idj[:, None], dsj[:, None], 0.0)
        if SOFTMAX:
            dx = s * (ds - tl.sum(s * ds, 1)[:, None])
        else:
            dx = ds * s * (1.0 - s)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=inside)


def _precision(t: torch.Tensor) -> str:
    """fp32 operands multiply in full fp32 ("ieee"), as torch's matmul does by default, not TF32."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _gmm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """a (M, K) grouped by counts, b (E, K, N) any strides -> (M, N) = a[g_e] @ b[e]."""
    M, K = a.shape
    E, _, N = b.shape
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    if M == 0:
        return c
    grid = lambda meta: ((triton.cdiv(M, meta["BM"]) + E) * triton.cdiv(N, meta["BN"]),)  # noqa: E731
    _gmm_kernel[grid](a, b, c, counts, M, N, K, E, a.stride(0), b.stride(0), b.stride(1), b.stride(2), c.stride(0),
                      GROUP_M=8, PRECISION=_precision(a))
    return c


def _gmm_wgrad(x: torch.Tensor, dy: torch.Tensor, counts: torch.Tensor, E: int, dtype: torch.dtype) -> torch.Tensor:
    """x (M, IN), dy (M, OUT) grouped by counts -> (E, OUT, IN); experts without rows get zeros."""
    OUT, IN = dy.shape[1], x.shape[1]
    dw = torch.empty(E, OUT, IN, device=x.device, dtype=dtype)
    grid = lambda meta: (E * triton.cdiv(OUT, meta["BO"]), triton.cdiv(IN, meta["BI"]))  # noqa: E731
    _gmm_wgrad_kernel[grid](x, dy, dw, counts, OUT, IN, E, x.stride(0), dy.stride(0), PRECISION=_precision(x))
    return dw


def grouped_mm_trusted(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """grouped_mm for counts that sum to x's rows by construction (the MoE layer's, model.moe.gemm='triton')."""
    return grouped_mm(x, w, counts, check_counts=False)


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts):
        ctx.save_for_backward(x, w, counts)
        return _gmm(x, w.transpose(1, 2), counts)  # B_e = W_e^T, read through strides

    @staticmethod
    def backward(ctx, dy):
        x, w, counts = ctx.saved_tensors
        dy = dy.contiguous()
        dx = _gmm(dy, w, counts) if ctx.needs_input_grad[0] else None
        dw = _gmm_wgrad(x, dy, counts, w.shape[0], w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, check_counts: bool = True) -> torch.Tensor:
    """x (M, in) sorted by expert, counts (E,) rows per expert (on x's device), w (E, out, in) -> (M, out),
    differentiable in x and w. Under autocast both are cast to the autocast dtype (as F.linear would).
    check_counts=False: the caller's counts sum to M by construction (the MoE layer's: `grouped_mm_trusted`), so
    the device-side check's two launches per call are left out of its step."""
    if x.dim() != 2 or w.dim() != 3 or w.shape[2] != x.shape[1] or counts.shape != (w.shape[0],):
        # the kernels take the widths from x and the expert count from w: any mismatch reads out of bounds
        raise ValueError(f"grouped_mm takes x (M, in), w (E, out, in) and counts (E,); got x {tuple(x.shape)}, "
                         f"w {tuple(w.shape)}, counts {tuple(counts.shape)}")
    # counts past x's rows made the kernels write past the output (heap corruption); checked on the device, no sync
    # (eager only: a compiled model's graph keeps the MoE layer's own counts, which sum to its rows by construction)
    if check_counts and not torch.compiler.is_compiling():
        torch._assert_async(counts.sum() == x.shape[0], "grouped_mm: counts must sum to the rows of x (M), one "
                            "count per expert of the rows sorted by expert")
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))
    if falls_back(x.device, "the Triton grouped GEMM"):  # after the cast: the kernel's dtypes (w follows x)
        return grouped_mm_loop(x, w.to(x.dtype), counts)
    dtype = x.dtype
    if dtype == torch.bfloat16 and interpreting():  # the interpreter's bf16 tl.dot is wrong (flash_attention.py)
        x = x.float()
    w = w.to(x.dtype)
    if w.stride(-1) != 1:
        w = w.contiguous()
    return _GroupedMM.apply(x.contiguous(), w, counts.to(torch.int32).contiguous()).to(dtype)  # counts: one row


class _GatherTokens(torch.autograd.Function):
    """x (N, d) -> x[order // k] (N·k, d), each token once per assignment in expert order; the backward sums
    each token's k gradient rows in one pass (the combine kernel with unit weights) - no scatter."""

    @staticmethod
    def forward(ctx, x, order, inv, k: int):
        ctx.save_for_backward(inv)
        ctx.k = k
        return x[order // k]

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        ones = torch.ones(inv.numel() // ctx.k, ctx.k, device=g.device)
        return _combine(g.contiguous(), ones, inv, g.dtype), None, None, None


class _Combine(torch.autograd.Function):
    """(M, d) expert outputs in expert order -> (N, d) tokens, out[t] = Σ_j w[t, j] · y[inv[t·k + j]]; the
    gradient reaches y (a permutation: gathered, not scattered with atomics) and the router weights w."""

    @staticmethod
    def forward(ctx, y, w, inv, out_dtype: torch.dtype):
        ctx.save_for_backward(y, w, inv)
        return _combine(y, w, inv, out_dtype)

    @staticmethod
    def backward(ctx, g):
        y, w, inv = ctx.saved_tensors
        dy, dw = torch.empty_like(y), torch.empty(w.shape, device=w.device, dtype=torch.float32)
        if w.shape[0]:
            _combine_bwd_kernel[(w.shape[0],)](g.contiguous(), y, w, inv, dy, dw, y.shape[1], K=w.shape[1],
                                               BLOCK_D=_block_d(y.shape[1]))
        return dy, dw.to(w.dtype), None, None


def _combine(y: torch.Tensor, w: torch.Tensor, inv: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    N, k = w.shape
    out = torch.empty(N, y.shape[1], device=y.device, dtype=out_dtype)
    if N:
        _combine_kernel[(N,)](y, w, inv, out, y.shape[1], K=k, BLOCK_D=_block_d(y.shape[1]))
    return out


def _block_d(D: int) -> int:
    return min(triton.next_power_of_2(D), 2048)


def _route_blocks(E: int) -> tuple[int, int]:
    """(rows per program, padded experts) of the routing kernels: ~4k scores per program."""
    BE = triton.next_power_of_2(E)
    return max(1, min(128, 4096 // BE)), BE


class _Route(torch.autograd.Function):
    """Router logits (N, E) -> top-k ids (N, k) int64, their weights (N, k) fp32 and the scores (N, E) fp32 in
    one pass; MoE.route's softmax / sigmoid, + bias, top-k, gather, renormalisation and scale (its reference).
    The backward returns the logits' gradient in their dtype, from the weights' and the scores' gradients."""

    @staticmethod
    def forward(ctx, logits, bias, k: int, softmax: bool, norm: bool, scale: float):
        N, E = logits.shape
        logits = logits.contiguous()
        idx = torch.empty(N, k, device=logits.device, dtype=torch.long)
        w = torch.empty(N, k, device=logits.device, dtype=torch.float32)
        s = torch.empty(N, E, device=logits.device, dtype=torch.float32)
        BN, BE = _route_blocks(E)
        if N:
            _route_kernel[(triton.cdiv(N, BN),)](logits, bias.float().contiguous(), idx, w, s, N, E, float(scale),
                                                 K=k, KP=triton.next_power_of_2(k), SOFTMAX=softmax, NORM=norm,
                                                 BN=BN, BE=BE)
        ctx.save_for_backward(s, idx)
        ctx.mark_non_differentiable(idx)
        ctx.cfg = (k, softmax, norm, float(scale), logits.dtype)
        return idx, w, s

    @staticmethod
    def backward(ctx, _didx, dw, ds):
        s, idx = ctx.saved_tensors
        k, softmax, norm, scale, dtype = ctx.cfg
        N, E = s.shape
        dx = torch.empty(N, E, device=s.device, dtype=dtype)
        BN, BE = _route_blocks(E)
        if N:
            dw = None if dw is None else dw.contiguous()
            ds = None if ds is None else ds.contiguous()
            _route_bwd_kernel[(triton.cdiv(N, BN),)](s, idx, s if dw is None else dw, s if ds is None else ds, dx,
                                                     N, E, scale, HAS_DW=dw is not None, HAS_DS=ds is not None, K=k,
                                                     SOFTMAX=softmax, NORM=norm, BN=BN, BE=BE)
        return dx, None, None, None, None, None


class _FusedSwiGLU(torch.autograd.Function):
    """silu(gate)·up of the (M, 2·de) [gate | up] rows, read in place; the backward writes dgate and dup
    into one (M, 2·de) gradient (chunk's backward would concatenate two). The kernel gets whole tensors and
    the up half's column offset, never views of their halves, and writes dgate|dup through one pointer: under
    torch.compile a user kernel that writes into views, or into one tensor passed as two written arguments, is
    functionalized into copies of the whole rows."""

    @staticmethod
    def forward(ctx, gu):
        M, de = gu.shape[0], gu.shape[1] // 2
        h = torch.empty(M, de, device=gu.device, dtype=gu.dtype)
        if h.numel():
            _swiglu_launch(gu, gu, None, h, None, None, backward=False, n=de, u_off=de)
        ctx.save_for_backward(gu)
        return h

    @staticmethod
    def backward(ctx, dh):
        (gu,) = ctx.saved_tensors
        de = gu.shape[1] // 2
        dgu = torch.empty(gu.shape, device=gu.device, dtype=gu.dtype)
        if dgu.numel():
            _swiglu_launch(gu, gu, dh.contiguous(), None, dgu, dgu, backward=True, n=de, u_off=de, du_off=de)
        return dgu


class TritonMoE(MoE):
    """MoE whose dropless grouped dispatch runs its steps in Triton (module docstring); same parameters
    and names. With a capacity factor it keeps MoE's dropping path (on the chosen grouped matmul)."""

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """MoE.route with everything after the router's matmul in one kernel (_Route) where it applies: no
        noise in training, no expert groups, at most 256 experts; the logits are returned in the router's
        output dtype."""
        m = self.m
        if (self.noise is not None and self.training) or m.n_groups > 1 or self.E > 256 or not available(x.device):
            return super().route(x)
        logits = self.router(x)
        idx, w, scores = _Route.apply(logits, self.e_bias, self.k, m.score == "softmax", m.norm_topk, m.routed_scale)
        return idx, w, scores, logits

    kernel_under_compile = True
    """Whether the Triton SwiGLU also runs under torch.compile (set per module; False = Inductor's fusion of the
    plain expression, which bench/moe_kernels.py compares). With the kernel handed each tensor it writes once,
    Inductor adds no copy around it, and the compiled MoE step at 65k tokens ran 2.0-2.8% faster than with
    Inductor's expression (whose backward writes dgate|dup as one concatenation, reloading gate, up and dh for
    each half): 141.0 / 143.2 vs 145.0 / 146.1 ms on an H200 (docs/benchmarks.md, 2026-12-03)."""

    def _act(self, activation: str, gu: torch.Tensor) -> torch.Tensor:
        """The Triton SwiGLU (under torch.compile too, on a GPU, unless kernel_under_compile is off: Dynamo
        cannot trace Triton's CPU interpreter); else the plain expression."""
        if (activation == "swiglu" and available(gu.device) and gu.stride(-1) == 1
                and ((self.kernel_under_compile and gu.is_cuda) or not torch.compiler.is_compiling())):
            return _FusedSwiGLU.apply(gu)
        return glu_fused(activation, gu)

    @staticmethod
    def _gather(x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
        return _GatherTokens.apply(x, order, inv, k)

    @staticmethod
    def _combine(y: torch.Tensor, w: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype
                 ) -> torch.Tensor:
        return _Combine.apply(y.contiguous(), w.contiguous(), inv, dtype)  # w's gradient trains the router
