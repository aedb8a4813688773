"""Attention over MLA's paged latent cache (Triton), beside the plain PyTorch reference it must match.

Multi-head latent attention (lmforge.model.layers.mla) caches one latent c (r numbers) and one rope key k_r (d_r
numbers) per token, shared by all H query heads. With the key up-projection absorbed into the query
(q_lat = q_nope W_uk, per head) a head's score is q_lat·c + q_rope·k_r and its output, before the value
up-projection, is Σ p·c: multi-query attention whose key is [c | k_r] and whose value is c itself. Per layer:

    c_cache, kr_cache   (num_blocks, block_size, r) and (num_blocks, block_size, d_r), last dim contiguous
    block_tables        (S, max_blocks) int32: sequence s's slot j lives in block block_tables[s, j // block_size]
    q_lat, q_rope       (N, H, r) and (N, H, d_r) -> out (N, H, r)

Two kinds of rows (each as in lmforge.kernels.paged_attention / paged_varlen, whose online-softmax helpers
this kernel shares):
  decode   row b is sequence b's one new token: it sees slots 0 .. context_lens[b] - 1 (a window, token-tree
           ancestor bits as AttnMetadata.tree_rows). Programs (row, group of query heads, slice): a row's keys
           split into up to `slices` slices, the last program to finish combining them (flash-decoding).
  varlen   rows are a step's chunks back to back (cu_q: sequence s owns rows cu_q[s] .. cu_q[s + 1] - 1): token
           i of s's n_s-token chunk sees slots 0 .. context_lens[s] - n_s + i; one program per token and head
           group, each reading its row's (sequence, own slot) from `latent_rows` - device tensors only, so a
           CUDA graph of a mixed step holds it.
Every program reads each latent tile once for all its query heads and uses it twice: for the scores (with
the rope keys' tile) and as the values (FlashMLA's point: K and V are one tensor).
"""

from __future__ import annotations

import torch

from lmforge.kernels.decode import interpreting
from lmforge.kernels.paged_attention import _pad, _sm_count, index_layout, triton
from lmforge.model.layers.attention import check_softcap_and_window

if triton is not None:
    import triton.language as tl

    from lmforge.kernels.paged_attention import _combine_head, _normalize, _online_softmax, _tree_ok


def latent_rows(block_tables: torch.Tensor, context_lens: torch.Tensor, cu_q: torch.Tensor | None, n: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, own slot) of each of n query rows: decode rows (cu_q None) are their sequences' last slots;
    varlen rows (cu_q (S + 1,)) the chunks' tokens, own slot context_lens[s] - n_s + i (-1 past cu_q[-1])."""
    dev = block_tables.device
    if cu_q is None:
        return torch.arange(n, device=dev), context_lens.long() - 1
    tok, cu = torch.arange(n, device=dev), cu_q.long()
    seq = torch.searchsorted(cu[1:], tok, right=True).clamp(max=len(context_lens) - 1)
    own = context_lens.long()[seq] - (cu[seq + 1] - cu[seq]) + (tok - cu[seq])
    return seq, torch.where(tok < cu[-1], own, -1)


def paged_latent_reference(q_lat: torch.Tensor, q_rope: torch.Tensor, c_cache: torch.Tensor, kr_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *, scale: float,
                           softcap: float = 0.0, window: int = 0,
                           tree: tuple[torch.Tensor, torch.Tensor] | None = None,
                           cu_q: torch.Tensor | None = None) -> torch.Tensor:
    """Plain definition (fp32 inside): each row gathers its sequence's table, scores q_lat·c + q_rope·k_r
    (scaled, soft-capped), masks to its visible slots, and sums softmax·c. cu_q: varlen rows (module
    docstring); tree: (start, bits) (N,) per decode row. Rows that see no slot get zeros."""
    check_softcap_and_window("paged_latent_reference", softcap, window)
    seq, own = latent_rows(block_tables, context_lens, cu_q, q_lat.shape[0])
    slot = torch.arange(block_tables.shape[1] * c_cache.shape[1], device=q_lat.device)
    out = torch.empty_like(q_lat)
    for lo in range(0, q_lat.shape[0], REFERENCE_ROWS):  # (the gathered latents' memory stays bounded)
        part = slice(lo, lo + REFERENCE_ROWS)
        blocks = block_tables.long()[seq[part]]  # (n, W)
        c = c_cache[blocks].flatten(1, 2).float()  # (n, S, r)
        kr = kr_cache[blocks].flatten(1, 2).float()  # (n, S, d_r)
        s = (torch.einsum("nhr,nsr->nhs", q_lat[part].float(), c)
             + torch.einsum("nhd,nsd->nhs", q_rope[part].float(), kr)) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        o = own[part, None]
        seen = (slot[None] <= o) & (o >= 0)
        if window > 0:
            seen &= slot[None] > o - window
        if tree is not None:
            rel = slot[None] - tree[0][part].long()[:, None]
            seen &= (rel < 0) | ((tree[1][part].long()[:, None] >> rel.clamp(0, 62)) & 1).bool()
        p = torch.softmax(s.masked_fill(~seen[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
        out[part] = torch.einsum("nhs,nsr->nhr", p, c).to(q_lat.dtype)
    return out


REFERENCE_ROWS = 32
"""query rows per gather of paged_latent_reference"""


if triton is not None:

    @triton.jit
    def _latent_kernel(ql_ptr, qr_ptr, c_ptr, kr_ptr, bt_ptr, ctx_ptr, seq_ptr, own_ptr, out_ptr,
                       part_o_ptr, part_ml_ptr, count_ptr, tstart_ptr, tbits_ptr,
                       s_cb, s_cs, s_rb, s_rs, s_bt, scale, softcap, window, H,
                       GP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, DR: tl.constexpr, DRP: tl.constexpr,
                       BS: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr, SOFTCAP: tl.constexpr,
                       WINDOW: tl.constexpr, F32: tl.constexpr, PRECISION: tl.constexpr, TREE: tl.constexpr,
                       VARLEN: tl.constexpr):
        """Program (row, head group, slice): GP query heads of one query row against a slice of its sequence's
        slots. Decode: row = sequence. VARLEN: the row's sequence and own slot from seq/own (a padding row's own
        slot is -1: it attends nothing and stores nothing; the caller zeroes out)."""
        row, hg, sp = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if VARLEN:
            seq = tl.load(seq_ptr + row)
            own = tl.load(own_ptr + row)
            valid = own >= 0
            n = tl.maximum(own + 1, 0)  # slots 0 .. n - 1 visible
        else:
            seq = row
            valid = row >= 0
            n = tl.load(ctx_ptr + row)
        lo0 = 0
        if WINDOW:
            lo0 = tl.maximum(n - window, 0)
        t_start, t_bits = 0, 0
        if TREE:
            t_start, t_bits = tl.load(tstart_ptr + row), tl.load(tbits_ptr + row)
        used = tl.minimum(tl.maximum(tl.cdiv(n - lo0, BLOCK_S), 1), SPLITS)
        chunk = tl.cdiv(n - lo0, used)
        lo = lo0 + sp * chunk
        hi = tl.minimum(lo + chunk, n)
        g = tl.arange(0, GP)
        heads = hg * GP + g
        g_ok = heads < H
        r = tl.arange(0, RP)
        e = tl.arange(0, DRP)
        r_ok, e_ok = r < R, e < DR
        ql = tl.load(ql_ptr + (row * H + heads)[:, None] * R + r[None, :], mask=g_ok[:, None] & r_ok[None, :],
                     other=0.0)
        qr = tl.load(qr_ptr + (row * H + heads)[:, None] * DR + e[None, :], mask=g_ok[:, None] & e_ok[None, :],
                     other=0.0)
        if F32:
            ql, qr = ql.to(tl.float32), qr.to(tl.float32)
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], dtype=tl.float32)
        acc = tl.zeros([GP, RP], dtype=tl.float32)
        for s0 in range(lo, hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            ok = s < hi
            if TREE:
                ok = _tree_ok(s, ok, t_start, t_bits)
            page = tl.load(bt_ptr + seq * s_bt + s // BS, mask=ok, other=0).to(tl.int64)
            c = tl.load(c_ptr + page[:, None] * s_cb + (s % BS)[:, None] * s_cs + r[None, :],
                        mask=ok[:, None] & r_ok[None, :], other=0.0).to(ql.dtype)
            kr = tl.load(kr_ptr + page[:, None] * s_rb + (s % BS)[:, None] * s_rs + e[None, :],
                         mask=ok[:, None] & e_ok[None, :], other=0.0).to(ql.dtype)
            scores = (tl.dot(ql, tl.trans(c), input_precision=PRECISION)
                      + tl.dot(qr, tl.trans(kr), input_precision=PRECISION)) * scale  # (GP, BLOCK_S)
            m_i, l_i, acc = _online_softmax(scores, c, ok, m_i, l_i, acc, softcap, SOFTCAP, PRECISION, TREE)
        o_off = (row * H + heads)[:, None] * R + r[None, :]
        # (a compare, not `& valid`: Triton 3.x's interpreter makes a tensor & scalar mask int32 and refuses it)
        o_mask = g_ok[:, None] & (r[None, :] < tl.where(valid, R, 0))
        if used == 1:  # the row's only slice: the output itself
            if sp == 0:
                o = _normalize(acc, m_i, l_i, m_i, False)
                tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=o_mask)
        elif sp < used:
            prow = row * tl.num_programs(1) + hg  # this (row, head group)'s counter
            mine = (prow * SPLITS + sp) * GP + g
            tl.store(part_o_ptr + mine[:, None] * RP + r[None, :], acc)
            tl.store(part_ml_ptr + mine * 2, m_i)
            tl.store(part_ml_ptr + mine * 2 + 1, l_i)
            tl.debug_barrier()  # every thread's stores precede the (release) count below
            done = tl.atomic_add(count_ptr + prow, 1, sem="acq_rel", scope="gpu")
            if done == used - 1:  # the last slice combines all of them, one query head at a time
                sps = tl.arange(0, SPLITS)
                for gi in tl.static_range(GP):
                    if hg * GP + gi < H:
                        o = _combine_head(part_o_ptr, part_ml_ptr, (prow * SPLITS + sps) * GP + gi, used, r, RP,
                                          ql_ptr, 0, False)
                        tl.store(out_ptr + (row * H + hg * GP + gi) * R + r, o.to(out_ptr.dtype.element_ty),
                                 mask=r_ok)
                tl.store(count_ptr + prow, 0)  # ready for the next call


LatentConfig = tuple[int, int, int, int]
"""(slices, keys per tile, warps, query heads per program): at most `slices` programs per decode row and head group
(one per tile of keys; varlen rows take one), heads a power of two >= 16 (tl.dot's smallest side)"""


def default_latent_config(rows: int, heads: int, max_keys: int, device: torch.device, rank: int = 512
                          ) -> LatentConfig:
    """All heads in one program up to 16 (DeepSeek-V2-Lite's 16; V3's 128 take eight groups), tiles of 64 keys
    over 8 warps at r >= 256 (4 warps at smaller ranks), slices until the programs reach half the SMs (with at
    least four tiles per slice). Measured on the H200 (bench/paged_latent.py --sweep, 2026-12-05, V2-Lite's
    attention in bf16): within 10% of the sweep's best at 32-128 rows x 512-8192 keys (19-29% off at 8 rows x
    512-2048 keys), 1.08-1.58x faster than the first default (32-key tiles, slices up to one program per SM)."""
    gp = min(_pad(heads), 16)
    block, warps = 64, (8 if rank >= 256 else 4)
    sms = _sm_count(device.index or 0) if device.type == "cuda" else 8
    programs, splits = rows * -(-heads // gp), 1
    while 2 * programs * splits <= sms and splits < 32 and block * splits * 4 <= max_keys:
        splits *= 2
    return splits, block, warps, gp


def paged_latent_attention(q_lat: torch.Tensor, q_rope: torch.Tensor, c_cache: torch.Tensor, kr_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *, scale: float,
                           softcap: float = 0.0, window: int = 0,
                           tree: tuple[torch.Tensor, torch.Tensor] | None = None,
                           cu_q: torch.Tensor | None = None,
                           rows: tuple[torch.Tensor, torch.Tensor] | None = None,
                           config: LatentConfig | None = None) -> torch.Tensor:
    """Kernel version of paged_latent_reference (same arguments). Varlen rows (cu_q) read device tensors only;
    `rows`: their latent_rows(...), when the caller keeps them for all layers of a step."""
    check_softcap_and_window("paged_latent_attention", softcap, window)
    N, H, R = q_lat.shape
    DR = q_rope.shape[2]
    if (q_rope.shape[:2] != (N, H) or c_cache.dim() != 3 or kr_cache.shape[:2] != c_cache.shape[:2]
            or c_cache.shape[2] != R or kr_cache.shape[2] != DR):
        raise ValueError(f"paged_latent_attention wants q_lat (N, H, r), q_rope (N, H, d_r), c_cache (blocks, "
                         f"block_size, r) and kr_cache (blocks, block_size, d_r); got {tuple(q_lat.shape)}, "
                         f"{tuple(q_rope.shape)}, {tuple(c_cache.shape)}, {tuple(kr_cache.shape)}")
    if c_cache.stride(-1) != 1 or kr_cache.stride(-1) != 1 or not (q_lat.is_contiguous() and q_rope.is_contiguous()):
        raise ValueError("paged_latent_attention needs contiguous queries and a contiguous last cache dimension")
    varlen = cu_q is not None
    if varlen and tree is not None:
        raise ValueError("varlen rows (cu_q) take no tree rows")
    if block_tables.is_floating_point() or (not varlen and block_tables.shape[0] != N):
        raise ValueError(f"block_tables must be integer (rows, max_blocks); got {tuple(block_tables.shape)} "
                         f"{block_tables.dtype} for {N} rows")
    splits, block, warps, gp = config or default_latent_config(N, H, block_tables.shape[1] * c_cache.shape[1],
                                                               q_lat.device, R)
    if varlen:
        splits = 1
    if splits & (splits - 1) or block & (block - 1) or block < 16 or gp & (gp - 1) or gp < 16:
        raise ValueError(f"paged latent config {(splits, block, warps, gp)}: slices a power of two, keys per tile "
                         "and heads per program powers of two >= 16")
    block_tables, context_lens, cu_q = index_layout(block_tables, context_lens, cu_q)
    tree, rows = (None if ts is None else tuple(t.contiguous() for t in ts) for ts in (tree, rows))
    if varlen and rows is None:
        rows = latent_rows(block_tables, context_lens, cu_q, N)
    groups = -(-H // gp)
    out = torch.zeros_like(q_lat) if varlen else torch.empty_like(q_lat)
    rp = _pad(R)
    if splits > 1:
        part_o = torch.empty(N * groups * splits * gp, rp, dtype=torch.float32, device=q_lat.device)
        part_ml = torch.empty(N * groups * splits * gp, 2, dtype=torch.float32, device=q_lat.device)
        count = torch.zeros(N * groups, dtype=torch.int32, device=q_lat.device)
    else:
        part_o = part_ml = count = out
    ctx = context_lens
    _latent_kernel[(N, groups, splits)](
        q_lat, q_rope, c_cache, kr_cache, block_tables, ctx, *(rows if varlen else (ctx, ctx)), out,
        part_o, part_ml, count,
        *(tree if tree is not None else (ctx, ctx)),
        c_cache.stride(0), c_cache.stride(1), kr_cache.stride(0), kr_cache.stride(1), block_tables.stride(0),
        float(scale), float(softcap), int(window), H,
        GP=gp, R=R, RP=rp, DR=DR, DRP=_pad(DR), BS=c_cache.shape[1], BLOCK_S=block, SPLITS=splits,
        SOFTCAP=softcap > 0, WINDOW=window > 0,
        F32=q_lat.dtype == torch.float32 or interpreting(),  # the interpreter's bf16 dot is wrong (3.9)
        PRECISION="ieee" if q_lat.dtype == torch.float32 else "tf32", TREE=tree is not None, VARLEN=varlen,
        num_warps=warps)
    return out
