"""FlashAttention-2 (Dao 2023) forward and backward in Triton, beside a PyTorch tiled reference.

Attention softmax(s) v with s = scale · q kᵀ (optionally soft-capped, c·tanh(s/c), Gemma 2) is computed
one (BLOCK_M queries × BLOCK_N keys) tile at a time, never materialising the N × N scores:

  forward (Algorithm 1)   per query block, a running row max m and denominator l are updated tile by
                          tile ("online softmax": acc ← acc·e^(m_old - m_new) + P V); the output is
                          acc / l and the only other thing kept is the logsumexp L = m + log l, (B, H, N)
  backward (Algorithm 2)  P = exp(s - L) is recomputed from q, k and L; with D = rowsum(dO ∘ O)
                          (the preprocessing step, = rowsum(P ∘ dP)): dV = Pᵀ dO, dP = dO Vᵀ,
                          dS = P ∘ (dP - D), dQ = scale · dS K, dK = scale · dSᵀ Q

The Triton backward's main kernel gives one program to each key block, accumulating dK, dV over the
query blocks and over the query heads of its GQA group (K/V are never repeated in memory). dQ comes from
a second kernel with one program per query block (dq_mode="kernel": recomputes s and dP once more, 7
matmuls per tile pair instead of 5, deterministic), or - the paper's way - from fp32 atomic adds in the
key-block pass (dq_mode="atomic").

Inside the kernels scores are kept in base 2: log2(e) is folded into the scale so each exponential is one
exp2 (the MUFU unit's native op). Per query block the keys split into fully visible tiles (no mask
arithmetic) and the few tiles on the causal diagonal, the sliding-window edge or the sequence end, which
are masked; tiles entirely above the diagonal or behind the window are never visited. On Hopper the tiles
streamed through the inner loops (K, V in the forward; Q, dO or K, V in the backward) can come by TMA
tensor descriptors (`tma=True`; TMA_DEFAULT): the copy engine fetches them asynchronously, freeing
registers and issue slots; otherwise they are cp.async loads pipelined over `num_stages` buffers.

Layout: q (B, H, N, hd), k and v (B, KV, N, hd), any strides with a contiguous last dim; query head h
reads kv head h // (H / KV). Variable length: `cu_seqlens` (n_docs + 1,) are cumulative document lengths
over the B·N tokens taken row after row (documents do not cross rows; with B = 1 this is the usual packed
layout); a token attends only within its document. The window keeps keys i - window < j <= i (causal only).
Separate key lengths (`cu_seqlens_k`, forward only: the engine's prefill, lmforge.infer.kv.paged): document
d has Lq queries and Lk >= Lq keys of its own, its queries being the last Lq keys (bottom-right causal:
query m sits at key position Lk - Lq + m), so chunks continuing a cached context attend in the same launch
as fresh prompts. Attention sinks (gpt-oss, `sinks` (H,)): the online softmax starts from m = sink, l = 1
instead of m = -inf, l = 0, so the sink sits in every denominator and in L; the backward needs nothing
more for dQ, dK, dV, and the sinks' own gradient is -Σ_t e^(sink - L_t) D_t.

flash_reference.py holds the same algorithm as explicit PyTorch loops over tiles, for reading; the tests
compare both to the plain math attention (lmforge.model.layers.attention.math_attention).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.kernels.decode import fallback_notice, interpreting, pre_ampere
from lmforge.model.layers.attention import check_softcap_and_window
from lmforge.utils import compiler_disable

try:
    import triton
    import triton.language as tl
except ImportError:  # the `kernels` extra; flash_attention() raises a one-line error
    triton = None

HEAD_DIMS = (64, 128)
# TMA tile loads on Hopper: off by default until measured on the GPU (bench/attention.py, variant triton-tma)
TMA_DEFAULT = False
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32: tests and the interpreter (tf32 dots on GPU)


# kernels ------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _tanh(x):
        return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)  # 2·log2(e): e^(2x) as one exp2

    @triton.jit
    def _scores2(qk, scale, softcap, SOFTCAP: tl.constexpr):
        """Logits in base 2 (s · log2 e) and, with capping, tanh(s/c) for the backward's chain rule."""
        if SOFTCAP:
            t = _tanh(qk * (scale / softcap))
            return t * (softcap * 1.4426950408889634), t
        else:
            return qk * (scale * 1.4426950408889634), qk

    @triton.jit
    def _visible_tile(q_idx, k_idx, L, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
        """Broadcast (query, key) positions -> True where the key is visible (and both lie in the document)."""
        ok = (q_idx < L) & (k_idx < L)
        if CAUSAL:
            ok = ok & (k_idx <= q_idx)
        if WINDOW > 0:
            ok = ok & (q_idx - k_idx < WINDOW)
        return ok

    @triton.jit
    def _program(heads, cu_ptr, N, VARLEN: tl.constexpr, BLOCK: tl.constexpr, REVERSE: tl.constexpr):
        """Program (block, document·heads + head) -> (block start, head, row, first token, length) of its
        document (a whole row without cu_seqlens; with them, documents never cross rows). REVERSE hands
        the first programs the last blocks: causal query blocks late in the sequence have the most keys,
        and starting the longest programs first shortens the tail of the last wave."""
        pid = tl.num_programs(0) - 1 - tl.program_id(0) if REVERSE else tl.program_id(0)
        start, head, doc = pid * BLOCK, tl.program_id(1) % heads, tl.program_id(1) // heads
        if VARLEN:
            first = tl.load(cu_ptr + doc)
            b = first // N
            return start, head, b.to(tl.int64), first - b * N, tl.load(cu_ptr + doc + 1) - first
        else:
            return start, head, doc.to(tl.int64), 0, N

    @triton.jit
    def _key_ranges(m0, L, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    WINDOW: tl.constexpr):
        """Keys a query block [m0, m0 + BLOCK_M) visits, as [lo, full_lo) masked, [full_lo, full_hi) fully
        visible, [full_hi, hi) masked (the diagonal and the document end)."""
        hi = L
        if CAUSAL:
            hi = tl.minimum(L, m0 + BLOCK_M)
        lo = 0
        full_lo = 0
        if WINDOW > 0:  # the first row sees keys > m0 - WINDOW; the last row all of a tile from m0+BM-WINDOW
            lo = tl.maximum(m0 - WINDOW + 1, 0) // BLOCK_N * BLOCK_N
            full_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(m0 + BLOCK_M - WINDOW, 0), BLOCK_N) * BLOCK_N, lo), hi)
        full_hi = L // BLOCK_N * BLOCK_N
        if CAUSAL:  # a tile is below the diagonal when its last key <= the block's first query
            full_hi = tl.minimum(full_hi, (m0 + 1) // BLOCK_N * BLOCK_N)
        return lo, full_lo, tl.maximum(full_hi, full_lo), hi

    @triton.jit
    def _query_ranges(n0, L, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                      WINDOW: tl.constexpr):
        """Queries a key block [n0, n0 + BLOCK_N) is seen by, split like _key_ranges."""
        lo = 0
        full_lo = 0
        if CAUSAL:  # a query tile is fully past the diagonal from m0 >= the block's last key
            lo = n0 // BLOCK_M * BLOCK_M
            full_lo = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
        hi = L
        if WINDOW > 0:
            hi = tl.minimum(L, n0 + BLOCK_N - 1 + WINDOW)
        full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
        full_hi = L // BLOCK_M * BLOCK_M
        if WINDOW > 0:  # every query of the tile still sees the block's first key
            full_hi = tl.minimum(full_hi, (n0 + WINDOW) // BLOCK_M * BLOCK_M)
        return lo, full_lo, tl.maximum(full_hi, full_lo), hi

    @triton.jit
    def _rows(X, b, head, t0, sb, sh, sn, r0, L, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr,
              TMA: tl.constexpr):
        """(ROWS, HEAD_DIM) tile: positions r0 .. r0 + ROWS - 1 of a document (first token t0, length L) in
        one head. TMA = 1 or 2: X is a tensor descriptor over (B, heads, N, hd), or over (B, N, heads, hd)
        for the model's transposed projections (descriptor dimensions follow memory order), and the copy
        engine fetches the tile (rows past the document are read - the callers mask their scores - and
        zeros past the tensor); TMA = 0: X is a pointer with strides sb, sh, sn, and MASKED loads zeros
        past the document."""
        if TMA == 1:
            return X.load([b.to(tl.int32), head, t0 + r0, 0]).reshape(ROWS, HEAD_DIM)
        elif TMA == 2:
            return X.load([b.to(tl.int32), t0 + r0, head, 0]).reshape(ROWS, HEAD_DIM)
        else:
            r = r0 + tl.arange(0, ROWS)
            ptrs = X + b * sb + head * sh + (t0 + r)[:, None] * sn + tl.arange(0, HEAD_DIM)[None, :]
            if MASKED:
                return tl.load(ptrs, mask=r[:, None] < L, other=0.0)
            else:
                return tl.load(ptrs)

    @triton.jit
    def _fwd_tiles(acc, l_i, m_i, q, K, V, b, kvh, t0, skb, skh, skn, svb, svh, svn, offs_m, lo, hi, L, scale,
                   softcap, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                   TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = _rows(K, b, kvh, t0, skb, skh, skn, n0, L, BLOCK_N, HEAD_DIM, MASKED, TMA)
            v = _rows(V, b, kvh, t0, svb, svh, svn, n0, L, BLOCK_N, HEAD_DIM, MASKED, TMA)
            s, _ = _scores2(tl.dot(q, tl.trans(k)), scale, softcap, SOFTCAP)  # (BLOCK_M, BLOCK_N), base 2
            if MASKED:
                s = tl.where(_visible_tile(offs_m[:, None], offs_n[None, :], L, CAUSAL, WINDOW), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            if MASKED:  # a row with nothing visible yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
                shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            else:
                shift = m_new
            p = tl.exp2(s - shift[:, None])
            alpha = tl.exp2(m_i - shift)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # accumulates in the MMA's registers
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _fwd_kernel(Q, K, V, O, LSE, CU, scale, softcap, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                    sob, soh, son, H, N, CU_K, SINK, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
                    KV_LENS: tl.constexpr, SINKS: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """Program (query block, document·H + head): Algorithm 1 for BLOCK_M queries of one head. KV_LENS:
        keys have their own cumulative lengths CU_K and a document's L queries are its last L of LK keys
        (query m at key position LK - L + m); SINKS: one learned logit per head joins every denominator."""
        m0, h, b, t0, L = _program(H, CU, N, VARLEN, BLOCK_M, CAUSAL)
        if m0 >= L:
            return
        tk0, LK = t0, L
        if KV_LENS:
            tk0 = tl.load(CU_K + tl.program_id(1) // H)
            LK = tl.load(CU_K + tl.program_id(1) // H + 1) - tk0
        kvh = h // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        pos_m = offs_m + (LK - L)  # query positions among the keys (bottom-right aligned)
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * sqb + h * sqh + (t0 + offs_m[:, None]) * sqn + offs_d[None, :],
                    mask=offs_m[:, None] < L, other=0.0)
        if SINKS:  # the sink starts the online softmax: m = sink (base 2), l = e^0 = 1, nothing accumulated
            m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINK + h).to(tl.float32) * 1.4426950408889634
            l_i = tl.full([BLOCK_M], 1.0, tl.float32)
        else:
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        lo, full_lo, full_hi, hi = _key_ranges(m0 + LK - L, LK, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, b, kvh, tk0, skb, skh, skn, svb, svh, svn, pos_m, lo,
                                   full_lo, LK, scale, softcap, True, CAUSAL, WINDOW, SOFTCAP, TMA, BLOCK_N, HEAD_DIM)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, b, kvh, tk0, skb, skh, skn, svb, svh, svn, pos_m, full_lo,
                                   full_hi, LK, scale, softcap, False, CAUSAL, WINDOW, SOFTCAP, TMA, BLOCK_N, HEAD_DIM)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, K, V, b, kvh, tk0, skb, skh, skn, svb, svh, svn, pos_m, full_hi,
                                   hi, LK, scale, softcap, True, CAUSAL, WINDOW, SOFTCAP, TMA, BLOCK_N, HEAD_DIM)
        row_ok = offs_m < L
        l_safe = tl.where(row_ok, l_i, 1.0)
        tl.store(O + b * sob + h * soh + (t0 + offs_m[:, None]) * son + offs_d[None, :],
                 (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None])
        lse = (m_i + tl.log2(l_safe)) * 0.6931471805599453  # back to natural log: L = m + ln l
        tl.store(LSE + (b * H + h) * N + t0 + offs_m, lse, mask=row_ok)

    @triton.jit
    def _bwd_pre_kernel(O, DO, Dl, H, N, sob, soh, son, sdb, sdh, sdn, HEAD_DIM: tl.constexpr,
                        BLOCK_M: tl.constexpr):
        """D = rowsum(dO ∘ O), (B, H, N) fp32 (Algorithm 2's preprocessing)."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        bh = tl.program_id(1)
        b, h = (bh // H).to(tl.int64), bh % H
        offs_d = tl.arange(0, HEAD_DIM)
        ok = offs_m[:, None] < N
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :], mask=ok, other=0.0)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :], mask=ok, other=0.0)
        tl.store(Dl + bh.to(tl.int64) * N + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < N)

    @triton.jit
    def _bwd_kv_tiles(dk, dv, k, v, Q, DO, b, h, t0, sqb, sqh, sqn, sdob, sdoh, sdon, lse_base, d_base, dqa_base,
                      offs_n, lo, hi, L, scale, softcap, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                      WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, DQ_ATOMIC: tl.constexpr, TMA: tl.constexpr,
                      BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr):
        """dK, dV of one key block over query blocks [lo, hi) of head h, on transposed tiles (keys × queries);
        with DQ_ATOMIC also each tile's share of dQ, added into an fp32 (B, H, N, hd) buffer (FA2's way)."""
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            q = _rows(Q, b, h, t0, sqb, sqh, sqn, m0, L, BLOCK_M, HEAD_DIM, MASKED, TMA)
            do = _rows(DO, b, h, t0, sdob, sdoh, sdon, m0, L, BLOCK_M, HEAD_DIM, MASKED, TMA)
            if MASKED:
                lse = tl.load(lse_base + offs_m, mask=offs_m < L, other=0.0)
                delta = tl.load(d_base + offs_m, mask=offs_m < L, other=0.0)
            else:
                lse = tl.load(lse_base + offs_m)
                delta = tl.load(d_base + offs_m)
            s, t = _scores2(tl.dot(k, tl.trans(q)), scale, softcap, SOFTCAP)  # (BLOCK_N, BLOCK_M)
            pt = tl.exp2(s - lse[None, :] * 1.4426950408889634)
            if MASKED:
                pt = tl.where(_visible_tile(offs_m[None, :], offs_n[:, None], L, CAUSAL, WINDOW), pt, 0.0)
            dv = tl.dot(pt.to(do.dtype), do, dv)
            dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])  # dSᵀ = Pᵀ ∘ (dPᵀ - D)
            if SOFTCAP:
                dst = dst * (1.0 - t * t)
            dk = tl.dot(dst.to(q.dtype), q, dk)
            if DQ_ATOMIC:
                dq = tl.dot(tl.trans(dst).to(k.dtype), k) * scale  # (BLOCK_M, HEAD_DIM)
                tl.atomic_add(dqa_base + offs_m[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], dq,
                              mask=offs_m[:, None] < L, sem="relaxed")
        return dk, dv

    @triton.jit
    def _bwd_kv_kernel(Q, K, V, DO, LSE, Dl, DK, DV, DQA, CU, scale, softcap, sqb, sqh, sqn, skb, skh, skn, svb, svh,
                       svn, sdob, sdoh, sdon, H, KV, N, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                       CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr,
                       DQ_ATOMIC: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (key block, document·KV + kv head): dK, dV summed over the GROUP query heads sharing it.
        K, V, DK, DV are pointers (DK/DV with K/V's strides); Q and DO descriptors with TMA."""
        n0, kvh, b, t0, L = _program(KV, CU, N, VARLEN, BLOCK_N, False)  # early key blocks: most work
        if n0 >= L:
            return
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        kv_ok = offs_n[:, None] < L
        k_ptrs = b * skb + kvh * skh + (t0 + offs_n[:, None]) * skn + offs_d[None, :]
        v_ptrs = b * svb + kvh * svh + (t0 + offs_n[:, None]) * svn + offs_d[None, :]
        k = tl.load(K + k_ptrs, mask=kv_ok, other=0.0)
        v = tl.load(V + v_ptrs, mask=kv_ok, other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        lo, full_lo, full_hi, hi = _query_ranges(n0, L, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
        for g in range(GROUP):
            h = kvh * GROUP + g
            row = (b * H + h) * N + t0
            lse_base, d_base, dqa_base = LSE + row, Dl + row, DQA + row * HEAD_DIM
            dk, dv = _bwd_kv_tiles(dk, dv, k, v, Q, DO, b, h, t0, sqb, sqh, sqn, sdob, sdoh, sdon, lse_base, d_base,
                                   dqa_base, offs_n, lo, full_lo, L, scale, softcap, True, CAUSAL, WINDOW, SOFTCAP,
                                   DQ_ATOMIC, TMA, BLOCK_M, HEAD_DIM)
            dk, dv = _bwd_kv_tiles(dk, dv, k, v, Q, DO, b, h, t0, sqb, sqh, sqn, sdob, sdoh, sdon, lse_base, d_base,
                                   dqa_base, offs_n, full_lo, full_hi, L, scale, softcap, False, CAUSAL, WINDOW,
                                   SOFTCAP, DQ_ATOMIC, TMA, BLOCK_M, HEAD_DIM)
            dk, dv = _bwd_kv_tiles(dk, dv, k, v, Q, DO, b, h, t0, sqb, sqh, sqn, sdob, sdoh, sdon, lse_base, d_base,
                                   dqa_base, offs_n, full_hi, hi, L, scale, softcap, True, CAUSAL, WINDOW, SOFTCAP,
                                   DQ_ATOMIC, TMA, BLOCK_M, HEAD_DIM)
        tl.store(DK + k_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DV + v_ptrs, dv.to(DV.dtype.element_ty), mask=kv_ok)

    @triton.jit
    def _bwd_q_tiles(dq, q, do, lse, delta, K, V, b, kvh, t0, skb, skh, skn, svb, svh, svn, offs_m, lo, hi, L,
                     scale, softcap, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                     SOFTCAP: tl.constexpr, TMA: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            k = _rows(K, b, kvh, t0, skb, skh, skn, n0, L, BLOCK_N, HEAD_DIM, MASKED, TMA)
            v = _rows(V, b, kvh, t0, svb, svh, svn, n0, L, BLOCK_N, HEAD_DIM, MASKED, TMA)
            s, t = _scores2(tl.dot(q, tl.trans(k)), scale, softcap, SOFTCAP)
            p = tl.exp2(s - lse[:, None])
            if MASKED:
                p = tl.where(_visible_tile(offs_m[:, None], offs_n[None, :], L, CAUSAL, WINDOW), p, 0.0)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            if SOFTCAP:
                ds = ds * (1.0 - t * t)
            dq = tl.dot(ds.to(k.dtype), k, dq)
        return dq

    @triton.jit
    def _bwd_q_kernel(Q, K, V, DO, LSE, Dl, DQ, CU, scale, softcap, sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
                      sdob, sdoh, sdon, H, N, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                      WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, VARLEN: tl.constexpr, TMA: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """Program (query block, document·H + head): dQ over the same key tiles as the forward. DQ has Q's
        strides; K and V are descriptors with TMA."""
        m0, h, b, t0, L = _program(H, CU, N, VARLEN, BLOCK_M, CAUSAL)
        if m0 >= L:
            return
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < L
        q_ptrs = b * sqb + h * sqh + (t0 + offs_m[:, None]) * sqn + tl.arange(0, HEAD_DIM)[None, :]
        q = tl.load(Q + q_ptrs, mask=row_ok[:, None], other=0.0)
        do = _rows(DO, b, h, t0, sdob, sdoh, sdon, m0, L, BLOCK_M, HEAD_DIM, True, False)
        row = (b * H + h) * N + t0 + offs_m
        lse = tl.load(LSE + row, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(Dl + row, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        lo, full_lo, full_hi, hi = _key_ranges(m0, L, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
        kvh = h // GROUP
        dq = _bwd_q_tiles(dq, q, do, lse, delta, K, V, b, kvh, t0, skb, skh, skn, svb, svh, svn, offs_m, lo, full_lo,
                          L, scale, softcap, True, CAUSAL, WINDOW, SOFTCAP, TMA, BLOCK_N, HEAD_DIM)
        dq = _bwd_q_tiles(dq, q, do, lse, delta, K, V, b, kvh, t0, skb, skh, skn, svb, svh, svn, offs_m, full_lo,
                          full_hi, L, scale, softcap, False, CAUSAL, WINDOW, SOFTCAP, TMA, BLOCK_N, HEAD_DIM)
        dq = _bwd_q_tiles(dq, q, do, lse, delta, K, V, b, kvh, t0, skb, skh, skn, svb, svh, svn, offs_m, full_hi, hi,
                          L, scale, softcap, True, CAUSAL, WINDOW, SOFTCAP, TMA, BLOCK_N, HEAD_DIM)
        tl.store(DQ + q_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# launchers ----------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, warps, stages) candidates per head dim for 2-byte dtypes (fitting_configs lowers the
# stages where fp32 tiles or a smaller GPU's shared memory need it), autotuned per shape at the first call
# on a GPU. Hopper wants 128-row query tiles (a warpgroup's wgmma is 64 rows) and software pipelining
# (stages of cp.async K/V loads). Lists are pruned to configurations that do not spill registers on sm_90
# (checked with ptxas, Triton 3.9, 2026-12-02): 4 warps cannot hold a 128 × 128 fp32 accumulator plus
# the score tile, and the key-block backward (accumulators dK and dV, BLOCK_N × hd each) needs 8 warps
# or short key tiles at hd 128.
CONFIGS = {
    "fwd": {64: ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 4), (64, 64, 4, 4)),
            128: ((128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4), (64, 64, 4, 4))},
    "kv": {64: ((32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4), (32, 128, 8, 4)),
           128: ((32, 64, 8, 3), (64, 64, 8, 3), (16, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 4))},
    "q": {64: ((128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 4)),
          128: ((128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 8, 3))},
}
# the CPU interpreter: one small configuration (tests need several tiles per sequence, and unequal tiles)
INTERPRET_CONFIGS = {"fwd": (32, 16, 4, 1), "kv": (16, 32, 4, 1), "q": (32, 16, 4, 1)}
_KEY = ["N", "GROUP", "CAUSAL", "WINDOW", "SOFTCAP", "VARLEN", "TMA"]
_FWD_KEY = _KEY + ["KV_LENS", "SINKS"]
DQ_MODES = ("kernel", "atomic")


# tiles in shared memory, in rows of hd elements: (loaded once per program, streamed per pipeline stage)
_SMEM_ROWS = {"fwd": lambda bm, bn: (bm, 2 * bn),  # q; k and v
              "kv": lambda bm, bn: (2 * bn, 2 * bm),  # k and v; q and dO
              "q": lambda bm, bn: (2 * bm, 2 * bn)}  # q and dO; k and v


def smem_bytes(kind: str, config: tuple[int, int, int, int], hd: int, itemsize: int) -> int:
    """Shared memory a configuration's tiles take: the tiles loaded once plus `stages` buffers of the
    streamed ones (the forward's (128, 64, 8, 3) in fp32 at hd 128 is 262,144 bytes, the figure of
    Triton's OutOfResources on the H200, 2026-12-05)."""
    bm, bn, _, stages = config
    once, streamed = _SMEM_ROWS[kind](bm, bn)
    return (once + stages * streamed) * hd * itemsize


def fitting_configs(kind: str, hd: int, itemsize: int, limit: int) -> list[tuple[int, int, int, int]]:
    """CONFIGS[kind][hd] with each candidate's stages lowered until its tiles fit `limit` bytes of shared
    memory (the lists are tuned for 2-byte dtypes: in fp32 none of the forward's fit an H200 at hd 128);
    candidates that do not fit with one stage are dropped, and the smallest one-stage candidate is kept
    when none fits."""
    out = []
    for bm, bn, w, s in CONFIGS[kind][hd]:
        while s > 1 and smem_bytes(kind, (bm, bn, w, s), hd, itemsize) > limit:
            s -= 1
        if smem_bytes(kind, (bm, bn, w, s), hd, itemsize) <= limit and (bm, bn, w, s) not in out:
            out.append((bm, bn, w, s))
    if not out:
        out = [min(((bm, bn, w, 1) for bm, bn, w, _ in CONFIGS[kind][hd]),
                   key=lambda c: smem_bytes(kind, c, hd, itemsize))]
    return out


@functools.lru_cache(maxsize=None)
def _gpu_candidates(kind: str, hd: int, itemsize: int, device_index: int) -> tuple:
    """fitting_configs for the shared memory one program may take on that GPU (Triton's own limit, the
    one OutOfResources checks)."""
    from triton.runtime import driver

    limit = driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return tuple(fitting_configs(kind, hd, itemsize, limit))


def _tuned(kernel, cands: tuple, tiles: dict[str, str], **kw):
    """`kernel` autotuned over `cands` on a GPU; LMFORGE_FLASH_TUNE=0 takes the first (tests: no timing
    runs, fewer compilations). `tiles`: TMA descriptor arguments -> the block size of their tiles
    ("BLOCK_M" or "BLOCK_N"), set on the descriptor before each launch."""
    if os.environ.get("LMFORGE_FLASH_TUNE", "1") == "0":
        cands = cands[:1]

    def set_tiles(nargs):
        for name, block in tiles.items():
            if nargs["TMA"]:
                rows, hd = nargs[block], nargs["HEAD_DIM"]
                nargs[name].block_shape = [1, 1, rows, hd] if nargs["TMA"] == 1 else [1, rows, 1, hd]

    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=set_tiles)
               for bm, bn, w, s in cands]
    return triton.autotune(configs, **{"key": _KEY, **kw})(kernel)


_kernels: dict[tuple, object] = {}


def _kernel(kind: str, q: torch.Tensor):
    """The autotuned kernel for q's head dim, dtype width and GPU, built at first use (the interpreter
    switch is read then): its candidates are those whose tiles fit the GPU's shared memory."""
    hd, base = q.shape[3], "fwd" if kind == "prefill" else kind
    if interpreting():
        cands = (INTERPRET_CONFIGS[base],)
    else:
        index = q.device.index if q.device.index is not None else torch.cuda.current_device()
        cands = _gpu_candidates(base, hd, q.element_size(), index)
    key = (kind, hd, cands)
    if key not in _kernels:
        _kernels[key] = {
            "fwd": lambda: _tuned(_fwd_kernel, cands, {"K": "BLOCK_N", "V": "BLOCK_N"}, key=_FWD_KEY),
            # the engine's prefill (cu_seqlens_k): N, its token count, changes every step, and tuning
            # again for each would stall serving; one tuning per layer kind serves every step
            "prefill": lambda: _tuned(_fwd_kernel, cands, {"K": "BLOCK_N", "V": "BLOCK_N"},
                                      key=[k for k in _FWD_KEY if k != "N"]),
            "q": lambda: _tuned(_bwd_q_kernel, cands, {"K": "BLOCK_N", "V": "BLOCK_N"}),
            # the key-block kernel's timing runs add into the dQ buffer: zeroed before each
            "kv": lambda: _tuned(_bwd_kv_kernel, cands, {"Q": "BLOCK_M", "DO": "BLOCK_M"},
                                 key=_KEY + ["DQ_ATOMIC"], reset_to_zero=["DQA"]),
        }[kind]()
    return _kernels[key]


class _Opts(NamedTuple):
    causal: bool
    scale: float
    window: int
    softcap: float
    cu_seqlens: torch.Tensor | None
    max_len: int  # longest document (N without cu_seqlens): the grid's block count
    cu_seqlens_k: torch.Tensor | None  # keys' own document lengths (forward only)
    sinks: torch.Tensor | None  # (H,) fp32 sink logits
    dq_mode: str
    tma: bool  # wanted; a launch uses it when its streamed tensors share one layout


def _strides(*ts: torch.Tensor) -> list[int]:
    return [s for t in ts for s in t.stride()[:3]]


def _launch(kind: str, grid_block: str, heads: int, opt: _Opts, tensors: list, tma: tuple[int, ...], *args, **kw):
    """Launch kernel `kind` on (document blocks, documents · heads) programs; tensors[i] for i in `tma`
    are passed as TMA descriptors when opt.tma, with dimensions in memory order (TMA = 1: heads outside
    the sequence, 2: heads inside it)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    q, k = tensors[0], tensors[1]
    docs = q.shape[0] if opt.cu_seqlens is None else opt.cu_seqlens.numel() - 1
    modes = {1 if tensors[i].stride(1) >= tensors[i].stride(2) else 2 for i in tma}
    mode = modes.pop() if opt.tma and len(modes) == 1 else 0
    tiled = list(tensors)
    for i in tma if mode else ():
        t = tensors[i] if mode == 1 else tensors[i].transpose(1, 2)
        tiled[i] = TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, t.shape[3]])
    cu = opt.cu_seqlens if opt.cu_seqlens is not None else q
    _kernel(kind, q)[lambda meta: (triton.cdiv(opt.max_len, meta[grid_block]), docs * heads)](
        *tiled, cu, opt.scale, opt.softcap, *args, GROUP=q.shape[1] // k.shape[1], HEAD_DIM=q.shape[3],
        CAUSAL=opt.causal, WINDOW=opt.window, SOFTCAP=opt.softcap > 0, VARLEN=opt.cu_seqlens is not None,
        TMA=mode, **kw)


def _forward(q, k, v, opt: _Opts):
    B, H, N, _ = q.shape
    o = torch.empty_like(q)  # q's strides: a (B, N, H, hd) projection's transpose stays a view downstream
    lse = torch.empty(B, H, N, dtype=torch.float32, device=q.device)
    cu_k, sink = opt.cu_seqlens_k, opt.sinks  # unused pointer arguments get a tensor at hand
    _launch("fwd" if cu_k is None else "prefill", "BLOCK_M", H, opt, [q, k, v, o, lse], (1, 2),
            *_strides(q, k, v, o), H, N, q if cu_k is None else cu_k, lse if sink is None else sink,
            KV_LENS=cu_k is not None, SINKS=sink is not None)
    return o, lse


def _backward(do, q, k, v, o, lse, opt: _Opts):
    B, H, N, hd = q.shape
    do = do if do.stride(-1) == 1 else do.contiguous()
    opt = opt._replace(tma=opt.tma and _tma_ok(do))
    delta = torch.empty_like(lse)
    _bwd_pre_kernel[(triton.cdiv(N, 64), B * H)](o, do, delta, H, N, *_strides(o, do), HEAD_DIM=hd, BLOCK_M=64)
    dk, dv = torch.empty_like(k), torch.empty_like(v)  # k's and v's strides (_dense)
    atomic = opt.dq_mode == "atomic"
    dqa = torch.zeros(B, H, N, hd, dtype=torch.float32, device=q.device) if atomic else delta.new_zeros(1)
    _launch("kv", "BLOCK_N", k.shape[1], opt, [q, k, v, do, lse, delta, dk, dv, dqa], (0, 3),
            *_strides(q, k, v, do), H, k.shape[1], N, DQ_ATOMIC=atomic)
    if atomic:
        dq = dqa.to(q.dtype)
    else:
        dq = torch.empty_like(q)
        _launch("q", "BLOCK_M", H, opt, [q, k, v, do, lse, delta, dq], (1, 2), *_strides(q, k, v, do), H, N)
    # P = e^(s - L) already counts the sink in L, so dQ, dK, dV need nothing more; the sink's own column has
    # dP = 0, so dS_sink = P_sink (0 - D) and d sink_h = -Σ_t e^(sink_h - L_t) D_t
    dsinks = None if opt.sinks is None else -((opt.sinks[:, None] - lse).exp() * delta).sum((0, 2))
    return dq, dk, dv, dsinks


class FlashAttention(torch.autograd.Function):
    """Saves q, k, v (the inputs) and only O and the (B, H, N) logsumexp; the backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, opt: _Opts):
        o, lse = _forward(q, k, v, opt)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.opt, ctx.sinks_dtype = opt, None if sinks is None else sinks.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv, dsinks = _backward(do, q, k, v, o, lse, ctx.opt)
        return dq, dk, dv, None if dsinks is None else dsinks.to(ctx.sinks_dtype), None


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA reads tensors whose base and strides (but the last, 1) are multiples of 16 bytes."""
    return t.data_ptr() % 16 == 0 and all(st * t.element_size() % 16 == 0 for st in t.stride()[:-1])


def _dense(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, hd) contiguous, or the transpose of a contiguous (B, N, H, hd): layouts whose empty_like
    has the same strides (the kernels write gradients with their input's strides)."""
    return t if t.is_contiguous() or t.transpose(1, 2).is_contiguous() else t.contiguous()


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernel cannot run these tensors here (one line), or None."""
    if triton is None:
        return "flash_attention needs triton (pip install 'lmforge[kernels]')"
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or k.shape[3] != q.shape[3]:
        return (f"flash_attention takes q (B, H, N, hd) and k, v (B, KV, N, hd); got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[3] not in HEAD_DIMS:
        return f"flash_attention supports head dims {HEAD_DIMS}, got {q.shape[3]}; use attn_impl='sdpa'"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return (f"flash_attention takes q, k, v of one dtype among fp16/bf16/fp32, got {q.dtype}, {k.dtype}, "
                f"{v.dtype}; cast them or use attn_impl='sdpa'")
    if q.device.type != "cuda" and not interpreting():
        return f"flash_attention runs on CUDA GPUs (or with TRITON_INTERPRET=1), got device {q.device}"
    if (why := pre_ampere(q.device)) is not None:
        return f"flash_attention {why}; use attn_impl='sdpa'"
    return None


def _check_documents(cu: list[int], B: int, N: int) -> int:
    """Validate cumulative document lengths over B rows of N tokens; return the longest length."""
    lengths = [e - s for s, e in zip(cu[:-1], cu[1:])]
    if not lengths or cu[0] != 0 or cu[-1] != B * N or min(lengths) < 0:
        raise ConfigError(f"cu_seqlens must rise from 0 to B·N = {B * N}, got {cu[:4]}...{cu[-2:]}")
    crossing = [(s, e) for s, e in zip(cu[:-1], cu[1:]) if e > s and s // N != (e - 1) // N]
    if crossing:
        raise ConfigError(f"cu_seqlens: document {crossing[0]} crosses a row boundary (rows of N = {N} tokens)")
    return max(lengths)


def _check_key_documents(cu_q: list[int], cu_k: list[int], Nk: int) -> None:
    """Keys' cumulative lengths: one entry per query document, rising to Nk, never fewer keys than queries."""
    lengths = [(eq - sq, ek - sk) for sq, eq, sk, ek in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])]
    if len(cu_k) != len(cu_q) or cu_k[0] != 0 or cu_k[-1] != Nk or any(lk < lq for lq, lk in lengths):
        raise ConfigError(f"cu_seqlens_k must rise from 0 to the {Nk} keys, one entry per query document, with at "
                          f"least as many keys as queries per document; got {cu_k[:4]}...{cu_k[-2:]}")


def _doc_ids(cu_seqlens: torch.Tensor, B: int, N: int) -> torch.Tensor:
    """(B, N) document ids of packed rows from their cumulative lengths (cu_seqlens_from_doc_ids inverted):
    token t belongs to the document whose end is the first one past t (empty documents own no token)."""
    tokens = torch.arange(B * N, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].long(), tokens, right=True).view(B, N)


@compiler_disable  # a graph break under torch.compile: the autotuner and descriptors are host code
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    scale: float | None = None, window: int = 0, softcap: float = 0.0,
                    cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None,
                    cu_seqlens_k: torch.Tensor | None = None, sinks: torch.Tensor | None = None,
                    dq_mode: str = "kernel", tma: bool | None = None) -> torch.Tensor:
    """softmax(scale · q kᵀ [capped, masked]) v; q (B, H, N, hd), k and v (B, KV, N, hd) -> (B, H, N, hd),
    differentiable. `window` > 0 keeps keys i - window < j <= i (causal only); `softcap` > 0 caps logits at
    ±softcap; `cu_seqlens` (n_docs + 1,) int32 packs documents (module docstring), `max_seqlen` is their
    longest length (computed, with a device sync, when not given). `cu_seqlens_k` (forward only, B = 1):
    the keys' own document lengths over k's Nk tokens; a document's Lq queries are then its last Lq of Lk
    keys (bottom-right causal: chunked prefill over a cached context). `sinks` (H,): one learned logit per
    head in every softmax denominator (gpt-oss), with its gradient. `dq_mode`: "kernel" computes dQ in its
    own pass (deterministic), "atomic" adds it from the key-block pass into an fp32 buffer (FA2's way:
    5 matmuls per tile pair instead of 7, run-to-run differences in the last bits). `tma`: fetch the tiles
    streamed through the inner loops with Hopper's tensor memory accelerator (sm_90+; None = TMA_DEFAULT)."""
    reason = unsupported(q, k, v)
    if reason is not None:
        raise LmforgeError(reason)
    B, H, N, hd = q.shape
    if k.shape[0] != B or (k.shape[2] != N and cu_seqlens_k is None) or H % k.shape[1]:
        raise ConfigError(f"flash_attention: k, v {tuple(k.shape)} must be (B={B}, KV, N={N}, {hd}) with KV "
                          f"dividing H={H} (for fewer queries than keys pass cu_seqlens_k)")
    if dq_mode not in DQ_MODES:
        raise ConfigError(f"flash_attention: dq_mode={dq_mode!r} is not one of {DQ_MODES}")
    if window < 0 or (window > 0 and not causal):
        raise ConfigError(f"flash_attention: window={window} must be >= 0 and needs causal=True")
    check_softcap_and_window("flash_attention", softcap)
    if cu_seqlens_k is not None and (cu_seqlens is None or B != 1):
        raise ConfigError("flash_attention: cu_seqlens_k needs cu_seqlens and one packed row (B = 1)")
    if cu_seqlens_k is not None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ConfigError("flash_attention: cu_seqlens_k is forward only (inference); run under torch.no_grad()")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ConfigError(f"cu_seqlens must be a 1-D int tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        if cu_seqlens_k is not None:
            cu_seqlens_k = cu_seqlens_k.to(device=q.device, dtype=torch.int32)
        if max_seqlen is None:  # one device sync anyway: check the documents too
            max_seqlen = _check_documents(cu_seqlens.tolist(), B, N)
            if cu_seqlens_k is not None:
                _check_key_documents(cu_seqlens.tolist(), cu_seqlens_k.tolist(), k.shape[2])
    if sinks is not None and sinks.shape != (H,):
        raise ConfigError(f"flash_attention: sinks must be one logit per query head ({H},), got {tuple(sinks.shape)}")
    dtype = q.dtype
    if dtype == torch.bfloat16 and interpreting():
        # Triton's CPU interpreter multiplies bf16 tl.dot operands as raw bits (triton-lang/triton#11584,
        # unsupported as of 3.8: outputs ~1e9): interpret the fp32 kernels, as paged_attention's F32 does
        q, k, v = q.float(), k.float(), v.float()
    q, k, v = _dense(q), _dense(k), _dense(v)
    if tma is None:
        tma = TMA_DEFAULT and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] >= 9
    opt = _Opts(bool(causal), hd ** -0.5 if scale is None else float(scale), int(window), float(softcap), cu_seqlens,
                N if cu_seqlens is None else max_seqlen, cu_seqlens_k,
                None if sinks is None else sinks.detach().float().contiguous(), dq_mode,
                bool(tma) and all(map(_tma_ok, (q, k, v))))
    return FlashAttention.apply(q, k, v, sinks, opt).to(dtype)


def flash_attention_for_model(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, *, scale: float,
                              softcap: float = 0.0, window: int = 0,
                              documents: tuple[torch.Tensor, int] | None = None, dropout_p: float = 0.0,
                              sinks: torch.Tensor | None = None, doc_mask=None) -> torch.Tensor:
    """attn_impl = "triton" for lmforge.model.layers.attention: `mask` is the layer's mask before any
    window is applied ("causal", None = all keys, or a bool tensor), `window` the layer's sliding window,
    `documents` the (cu_seqlens, longest length) of packed rows (AttnMetadata.documents(), computed once
    per forward; their bool mask is then ignored). `doc_mask`: a callable giving those rows' (B, 1, T, T) mask
    for the SDPA fallback (AttnMetadata.doc_mask, built once per forward there; else rebuilt from cu_seqlens).
    What the kernel cannot do (a cache with fewer queries than keys, other mask tensors, dropout, an unsupported
    head dim, dtype or GPU) falls back to the reference path with a one-line warning."""
    from lmforge.model.layers.attention import attention, window_mask
    from lmforge.model.meta import AttnMetadata

    reason = unsupported(q, k, v)
    if reason is None:
        if q.shape[2] != k.shape[2]:
            reason = "flash_attention needs as many queries as keys (fewer queries: a cache's steps)"
        elif dropout_p > 0:
            reason = "flash_attention has no attention dropout"
        elif not (isinstance(mask, str) or mask is None or documents is not None):
            reason = "flash_attention takes causal, full or packed-document masks, not arbitrary mask tensors"
        elif window > 0 and not (isinstance(mask, str) or documents is not None):
            reason = "flash_attention's sliding window is causal only"
    if reason is None:
        cu, longest = documents if documents is not None else (None, None)
        return flash_attention(q, k, v, causal=isinstance(mask, str) or documents is not None, scale=scale,
                               window=window, softcap=softcap, cu_seqlens=cu, max_seqlen=longest, sinks=sinks)
    # once (every layer, every step); the reason without its advice to the direct caller ("; use attn_impl='sdpa'")
    fallback_notice(f"{reason.split('; ')[0]}; using attn_impl='sdpa' for these calls")
    if documents is not None:  # packed rows: their own mask (causal within each document), not plain causal
        mask = doc_mask() if doc_mask is not None else AttnMetadata.packed(
            _doc_ids(documents[0], q.shape[0], q.shape[2])).doc_mask()
    if window > 0 and k.shape[2] > window:
        mask = window_mask(mask, q.shape[2], k.shape[2], window, q.device)
    return attention(q, k, v, mask, scale=scale, softcap=softcap, dropout_p=dropout_p, impl="sdpa", sinks=sinks)
