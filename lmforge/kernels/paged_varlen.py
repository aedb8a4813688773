"""Attention over a paged KV cache for a step of several sequences' chunks, from device metadata alone: the
CUDA graphs of the engine's steps holding prefill chunks (lmforge.infer.graphs) replay it, so it may read no host
length. Beside the plain PyTorch reference it must match.

Layout (lmforge.model.meta.AttnMetadata.varlen_tiles): the step's new tokens back to back, sequence s owning
tokens cu_q[s] .. cu_q[s + 1] - 1, the last n_s of its context_lens[s] keys in the paged cache (this step's keys
already written), found through block_tables[s]; its i-th query sees keys 0 .. context_lens[s] - n_s + i
(bottom-right causal, as the eager engine's varlen FlashAttention call computes it), within a sliding window if
any. The kernel's grid is fixed by the tile list (varlen_tiles: one program per 16 queries of one sequence and kv
head, -1 entries idle), so a graph of a token bucket holds it whatever the step's sequences. Each program serves all
query heads of its kv head (GQA without repeating keys: TM x GROUP rows against one key tile), an online softmax in
fp32 as in lmforge.kernels.paged_attention (whose tile helpers it shares). No split over keys: a program reads its
tile's whole key range, so very long contexts are left to the eager kernels (lmforge.infer.graphs.MIXED_MAX_CONTEXT).
"""

from __future__ import annotations

import torch

from lmforge.kernels.decode import interpreting
from lmforge.kernels.paged_attention import _check_shapes, _pad, index_layout, triton
from lmforge.model.layers.attention import check_softcap_and_window

if triton is not None:
    import triton.language as tl

    from lmforge.kernels.paged_attention import _kv_tile, _normalize, _softmax_step


VARLEN_TILE = 16
"""query tokens per program of the varlen kernel (times the kv head's query heads: the program's rows)"""


def varlen_tiles(query_lens, programs: int | None = None) -> tuple[list[int], list[int]]:
    """The varlen kernel's work list: (sequence, first query) of each tile of VARLEN_TILE queries of each
    sequence, padded with (-1, 0) (no work) to `programs` entries (a static grid: at most
    ceil(tokens / VARLEN_TILE) + sequences tiles)."""
    seqs, firsts = [], []
    for s, n in enumerate(query_lens):
        for q0 in range(0, n, VARLEN_TILE):
            seqs.append(s)
            firsts.append(q0)
    if programs is not None:
        if len(seqs) > programs:
            raise ValueError(f"{len(seqs)} tiles do not fit a grid of {programs} programs")
        seqs += [-1] * (programs - len(seqs))
        firsts += [0] * (programs - len(firsts))
    return seqs, firsts


def varlen_programs(tokens: int, seqs: int) -> int:
    """The most tiles `tokens` queries of `seqs` sequences make (varlen_tiles)."""
    return -(-tokens // VARLEN_TILE) + seqs


def paged_varlen_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           cu_q: torch.Tensor, context_lens: torch.Tensor, *, scale: float, softcap: float = 0.0,
                           window: int = 0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Plain definition of paged_varlen_attention, from device tensors only (so a CUDA graph can hold it): each
    query token is a decode row of its sequence - the chunk of sequence s is its last n_s = cu_q[s+1] - cu_q[s]
    of context_lens[s] keys, so its i-th query sees keys 0 .. context_lens[s] - n_s + i (bottom-right causal).
    Tokens past cu_q[-1] (a static buffer's padding) get zeros. Every token gathers its sequence's whole table,
    REFERENCE_TOKENS tokens at a time (the gathered keys' memory stays bounded)."""
    from lmforge.model.layers.attention import math_attention, visible

    check_softcap_and_window("paged_varlen_reference", softcap, window)
    N = q.shape[0]
    tok = torch.arange(N, device=q.device)
    cu = cu_q.long()
    seq = torch.searchsorted(cu[1:], tok, right=True).clamp(max=len(context_lens) - 1)  # each token's sequence
    own = context_lens.long()[seq] - (cu[seq + 1] - cu[seq]) + (tok - cu[seq])  # its own key's slot
    slots = torch.arange(block_tables.shape[1] * k_cache.shape[1], device=q.device)
    out = torch.empty_like(q)
    for lo in range(0, N, REFERENCE_TOKENS):
        part = slice(lo, lo + REFERENCE_TOKENS)
        blocks = block_tables.long()[seq[part]]  # (n, W)
        k = k_cache[blocks].flatten(1, 2).transpose(1, 2).to(q.dtype)  # (n, KV, W·bs, hd)
        v = v_cache[blocks].flatten(1, 2).transpose(1, 2).to(q.dtype)
        seen = visible(own[part], slots, window)[:, None, None]  # (n, 1, 1, W·bs)
        out[part] = math_attention(q[part, :, None], k, v, seen, scale=scale, softcap=softcap, sinks=sinks)[:, :, 0]
    return torch.where((tok < cu[-1])[:, None, None], out, 0.0)


REFERENCE_TOKENS = 32
"""query tokens per gather of paged_varlen_reference"""


if triton is not None:

    @triton.jit
    def _paged_varlen_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, cu_ptr, ctx_ptr, tseq_ptr, tq0_ptr, sinks_ptr, out_ptr,
                             s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_bt, scale, softcap, window, H,
                             GROUP: tl.constexpr, GP: tl.constexpr, TM: tl.constexpr, HD: tl.constexpr,
                             HDP: tl.constexpr, BS: tl.constexpr, BLOCK_S: tl.constexpr, SOFTCAP: tl.constexpr,
                             WINDOW: tl.constexpr, SINKS: tl.constexpr, F32: tl.constexpr, PRECISION: tl.constexpr):
        """Program (tile, kv head): TM consecutive queries of one sequence times the GROUP query heads of one kv
        head (TM·GP rows, every key read once for all of them), an online softmax over the keys up to the
        tile's last query, each row masked to its own causal prefix (and window). A tile of sequence -1 is
        padding (no work)."""
        p, kvh = tl.program_id(0), tl.program_id(1)
        sq = tl.load(tseq_ptr + p)
        if sq >= 0:
            q0 = tl.load(tq0_ptr + p)
            start = tl.load(cu_ptr + sq)
            n = tl.load(cu_ptr + sq + 1) - start
            ctx = tl.load(ctx_ptr + sq)
            r = tl.arange(0, TM * GP)
            i, g = q0 + r // GP, r % GP  # the row's query (within the chunk) and query head (within the group)
            row_ok = (i < n) & (g < GROUP)
            head = kvh * GROUP + g
            own = ctx - n + i  # the query's own key slot: it sees slots <= own
            d = tl.arange(0, HDP)
            d_ok = d < HD
            offs = ((start + i) * H + head)[:, None] * HD + d[None, :]
            o_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + offs, mask=o_mask, other=0.0)
            if F32:
                q = q.to(tl.float32)
            hi = tl.minimum(ctx - n + q0 + TM, ctx)  # past the tile's last query's key
            lo = 0
            if WINDOW:  # slots <= own - window are outside every row's window
                lo = tl.maximum(ctx - n + q0 - window + 1, 0)
            m_i = tl.full([TM * GP], float("-inf"), tl.float32)
            l_i = tl.zeros([TM * GP], dtype=tl.float32)
            acc = tl.zeros([TM * GP, HDP], dtype=tl.float32)
            for s0 in range(lo, hi, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                ok = s < hi
                k = _kv_tile(k_ptr, bt_ptr, sq, s_bt, s, ok, kvh, s_kb, s_ks, s_kh, d, d_ok, BS, F32)
                v = _kv_tile(v_ptr, bt_ptr, sq, s_bt, s, ok, kvh, s_vb, s_vs, s_vh, d, d_ok, BS, F32)
                seen = ok[None, :] & (s[None, :] <= own[:, None])
                if WINDOW:
                    seen = seen & (s[None, :] > own[:, None] - window)
                m_i, l_i, acc = _softmax_step(q, k, v, seen, m_i, l_i, acc, scale, softcap, SOFTCAP, PRECISION,
                                              True, True)
            sink = m_i
            if SINKS:
                sink = tl.load(sinks_ptr + head, mask=row_ok, other=float("-inf")).to(tl.float32)
            tl.store(out_ptr + offs, _normalize(acc, m_i, l_i, sink, SINKS).to(out_ptr.dtype.element_ty), mask=o_mask)


def paged_varlen_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           cu_q: torch.Tensor, context_lens: torch.Tensor, tiles: tuple[torch.Tensor, torch.Tensor], *,
                           scale: float, softcap: float = 0.0, window: int = 0, sinks: torch.Tensor | None = None,
                           block: int = 64, warps: int = 4) -> torch.Tensor:
    """Kernel version of paged_varlen_reference: q (N, H, hd) of a step's chunks back to back (cu_q (S + 1,)
    int32 offsets), their keys already in the paged caches, context_lens (S,) int32, tiles (tile sequence,
    first query) int32 (P,) from varlen_tiles. Reads only device tensors and launches a grid fixed by P, so a
    CUDA graph of a mixed step (decodes and prefill chunks) holds it. Padding tokens (past cu_q[-1]) get zeros."""
    N, H, hd, KV = _check_shapes("paged_varlen_attention", "N", q, k_cache, v_cache)
    check_softcap_and_window("paged_varlen_attention", softcap, window)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or not q.is_contiguous():
        raise ValueError("paged_varlen_attention needs contiguous q and a contiguous last cache dimension")
    S = context_lens.shape[0]
    index = (block_tables, cu_q, context_lens, *tiles)
    if (any(t.is_floating_point() for t in index) or block_tables.dim() != 2 or block_tables.shape[0] != S
            or cu_q.shape != (S + 1,) or len(tiles) != 2 or tiles[0].shape != tiles[1].shape):
        raise ValueError(f"paged_varlen_attention wants integer block_tables (S, max_blocks), cu_q (S + 1,), "
                         f"context_lens (S,) and two tile lists of one length (varlen_tiles); got S={S}, "
                         f"block_tables {tuple(block_tables.shape)}, cu_q {tuple(cu_q.shape)}, tiles "
                         f"{[tuple(t.shape) for t in tiles]}")
    block_tables, cu_q, context_lens, sinks, *tiles = index_layout(block_tables, cu_q, context_lens, sinks, *tiles)
    group = H // KV
    out = torch.zeros_like(q)
    _paged_varlen_kernel[(tiles[0].shape[0], KV)](
        q, k_cache, v_cache, block_tables, cu_q, context_lens, tiles[0], tiles[1],
        sinks if sinks is not None else q, out,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), block_tables.stride(0), scale, float(softcap), int(window), H,
        GROUP=group, GP=triton.next_power_of_2(group), TM=VARLEN_TILE,
        HD=hd, HDP=_pad(hd), BS=k_cache.shape[1], BLOCK_S=block, SOFTCAP=softcap > 0, WINDOW=window > 0,
        SINKS=sinks is not None, F32=q.dtype == torch.float32 or interpreting(),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=warps)
    return out
