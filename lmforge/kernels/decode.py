"""Batch-1 decode kernels (Triton), each beside the plain PyTorch it must match.

At batch 1 a decode step reads every weight once and does almost no arithmetic, so its speed is set by
how close the weight reads come to memory bandwidth and by how many kernels run: each launch, even
inside a CUDA graph, costs a microsecond or two of idle GPU, and cuBLAS's matrix-vector kernels reach
only 55-85% of bandwidth on the 8-46 MB matrices of a 1B model. These kernels fold everything around
the matmuls into them, giving five kernels per Llama block instead of ~15:

  gemv           y = W · x with optional RMSNorm of x in front (gain applied on the fly), an optional
                 SwiGLU epilogue (W holds gate rows, then up rows: y = silu(W_g x) · W_u x) and an
                 optional residual add (y = r + W x, in place into r)
  qkv_rope       RMSNorm + the fused q/k/v projection, with RoPE (half-split) and the cache write of the
                 new token's k and v as epilogue
  attend         one query per head against the cache's valid slots (GQA: head h reads kv head
                 h // group), online softmax in fp32 over slices of the slots in parallel, combined
                 by the last slice's program (flash-decoding in one launch); reads only written slots

Everything is fp32 inside (bf16 weights and activations in memory). `*_ref` functions are the plain
definitions used by the tests (run on CPU with TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # the `kernels` extra; callers check available()
    triton = None

# Programmatic dependent launch (Hopper+): a kernel may be launched while the one before it is still
# finishing and waits (gdc_wait) only where it first reads that kernel's results, hiding launch latency
# between the ~110 kernels of a decode step. On by default where supported; `PDL = False` turns it off.
PDL = os.environ.get("LMFORGE_PDL", "1") != "0"


def _pdl_enabled() -> bool:
    return PDL and _pdl_supported()


@functools.lru_cache(maxsize=None)
def _pdl_supported() -> bool:
    """This Triton can launch with PDL and the GPU is Hopper or newer (checked once: launches are hot)."""
    if triton is None or not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}) and torch.cuda.get_device_capability()[0] >= 9


def _launch_opts() -> dict:
    """Extra launch arguments: the PDL constexpr, and the launch flag where it is on."""
    return _PDL_ON if _pdl_enabled() else _PDL_OFF


_PDL_ON, _PDL_OFF = {"PDL": True, "launch_pdl": True}, {"PDL": False}


def available(device: torch.device | str) -> bool:
    """Triton kernels can run on this device: CUDA, or any device under TRITON_INTERPRET=1 (tests)."""
    dev = torch.device(device)
    return triton is not None and (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


# references --------------------------------------------------------------------------------------------
def gemv_ref(x: torch.Tensor, w: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 1e-5,
             glu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (K,), w (N, K) or (2N, K) with glu -> (N,), in fp32, cast to the residual's dtype (w's without one)."""
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


def rope_cache_ref(qkv, cos, sin, pos: int, pad: int, n_heads: int, n_kv: int, k_cache, v_cache) -> torch.Tensor:
    """qkv (H·hd + 2·KV·hd,) -> rotated q (H, hd); writes rotated k and v into cache[:, pos] ((KV, S, hd))."""
    hd = k_cache.shape[-1]
    q, k, v = qkv.float().split([n_heads * hd, n_kv * hd, n_kv * hd])
    c, s = cos[pos - pad].float(), sin[pos - pad].float()

    def rot(t):
        t1, t2 = t.view(-1, hd).chunk(2, dim=-1)
        return torch.cat((t1 * c - t2 * s, t1 * s + t2 * c), dim=-1)

    k_cache[:, pos] = rot(k).to(k_cache.dtype)
    v_cache[:, pos] = v.view(n_kv, hd).to(v_cache.dtype)
    return rot(q).to(qkv.dtype)


def qkv_rope_ref(x, w, norm, eps: float, cos, sin, pos: int, pad: int, n_heads: int, n_kv: int, k_cache, v_cache
                 ) -> torch.Tensor:
    """RMSNorm + fused q/k/v projection, then rope_cache_ref."""
    return rope_cache_ref(gemv_ref(x, w, norm=norm, eps=eps), cos, sin, pos, pad, n_heads, n_kv, k_cache, v_cache)


def attend_ref(q, k_cache, v_cache, pos: int, pad: int, scale: float) -> torch.Tensor:
    """q (H, hd) against slots pad..pos of k/v_cache (KV, S, hd) -> (H, hd)."""
    group = q.shape[0] // k_cache.shape[0]
    k = k_cache[:, pad:pos + 1].float().repeat_interleave(group, dim=0)
    v = v_cache[:, pad:pos + 1].float().repeat_interleave(group, dim=0)
    p = torch.softmax((k @ q.float()[:, :, None]).squeeze(-1) * scale, dim=-1)  # (H, n)
    return (p[:, None, :] @ v).squeeze(1).to(q.dtype)


# kernels -----------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, g_ptr, r_ptr, out_ptr, bump_ptr, N, K, eps,
                     NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr, BUMP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # let the next kernel launch now; wait for the previous one's results
            gdc_launch_dependents()
            gdc_wait()
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
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
            m = row_ok[:, None] & k_ok[None, :]
            w = tl.load(w_ptr + rows[:, None] * K + kk[None, :], mask=m, other=0.0)
            acc += w.to(tl.float32) * xk[None, :]
            if GLU:
                wu = tl.load(w_ptr + (rows[:, None] + N) * K + kk[None, :], mask=m, other=0.0)
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
    def _embed_kernel(ids_ptr, emb_ptr, out_ptr, D, BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        """out (fp32) = emb[ids[0]]: the token's embedding row as the residual stream."""
        d = tl.arange(0, BLOCK)
        row = tl.load(ids_ptr).to(tl.int64)
        tl.store(out_ptr + d, tl.load(emb_ptr + row * D + d, mask=d < D, other=0.0).to(tl.float32), mask=d < D)

    @triton.jit
    def _gemv_add_kernel(x_ptr, w_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, PDL: tl.constexpr):
        """out += W x into an fp32 out, with the K dimension split over SPLIT_K programs per row block
        whose partial sums meet by atomic adds: matrices with few rows (o-projection, down-projection)
        otherwise leave most of the GPU idle."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * SPLIT_K):
            kk = k0 + cols
            k_ok = kk < K
            xk = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * K + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * xk[None, :]
        tl.atomic_add(out_ptr + rows, tl.sum(acc, 1), mask=row_ok)

    @triton.jit
    def _qkv_rope_kernel(x_ptr, w_ptr, g_ptr, cos_ptr, sin_ptr, pos_ptr, pad_ptr, q_ptr, k_ptr, v_ptr, stride_h,
                         H, KV, K, eps, HD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PDL: tl.constexpr):
        """Normed q/k/v projection with RoPE and the cache write as its epilogue. Program p computes rows
        j and j + hd/2 (j in one BLOCK_N slice of the first half) of one head - exactly the pairs RoPE
        rotates together - so the rotation needs no other program's output."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        HALF: tl.constexpr = HD // 2
        per_head = HALF // BLOCK_N
        head = tl.program_id(0) // per_head  # 0..H-1: q heads, then KV k heads, then KV v heads
        j = (tl.program_id(0) % per_head) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = head * HD + j
        cols = tl.arange(0, BLOCK_K)
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)  # RMSNorm folded in, as in _gemv_kernel
        acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + cols
            k_ok = kk < K
            xk = tl.load(x_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            ss += xk * xk
            xk = xk * tl.load(g_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            w1 = tl.load(w_ptr + rows[:, None] * K + kk[None, :], mask=k_ok[None, :], other=0.0)
            w2 = tl.load(w_ptr + (rows[:, None] + HALF) * K + kk[None, :], mask=k_ok[None, :], other=0.0)
            acc1 += w1.to(tl.float32) * xk[None, :]
            acc2 += w2.to(tl.float32) * xk[None, :]
        inv_rms = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
        y1, y2 = tl.sum(acc1, 1) * inv_rms, tl.sum(acc2, 1) * inv_rms
        pos = tl.load(pos_ptr)
        if head < H + KV:  # q and k heads rotate by the token's position (slot minus the row's padding)
            c = tl.load(cos_ptr + (pos - tl.load(pad_ptr)) * HALF + j)
            s = tl.load(sin_ptr + (pos - tl.load(pad_ptr)) * HALF + j)
            y1, y2 = y1 * c - y2 * s, y1 * s + y2 * c
        if head < H:
            tl.store(q_ptr + head * HD + j, y1.to(q_ptr.dtype.element_ty))
            tl.store(q_ptr + head * HD + HALF + j, y2.to(q_ptr.dtype.element_ty))
        elif head < H + KV:
            dst = k_ptr + (head - H) * stride_h + pos * HD
            tl.store(dst + j, y1.to(k_ptr.dtype.element_ty))
            tl.store(dst + HALF + j, y2.to(k_ptr.dtype.element_ty))
        else:
            dst = v_ptr + (head - H - KV) * stride_h + pos * HD
            tl.store(dst + j, y1.to(v_ptr.dtype.element_ty))
            tl.store(dst + HALF + j, y2.to(v_ptr.dtype.element_ty))

    @triton.jit
    def _attend_kernel(q_ptr, k_ptr, v_ptr, part_o_ptr, part_ml_ptr, count_ptr, out_ptr, pos_ptr, pad_ptr,
                       stride_h, scale, GROUP: tl.constexpr, HD: tl.constexpr, BLOCK_S: tl.constexpr,
                       SPLITS: tl.constexpr, PDL: tl.constexpr):
        """Program (h, sp): query head h over the sp-th of SPLITS equal slices of the slots pad..pos
        (flash-decoding: short decode attention needs more programs than heads to fill the GPU). Each
        writes its slice's unnormalised output, running max and denominator, then counts itself done;
        the last of a head's programs combines the slices (the "last block reduces" pattern, so no
        second kernel launch)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        h, sp = tl.program_id(0), tl.program_id(1)
        kv = h // GROUP
        end = tl.load(pos_ptr) + 1  # slots pad..pos hold this row's keys (pos: the new token's)
        start = tl.load(pad_ptr)
        chunk = tl.cdiv(end - start, SPLITS)
        lo = start + sp * chunk
        hi = tl.minimum(lo + chunk, end)
        d = tl.arange(0, HD)
        q = tl.load(q_ptr + h * HD + d).to(tl.float32) * scale
        m_i = tl.full([1], float("-inf"), tl.float32)
        l_i = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([HD], dtype=tl.float32)
        base = kv * stride_h
        for s0 in range(lo, hi, BLOCK_S):  # every block starts on a valid slot: no all-masked block
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < hi
            k = tl.load(k_ptr + base + s[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            scores = tl.where(ok, tl.sum(k * q[None, :], 1), float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 0))
            p = tl.exp(scores - m_new)
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + base + s[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
            l_i = l_i * alpha + tl.sum(p, 0)
            acc = acc * alpha + tl.sum(p[:, None] * v, 0)
            m_i = m_new
        part = h * SPLITS + sp
        tl.store(part_o_ptr + part * HD + d, acc)
        one = tl.arange(0, 1)
        tl.store(part_ml_ptr + 2 * part + one, m_i)
        tl.store(part_ml_ptr + 2 * part + 1 + one, l_i)
        tl.debug_barrier()  # every thread's stores precede the (release) count below
        done = tl.atomic_add(count_ptr + h, 1, sem="acq_rel", scope="gpu")
        if done == SPLITS - 1:  # the last slice of head h: combine all of them
            sps = tl.arange(0, SPLITS)
            # .cg loads skip the (incoherent) L1 cache: the slices were written by other SMs
            m = tl.load(part_ml_ptr + 2 * (h * SPLITS + sps), cache_modifier=".cg")
            l = tl.load(part_ml_ptr + 2 * (h * SPLITS + sps) + 1, cache_modifier=".cg")
            w = tl.exp(m - tl.max(m, 0))  # empty slices have m = -inf: weight 0
            o = tl.load(part_o_ptr + (h * SPLITS + sps)[:, None] * HD + d[None, :], cache_modifier=".cg")
            tl.store(out_ptr + h * HD + d, (tl.sum(w[:, None] * o, 0) / tl.sum(w * l, 0)).to(out_ptr.dtype.element_ty))
            tl.store(count_ptr + h, 0)  # ready for the next layer / step


# launchers ---------------------------------------------------------------------------------------------
# (rows per program, columns per loop step, warps); the first small-N shapes want few rows per program
GEMV_CONFIGS = ((8, 512, 4), (8, 256, 4), (16, 256, 4), (16, 512, 8), (4, 512, 4), (4, 1024, 4), (2, 1024, 4),
                (2, 512, 2), (32, 256, 8), (8, 1024, 8), (4, 2048, 8), (2, 2048, 8), (8, 2048, 8), (16, 1024, 8))
_best_config: dict[tuple, tuple[int, int, int]] = {}


def _launch_gemv(cfg, x, w, norm, eps, glu, residual, out, N, K, bump=None):
    bn, bk, warps = cfg
    _gemv_kernel[(triton.cdiv(N, bn),)](
        x, w, norm if norm is not None else x, residual if residual is not None else out, out,
        bump if bump is not None else out, N, K, eps, NORM=norm is not None, GLU=glu, RESIDUAL=residual is not None,
        BUMP=bump is not None, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **_launch_opts())


_l2_flush: torch.Tensor | None = None


_used: set | None = None  # when a set: every configuration lookup records its key (KernelStep.tune)


def _chosen(key, tune=None) -> tuple:
    if key not in _best_config and tune is not None:
        tune()
    if _used is not None:
        _used.add(key)
    return _best_config[key]


def candidates(key) -> tuple[tuple[int, ...], ...]:
    """The configurations a shape key may take."""
    if key[0] == "qkv_rope":
        return tuple(c for c in GEMV_CONFIGS if (key[3] // 2) % c[0] == 0)
    return {"gemv": GEMV_CONFIGS, "add": ADD_CONFIGS, "attend": ATTEND_CONFIGS}[key[0]]


def tuned_configs() -> dict[str, list[int]]:
    """The block configurations chosen so far, as JSON-ready {repr(shape key): config}."""
    return {repr(k): list(v) for k, v in _best_config.items()}


def use_configs(configs: dict[str, list[int]]) -> None:
    """Take configurations (from tuned_configs() of an earlier run) instead of tuning those shapes: tuning
    times single kernels, which is noisy, so a known-good set makes runs comparable."""
    import ast

    _best_config.update({ast.literal_eval(k): tuple(v) for k, v in configs.items()})


def _tune(key, run, configs=GEMV_CONFIGS) -> tuple[int, int, int]:
    """Pick the fastest block configuration for one matrix shape. On CUDA each candidate is timed on a
    cold L2 cache (a 128 MB write evicts the weight first, as in a real decode step, where a layer's
    weights are not read again before the next token); elsewhere the first configuration is taken."""
    global _l2_flush
    if key not in _best_config:
        if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            _best_config[key] = configs[0]
        else:
            _l2_flush = torch.empty(32 << 20, dtype=torch.float32, device="cuda") if _l2_flush is None else _l2_flush
            for _ in range(20):  # bring the clocks up first: idle-clocked early candidates would look slow
                _l2_flush.zero_()
            times = {}
            for cfg in configs:
                run(cfg)  # compile
                samples = []
                for _ in range(9):
                    _l2_flush.zero_()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    run(cfg)
                    end.record()
                    torch.cuda.synchronize()
                    samples.append(start.elapsed_time(end))
                times[cfg] = sorted(samples)[4]
            _best_config[key] = min(times, key=times.get)
    return _best_config[key]


ADD_CONFIGS = tuple((bn, bk, w, sk) for bn in (4, 8, 16) for bk in (256, 512, 1024) for w in (4, 8)
                    for sk in (1, 2, 4, 8) if bn * bk <= 8192)


def gemv(x: torch.Tensor, w: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 1e-5,
         glu: bool = False, residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
         bump: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel version of gemv_ref. With `residual`, `out` may be the residual tensor itself (updated in
    place: each program reads and writes only its own rows; an fp32 residual without norm or GLU is
    accumulated into by split-K atomic adds); `out` must not alias x. `bump`: a one-element integer
    tensor the kernel adds 1 to (not with residual accumulation)."""
    N, K = (w.shape[0] // 2 if glu else w.shape[0]), w.shape[1]
    if out is not None and out is residual and out.dtype == torch.float32 and norm is None and not glu:
        def add(cfg, o=out):
            bn, bk, warps, sk = cfg
            _gemv_add_kernel[(triton.cdiv(N, bn), sk)](x, w, o, N, K, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk,
                                                       num_warps=warps, **_launch_opts())

        key = ("add", N, K, str(w.dtype))
        scratch = out.clone() if key not in _best_config else None
        add(_chosen(key, lambda: _tune(key, lambda cfg: add(cfg, scratch), ADD_CONFIGS)))
        return out
    out = torch.empty(N, dtype=w.dtype, device=w.device) if out is None else out
    key = ("gemv", N, K, glu, norm is not None, residual is not None, str(w.dtype))
    if key not in _best_config:  # tune on scratch outputs: timing runs must not touch `out` / `residual`
        scratch, r = torch.empty_like(out), residual.clone() if residual is not None else None
        _tune(key, lambda cfg: _launch_gemv(cfg, x, w, norm, eps, glu, r, scratch, N, K))
    _launch_gemv(_chosen(key), x, w, norm, eps, glu, residual, out, N, K, bump)
    return out


def embed(ids: torch.Tensor, emb: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (D,) fp32 = emb[ids[0]] (ids on the device, so a captured graph serves every token)."""
    D = emb.shape[1]
    _embed_kernel[(1,)](ids, emb, out, D, BLOCK=triton.next_power_of_2(D), num_warps=4, **_launch_opts())
    return out


def qkv_rope(x, w, norm, eps: float, cos, sin, pos: torch.Tensor, pad: torch.Tensor, n_heads: int, n_kv: int,
             k_cache, v_cache, out: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel version of qkv_rope_ref; pos and pad are 1-element device tensors (graph-safe)."""
    hd = k_cache.shape[-1]
    out = torch.empty(n_heads, hd, dtype=w.dtype, device=w.device) if out is None else out
    K = w.shape[1]

    def run(cfg, q=out):
        bn, bk, warps = cfg
        _qkv_rope_kernel[((n_heads + 2 * n_kv) * (hd // 2 // bn),)](
            x, w, norm, cos, sin, pos, pad, q, k_cache, v_cache, k_cache.stride(0), n_heads, n_kv, K, eps,
            HD=hd, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, **_launch_opts())

    key = ("qkv_rope", n_heads, n_kv, hd, K, str(w.dtype))
    if key not in _best_config:  # timing runs rewrite the same cache slot with the same values
        scratch = torch.empty_like(out)
        _tune(key, lambda cfg: run(cfg, scratch), candidates(key))
    run(_chosen(key))
    return out


ATTEND_SPLITS = 32  # the most slices a configuration may use (sizes the workspace)
# (slices, slots per loop step, warps); tuned per head count and head size at the first call on a GPU
ATTEND_CONFIGS = ((16, 64, 2), (8, 64, 2), (8, 64, 4), (4, 128, 4), (16, 32, 1), (32, 32, 1), (32, 16, 1))


def attend(q, k_cache, v_cache, pos: torch.Tensor, pad: torch.Tensor, scale: float,
           out: torch.Tensor | None = None, work: tuple[torch.Tensor, ...] | None = None,
           config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Kernel version of attend_ref; reads slots pad..pos only (pos read on the device). `work`: the
    partial-result buffers and per-head counters of attend_workspace, allocated here when not given;
    `config` (slices, block, warps) overrides the tuned one."""
    H, hd = q.shape
    out = torch.empty_like(q) if out is None else out
    if work is None:
        work = attend_workspace(H, hd, q.device)

    def run(cfg, o=out):
        splits, block, warps = cfg
        _attend_kernel[(H, splits)](q, k_cache, v_cache, work[0], work[1], work[2], o, pos, pad,
                                    k_cache.stride(0), scale, GROUP=H // k_cache.shape[0], HD=hd,
                                    BLOCK_S=block, SPLITS=splits, num_warps=warps, **_launch_opts())

    if config is None:
        key = ("attend", H, k_cache.shape[0], hd, k_cache.shape[1])
        if key not in _best_config:
            scratch = torch.empty_like(out)
            _tune(key, lambda cfg: run(cfg, scratch), ATTEND_CONFIGS)
        config = _chosen(key)
    run(config)
    return out


def attend_workspace(n_heads: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(H, SPLITS, hd) partial outputs, (H, SPLITS, 2) maxima and denominators, (H,) counters (zero)."""
    return (torch.empty(n_heads, ATTEND_SPLITS, head_dim, dtype=torch.float32, device=device),
            torch.empty(n_heads, ATTEND_SPLITS, 2, dtype=torch.float32, device=device),
            torch.zeros(n_heads, dtype=torch.int32, device=device))
