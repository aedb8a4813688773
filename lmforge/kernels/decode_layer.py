"""A whole Llama decoder layer in one persistent Triton launch, at batch 1 (the kernel step's other mode).

lmforge.kernels.decode runs a layer as five kernels. At batch 1 on an H200 a layer's weights (88 MB for a
1B model) stream in ~21 us, so each of the five is only 2-11 us long and the ramp at its start and the tail
at its end - when part of the GPU has nothing left to load - cost a large share (the o-projection's 8 MB
take 2 us at full bandwidth). Programmatic dependent launch hides part of that, but a kernel can only
prefetch what fits beside the previous one.

Here one launch with a fixed number of programs per SM (all resident at once) does the five phases of
the layer, separated by grid-wide barriers instead of kernel boundaries:

  0  RMSNorm + q/k/v projection + RoPE + write of the token's k and v into the paged cache
  1  paged attention: (query heads, slice of the keys) units; the last slice of a head combines them
  2  o-projection + residual (x += Wo o)
  3  RMSNorm + gate/up projection + SwiGLU (h = silu(Wg xn) * Wu xn)
  4  down-projection + residual (x += Wd h)

Each program owns a contiguous, balanced range of rows of every matrix (pair-rows j, j + hd/2 in phase 0,
so RoPE needs no other program's output; no split-K and no atomics on the residual) and walks it in
(BN rows x BK columns) tiles, accumulating elementwise and reducing a row block once, after its last
column tile. The next tile is loaded while the current one is multiplied (register double-buffering, or
Triton's software pipeline through shared memory). Before each barrier a program already issues the loads
of its first tile of the next matrix (weights never depend on the barrier), so the memory system stays
busy while the slowest program finishes; the o-projection's first tile is in flight during all of
attention. The next layer's launch (PDL) prefetches its first q/k/v tile the same way.

The barrier (`_grid_sync`) is a counter each program adds 1 to (release) and polls (acquire); every
program must be resident at once, so a config's programs per SM are capped by what its compiled register
and shared-memory use lets fit (`_resident`). The counters are zeroed by the step's embedding kernel at
the start of every step. Data written by other programs inside the launch is read with .cg loads (past
the SMs' incoherent L1).

`decode_layer(..., split=True)` runs the same code as five launches, one phase each, without barriers:
what Triton's CPU interpreter runs (it executes programs one after another, so a barrier would never
open), and the reference the GPU tests compare the one-launch form with. Models with QK-norm keep the
five-kernel step (their per-head RMS needs a program to own whole heads).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import torch

from lmforge.kernels.decode import PDL_DEFAULT, _launch_opts, interpreting, triton
from lmforge.kernels.paged_attention import _pad

if triton is not None:
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    from lmforge.kernels.paged_attention import _combine_head, _kv_tile, _q_tile, _softmax_step

    @triton.jit
    def _grid_sync(counter_ptr, target):
        """Wait until every program of the launch has arrived (the counter reaches target); this
        program's earlier stores are visible to all of them afterwards, and theirs to it."""
        tl.debug_barrier()  # every thread of this program has stored its results
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
        while tl.load(counter_ptr, volatile=True) < target:
            pass
        tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def _rows_tile(w_ptr, rows, ok, k0, cols, K: tl.constexpr, EVICT: tl.constexpr):
        """(len(rows), len(cols)) tile of a row-major (N, K) weight at columns k0 + cols."""
        kk = k0 + cols
        return tl.load(w_ptr + rows[:, None] * K + kk[None, :], mask=ok[:, None] & (kk < K)[None, :], other=0.0,
                       eviction_policy=EVICT)

    @triton.jit
    def _qkv_tiles(wq_ptr, wk_ptr, wv_ptr, pr, ok, k0, cols, H, KV, HD: tl.constexpr, K: tl.constexpr,
                   EVICT: tl.constexpr):
        """Rows j and j + hd/2 of the heads of pair-rows pr (head = pr // (hd/2): q heads, then k, then v),
        each from its own projection's weight, at columns k0 + cols."""
        HALF: tl.constexpr = HD // 2
        head, j = pr // HALF, pr % HALF
        row = head * HD + j  # in the stacked [q; k; v] rows
        base = tl.where(head < H, wq_ptr + row * K,
                        tl.where(head < H + KV, wk_ptr + (row - H * HD) * K, wv_ptr + (row - (H + KV) * HD) * K))
        kk = k0 + cols
        m = ok[:, None] & (kk < K)[None, :]
        w1 = tl.load(base[:, None] + kk[None, :], mask=m, other=0.0, eviction_policy=EVICT)
        w2 = tl.load(base[:, None] + HALF * K + kk[None, :], mask=m, other=0.0, eviction_policy=EVICT)
        return w1, w2

    @triton.jit
    def _inv_rms(x_ptr, D: tl.constexpr, DP: tl.constexpr, eps):
        """1 / RMS(x) (x written by other programs: read past L1)."""
        cols = tl.arange(0, DP)
        x = tl.load(x_ptr + cols, mask=cols < D, other=0.0, cache_modifier=".cg")
        return 1.0 / tl.sqrt(tl.sum(x * x, 0) / D + eps)

    @triton.jit
    def _in_tile(a_ptr, g_ptr, inv, k0, cols, K: tl.constexpr, NORM: tl.constexpr):
        """Columns k0 + cols of a GEMV's input in fp32: a, or with NORM the RMS-normalised a times the gain."""
        kk = k0 + cols
        ok = kk < K
        a = tl.load(a_ptr + kk, mask=ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        if NORM:
            a = a * inv * tl.load(g_ptr + kk, mask=ok, other=0.0).to(tl.float32)
        return a

    @triton.jit
    def _qkv_store(y1, y2, pr, ok, cos_ptr, sin_ptr, pos, page, q_ptr, k_ptr, v_ptr, s_kb, s_ks, s_kh, s_vb, s_vs,
                   s_vh, H, KV, HD: tl.constexpr, BS: tl.constexpr):
        """Rows j (y1) and j + hd/2 (y2) of pair-rows pr: rotated into q, rotated k and plain v into the
        cache slot."""
        HALF: tl.constexpr = HD // 2
        head, j = pr // HALF, pr % HALF
        c = tl.load(cos_ptr + pos * HALF + j, mask=ok, other=1.0)
        s = tl.load(sin_ptr + pos * HALF + j, mask=ok, other=0.0)
        rot = head < H + KV  # q and k heads rotate by the token's position; v heads do not
        z1 = tl.where(rot, y1 * c - y2 * s, y1)
        z2 = tl.where(rot, y1 * s + y2 * c, y2)
        is_q = ok & (head < H)
        is_k = ok & (head >= H) & (head < H + KV)
        is_v = ok & (head >= H + KV)
        qd = q_ptr + head * HD + j
        tl.store(qd, z1.to(q_ptr.dtype.element_ty), mask=is_q)
        tl.store(qd + HALF, z2.to(q_ptr.dtype.element_ty), mask=is_q)
        slot = pos % BS
        kd = k_ptr + page * s_kb + slot * s_ks + (head - H) * s_kh + j
        tl.store(kd, z1.to(k_ptr.dtype.element_ty), mask=is_k)
        tl.store(kd + HALF, z2.to(k_ptr.dtype.element_ty), mask=is_k)
        vd = v_ptr + page * s_vb + slot * s_vs + (head - H - KV) * s_vh + j
        tl.store(vd, z1.to(v_ptr.dtype.element_ty), mask=is_v)
        tl.store(vd + HALF, z2.to(v_ptr.dtype.element_ty), mask=is_v)

    @triton.jit
    def _phase_qkv(x_ptr, g_ptr, wq_ptr, wk_ptr, wv_ptr, w1, w2, lo, hi, eps, cos_ptr, sin_ptr, pos, page,
                   q_ptr, k_ptr, v_ptr, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, H, KV, HD: tl.constexpr,
                   D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                   STAGES: tl.constexpr, EVICT: tl.constexpr):
        """Pair-rows [lo, hi) in tiles of BN pair-rows x BK columns, (w1, w2) the first (loaded by the
        caller), the rest double-buffered in registers (STAGES 0) or through Triton's software pipeline;
        each row block's dot products accumulate elementwise and are reduced once, after its last column
        tile."""
        NKT: tl.constexpr = (D + BK - 1) // BK
        cols = tl.arange(0, BK)
        inv = _inv_rms(x_ptr, D, DP, eps)
        n_t = tl.cdiv(hi - lo, BN) * NKT
        acc1 = tl.zeros([BN, BK], dtype=tl.float32)
        acc2 = tl.zeros([BN, BK], dtype=tl.float32)
        if STAGES == 0:  # register double-buffering: tile t + 1's loads go out before tile t's arithmetic
            for t in range(0, n_t):
                pr = lo + ((t + 1) // NKT) * BN + tl.arange(0, BN)  # past the last tile: all masked
                w1_n, w2_n = _qkv_tiles(wq_ptr, wk_ptr, wv_ptr, pr, pr < hi, ((t + 1) % NKT) * BK, cols, H, KV, HD,
                                        D, EVICT)
                acc1, acc2 = _qkv_step(t, w1, w2, acc1, acc2, lo, hi, x_ptr, g_ptr, inv, cos_ptr, sin_ptr, pos,
                                       page, q_ptr, k_ptr, v_ptr, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, H, KV, HD, D, BS,
                                       BN, BK)
                w1, w2 = w1_n, w2_n
        else:  # Triton's software pipeline: STAGES - 1 tiles in flight through shared memory
            acc1, acc2 = _qkv_step(0, w1, w2, acc1, acc2, lo, hi, x_ptr, g_ptr, inv, cos_ptr, sin_ptr, pos, page,
                                   q_ptr, k_ptr, v_ptr, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, H, KV, HD, D, BS, BN, BK)
            for t in tl.range(1, n_t, num_stages=STAGES):
                pr = lo + (t // NKT) * BN + tl.arange(0, BN)
                w1, w2 = _qkv_tiles(wq_ptr, wk_ptr, wv_ptr, pr, pr < hi, (t % NKT) * BK, cols, H, KV, HD, D, EVICT)
                acc1, acc2 = _qkv_step(t, w1, w2, acc1, acc2, lo, hi, x_ptr, g_ptr, inv, cos_ptr, sin_ptr, pos,
                                       page, q_ptr, k_ptr, v_ptr, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, H, KV, HD, D, BS,
                                       BN, BK)

    @triton.jit
    def _qkv_step(t, w1, w2, acc1, acc2, lo, hi, x_ptr, g_ptr, inv, cos_ptr, sin_ptr, pos, page, q_ptr, k_ptr,
                  v_ptr, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, H, KV, HD: tl.constexpr, D: tl.constexpr,
                  BS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """Tile t (row block t // NKT, column block t % NKT): accumulate; after a row block's last column
        block, reduce it, rotate and store, and start the next at zero."""
        NKT: tl.constexpr = (D + BK - 1) // BK
        a = _in_tile(x_ptr, g_ptr, inv, (t % NKT) * BK, tl.arange(0, BK), D, True)
        acc1 += w1.to(tl.float32) * a[None, :]
        acc2 += w2.to(tl.float32) * a[None, :]
        if t % NKT == NKT - 1:
            pr = lo + (t // NKT) * BN + tl.arange(0, BN)
            _qkv_store(tl.sum(acc1, 1), tl.sum(acc2, 1), pr, pr < hi, cos_ptr, sin_ptr, pos, page, q_ptr, k_ptr, v_ptr,
                       s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, H, KV, HD, BS)
            acc1 = tl.zeros([BN, BK], dtype=tl.float32)
            acc2 = tl.zeros([BN, BK], dtype=tl.float32)
        return acc1, acc2

    @triton.jit
    def _phase_attend(q_ptr, k_ptr, v_ptr, bt_ptr, n, o_ptr, part_o_ptr, part_ml_ptr, count_ptr, sinks_ptr,
                      s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, scale, softcap, window, pid, P, H, KV,
                      HD: tl.constexpr, HDP: tl.constexpr, GP: tl.constexpr, QPP: tl.constexpr, BS: tl.constexpr,
                      BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                      SINKS: tl.constexpr, F32: tl.constexpr, PRECISION: tl.constexpr):
        """Units (QPP query heads, slice of the n keys) dealt round-robin over the programs; each slice's
        unnormalised output goes to the workspace and the last slice of a head group to finish combines
        them into o (lmforge.kernels.paged_attention's algorithm)."""
        GROUP = H // KV
        d = tl.arange(0, HDP)
        d_ok = d < HD
        g = tl.arange(0, GP)
        g_ok = g < QPP
        lo0 = 0
        if WINDOW:
            lo0 = tl.maximum(n - window, 0)
        chunk = tl.cdiv(n - lo0, SPLITS)
        for u in range(pid, (H // QPP) * SPLITS, P):
            row, sp = u // SPLITS, u % SPLITS
            first = row * QPP
            kvh = first // GROUP
            heads = first + g
            lo = lo0 + sp * chunk
            hi = tl.minimum(lo + chunk, n)
            q = _q_tile(q_ptr, 0, H, heads, HD, d, g_ok, d_ok, F32)
            m_i = tl.full([GP], float("-inf"), tl.float32)
            l_i = tl.zeros([GP], dtype=tl.float32)
            acc = tl.zeros([GP, HDP], dtype=tl.float32)
            for s0 in range(lo, hi, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                ok = s < hi
                k = _kv_tile(k_ptr, bt_ptr, 0, 0, s, ok, kvh, s_kb, s_ks, s_kh, d, d_ok, BS, F32)
                v = _kv_tile(v_ptr, bt_ptr, 0, 0, s, ok, kvh, s_vb, s_vs, s_vh, d, d_ok, BS, F32)
                m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, scale, softcap, SOFTCAP, PRECISION, False)
            mine = u * GP + g  # this unit's rows of the partial results
            tl.store(part_o_ptr + mine[:, None] * HDP + d[None, :], acc)
            tl.store(part_ml_ptr + mine * 2, m_i)
            tl.store(part_ml_ptr + mine * 2 + 1, l_i)
            tl.debug_barrier()  # every thread's stores precede the (release) count below
            done = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
            if done == SPLITS - 1:  # the last slice of this head group combines all of them
                sps = tl.arange(0, SPLITS)
                for gi in tl.static_range(QPP):
                    o = _combine_head(part_o_ptr, part_ml_ptr, (row * SPLITS + sps) * GP + gi, SPLITS, d, HDP,
                                      sinks_ptr, first + gi, SINKS)
                    tl.store(o_ptr + (first + gi) * HD + d, o.to(o_ptr.dtype.element_ty), mask=d_ok)
                tl.store(count_ptr + row, 0)  # ready for the next layer

    @triton.jit
    def _phase_residual(w_ptr, a_ptr, x_ptr, w, lo, hi, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        STAGES: tl.constexpr, EVICT: tl.constexpr):
        """x[r] += W[r] . a for the rows r in [lo, hi) (this program's own rows: no atomics), tiles as in
        _phase_qkv; w is the first tile."""
        NKT: tl.constexpr = (K + BK - 1) // BK
        cols = tl.arange(0, BK)
        n_t = tl.cdiv(hi - lo, BN) * NKT
        acc = tl.zeros([BN, BK], dtype=tl.float32)
        if STAGES == 0:  # register double-buffering, as in _phase_qkv
            for t in range(0, n_t):
                rows = lo + ((t + 1) // NKT) * BN + tl.arange(0, BN)
                w_n = _rows_tile(w_ptr, rows, rows < hi, ((t + 1) % NKT) * BK, cols, K, EVICT)
                acc = _residual_step(t, w, acc, a_ptr, x_ptr, lo, hi, K, BN, BK)
                w = w_n
        else:
            acc = _residual_step(0, w, acc, a_ptr, x_ptr, lo, hi, K, BN, BK)
            for t in tl.range(1, n_t, num_stages=STAGES):
                rows = lo + (t // NKT) * BN + tl.arange(0, BN)
                w = _rows_tile(w_ptr, rows, rows < hi, (t % NKT) * BK, cols, K, EVICT)
                acc = _residual_step(t, w, acc, a_ptr, x_ptr, lo, hi, K, BN, BK)

    @triton.jit
    def _residual_step(t, w, acc, a_ptr, x_ptr, lo, hi, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        NKT: tl.constexpr = (K + BK - 1) // BK
        acc += w.to(tl.float32) * _in_tile(a_ptr, a_ptr, 1.0, (t % NKT) * BK, tl.arange(0, BK), K, False)[None, :]
        if t % NKT == NKT - 1:  # the row block is complete: add it to the residual stream
            rows = lo + (t // NKT) * BN + tl.arange(0, BN)
            ok = rows < hi
            res = tl.load(x_ptr + rows, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(x_ptr + rows, res + tl.sum(acc, 1), mask=ok)
            acc = tl.zeros([BN, BK], dtype=tl.float32)
        return acc

    @triton.jit
    def _phase_glu(x_ptr, g_ptr, wg_ptr, wu_ptr, h_ptr, wg, wu, lo, hi, eps, D: tl.constexpr, DP: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, STAGES: tl.constexpr, EVICT: tl.constexpr):
        """h[r] = silu(Wg[r] . xn) * (Wu[r] . xn), xn = RMSNorm(x), for the rows r in [lo, hi); tiles as in
        _phase_qkv, (wg, wu) the first."""
        NKT: tl.constexpr = (D + BK - 1) // BK
        cols = tl.arange(0, BK)
        inv = _inv_rms(x_ptr, D, DP, eps)
        n_t = tl.cdiv(hi - lo, BN) * NKT
        acc_g = tl.zeros([BN, BK], dtype=tl.float32)
        acc_u = tl.zeros([BN, BK], dtype=tl.float32)
        if STAGES == 0:  # register double-buffering, as in _phase_qkv
            for t in range(0, n_t):
                rows = lo + ((t + 1) // NKT) * BN + tl.arange(0, BN)
                wg_n = _rows_tile(wg_ptr, rows, rows < hi, ((t + 1) % NKT) * BK, cols, D, EVICT)
                wu_n = _rows_tile(wu_ptr, rows, rows < hi, ((t + 1) % NKT) * BK, cols, D, EVICT)
                acc_g, acc_u = _glu_step(t, wg, wu, acc_g, acc_u, lo, hi, x_ptr, g_ptr, inv, h_ptr, D, BN, BK)
                wg, wu = wg_n, wu_n
        else:
            acc_g, acc_u = _glu_step(0, wg, wu, acc_g, acc_u, lo, hi, x_ptr, g_ptr, inv, h_ptr, D, BN, BK)
            for t in tl.range(1, n_t, num_stages=STAGES):
                rows = lo + (t // NKT) * BN + tl.arange(0, BN)
                wg = _rows_tile(wg_ptr, rows, rows < hi, (t % NKT) * BK, cols, D, EVICT)
                wu = _rows_tile(wu_ptr, rows, rows < hi, (t % NKT) * BK, cols, D, EVICT)
                acc_g, acc_u = _glu_step(t, wg, wu, acc_g, acc_u, lo, hi, x_ptr, g_ptr, inv, h_ptr, D, BN, BK)

    @triton.jit
    def _glu_step(t, wg, wu, acc_g, acc_u, lo, hi, x_ptr, g_ptr, inv, h_ptr, D: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
        NKT: tl.constexpr = (D + BK - 1) // BK
        a = _in_tile(x_ptr, g_ptr, inv, (t % NKT) * BK, tl.arange(0, BK), D, True)
        acc_g += wg.to(tl.float32) * a[None, :]
        acc_u += wu.to(tl.float32) * a[None, :]
        if t % NKT == NKT - 1:
            rows = lo + (t // NKT) * BN + tl.arange(0, BN)
            y, u = tl.sum(acc_g, 1), tl.sum(acc_u, 1)
            tl.store(h_ptr + rows, (y * tl.sigmoid(y) * u).to(h_ptr.dtype.element_ty), mask=rows < hi)
            acc_g = tl.zeros([BN, BK], dtype=tl.float32)
            acc_u = tl.zeros([BN, BK], dtype=tl.float32)
        return acc_g, acc_u

    @triton.jit
    def _layer_kernel(x_ptr, g1_ptr, wq_ptr, wk_ptr, wv_ptr, cos_ptr, sin_ptr, pos_ptr, bt_ptr, k_ptr, v_ptr,
                      q_ptr, o_ptr, wo_ptr, g2_ptr, wg_ptr, wu_ptr, h_ptr, wd_ptr, part_o_ptr, part_ml_ptr,
                      count_ptr, sinks_ptr, sync_ptr, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, eps, scale, softcap,
                      window, H, KV, D: tl.constexpr, DP: tl.constexpr, FF: tl.constexpr, HD: tl.constexpr,
                      HDP: tl.constexpr, OK: tl.constexpr, BS: tl.constexpr,
                      BN_QKV: tl.constexpr, BN_O: tl.constexpr, BN_GU: tl.constexpr, BN_DOWN: tl.constexpr,
                      BK: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, QPP: tl.constexpr,
                      STAGES: tl.constexpr,
                      GP: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr,
                      F32: tl.constexpr, PRECISION: tl.constexpr, PHASE: tl.constexpr, EVICT: tl.constexpr,
                      PDL: tl.constexpr):
        """One decoder layer (PHASE -1: all five phases with grid barriers between them) or one phase of
        it (PHASE 0-4, no barrier). OK = H * HD, the o-projection's input width."""
        pid = tl.program_id(0)
        P = tl.num_programs(0)
        HALF: tl.constexpr = HD // 2
        NPR = (H + 2 * KV) * HALF
        qkv_lo, qkv_hi = pid * NPR // P, (pid + 1) * NPR // P  # this program's rows of every matrix
        d_lo, d_hi = pid * D // P, (pid + 1) * D // P
        f_lo, f_hi = pid * FF // P, (pid + 1) * FF // P
        cols = tl.arange(0, BK)
        if PHASE == -1 or PHASE == 0:  # weights do not depend on the previous kernel: load before waiting
            pr = qkv_lo + tl.arange(0, BN_QKV)
            w1, w2 = _qkv_tiles(wq_ptr, wk_ptr, wv_ptr, pr, pr < qkv_hi, 0, cols, H, KV, HD, D, EVICT)
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        pos = tl.load(pos_ptr)
        if PHASE == -1 or PHASE == 0:
            page = tl.load(bt_ptr + pos // BS).to(tl.int64)
            _phase_qkv(x_ptr, g1_ptr, wq_ptr, wk_ptr, wv_ptr, w1, w2, qkv_lo, qkv_hi, eps, cos_ptr, sin_ptr, pos,
                       page, q_ptr, k_ptr, v_ptr, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, H, KV, HD, D, DP, BS, BN_QKV,
                       BK, STAGES, EVICT)
        o_rows = d_lo + tl.arange(0, BN_O)
        if PHASE == -1:  # the o-projection's first tile is in flight through the barrier and attention
            wo = _rows_tile(wo_ptr, o_rows, o_rows < d_hi, 0, cols, OK, EVICT)
            _grid_sync(sync_ptr, P)
        if PHASE == -1 or PHASE == 1:
            _phase_attend(q_ptr, k_ptr, v_ptr, bt_ptr, pos + 1, o_ptr, part_o_ptr, part_ml_ptr, count_ptr,
                          sinks_ptr, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, scale, softcap, window, pid, P, H, KV, HD,
                          HDP, GP, QPP, BS, BLOCK_S, SPLITS, SOFTCAP, WINDOW, SINKS, F32, PRECISION)
        if PHASE == -1:
            _grid_sync(sync_ptr, 2 * P)
        if PHASE == 2:
            wo = _rows_tile(wo_ptr, o_rows, o_rows < d_hi, 0, cols, OK, EVICT)
        if PHASE == -1 or PHASE == 2:
            _phase_residual(wo_ptr, o_ptr, x_ptr, wo, d_lo, d_hi, OK, BN_O, BK, STAGES, EVICT)
        if PHASE == -1 or PHASE == 3:
            f_rows = f_lo + tl.arange(0, BN_GU)
            wg = _rows_tile(wg_ptr, f_rows, f_rows < f_hi, 0, cols, D, EVICT)
            wu = _rows_tile(wu_ptr, f_rows, f_rows < f_hi, 0, cols, D, EVICT)
        if PHASE == -1:
            _grid_sync(sync_ptr, 3 * P)
        if PHASE == -1 or PHASE == 3:
            _phase_glu(x_ptr, g2_ptr, wg_ptr, wu_ptr, h_ptr, wg, wu, f_lo, f_hi, eps, D, DP, BN_GU, BK, STAGES, EVICT)
        if PHASE == -1 or PHASE == 4:
            d_rows = d_lo + tl.arange(0, BN_DOWN)
            wd = _rows_tile(wd_ptr, d_rows, d_rows < d_hi, 0, cols, FF, EVICT)
        if PHASE == -1:
            _grid_sync(sync_ptr, 4 * P)
        if PHASE == -1 or PHASE == 4:
            _phase_residual(wd_ptr, h_ptr, x_ptr, wd, d_lo, d_hi, FF, BN_DOWN, BK, STAGES, EVICT)

# configurations -------------------------------------------------------------------------------------------
LayerConfig = tuple[int, ...]
"""(q/k/v pair-rows per tile, o rows per tile, gate/up rows per tile, down rows per tile, columns per tile,
attention slices, keys per attention tile, warps, attention unit: 1 = one query head, 2 = all query heads of a
kv head, whose keys are then read once; weight tiles: 1 = double-buffered in registers, >= 2 = through Triton's
software pipeline with that many stages;
programs per SM, as many as fit)"""
LAYER_CONFIGS: tuple[LayerConfig, ...] = (  # the first two: the fastest on the H200 (bench/decode_layer.py)
    (8, 8, 8, 8, 512, 4, 32, 4, 1, 1, 2), (8, 8, 8, 8, 256, 4, 32, 4, 1, 3, 2),
    (16, 16, 16, 16, 256, 4, 32, 4, 1, 1, 2), (8, 8, 8, 8, 256, 4, 32, 4, 1, 1, 3),
    (16, 16, 16, 16, 256, 4, 32, 8, 1, 1, 2), (4, 4, 4, 4, 2048, 4, 32, 8, 1, 1, 1),
    (16, 16, 16, 16, 256, 8, 16, 4, 1, 1, 2), (16, 16, 16, 16, 256, 16, 16, 4, 2, 1, 2),
)


def layer_key(d_model: int, n_heads: int, n_kv: int, head_dim: int, ff: int, dtype) -> tuple:
    return ("layer", d_model, n_heads, n_kv, head_dim, ff, str(dtype))


def programs(device: torch.device) -> int:
    """One program per SM on a GPU (every program must be resident for the grid barriers); a few under
    the interpreter, enough that every phase deals rows and attention units to several programs."""
    if device.type == "cuda" and not interpreting():
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 3


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_RESIDENT: dict[tuple, int] = {}


def _resident(args, consts: dict, warps: int, opts: dict, want: int, device: torch.device) -> int:
    """How many of the one-launch kernel's programs fit on one SM at once, at most `want`: from its
    compiled register and shared-memory use (the grid barriers deadlock unless every program is
    resident, so a config asking for more programs per SM than fit gets fewer)."""
    key = (tuple(sorted(consts.items())), warps, want, str(device))
    if key not in _RESIDENT:
        try:
            kernel = _layer_kernel.warmup(*args, **consts, PHASE=-1, num_warps=warps, grid=(1,), **opts)
            kernel._init_handles()
        except (AttributeError, TypeError) as e:  # a Triton without these internals: one program per SM is safe
            warnings.warn(f"decode_layer: cannot read the kernel's resource use ({e}); one program per SM",
                          stacklevel=3)
            _RESIDENT[key] = 1
            return 1
        props = torch.cuda.get_device_properties(device)
        per_warp = -(-kernel.n_regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
        fits = [getattr(props, "regs_per_multiprocessor", 65536) // max(per_warp * warps, 1),
                getattr(props, "max_threads_per_multi_processor", 2048) // (32 * warps), want]
        if kernel.metadata.shared:
            fits.append(getattr(props, "shared_memory_per_multiprocessor", 233472) // (kernel.metadata.shared + 1024))
        _RESIDENT[key] = max(1, min(fits))
    return _RESIDENT[key]


@dataclasses.dataclass
class LayerWork:
    """Buffers a layer launch writes and the next phase reads, shared by every layer of a step."""
    q: torch.Tensor
    """(H·hd,) the rotated query"""
    o: torch.Tensor
    """(H·hd,) attention's output"""
    h: torch.Tensor
    """(ff,) the SwiGLU activation"""
    part_o: torch.Tensor
    part_ml: torch.Tensor
    counts: torch.Tensor
    """attention's per-head-group arrival counters (zero between launches: the combining program resets them)"""
    sync: torch.Tensor
    """(layers,) int32 grid-barrier counters, zeroed at the start of every step (lmforge.kernels.decode.embed)"""


def workspace(n_layers: int, n_heads: int, head_dim: int, ff: int, dtype, device, max_splits: int = 32) -> LayerWork:
    """Buffers for every config up to max_splits attention slices (one query head per unit or more)."""
    hdp = _pad(head_dim)
    rows = n_heads * max_splits * 16  # units x GP rows: at most H·splits units of GP = 16 rows
    new = lambda *s, dt=dtype: torch.zeros(*s, dtype=dt, device=device)  # noqa: E731
    # (a power-of-two count of barrier counters: the embedding kernel zeroes all of them in one vector store)
    return LayerWork(q=new(n_heads * head_dim), o=new(n_heads * head_dim), h=new(ff),
                     part_o=new(rows, hdp, dt=torch.float32), part_ml=new(rows, 2, dt=torch.float32),
                     counts=new(n_heads, dt=torch.int32), sync=new(triton.next_power_of_2(n_layers), dt=torch.int32))


def decode_layer(x: torch.Tensor, g1: torch.Tensor, wqkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_table: torch.Tensor, wo: torch.Tensor, g2: torch.Tensor,
                 wgu: tuple[torch.Tensor, torch.Tensor], wd: torch.Tensor, work: LayerWork, layer: int, *, eps: float,
                 scale: float, softcap: float = 0.0, window: int = 0, sinks: torch.Tensor | None = None,
                 config: LayerConfig | None = None, n_programs: int | None = None, split: bool | None = None,
                 phases: tuple[int, ...] | None = None, pdl: bool = PDL_DEFAULT, evict: bool = True) -> torch.Tensor:
    """One decoder layer for the token at `pos` (a (1,) device tensor; the block table must hold its block):
    x (d_model,) fp32 is updated in place (x += attention(...); x += mlp(...)), the token's k and v land in the
    layer's paged cache. The weights are the model's own (q, k, v; gate, up), rows contiguous. split: five
    launches, one per phase, without barriers (default under the interpreter); work.sync[layer] must be 0
    before a one-launch call (embed(zero=work.sync) does it for a whole step). phases: with split, launch
    only these (benchmarks time each phase on its own)."""
    wq, wk, wv = wqkv
    wg, wu = wgu
    H, hd = wq.shape[0] // k_cache.shape[3], k_cache.shape[3]
    KV, D, FF = k_cache.shape[2], x.shape[0], wg.shape[0]
    for w, shape in ((wq, (H * hd, D)), (wk, (KV * hd, D)), (wv, (KV * hd, D)), (wo, (D, H * hd)), (wg, (FF, D)),
                     (wu, (FF, D)), (wd, (D, FF))):
        if tuple(w.shape) != shape or w.stride(0) != w.shape[1] or w.stride(1) != 1:
            raise ValueError(f"decode_layer: a weight of shape {tuple(w.shape)} (strides {w.stride()}) where a "
                             f"contiguous {shape} was expected")
    bn_qkv, bn_o, bn_gu, bn_down, bk, splits, block_s, warps, qpp, stages, per_sm = config or LAYER_CONFIGS[0]
    pow2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731  (Triton tiles)
    if not (all(map(pow2, (bn_qkv, bn_o, bn_gu, bn_down, bk, splits, block_s, warps))) and block_s >= 16
            and qpp in (1, 2) and stages >= 1 and per_sm >= 1):
        raise ValueError(f"decode_layer config {config}: tile sides, warps and slices a power of two, keys per "
                         "tile a power of two >= 16, the attention unit 1 (one query head) or 2 (all of a kv "
                         "head's), stages and programs per SM >= 1 (see LayerConfig)")
    qpp = 1 if qpp == 1 else H // KV
    if H * splits * 16 > work.part_o.shape[0]:
        raise ValueError(f"decode_layer config {config}: {splits} slices need a larger workspace "
                         f"(workspace(..., max_splits={splits}))")
    interpret = interpreting()
    split = interpret if split is None else split
    P = n_programs or programs(x.device)
    consts = dict(D=D, DP=triton.next_power_of_2(D), FF=FF, HD=hd, HDP=_pad(hd), OK=H * hd,
                  BS=k_cache.shape[1], BN_QKV=bn_qkv, BN_O=bn_o, BN_GU=bn_gu, BN_DOWN=bn_down,
                  BK=min(bk, triton.next_power_of_2(max(D, H * hd, FF))), SPLITS=splits, BLOCK_S=block_s,
                  QPP=qpp, GP=_pad(qpp), STAGES=0 if stages == 1 else stages,  # 0: register double-buffering
                  SOFTCAP=softcap > 0, WINDOW=window > 0, SINKS=sinks is not None,
                  F32=x.dtype == wq.dtype or interpret,  # fp32 models; the interpreter's bf16 dot is wrong (3.9)
                  PRECISION="ieee" if wq.dtype == torch.float32 else "tf32")
    args = (x, g1, wq, wk, wv, cos, sin, pos, block_table, k_cache, v_cache, work.q, work.o, wo, g2, wg, wu, work.h,
            wd, work.part_o, work.part_ml, work.counts, sinks if sinks is not None else x, work.sync[layer:],
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
            v_cache.stride(2), eps, scale, float(softcap), int(window), H, KV)
    opts = _launch_opts(pdl, None, evict)
    opts["EVICT"] = "evict_first" if evict else ""
    if not split and n_programs is None and per_sm > 1:
        P *= _resident(args, consts, warps, opts, per_sm, x.device)
    for phase in ((phases or range(5)) if split else (-1,)):
        _layer_kernel[(P,)](*args, **consts, PHASE=phase, num_warps=warps, **opts)
    return x
