"""Per-head maximum attention logits, collected from outside the model for MuonClip's QK-clip (Kimi Team
2025, "Kimi K2", sec. 2.1): after each optimizer step, heads whose largest pre-softmax logit
S_max^h = max_{b,i,j} q_i^h . k_j^h / sqrt(d) (over visible keys) exceeded tau get W_q, W_k shrunk
(lmforge.optim.qk_clip). The fused attention kernels never materialise the logits, so a forward hook
on each attention module recomputes q and k from the module's input and takes the max without autograd:
one extra Q K^T per layer, the price of measuring (a kernel could emit the row max it already has).

    rec = MaxLogitRecorder(model)                 # before parallelising: the hooks survive FSDP2
    loss.backward(); opt.step(); rec.all_reduce_(); opt.clip_qk_(rec.layers()); rec.reset()
    # on FSDP2-sharded weights: clip_qk_(rec.layers(), tau) below instead of Muon.clip_qk_
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.layers.attention import Attention, visible
from lmforge.model.layers.rope import apply_rope


def _q_k(attn: Attention, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, T, hd), k (B, KV, T, hd) as Attention.forward computes them."""
    B, T, _ = x.shape
    if attn.wqkv is not None:
        q, k, _ = attn.wqkv(x).split(attn.qkv_sizes, dim=-1)
    else:
        q, k = attn.wq(x), attn.wk(x)
    q = q.view(B, T, attn.n_heads, attn.hd).transpose(1, 2)
    k = k.view(B, T, attn.n_kv, attn.hd).transpose(1, 2)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = apply_rope(q, *rope, attn.rope_layout), apply_rope(k, *rope, attn.rope_layout)
    return q, k


class MaxLogitRecorder:
    """Running per-query-head max logit of every (MHA/GQA) attention layer since the last reset()."""

    def __init__(self, model: nn.Module):
        self.attns = [m for m in model.modules() if isinstance(m, Attention)]
        if not self.attns:
            raise ConfigError(f"MaxLogitRecorder found no lmforge Attention modules in {type(model).__name__} "
                              "(MLA layers are not supported yet)")
        self.max: dict[Attention, torch.Tensor] = {}
        self._handles = [a.register_forward_hook(self._hook) for a in self.attns]

    @torch.no_grad()
    def _hook(self, attn: Attention, args, out) -> None:
        # Attention.forward(x, rope, mask, cache, meta): the mask argument is legacy (always causal now)
        x, rope = args[0], args[1]
        cache = args[3] if len(args) > 3 else None
        meta = args[4] if len(args) > 4 else None
        if cache is not None:
            return  # decoding with a cache: not a training step
        q, k = _q_k(attn, x, rope)
        k = k.repeat_interleave(attn.n_heads // attn.n_kv, dim=1)  # (B, H, T, hd)
        s = (q.float() @ k.float().transpose(-2, -1)) * attn.scale  # (B, H, T, T)
        pos = torch.arange(s.shape[-1], device=s.device)
        allowed = visible(pos, pos, attn.window)  # (T, T): causal, and inside the window on sliding layers
        doc = meta.doc_mask() if meta is not None else None  # packed rows: (B, 1, T, T) same-document keys
        if doc is not None:
            allowed = allowed & doc
        s = s.masked_fill(~allowed, float("-inf"))
        m = s.amax(dim=(0, 2, 3))  # (H,)
        self.max[attn] = torch.maximum(self.max[attn], m) if attn in self.max else m

    def layers(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]:
        """[(W_q, W_k, max logit per query head, head_dim)] as Muon.clip_qk_ takes them."""
        if any(a.wqkv is not None for a in self.attns):
            raise ConfigError("QK-clip needs separate wq/wk weights; build the model with fused_proj=false")
        return [(a.wq.weight, a.wk.weight, self.max[a], a.hd) for a in self.attns if a in self.max]

    def all_reduce_(self, group=None) -> None:
        """Max over the data-parallel ranks (each saw its own tokens): call before clipping."""
        import torch.distributed as dist

        for m in self.max.values():
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)

    def reset(self) -> None:
        self.max.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _scale_rows_(w: torch.Tensor, rows: torch.Tensor) -> None:
    """w *= rows (n, 1), on whole weights or on this rank's rows of an FSDP2 Shard(0) DTensor."""
    if hasattr(w, "to_local"):
        from lmforge.parallel.matrix_optim import _is_row_sharded, _own_rows

        _is_row_sharded(w)
        w.to_local().mul_(_own_rows(rows, w).to_local().to(w.dtype))
    else:
        w.mul_(rows.to(w.dtype))


@torch.no_grad()
def clip_qk_(layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]], tau: float) -> list[torch.Tensor]:
    """QK-clip (lmforge.optim.qk_clip) on whole or FSDP2-sharded W_q, W_k: the per-row factors qk_clip_
    applies are found by running it on columns of ones, then each rank scales its own rows (no gather).
    Returns gamma per query head for each layer."""
    from lmforge.optim.qk_clip import qk_clip_

    gammas = []
    for wq, wk, max_logits, hd in layers:
        rq = torch.ones(wq.shape[0], 1, device=max_logits.device)
        rk = torch.ones(wk.shape[0], 1, device=max_logits.device)
        gammas.append(qk_clip_(rq, rk, max_logits, tau, hd))
        _scale_rows_(wq, rq)
        _scale_rows_(wk, rk)
    return gammas
