"""Decode attention over a paged KV cache (Triton), beside the plain PyTorch reference it must match.

A paged cache (vLLM's PagedAttention, Kwon et al. 2023) keeps every sequence's keys in fixed-size blocks
of one shared pool; row b's key j lives in block `block_tables[b, j // block_size]` at offset
`j % block_size`. Per layer:

    k_cache, v_cache   (num_blocks, block_size, n_kv_heads, head_dim)   any strides, last dim contiguous
    block_tables       (B, max_blocks) int32                             entries past a row's end unused
    context_lens       (B,) int32: row b attends to its keys 0..context_lens[b]-1 (its new token included)
    q                  (B, H, head_dim), one query per row (decode) -> out (B, H, head_dim)

The kernel is flash-decoding (Dao et al. 2023, "Flash-Decoding for long-context inference") in one
launch: program (b, kv head, split) takes one slice of the row's keys (a row gets a slice per tile of keys, up
to the configured number: short rows use fewer programs), keeps an online softmax in fp32 and writes its
slice's unnormalised output with its running max and denominator; the last program of a (b, kv head) to finish
combines the slices ("last block reduces", so no second launch); a row in one slice is written directly.
Each program serves all GROUP = H / n_kv query heads of its kv head (GQA / MQA without repeating K/V: every
key is read once, and q·kᵀ / p·v are (GROUP, slots) matrix products on tensor cores).
Keys are gathered slot by slot through the block table, so slices and tiles need not align with blocks.
Options, each as in `lmforge.model.layers.attention.math_attention`: soft-capping (Gemma 2:
c·tanh(s/c) of the scaled scores), a sliding window (query at position p sees keys in (p - window, p]),
learned sinks (gpt-oss: one extra logit per head in the softmax denominator).
"""

from __future__ import annotations

import functools

import torch

from lmforge.kernels.decode import PDL_DEFAULT, _launch_opts, interpreting, triton
from lmforge.model.layers.attention import check_softcap_and_window

if triton is not None:
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor, *, scale: float,
                               softcap: float = 0.0, window: int = 0, sinks: torch.Tensor | None = None
                               ) -> torch.Tensor:
    """Plain definition: gather each row's blocks into a contiguous (S, KV, hd) cache, then the model's
    reference attention (fp32) over its visible keys."""
    from lmforge.model.layers.attention import math_attention

    check_softcap_and_window("paged_decode_attention_ref", softcap, window)
    bs = k_cache.shape[1]
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        n = int(context_lens[b])
        if n == 0:
            continue
        blocks = block_tables[b, : -(-n // bs)].long()
        lo = max(0, n - window) if window > 0 else 0
        k = k_cache[blocks].flatten(0, 1)[lo:n]  # (S, KV, hd)
        v = v_cache[blocks].flatten(0, 1)[lo:n]
        o = math_attention(q[b][None, :, None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], None,
                           scale=scale, softcap=softcap, sinks=sinks)  # (1, H, 1, hd)
        out[b] = o[0, :, 0]
    return out


if triton is not None:

    @triton.jit
    def _kv_tile(ptr, bt_ptr, b, s_bt, s, ok, kvh, s_b, s_s, s_h, d, d_ok, BS: tl.constexpr, F32: tl.constexpr):
        """(BLOCK_S, HDP) tile of keys or values at positions s (where ok) of row b, kv head kvh: each
        position's block looked up in the row's block table."""
        page = tl.load(bt_ptr + b * s_bt + s // BS, mask=ok, other=0).to(tl.int64)
        t = tl.load(ptr + page[:, None] * s_b + (s % BS)[:, None] * s_s + kvh * s_h + d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0)
        if F32:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def _q_tile(q_ptr, b, H, heads, HD: tl.constexpr, d, g_ok, d_ok, F32: tl.constexpr):
        """(GP, HDP) tile of row b's query heads (zeros in the padding)."""
        q = tl.load(q_ptr + (b * H + heads)[:, None] * HD + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        if F32:
            q = q.to(tl.float32)
        return q

    @triton.jit
    def _softmax_step(q, k, v, ok, m_i, l_i, acc, scale, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                      SAFE: tl.constexpr = False, MASK2D: tl.constexpr = False):
        """One tile of the online softmax (Milakov & Gimelshein 2018) for GP query rows: q·kᵀ and p·v on
        tensor cores in the cache's dtype (p rounded to it, as FlashAttention does), fp32 accumulation.
        ok: (BLOCK_S,) visible keys, every row alike, or with MASK2D (GP, BLOCK_S) per row (causal rows).
        SAFE: a row may see no key of the tile (tree rows, causal rows): its maximum stays -inf, not NaN.
        A cache kept in another dtype than q (EngineConfig.kv_cache_dtype: fp8 or bf16 keys under a wider model) is
        read in q's, as the reference paths read it."""
        if k.dtype != q.dtype:
            k = k.to(q.dtype)
        if v.dtype != q.dtype:
            v = v.to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (GP, BLOCK_S)
        return _online_softmax(scores, v, ok, m_i, l_i, acc, softcap, SOFTCAP, PRECISION, SAFE, MASK2D)

    @triton.jit
    def _online_softmax(scores, v, ok, m_i, l_i, acc, softcap, SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
                        SAFE: tl.constexpr = False, MASK2D: tl.constexpr = False):
        """_softmax_step from the tile's scaled scores (GP, BLOCK_S) on: soft-capping, the mask, the running
        maximum and denominator, p·v (v already in q's dtype)."""
        if SOFTCAP:  # c·tanh(s/c), tanh(x) = 2·sigmoid(2x) - 1
            scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)
        if MASK2D:
            scores = tl.where(ok, scores, float("-inf"))
        else:
            scores = tl.where(ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_use = m_new
        if SAFE:
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        return (m_new, l_i * alpha + tl.sum(p, 1),
                acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION))

    @triton.jit
    def _normalize(acc, m_i, l_i, sink, SINKS: tl.constexpr):
        """Rows' outputs from an online softmax's running maxima, denominators and unnormalised sums (with SINKS
        each row's learned sink logit joins the denominator); a row that saw no key gives zeros, not NaN."""
        m_all = m_i
        if SINKS:
            m_all = tl.maximum(m_all, sink)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
        alpha = tl.exp(m_i - m_all)
        den = l_i * alpha
        if SINKS:
            den += tl.exp(sink - m_all)
        den = tl.where(den == 0.0, 1.0, den)
        return acc * (alpha / den)[:, None]

    @triton.jit
    def _tree_ok(s, ok, t_start, t_bits):
        """ok where key slot s is below the row's first tree slot or, at or beyond it, a tree slot whose bit is
        set (its ancestors and itself: AttnMetadata.tree_rows)."""
        rel = s - t_start
        return ok & ((rel < 0) | (((t_bits >> tl.minimum(tl.maximum(rel, 0), 62)) & 1) != 0))

    @triton.jit
    def _combine_head(part_o_ptr, part_ml_ptr, parts, used, d, HDP: tl.constexpr, sinks_ptr, head,
                      SINKS: tl.constexpr):
        """Query head `head`'s output (HDP,) fp32 from its slices' partial results at rows `parts` (SLICES,),
        of which the first `used` hold results: each slice's running max m, denominator l and unnormalised
        output, rescaled to the common max (and the head's learned sink logit with SINKS). .cg loads skip the
        (incoherent) L1 cache: the slices were written by other SMs."""
        if SINKS:
            sink = tl.load(sinks_ptr + head).to(tl.float32)
        on = tl.arange(0, parts.shape[0]) < used
        m = tl.load(part_ml_ptr + 2 * parts, mask=on, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(part_ml_ptr + 2 * parts + 1, mask=on, other=0.0, cache_modifier=".cg")
        o = tl.load(part_o_ptr + parts[:, None] * HDP + d[None, :], mask=on[:, None], other=0.0, cache_modifier=".cg")
        m_all = tl.max(m, 0)
        if SINKS:
            m_all = tl.maximum(m_all, sink)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)  # an empty row: zeros, not NaN
        w = tl.exp(m - m_all)  # empty slices have m = -inf: weight 0
        den = tl.sum(w * l, 0)
        if SINKS:
            den += tl.exp(sink - m_all)
        den = tl.where(den == 0.0, 1.0, den)
        return tl.sum(w[:, None] * o, 0) / den

    @triton.jit
    def _paged_attend_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, start_ptr, sinks_ptr, out_ptr,
                             part_o_ptr, part_ml_ptr, count_ptr, tstart_ptr, tbits_ptr,
                             s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_bt, scale, softcap, window, H, KV,
                             GROUP: tl.constexpr, QPP: tl.constexpr, GP: tl.constexpr, HD: tl.constexpr,
                             HDP: tl.constexpr,
                             BS: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
                             SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr,
                             START: tl.constexpr, EARLY: tl.constexpr, F32: tl.constexpr, PRECISION: tl.constexpr,
                             PDL: tl.constexpr, STAGES: tl.constexpr, TREE: tl.constexpr):
        """Program (b·H/QPP + head group, split) for QPP query heads: all GROUP heads of one kv head (every
        key read once), or one head (QPP = 1: GROUP times the programs, for short rows at batch 1, where
        parallelism matters more than re-reading keys from L2). GP >= 16 rows (QPP padded, tl.dot needs 16)
        by HDP >= 16 columns (head_dim padded); padded rows and columns load zeros and are never stored.
        A row's keys go to as many slices as it has tiles of BLOCK_S keys, at most SPLITS (the rest of the
        programs have nothing to do); a row in one slice is written by that program alone, with no partial
        results to combine. EARLY: ctx_ptr holds positions (context - 1) written before the previous kernel
        ran, and every key but the last is from earlier steps, so the program reads its first tile before its
        PDL wait and only the new key's row after. STAGES: 0 = the next tile's loads issued before this
        tile's arithmetic (registers), 1 = one tile at a time (wide tiles: a short row in one tile, all read
        before the wait), >= 2 = Triton's software pipeline. TREE: rows of a token tree (tstart/tbits: each
        row's first tree slot and ancestor bits, AttnMetadata.tree_rows) see tree slots only where a bit is set;
        a tile may then hold no visible key (the softmax step's SAFE form)."""
        row, sp = tl.program_id(0), tl.program_id(1)
        b, first = row // (H // QPP), (row % (H // QPP)) * QPP  # batch row, first query head
        kvh = first // GROUP
        if PDL:  # launch the next kernel now
            gdc_launch_dependents()
        if EARLY:
            n = tl.load(ctx_ptr + b) + 1
        else:
            if PDL:  # wait for the previous kernel's results (q, the new key, the key count)
                gdc_wait()
            n = tl.load(ctx_ptr + b)
        lo0 = 0
        if WINDOW:  # keys at positions <= (n - 1) - window are outside the window
            lo0 = tl.maximum(n - window, 0)
        if START:  # a static cache row's left padding: its keys start at slot start[b]
            lo0 = tl.maximum(lo0, tl.load(start_ptr + b))
        t_start, t_bits = 0, 0
        if TREE:
            t_start, t_bits = tl.load(tstart_ptr + b), tl.load(tbits_ptr + b)
        used = tl.minimum(tl.maximum(tl.cdiv(n - lo0, BLOCK_S), 1), SPLITS)  # slices with keys (>= 1)
        chunk = tl.cdiv(n - lo0, used)
        lo = lo0 + sp * chunk
        hi = tl.minimum(lo + chunk, n)
        g = tl.arange(0, GP)
        d = tl.arange(0, HDP)
        g_ok, d_ok = g < QPP, d < HD
        heads = first + g
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, HDP], dtype=tl.float32)
        if STAGES <= 1:
            s = lo + tl.arange(0, BLOCK_S)  # the first tile, loaded before the loop
            ok = s < hi
            if TREE:
                ok = _tree_ok(s, ok, t_start, t_bits)
            if EARLY:  # every key but the new one (its slot is known: positions came before the step)
                new_at = n - 1
                new_page = tl.load(bt_ptr + b * s_bt + new_at // BS).to(tl.int64)
                old = ok & (s < new_at)
                k = _kv_tile(k_ptr, bt_ptr, b, s_bt, s, old, kvh, s_kb, s_ks, s_kh, d, d_ok, BS, F32)
                v = _kv_tile(v_ptr, bt_ptr, b, s_bt, s, old, kvh, s_vb, s_vs, s_vh, d, d_ok, BS, F32)
                if PDL:
                    gdc_wait()
                # the new key's row, written by the previous kernel: one row each of k and v, put in its place
                new = ok & (s == new_at)
                # its row, if in this slice (a compare, not `d_ok & scalar`: Triton 3.x's interpreter makes that
                # mask int32 and refuses it)
                here = d < tl.where((new_at >= lo) & (new_at < hi), HD, 0)
                k_new = tl.load(k_ptr + new_page * s_kb + (new_at % BS) * s_ks + kvh * s_kh + d, mask=here, other=0.0)
                v_new = tl.load(v_ptr + new_page * s_vb + (new_at % BS) * s_vs + kvh * s_vh + d, mask=here,
                                other=0.0)
                if F32:
                    k_new, v_new = k_new.to(tl.float32), v_new.to(tl.float32)
                k = tl.where(new[:, None], k_new[None, :], k)
                v = tl.where(new[:, None], v_new[None, :], v)
            else:
                k = _kv_tile(k_ptr, bt_ptr, b, s_bt, s, ok, kvh, s_kb, s_ks, s_kh, d, d_ok, BS, F32)
                v = _kv_tile(v_ptr, bt_ptr, b, s_bt, s, ok, kvh, s_vb, s_vs, s_vh, d, d_ok, BS, F32)
            q = _q_tile(q_ptr, b, H, heads, HD, d, g_ok, d_ok, F32)
            # every tile starts on a visible key (none all-masked; an empty slice keeps m = -inf, l = 0)
            if STAGES == 0:  # the next tile's loads go out before this tile's arithmetic: two tiles in flight
                for s0 in range(lo, hi, BLOCK_S):
                    s_next = s0 + BLOCK_S + tl.arange(0, BLOCK_S)
                    ok_next = s_next < hi
                    if TREE:
                        ok_next = _tree_ok(s_next, ok_next, t_start, t_bits)
                    k_next = _kv_tile(k_ptr, bt_ptr, b, s_bt, s_next, ok_next, kvh, s_kb, s_ks, s_kh, d, d_ok, BS, F32)
                    v_next = _kv_tile(v_ptr, bt_ptr, b, s_bt, s_next, ok_next, kvh, s_vb, s_vs, s_vh, d, d_ok, BS, F32)
                    m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, scale, softcap, SOFTCAP, PRECISION,
                                                  TREE)
                    k, v, ok = k_next, v_next, ok_next
            else:  # one tile at a time
                if lo < hi:
                    m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, scale, softcap, SOFTCAP, PRECISION,
                                                  TREE)
                for s0 in range(lo + BLOCK_S, hi, BLOCK_S):
                    s = s0 + tl.arange(0, BLOCK_S)
                    ok = s < hi
                    if TREE:
                        ok = _tree_ok(s, ok, t_start, t_bits)
                    k = _kv_tile(k_ptr, bt_ptr, b, s_bt, s, ok, kvh, s_kb, s_ks, s_kh, d, d_ok, BS, F32)
                    v = _kv_tile(v_ptr, bt_ptr, b, s_bt, s, ok, kvh, s_vb, s_vs, s_vh, d, d_ok, BS, F32)
                    m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, scale, softcap, SOFTCAP, PRECISION,
                                                  TREE)
        else:  # Triton's software pipeline: STAGES tiles of keys in flight through async copies
            q = _q_tile(q_ptr, b, H, heads, HD, d, g_ok, d_ok, F32)
            for s0 in tl.range(lo, hi, BLOCK_S, num_stages=STAGES):
                s = s0 + tl.arange(0, BLOCK_S)
                ok = s < hi
                if TREE:
                    ok = _tree_ok(s, ok, t_start, t_bits)
                k = _kv_tile(k_ptr, bt_ptr, b, s_bt, s, ok, kvh, s_kb, s_ks, s_kh, d, d_ok, BS, F32)
                v = _kv_tile(v_ptr, bt_ptr, b, s_bt, s, ok, kvh, s_vb, s_vs, s_vh, d, d_ok, BS, F32)
                m_i, l_i, acc = _softmax_step(q, k, v, ok, m_i, l_i, acc, scale, softcap, SOFTCAP, PRECISION, TREE)
        o_off = (b * H + heads)[:, None] * HD + d[None, :]
        o_mask = g_ok[:, None] & d_ok[None, :]
        if used == 1:  # the row's only slice: the output itself
            if sp == 0:
                sink = m_i
                if SINKS:
                    sink = tl.load(sinks_ptr + heads, mask=g_ok, other=float("-inf")).to(tl.float32)
                o = _normalize(acc, m_i, l_i, sink, SINKS)
                tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=o_mask)
        elif sp < used:
            mine = (row * SPLITS + sp) * GP + g  # this slice's rows of the partial results
            tl.store(part_o_ptr + mine[:, None] * HDP + d[None, :], acc)
            tl.store(part_ml_ptr + mine * 2, m_i)
            tl.store(part_ml_ptr + mine * 2 + 1, l_i)
            tl.debug_barrier()  # every thread's stores precede the (release) count below
            done = tl.atomic_add(count_ptr + row, 1, sem="acq_rel", scope="gpu")
            if done == used - 1:  # the last slice of this (row, kv head) combines all of them
                sps = tl.arange(0, SPLITS)
                # one query head at a time, unrolled: each head's (SPLITS, HDP) partials are independent
                # loads the compiler can issue together (a rolled loop would wait out each one's latency)
                for gi in tl.static_range(QPP):
                    o = _combine_head(part_o_ptr, part_ml_ptr, (row * SPLITS + sps) * GP + gi, used, d, HDP,
                                      sinks_ptr, first + gi, SINKS)
                    tl.store(out_ptr + (b * H + first + gi) * HD + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)
                tl.store(count_ptr + row, 0)  # ready for the next call


# None: chosen from the batch shape by default_config
PagedConfig = tuple[int, ...]
"""(slices, keys per tile, warps[, per head[, stages]]): at most `slices` programs per row and query-head group,
one per tile of keys; per head 1 = one query head per program; stages 0 = register double-buffering of the
key tiles, 1 = one tile at a time, >= 2 = Triton's software pipeline with that many stages"""


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(batch: int, n_kv: int, max_keys: int, device: torch.device, head_dim: int = 128
                   ) -> PagedConfig:
    """Slices until there is a program per SM (132 on an H100/H200), each with at least four tiles of keys;
    tiles of 64 keys through Triton's software pipeline: 2 stages and 4 warps with three programs per SM or
    more, else 3 stages and 8 warps. From a sweep of 54 configurations at 12 shapes on an H200
    (bench/paged_attention.py --sweep: Qwen3-0.6B's attention, batch 32-256, context 512-2048, 2026-12-02):
    one slice won at every batch >= 32 (even at 256 programs), and the pipelined 64 x 4 x 2 stages read
    3.1-4.1 TB/s at 512 programs and more, +15-23% over the register double-buffered loop's best."""
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 8
    programs = batch * n_kv
    block, warps, stages = (64, 4, 2) if programs >= 3 * sms else (64, 8, 3)
    splits = 1
    while programs * splits < sms and splits < 32 and block * splits * 4 <= max_keys:
        splits *= 2
    return splits, block, warps, 0, stages


def workspace(batch: int, n_heads: int, n_kv: int, head_dim: int, splits: int, device, per_head: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partial outputs (P·splits·GP, HDP), maxima and denominators (P·splits·GP, 2) and per-program-row
    counters (P; zero, and each call leaves them zero again), P = B·KV programs rows (B·H per_head)."""
    qpp = 1 if per_head else n_heads // n_kv
    programs, gp, hdp = batch * n_heads // qpp, _pad(qpp), _pad(head_dim)
    rows = programs * splits * gp
    return (torch.empty(rows, hdp, dtype=torch.float32, device=device),
            torch.empty(rows, 2, dtype=torch.float32, device=device),
            torch.zeros(programs, dtype=torch.int32, device=device))


def index_layout(block_tables: torch.Tensor, *vectors: torch.Tensor | None) -> tuple:
    """Index tensors as the kernels read them: a block table's entries one apart (a view of a wider table keeps
    its row stride) and 1-D tensors (lengths, offsets, sinks, tree rows) contiguous; None stays None. Copies only
    what is laid out otherwise (a column-major table or a strided length vector was read wrongly, silently)."""
    table = block_tables if block_tables.stride(-1) == 1 else block_tables.contiguous()
    return (table, *(t if t is None else t.contiguous() for t in vectors))


def _check_shapes(name: str, rows: str, q, k_cache, v_cache) -> tuple[int, int, int, int]:
    """(rows, H, hd, KV) of q (rows, H, hd) and k/v caches (blocks, block_size, KV, hd), or a ValueError naming them."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[3] != q.shape[2]:
        raise ValueError(f"{name} wants q ({rows}, H, hd) and k/v caches (blocks, block_size, KV, hd) "
                         f"alike; got q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k_cache.shape[2]} kv heads")
    return (*q.shape, k_cache.shape[2])


def _pad(n: int) -> int:
    """A tile side for n: a power of two, at least 16 (tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(n))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *, scale: float,
                           softcap: float = 0.0, window: int = 0, sinks: torch.Tensor | None = None,
                           config: PagedConfig | None = None, out: torch.Tensor | None = None,
                           work: tuple[torch.Tensor, ...] | None = None, start: torch.Tensor | None = None,
                           early_positions: torch.Tensor | None = None, pdl: bool = PDL_DEFAULT,
                           tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Kernel version of paged_decode_attention_ref (same arguments). Extra, for callers that capture CUDA
    graphs or tune: `config` (slices, keys per tile, warps[, 1 = one query head per program]), `out`,
    `work` (from workspace(), sized for the config), `start` ((B,) first visible slot per row: a static cache's
    left padding), `pdl` (programmatic dependent launch where the GPU has it), `early_positions` ((B,) each
    row's new-token position, used instead of context_lens: written before the step began and with every other key from
    earlier steps, so the kernel reads them before its PDL wait - lmforge.infer.kernel_step), `tree` ((start,
    bits) int64 (B,) each: rows of a token tree, lmforge.model.meta.AttnMetadata.tree_rows)."""
    B, H, hd, KV = _check_shapes("paged_decode_attention", "B", q, k_cache, v_cache)
    check_softcap_and_window("paged_decode_attention", softcap, window)
    if block_tables.shape[0] != B or context_lens.shape[0] != B or block_tables.is_floating_point():
        raise ValueError(f"block_tables must be integer (B={B}, max_blocks) and context_lens (B,); got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype} and {tuple(context_lens.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or not q.is_contiguous():
        raise ValueError("paged_decode_attention needs contiguous q and a contiguous last cache dimension")
    config = config or default_config(B, KV, block_tables.shape[1] * k_cache.shape[1], q.device, hd)
    (splits, block, warps), per_head = config[:3], len(config) > 3 and config[3] == 1
    stages = config[4] if len(config) > 4 else 0
    if tree is not None and early_positions is not None:
        raise ValueError("tree rows and early_positions cannot be combined (a tree step writes several keys per row)")
    if stages > 1 and early_positions is not None:
        raise ValueError(f"paged attention config {config}: early_positions needs stages 0 or 1 (the first tile "
                         "is read before the PDL wait)")
    qpp = 1 if per_head else H // KV
    if splits & (splits - 1) or block & (block - 1) or block < 16 or not 0 <= stages <= 8:
        raise ValueError(f"paged attention config {config}: slices must be a power of two, keys per tile a "
                         "power of two >= 16, stages 0 (double-buffered), 1 (one tile at a time) or a pipeline of "
                         "2 to 8")
    block_tables, context_lens, start, sinks, early_positions = index_layout(
        block_tables, context_lens, start, sinks, early_positions)
    tree = None if tree is None else tuple(t.contiguous() for t in tree)
    out = torch.empty_like(q) if out is None else out
    if splits > 1 and work is None:
        work = workspace(B, H, KV, hd, splits, q.device, per_head)
    work = work or (out, out, out)
    ctx = early_positions if early_positions is not None else context_lens
    _paged_attend_kernel[(B * H // qpp, splits)](
        q, k_cache, v_cache, block_tables, ctx, start if start is not None else ctx,
        sinks if sinks is not None else q, out, work[0], work[1], work[2],
        *(tree if tree is not None else (ctx, ctx)),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0), scale, float(softcap), int(window), H, KV,
        GROUP=H // KV, QPP=qpp, GP=_pad(qpp), HD=hd, HDP=_pad(hd), BS=k_cache.shape[1],
        BLOCK_S=block, SPLITS=splits, SOFTCAP=softcap > 0, WINDOW=window > 0, SINKS=sinks is not None,
        START=start is not None, EARLY=early_positions is not None,
        F32=q.dtype == torch.float32 or interpreting(),  # its bf16 dot is wrong (3.9)
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        STAGES=stages, TREE=tree is not None, num_warps=warps, **_launch_opts(pdl))
    return out

