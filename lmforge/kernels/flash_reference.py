"""PyTorch reference for lmforge.kernels.flash_attention: FlashAttention-2's tiled algorithm (Dao 2023,
Algorithms 1 and 2) as explicit loops over (query block, key block) tiles, for reading and for the tests.

Same conventions as the kernels: q (B, H, N, hd), k and v (B, KV, N, hd), query head h uses kv head
h // (H / KV); `cu_seqlens` packs documents over the B·N tokens taken row after row; the window keeps keys
i - window < j <= i. Tiles with nothing visible are skipped, as the kernels skip them.
"""

from __future__ import annotations

import math

import torch


def _documents(cu_seqlens: torch.Tensor | None, B: int, N: int) -> list[tuple[int, int, int]]:
    """(row, first token in the row, length) of every non-empty document (an empty one at the end starts
    at B·N, past the last row)."""
    if cu_seqlens is None:
        return [(b, 0, N) for b in range(B)]
    cu = cu_seqlens.tolist()
    return [(s // N, s % N, e - s) for s, e in zip(cu[:-1], cu[1:]) if e > s]


def visible(rows: torch.Tensor, cols: torch.Tensor, causal: bool, window: int) -> torch.Tensor:
    """(len(rows), len(cols)) bool, True where the query at position rows[i] sees the key at cols[j]."""
    d = rows[:, None] - cols[None, :]
    ok = d >= 0 if causal else torch.ones_like(d, dtype=torch.bool)
    return ok & (d < window) if window > 0 else ok


def _capped(raw: torch.Tensor, softcap: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Soft-capped logits c·tanh(s/c) and their derivative 1 - tanh² (None without capping)."""
    if softcap <= 0:
        return raw, None
    t = torch.tanh(raw / softcap)
    return softcap * t, 1 - t * t


def _ref_forward_doc(q, k, v, causal, scale, window, softcap, bm, bn):
    """One document: q (H, L, hd), k/v (KV, L, hd) -> O (H, L, hd) fp32, logsumexp (H, L). Heads are
    viewed as (KV, group): a kv head broadcasts over its query heads, never copied."""
    H, L, hd = q.shape
    KV = k.shape[0]
    qg, kf, vf = q.float().view(KV, H // KV, L, hd), k.float()[:, None], v.float()[:, None]
    o, lse = torch.zeros_like(qg), qg.new_zeros(KV, H // KV, L)
    for m0 in range(0, L, bm):
        rows = torch.arange(m0, min(m0 + bm, L), device=q.device)
        m = qg.new_full((KV, H // KV, len(rows)), -math.inf)
        l, acc = torch.zeros_like(m), qg.new_zeros(KV, H // KV, len(rows), hd)
        for n0 in range(0, L, bn):
            cols = torch.arange(n0, min(n0 + bn, L), device=q.device)
            ok = visible(rows, cols, causal, window)
            if not ok.any():  # above the diagonal or behind the window: the kernel skips it
                continue
            s = _capped(qg[:, :, rows] @ kf[:, :, cols].mT * scale, softcap)[0].masked_fill(~ok, -math.inf)
            m_new = torch.maximum(m, s.amax(-1))
            shift = m_new.nan_to_num(neginf=0.0)  # rows with nothing visible yet: exp(-inf - 0) = 0
            alpha, p = torch.exp(m - shift), torch.exp(s - shift[..., None])
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + p @ vf[:, :, cols]
            m = m_new
        o[:, :, rows], lse[:, :, rows] = acc / l[..., None], m + torch.log(l)
    return o.view(H, L, hd), lse.view(H, L)


def flash_attention_ref(q, k, v, *, causal: bool = True, scale: float | None = None, window: int = 0,
                        softcap: float = 0.0, cu_seqlens: torch.Tensor | None = None, block_m: int = 64,
                        block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiled forward in PyTorch: (O in q's dtype, logsumexp (B, H, N) fp32)."""
    B, H, N, hd = q.shape
    scale = hd ** -0.5 if scale is None else scale
    o, lse = torch.zeros_like(q), q.new_zeros(B, H, N, dtype=torch.float32)
    for b, t0, L in _documents(cu_seqlens, B, N):
        sl = slice(t0, t0 + L)
        od, ld = _ref_forward_doc(q[b, :, sl], k[b, :, sl], v[b, :, sl], causal, scale, window, softcap,
                                  block_m, block_n)
        o[b, :, sl], lse[b, :, sl] = od.to(q.dtype), ld
    return o, lse


def _ref_backward_doc(do, q, k, v, o, lse, causal, scale, window, softcap, bm, bn):
    """Algorithm 2 for one document: outer loop over key blocks, inner over query blocks."""
    H, L, hd = q.shape
    KV, G = k.shape[0], H // k.shape[0]
    qg, dog = q.float().view(KV, G, L, hd), do.float().view(KV, G, L, hd)
    kf, vf, lse = k.float()[:, None], v.float()[:, None], lse.view(KV, G, L)
    D = (dog * o.float().view(KV, G, L, hd)).sum(-1)  # (KV, G, L) = rowsum(dO ∘ O)
    dq, dk, dv = torch.zeros_like(qg), qg.new_zeros(KV, L, hd), qg.new_zeros(KV, L, hd)
    for n0 in range(0, L, bn):
        cols = torch.arange(n0, min(n0 + bn, L), device=q.device)
        for m0 in range(0, L, bm):
            rows = torch.arange(m0, min(m0 + bm, L), device=q.device)
            ok = visible(rows, cols, causal, window)
            if not ok.any():
                continue
            s, dcap = _capped(qg[:, :, rows] @ kf[:, :, cols].mT * scale, softcap)
            p = torch.exp(s - lse[:, :, rows, None]).masked_fill(~ok, 0.0)  # (KV, G, bm, bn)
            dv[:, cols] += (p.mT @ dog[:, :, rows]).sum(1)
            ds = p * (dog[:, :, rows] @ vf[:, :, cols].mT - D[:, :, rows, None])
            ds = ds * dcap if dcap is not None else ds
            dq[:, :, rows] += scale * ds @ kf[:, :, cols]
            dk[:, cols] += scale * (ds.mT @ qg[:, :, rows]).sum(1)
    return dq.view(H, L, hd), dk, dv


def flash_attention_ref_backward(do, q, k, v, o, lse, *, causal: bool = True, scale: float | None = None,
                                 window: int = 0, softcap: float = 0.0, cu_seqlens: torch.Tensor | None = None,
                                 block_m: int = 64, block_n: int = 64):
    """Tiled backward in PyTorch from O and the logsumexp only: (dq, dk, dv) in the inputs' dtypes."""
    B, H, N, hd = q.shape
    scale = hd ** -0.5 if scale is None else scale
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, t0, L in _documents(cu_seqlens, B, N):
        sl = slice(t0, t0 + L)
        g = _ref_backward_doc(do[b, :, sl], q[b, :, sl], k[b, :, sl], v[b, :, sl], o[b, :, sl], lse[b, :, sl],
                              causal, scale, window, softcap, block_m, block_n)
        dq[b, :, sl], dk[b, :, sl], dv[b, :, sl] = (x.to(q.dtype) for x in g)
    return dq, dk, dv
