"""Expert parallelism (GShard, Lepikhin et al. 2021; Switch, Fedus et al. 2021): the E experts of every MoE
layer are split over the ep ranks of a group (rank r holds experts [r·E/ep, (r+1)·E/ep)), each rank routes
its own tokens, and two all-to-alls move token rows to the ranks holding their experts and back:

    route (N·k assignments) -> sort by expert -> all-to-all (rows to the expert's rank) -> sort by local
    expert -> grouped expert MLP -> unsort -> all-to-all back -> weight and sum per token

Everything but the experts stays replicated (data parallel over the same ranks). Gradients: the experts'
come back through the all-to-all from every rank's loss, so they are divided by ep; the replicated
parameters' are averaged with an all-reduce (`sync_gradients`). The router, balancing losses and shared
experts are the wrapped MoE's own (renamed mlp.moe.router, ...); the local experts are an `Experts.slice` in
the MoE's place (mlp.experts.w_up holds only the local rows), so EP models are checkpointed with their layout
(not through lmforge.parallel.checkpoint).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.layers.moe import Experts, MoE


class _AllToAll(torch.autograd.Function):
    """Rows of x (split by `send` counts per rank) to every rank; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(sum(ctx.send), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return out, None, None, None


def expert_range(n_experts: int, ep: int, rank: int) -> tuple[int, int]:
    """Experts [lo, hi) held by `rank` of `ep`."""
    if n_experts % ep:
        raise ConfigError(f"expert parallel size {ep} must divide model.moe.n_experts={n_experts}")
    per = n_experts // ep
    return rank * per, (rank + 1) * per


class ExpertParallelMoE(nn.Module):
    def __init__(self, moe: MoE, group=None):
        super().__init__()
        self.ep = dist.get_world_size(group)
        lo, hi = expert_range(moe.E, self.ep, dist.get_rank(group))
        if moe.m.capacity_factor > 0:
            raise ConfigError("expert parallelism here is dropless: set model.moe.capacity_factor=0")
        self.group, self.E_local = group, hi - lo
        if not isinstance(moe.experts, Experts):
            raise ConfigError(f"expert parallelism splits an MoE's stacked Experts; this one's experts are a "
                              f"{type(moe.experts).__name__}: apply expert parallelism before replacing them")
        self.experts = moe.experts.slice(lo, hi)  # this rank's share, computed as the whole MoE computes all
        moe.experts = None  # the wrapped MoE keeps the router, shared experts and balancing only
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe = self.moe
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        idx, w, scores, logits = moe.route(flat)
        y = self._dispatch(flat, idx, w)
        if moe.shared is not None:
            y = y + moe.shared(flat)
        moe._balance(idx, None, scores, logits, B, T)  # dropless
        return y.view(B, T, d)

    def _dispatch(self, flat: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        E, k = self.moe.E, self.moe.k
        order = idx.reshape(-1).argsort(stable=True)  # assignments sorted by expert = grouped by rank
        tok = order // k
        counts = torch.bincount(idx.reshape(-1), minlength=E).view(self.ep, self.E_local)  # (ep, E_local)
        got = torch.empty_like(counts)
        dist.all_to_all_single(got, counts, group=self.group)  # got[s, e]: rows from rank s for local expert e
        send, recv = counts.sum(1).tolist(), got.sum(1).tolist()
        xr = _AllToAll.apply(flat[tok], send, recv, self.group)  # (sum recv, d), by source rank then expert
        local_e = torch.repeat_interleave(torch.arange(self.E_local, device=flat.device).repeat(self.ep),
                                          got.reshape(-1))
        perm = local_e.argsort(stable=True)
        yr = self.experts(xr[perm], got.sum(0))[perm.argsort()]  # back to arrival order
        ys = _AllToAll.apply(yr, recv, send, self.group)  # (N·k, d) in `order`
        ys = ys * w.reshape(-1)[order, None]
        return flat.new_zeros(flat.shape).index_add_(0, tok, ys.to(flat.dtype))


def apply_ep(model: nn.Module, group=None) -> nn.Module:
    """Replace every MoE layer's experts by this rank's share, in place."""
    n = 0
    for block in model.blocks:
        if isinstance(block.mlp, MoE):
            block.mlp = ExpertParallelMoE(block.mlp, group)
            n += 1
    if not n:
        raise ConfigError("expert parallelism needs MoE layers (model.mlp='moe')")
    return model


@torch.no_grad()
def sync_gradients(model: nn.Module, group=None) -> None:
    """After backward: expert grads / ep (every rank's loss reached them); all other grads averaged."""
    world = dist.get_world_size(group)
    # the ranks' expert slices only: an MoE left whole (an MTP module's) is replicated like the rest
    experts = {id(p) for m in model.modules() if isinstance(m, ExpertParallelMoE) for p in m.experts.parameters()}
    for p in model.parameters():
        if p.grad is None:
            continue
        if id(p) not in experts:
            dist.all_reduce(p.grad, group=group)
        p.grad.div_(world)
