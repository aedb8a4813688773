"""Batch-1 decode kernels (Triton), each beside the plain PyTorch it must match.

At batch 1 a decode step reads every weight once and does almost no arithmetic, so its speed is set by
how close the weight reads come to memory bandwidth and by how many kernels run: each launch, even
inside a CUDA graph, costs a microsecond or two of idle GPU, and cuBLAS's matrix-vector kernels reach
only 55-85% of bandwidth on the 8-46 MB matrices of a 1B model. These kernels fold everything around
the matmuls into them, giving five kernels per Llama block instead of ~15:

  gemv           y = W · x with optional RMSNorm of x in front (gain applied on the fly), an optional
                 SwiGLU epilogue (y = silu(W_g x) · W_u x, the two as separate tensors or stacked) and an
                 optional residual add (y = r + W x, in place into r; split-K with atomic adds for an
                 fp32 residual)
  qkv_rope       RMSNorm + the q, k and v projections in one launch (the model's own three matrices, no
                 stacked copy), with RoPE (half-split) and the write of the new token's k and v into a
                 paged cache (lmforge.kernels.paged_attention's layout) as epilogue
  attention      lmforge.kernels.paged_attention (flash-decoding over the cache's blocks, one launch)

Launch gaps. On Hopper every kernel is launched with programmatic dependent launch (PDL): it may start
while the previous kernel still runs, and waits (gdc_wait) only before reading that kernel's results.
Weights do not depend on the previous kernel, so each GEMV issues the loads of its first weight tile
*before* waiting (PREFETCH): the first microseconds of every kernel - when its memory pipeline would sit
empty, ~112 times per token - overlap the previous kernel's tail instead. With a tile as wide as the
matrix (BLOCK_K = K) a program's whole share of the weights is in flight before the wait.

Weights are loaded with an evict-first L2 policy: each is read once per token and the 2 GB of a 1B model
would only push the activations, KV cache and partial sums out of the 50 MB L2.

Block shapes are explicit arguments (`config`), chosen by lmforge.kernels.tuning (no module state). Every
kernel is fp32 inside (bf16 weights and activations in memory). `*_ref` functions are the plain
definitions used by the tests (run on CPU with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

import torch
import torch.nn.functional as F

from lmforge.utils import compiler_disable


def _no_triton(e: ImportError) -> str:
    """Why `triton` is None, for the fallback's notice: not installed, or installed but older than 3.3 (no
    gdc_* for PDL below), which is then to be upgraded, not installed."""
    if e.name == "triton":
        return "Triton is not installed: pip install 'lmforge[kernels]'"
    return f"the installed Triton is too old ({e}): pip install -U 'triton>=3.3'"


try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    _NO_TRITON = ""
except ImportError as e:  # the `kernels` extra; callers check available()
    _NO_TRITON = _no_triton(e)
    triton = None

# Programmatic dependent launch (Hopper+), on by default where supported; LMFORGE_PDL=0 turns the default
# off (launchers also take pdl=False)
PDL_DEFAULT = os.environ.get("LMFORGE_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def pdl_supported() -> bool:
    """This Triton can launch with PDL and the GPU is Hopper or newer (checked once: launches are hot)."""
    if triton is None or not torch.cuda.is_available() or interpreting():
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return ("launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
            and torch.cuda.get_device_capability()[0] >= 9)


def _launch_opts(pdl: bool = PDL_DEFAULT, prefetch: bool | None = None, evict: bool = True) -> dict:
    """Extra launch arguments: the PDL constexpr and launch flag where PDL is on and supported, and for the
    GEMV kernels the PREFETCH constexpr and the weights' L2 policy (EVICT)."""
    on = pdl and pdl_supported()
    opts = {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
    if prefetch is not None:
        opts.update(PREFETCH=prefetch, EVICT="evict_first" if evict else "")
    return opts


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run in Triton's CPU interpreter (the tests), read at each call. The one check
    of the switch (Triton itself reads it when a kernel is first defined: tests/conftest.py)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device | str) -> bool:
    """Triton kernels can run on this device: CUDA, or any device under TRITON_INTERPRET=1 (tests)."""
    dev = torch.device(device)
    return triton is not None and (dev.type == "cuda" or interpreting())


def falls_back(device: torch.device | str, what: str) -> bool:
    """False where the Triton kernels run on `device`; else True after a one-line warning (once per kernel and
    device type), and the caller runs its PyTorch reference (a fused model moved to the CPU, a direct call
    without a GPU: Triton's launch would fail with "0 active drivers", or on None without the `kernels` extra)."""
    if available(device):
        return False
    _fallback_notice(what, torch.device(device).type)
    return True


def _fallback_notice(what: str, device_type: str) -> None:
    fallback_notice(f"{what} {unavailable(device_type)}; using the PyTorch reference")


def unavailable(device: torch.device | str) -> str | None:
    """Why the Triton kernels cannot run on `device` ('needs a CUDA GPU and Triton (...), got device cpu'), or
    None where they can: no Triton (or one too old) told from a device Triton cannot run on."""
    if available(device):
        return None
    why = _NO_TRITON or "TRITON_INTERPRET=1 runs the kernels on CPU, for tests"
    return f"needs a CUDA GPU and Triton ({why}), got device {torch.device(device).type}"


def pre_ampere(device: torch.device | str) -> str | None:
    """Why a CUDA `device` is too old for the bf16 Triton kernels ('needs a GPU of compute capability >= 8.0
    (Ampere), and Tesla T4 has 7.5'), or None (Ampere or newer, or no CUDA device: `unavailable` tells that)."""
    dev = torch.device(device)
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) >= (8, 0):
        return None
    cap = "%d.%d" % torch.cuda.get_device_capability(dev)
    return f"needs a GPU of compute capability >= 8.0 (Ampere), and {torch.cuda.get_device_name(dev)} has {cap}"


@compiler_disable  # warnings.warn is a graph break anyway; this way it is reported from the caller's frame
@functools.lru_cache(maxsize=None)  # the fallback runs at every call (every layer, every step): one notice is enough
def fallback_notice(message: str) -> None:
    """A kernel's fallback to its reference, warned once per message (keep shapes and lengths out of it)."""
    # reported from the first frame outside the kernels and torch (the model's layer, the user's call), not
    # from compiler_disable's wrapper (lmforge/utils.py) or torch's
    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__), compiler_disable.__code__.co_filename)
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


# references --------------------------------------------------------------------------------------------
def gemv_ref(x: torch.Tensor, w: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 1e-5,
             glu: bool = False, up: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (K,), w (N, K) or, with glu, (2N, K) gate rows then up rows (or w (N, K) gate and `up` (N, K)) ->
    (N,), in fp32, cast to the residual's dtype (w's without one)."""
    if up is not None:
        w = torch.cat([w, up])
    xf = x.float()
    if norm is not None:
        xf = F.rms_norm(xf, (xf.shape[-1],), norm.float(), eps)
    y = w.float() @ xf
    if glu:
        gate, up = y.chunk(2)
        y = F.silu(gate) * up
    if residual is not None:
        return (y + residual.float()).to(residual.dtype)
    return y.to(w.dtype)


def rope_cache_ref(qkv, cos, sin, pos: int, pad: int, n_heads: int, n_kv: int, k_cache, v_cache,
                   block_table, qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """qkv (H·hd + 2·KV·hd,) -> rotated q (H, hd), rotated by position pos - pad; writes rotated k and v
    into slot pos of a paged cache ((num_blocks, block_size, KV, hd), row block_table (1, max_blocks)).
    qk_norm = (q gain, k gain, eps): QK-norm (Qwen3, OLMo 2) - RMSNorm over each q and k head before RoPE."""
    hd = k_cache.shape[-1]
    q, k, v = qkv.float().split([n_heads * hd, n_kv * hd, n_kv * hd])
    if qk_norm is not None:
        gq, gk, eps = qk_norm
        q, k = (F.rms_norm(t.view(-1, hd), (hd,), g.float(), eps) for t, g in ((q, gq), (k, gk)))
    c, s = cos[pos - pad].float(), sin[pos - pad].float()

    def rot(t):
        t1, t2 = t.view(-1, hd).chunk(2, dim=-1)
        return torch.cat((t1 * c - t2 * s, t1 * s + t2 * c), dim=-1)

    page, slot = int(block_table[0, pos // k_cache.shape[1]]), pos % k_cache.shape[1]
    k_cache[page, slot] = rot(k).to(k_cache.dtype)
    v_cache[page, slot] = v.view(n_kv, hd).to(v_cache.dtype)
    return rot(q).to(qkv.dtype)


def qkv_rope_ref(x, w, norm, eps: float, cos, sin, pos: int, pad: int, n_heads: int, n_kv: int, k_cache, v_cache,
                 block_table, qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
    """RMSNorm + the q/k/v projection (w stacked, or a (wq, wk, wv) tuple), then rope_cache_ref."""
    w = torch.cat(w) if isinstance(w, (tuple, list)) else w
    return rope_cache_ref(gemv_ref(x, w, norm=norm, eps=eps), cos, sin, pos, pad, n_heads, n_kv, k_cache, v_cache,
                          block_table, qk_norm)


# kernels -----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, u_ptr, g_ptr, r_ptr, out_ptr, bump_ptr, N, K, eps,
                     NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, BUMP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, EVICT: tl.constexpr,
                     PDL: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        w_at = w_ptr + rows[:, None] * K + cols[None, :]
        u_at = u_ptr + rows[:, None] * K + cols[None, :]  # GLU: the up projection's rows
        if PREFETCH:  # the first weight tile does not depend on the previous kernel: load it before waiting
            m0 = row_ok[:, None] & (cols < K)[None, :]
            w_next = tl.load(w_at, mask=m0, other=0.0, eviction_policy=EVICT)
            if GLU:
                u_next = tl.load(u_at, mask=m0, other=0.0, eviction_policy=EVICT)
        if PDL:  # let the next kernel launch now; wait for the previous one's results
            gdc_launch_dependents()
            gdc_wait()
        # RMSNorm folds into the same pass: W (g * x / rms) = (W (g * x)) / rms, and every program reads
        # all of x anyway, so it sums x^2 on the way and scales its dot products at the end
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if GLU:
            acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + cols
            k_ok = kk < K
            xk = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            if NORM:
                ss += xk * xk
                xk = xk * tl.load(g_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            if PREFETCH:  # software pipeline: this tile was loaded one step ahead
                w = w_next
                m1 = row_ok[:, None] & (kk + BLOCK_K < K)[None, :]
                w_next = tl.load(w_at + k0 + BLOCK_K, mask=m1, other=0.0, eviction_policy=EVICT)
                if GLU:
                    wu = u_next
                    u_next = tl.load(u_at + k0 + BLOCK_K, mask=m1, other=0.0, eviction_policy=EVICT)
            else:
                m = row_ok[:, None] & k_ok[None, :]
                w = tl.load(w_at + k0, mask=m, other=0.0, eviction_policy=EVICT)
                if GLU:
                    wu = tl.load(u_at + k0, mask=m, other=0.0, eviction_policy=EVICT)
            acc += w.to(tl.float32) * xk[None, :]
            if GLU:
                acc_up += wu.to(tl.float32) * xk[None, :]
        y = tl.sum(acc, 1)
        if NORM:
            inv_rms = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
            y = y * inv_rms
        if GLU:
            up = tl.sum(acc_up, 1)
            if NORM:
                up = up * inv_rms
            y = y * tl.sigmoid(y) * up
        if RESIDUAL:
            y += tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_ok)
        if BUMP:  # one program adds 1 to a counter no program reads (the cache's write slot): saves a launch
            if tl.program_id(0) == 0:
                tl.atomic_add(bump_ptr, 1)

    @triton.jit
    def _embed_kernel(ids_ptr, emb_ptr, out_ptr, zero_ptr, D, BLOCK: tl.constexpr, NZERO: tl.constexpr,
                      PDL: tl.constexpr):
        """out (fp32) = emb[ids[0]]: the token's embedding row as the residual stream; and NZERO int32
        counters at zero_ptr set to 0 (the step's grid-barrier counters, lmforge.kernels.decode_layer)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        if NZERO > 0:
            z = tl.arange(0, NZERO)
            tl.store(zero_ptr + z, tl.zeros([NZERO], dtype=tl.int32))
        d = tl.arange(0, BLOCK)
        row = tl.load(ids_ptr).to(tl.int64)
        tl.store(out_ptr + d, tl.load(emb_ptr + row * D + d, mask=d < D, other=0.0).to(tl.float32), mask=d < D)

    @triton.jit
    def _gemv_add_kernel(x_ptr, w_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, PREFETCH: tl.constexpr, EVICT: tl.constexpr,
                         PDL: tl.constexpr):
        """out += W x into an fp32 out, with the K dimension split over SPLIT_K programs per row block
        whose partial sums meet by atomic adds: matrices with few rows (o-projection, down-projection)
        otherwise leave most of the GPU idle."""
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        first = tl.program_id(1) * BLOCK_K
        w_at = w_ptr + rows[:, None] * K + cols[None, :]
        if PREFETCH:
            w_next = tl.load(w_at + first, mask=row_ok[:, None] & (first + cols < K)[None, :], other=0.0,
                             eviction_policy=EVICT)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(first, K, BLOCK_K * SPLIT_K):
            kk = k0 + cols
            k_ok = kk < K
            xk = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            if PREFETCH:
                w = w_next
                nxt = k0 + BLOCK_K * SPLIT_K
                w_next = tl.load(w_at + nxt, mask=row_ok[:, None] & (nxt + cols < K)[None, :], other=0.0,
                                 eviction_policy=EVICT)
            else:
                w = tl.load(w_at + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0,
                            eviction_policy=EVICT)
            acc += w.to(tl.float32) * xk[None, :]
        tl.atomic_add(out_ptr + rows, tl.sum(acc, 1), mask=row_ok)

    @triton.jit
    def _qkv_rope_kernel(x_ptr, wq_ptr, wk_ptr, wv_ptr, g_ptr, cos_ptr, sin_ptr, pos_ptr, pad_ptr, q_ptr, k_ptr,
                         v_ptr, bt_ptr, ctx_ptr, qn_ptr, kn_ptr, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, H, KV, K, eps,
                         qk_eps, HD: tl.constexpr, BS: tl.constexpr, PAD: tl.constexpr, QK_NORM: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr, EVICT: tl.constexpr,
                         PDL: tl.constexpr):
        """Normed q/k/v projection with RoPE and the cache write as its epilogue. Program p computes rows
        j and j + hd/2 (j in one BLOCK_N slice of the first half) of one head - exactly the pairs RoPE
        rotates together - so the rotation needs no other program's output. QK_NORM (BLOCK_N = hd/2: one
        program holds a whole head) RMS-normalises each q and k head with its gain (qn_ptr, kn_ptr) before
        the rotation. Program 0 also writes the row's key count (pos + 1) for the attention kernel."""
        HALF: tl.constexpr = HD // 2
        per_head = HALF // BLOCK_N
        head = tl.program_id(0) // per_head  # 0..H-1: q heads, then KV k heads, then KV v heads
        j = (tl.program_id(0) % per_head) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        if head < H:  # the head's rows in its own projection (the model's wq, wk, wv: no stacked copy)
            w_head = wq_ptr + head * HD * K
        elif head < H + KV:
            w_head = wk_ptr + (head - H) * HD * K
        else:
            w_head = wv_ptr + (head - H - KV) * HD * K
        w1_at = w_head + j[:, None] * K + cols[None, :]
        w2_at = w1_at + HALF * K
        if PREFETCH:
            m0 = (cols < K)[None, :]
            w1_next = tl.load(w1_at, mask=m0, other=0.0, eviction_policy=EVICT)
            w2_next = tl.load(w2_at, mask=m0, other=0.0, eviction_policy=EVICT)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        # the epilogue's small loads (slot, block, RoPE angles) go out first: their latency hides behind
        # the main loop instead of following it
        pos = tl.load(pos_ptr)
        rpos = pos
        if PAD:  # a static cache row's left padding: the token's position is its slot minus the padding
            rpos = pos - tl.load(pad_ptr)
        c = tl.load(cos_ptr + rpos * HALF + j)
        s = tl.load(sin_ptr + rpos * HALF + j)
        page = tl.load(bt_ptr + pos // BS).to(tl.int64)  # the slot's block: block_table[pos // BS]
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)  # RMSNorm folded in, as in _gemv_kernel
        acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + cols
            k_ok = kk < K
            xk = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            ss += xk * xk
            xk = xk * tl.load(g_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            if PREFETCH:
                w1, w2 = w1_next, w2_next
                m1 = (kk + BLOCK_K < K)[None, :]
                w1_next = tl.load(w1_at + k0 + BLOCK_K, mask=m1, other=0.0, eviction_policy=EVICT)
                w2_next = tl.load(w2_at + k0 + BLOCK_K, mask=m1, other=0.0, eviction_policy=EVICT)
            else:
                w1 = tl.load(w1_at + k0, mask=k_ok[None, :], other=0.0, eviction_policy=EVICT)
                w2 = tl.load(w2_at + k0, mask=k_ok[None, :], other=0.0, eviction_policy=EVICT)
            acc1 += w1.to(tl.float32) * xk[None, :]
            acc2 += w2.to(tl.float32) * xk[None, :]
        inv_rms = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
        y1, y2 = tl.sum(acc1, 1) * inv_rms, tl.sum(acc2, 1) * inv_rms
        if QK_NORM:
            if head < H + KV:  # a q or k head, all of it in this program: its RMS, then its gain
                if head < H:
                    gain = qn_ptr
                else:
                    gain = kn_ptr
                head_rms = 1.0 / tl.sqrt((tl.sum(y1 * y1, 0) + tl.sum(y2 * y2, 0)) / HD + qk_eps)
                y1 = y1 * head_rms * tl.load(gain + j).to(tl.float32)
                y2 = y2 * head_rms * tl.load(gain + HALF + j).to(tl.float32)
        if tl.program_id(0) == 0:
            tl.store(ctx_ptr, (pos + 1).to(ctx_ptr.dtype.element_ty))
        if head < H + KV:  # q and k heads rotate by the token's position
            y1, y2 = y1 * c - y2 * s, y1 * s + y2 * c
        if head < H:
            tl.store(q_ptr + head * HD + j, y1.to(q_ptr.dtype.element_ty))
            tl.store(q_ptr + head * HD + HALF + j, y2.to(q_ptr.dtype.element_ty))
        elif head < H + KV:
            dst = k_ptr + page * s_kb + (pos % BS) * s_ks + (head - H) * s_kh
            tl.store(dst + j, y1.to(k_ptr.dtype.element_ty))
            tl.store(dst + HALF + j, y2.to(k_ptr.dtype.element_ty))
        else:
            dst = v_ptr + page * s_vb + (pos % BS) * s_vs + (head - H - KV) * s_vh
            tl.store(dst + j, y1.to(v_ptr.dtype.element_ty))
            tl.store(dst + HALF + j, y2.to(v_ptr.dtype.element_ty))


# shape keys and candidate block shapes -------------------------------------------------------------------
# gemv / qkv_rope: (rows per program, columns per loop step, warps); add: + K splits. The first candidate
# of each list is the default (the H100's picks for a 1B model, 2026-11-23) and the likeliest come first
# (a short tune takes the first few). BLOCK_K = 2048 (the whole row of a 2048-wide model), or K splits
# with BLOCK_K · splits >= K, put a program's whole share of the weights in flight before its PDL wait.
GEMV_CONFIGS = ((4, 1024, 4), (4, 512, 4), (2, 2048, 4), (4, 2048, 8), (32, 256, 8), (8, 1024, 8), (8, 512, 4),
                (16, 256, 4), (1, 2048, 4))
ADD_CONFIGS = ((4, 256, 4, 4), (4, 1024, 4, 2), (4, 1024, 4, 6), (4, 2048, 8, 3), (2, 1024, 4, 2), (4, 512, 4, 4),
               (2, 2048, 4, 3), (4, 2048, 8, 1), (8, 256, 4, 4), (4, 256, 4, 8), (8, 512, 4, 2))
# qkv_rope with QK-norm: (columns per loop step, warps) for BLOCK_N = hd / 2 rows per half-head (two fp32
# accumulators of BLOCK_N x BLOCK_K: narrow column tiles keep them in registers)
QK_NORM_TILES = ((128, 8), (64, 4), (256, 8), (32, 4))
# paged attention (lmforge.kernels.paged_attention): (most slices per row, keys per tile, warps), and with a 4th
# entry 1 one query head per program (H x slices programs at batch 1 instead of KV x slices; the previous
# per-head kernel's shape on the H100 was (32, 16, 1)). 64-key tiles want 8 warps (with 4 a thread needs
# more than 255 registers, sm_90). (16, 32, 2, 1): the H200's pick across 384-4,096 keys (docs/benchmarks.md).
ATTEND_CONFIGS = ((16, 16, 4), (2, 64, 8), (16, 32, 2, 1), (32, 16, 1, 1), (16, 16, 2, 1), (8, 32, 2, 1),
                  (16, 16, 4, 1), (32, 16, 2, 1), (32, 16, 4), (8, 32, 4), (16, 32, 4), (8, 16, 2), (1, 64, 8),
                  (4, 64, 8))


def gemv_key(N: int, K: int, *, glu: bool = False, norm: bool = False, residual: bool = False, dtype=None) -> tuple:
    return ("gemv", N, K, glu, norm, residual, str(dtype))


def add_key(N: int, K: int, dtype) -> tuple:
    return ("add", N, K, str(dtype))


def qkv_rope_key(n_heads: int, n_kv: int, head_dim: int, K: int, dtype, qk_norm: bool = False) -> tuple:
    """(the key of models without QK-norm predates it: their tuned configs keep their key)"""
    return ("qkv_rope", n_heads, n_kv, head_dim, K, str(dtype)) + (("qk_norm",) if qk_norm else ())


def attend_key(n_heads: int, n_kv: int, head_dim: int) -> tuple:
    return ("attend", n_heads, n_kv, head_dim)


def candidates(key: tuple) -> tuple[tuple[int, ...], ...]:
    """The block configurations a shape key may take (the first is the default)."""
    if key[0] == "qkv_rope" and key[-1] == "qk_norm":  # one program per head: BLOCK_N = hd / 2
        return tuple((key[3] // 2, bk, warps) for bk, warps in QK_NORM_TILES)
    if key[0] == "qkv_rope":
        return tuple(c for c in GEMV_CONFIGS if (key[3] // 2) % c[0] == 0)
    return {"gemv": GEMV_CONFIGS, "add": ADD_CONFIGS, "attend": ATTEND_CONFIGS}[key[0]]


# launchers ---------------------------------------------------------------------------------------------
def _pow2(k: int) -> int:
    """The widest useful tile for rows of k columns (a wider one only loads masked lanes)."""
    return triton.next_power_of_2(k)


def gemv(x: torch.Tensor, w: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 1e-5,
         glu: bool = False, up: torch.Tensor | None = None, residual: torch.Tensor | None = None,
         out: torch.Tensor | None = None,
         bump: torch.Tensor | None = None, config: tuple[int, ...] | None = None, pdl: bool = PDL_DEFAULT,
         prefetch: bool = True, evict: bool = True) -> torch.Tensor:
    """Kernel version of gemv_ref. With `residual`, `out` may be the residual tensor itself (updated in
    place: each program reads and writes only its own rows); an fp32 residual without norm or GLU is
    accumulated into by split-K atomic adds (config from ADD_CONFIGS; see `add_key`), every other case
    takes a GEMV_CONFIGS config (`gemv_key`). `out` must not alias x. `bump`: a one-element integer tensor
    the kernel adds 1 to (not with residual accumulation). glu: `up` holds the up rows, or w stacks them
    after the gate rows."""
    if glu and up is None:
        w, up = w.chunk(2)  # views: no copy
    N, K = w.shape
    if w.stride(0) != K or (up is not None and up.stride(0) != K):
        raise ValueError("gemv needs weights with contiguous rows")
    if out is not None and out is residual and out.dtype == torch.float32 and norm is None and not glu:
        bn, bk, warps, sk = config or ADD_CONFIGS[0]
        bk = min(bk, _pow2(K))
        _gemv_add_kernel[(triton.cdiv(N, bn), sk)](x, w, out, N, K, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk,
                                                   num_warps=warps, **_launch_opts(pdl, prefetch, evict))
        return out
    out = torch.empty(N, dtype=w.dtype, device=w.device) if out is None else out
    bn, bk, warps = config or GEMV_CONFIGS[0]
    bk = min(bk, _pow2(K))
    _gemv_kernel[(triton.cdiv(N, bn),)](
        x, w, up if up is not None else w, norm if norm is not None else x,
        residual if residual is not None else out, out,
        bump if bump is not None else out, N, K, eps, NORM=norm is not None, GLU=glu, RESIDUAL=residual is not None,
        BUMP=bump is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **_launch_opts(pdl, prefetch, evict))
    return out


def embed(ids: torch.Tensor, emb: torch.Tensor, out: torch.Tensor, *, zero: torch.Tensor | None = None,
          pdl: bool = PDL_DEFAULT) -> torch.Tensor:
    """out (D,) fp32 = emb[ids[0]] (ids on the device, so a captured graph serves every token); `zero`: a
    contiguous int32 tensor whose length is a power of two, set to zeros by the same launch."""
    D = emb.shape[1]
    n = 0 if zero is None else zero.numel()
    if n & (n - 1) or (zero is not None and (zero.dtype != torch.int32 or not zero.is_contiguous())):
        raise ValueError("embed(zero=...) takes a contiguous int32 tensor with a power-of-two length")
    _embed_kernel[(1,)](ids, emb, out, zero if zero is not None else out, D, BLOCK=triton.next_power_of_2(D),
                        NZERO=n, num_warps=4, **_launch_opts(pdl))
    return out


def qkv_rope(x, w, norm, eps: float, cos, sin, pos: torch.Tensor, n_heads: int, n_kv: int, k_cache, v_cache,
             block_table: torch.Tensor, context_len: torch.Tensor, *, pad: torch.Tensor | None = None,
             qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None, out: torch.Tensor | None = None,
             config: tuple[int, int, int] | None = None, pdl: bool = PDL_DEFAULT, prefetch: bool = True,
             evict: bool = True) -> torch.Tensor:
    """Kernel version of qkv_rope_ref. pos (the new token's slot), pad (left padding, optional) and
    block_table (1, max_blocks) are device tensors read by the kernel (graph-safe); it also writes
    context_len[0] = pos + 1. k_cache, v_cache: (num_blocks, block_size, KV, hd), any strides with the
    last dimension contiguous (a static cache row (KV, S, hd) is `.permute(1, 0, 2)[None]`, one block).
    w: the stacked q/k/v weight or a (wq, wk, wv) tuple (a model's own, unfused projections). qk_norm:
    (q gain (hd,), k gain (hd,), eps), which needs configs with BLOCK_N = hd / 2 (qkv_rope_key's candidates)."""
    hd = k_cache.shape[-1]
    wq, wk, wv = w if isinstance(w, (tuple, list)) else w.split([n_heads * hd, n_kv * hd, n_kv * hd])
    K = wq.shape[1]
    if any(t.stride(0) != K for t in (wq, wk, wv)):
        raise ValueError("qkv_rope needs weights with contiguous rows")
    out = torch.empty(n_heads, hd, dtype=wq.dtype, device=wq.device) if out is None else out
    bn, bk, warps = config or candidates(qkv_rope_key(n_heads, n_kv, hd, K, wq.dtype, qk_norm is not None))[0]
    if qk_norm is not None and bn != hd // 2:
        raise ValueError(f"qkv_rope with QK-norm needs one program per head: BLOCK_N = {hd // 2}, got config "
                         f"{(bn, bk, warps)}")
    bk = min(bk, _pow2(K))
    qn, kn, qk_eps = qk_norm if qk_norm is not None else (norm, norm, 0.0)
    _qkv_rope_kernel[((n_heads + 2 * n_kv) * (hd // 2 // bn),)](
        x, wq, wk, wv, norm, cos, sin, pos, pad if pad is not None else pos, out, k_cache, v_cache, block_table,
        context_len, qn, kn,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), n_heads, n_kv, K, eps, float(qk_eps), HD=hd, BS=k_cache.shape[1], PAD=pad is not None,
        QK_NORM=qk_norm is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **_launch_opts(pdl, prefetch, evict))
    return out
