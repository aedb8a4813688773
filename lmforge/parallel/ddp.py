"""Data parallelism from scratch (teaching implementations; torch's DistributedDataParallel is the engine
to use, and the tests compare both with it).

Every rank holds the whole model, runs forward and backward on its own slice of the global batch, and
the ranks average their gradients before the (identical) optimizer step, so all replicas stay equal:
    g = (1/N) sum_r g_r        (= the full-batch mean gradient when every rank's slice has equal size)

Two versions:
  NaiveDDP     after backward, one blocking all-reduce per parameter (many small messages, no overlap)
  BucketedDDP  gradients are packed into ~bucket_mb buckets in reverse registration order (the order in
               which backward produces them); a bucket's all-reduce starts asynchronously the moment its
               last gradient is accumulated (a post-accumulate-grad hook), so communication overlaps the
               rest of backward (Li et al. 2020, "PyTorch Distributed", sec. 3.2). Buckets are launched in
               index order on every rank, so the collectives match across ranks.

Parameters a forward did not use (a branch taken on some ranks only, an MoE expert no token of this rank
chose) follow torch's DDP (find_unused_parameters=True) and one process on the whole batch: a parameter
used on some ranks gets the mean with zeros from the others; one no rank used keeps grad None, so the
optimizer leaves it untouched (a zero gradient would still apply AdamW's weight decay). "Used" means
has a gradient (p.grad is not None) when the gradients are averaged; the ranks all-reduce one flag each.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn


def broadcast_module_(module: nn.Module, src: int = 0, group=None) -> None:
    """Make every rank's parameters and buffers equal to rank `src`'s (replicas must start equal)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=dist.get_global_rank(group, src) if group is not None else src, group=group)


def used_anywhere(params: list[torch.Tensor], used: list[bool], group=None) -> list[bool]:
    """Whether each parameter was used (has a gradient) on any rank of `group`: one all-reduce of flags
    (on the parameters' device: NCCL takes only GPU tensors)."""
    flags = torch.tensor(used, dtype=torch.int32, device=params[0].device if params else "cpu")
    dist.all_reduce(flags, group=group)
    return [bool(f) for f in flags.tolist()]


@torch.no_grad()
def average_gradients(params, group=None) -> None:
    """Replace each gradient by its mean over `group`, with zeros for ranks that have none; a parameter no
    rank has a gradient for keeps grad None. Every rank issues the same collectives, whatever it used."""
    params = list(params)
    world = dist.get_world_size(group)
    for p, used in zip(params, used_anywhere(params, [p.grad is not None for p in params], group)):
        if used:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(world)


class NaiveDDP(nn.Module):
    """All-reduce each gradient after backward: call `sync_gradients()` between backward and step."""

    def __init__(self, module: nn.Module, group=None):
        super().__init__()
        self.module, self.group = module, group
        self.world = dist.get_world_size(group)
        broadcast_module_(module, group=group)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def sync_gradients(self) -> None:
        average_gradients(self.module.parameters(), self.group)


class InOrderLauncher:
    """Start one collective per bucket of parameters, always in bucket order, each as soon as the bucket
    and all before it have their gradients (`ready(p)` from a post-accumulate-grad hook); `launch_rest()`
    starts the ones still waiting (buckets with a parameter this rank did not use), then `reset()`.

    The order, not the timing, is what lines the ranks' collectives up: a rank that skipped a branch
    holds back the buckets behind it until launch_rest(), while a rank that used it sends them during
    backward; both issue the same sequence, so a blocking collective on one waits for the other's."""

    def __init__(self, buckets: list[list[torch.Tensor]], launch):
        self.buckets, self.launch = buckets, launch
        self.bucket_of = {p: i for i, b in enumerate(buckets) for p in b}
        self.reset()

    def reset(self) -> None:
        self.n_ready = [0] * len(self.buckets)
        self.next = 0  # the next bucket to launch

    def ready(self, p: torch.Tensor) -> None:
        self.n_ready[self.bucket_of[p]] += 1
        while self.next < len(self.buckets) and self.n_ready[self.next] == len(self.buckets[self.next]):
            self.launch(self.next)
            self.next += 1

    def launch_rest(self) -> None:
        while self.next < len(self.buckets):
            self.launch(self.next)
            self.next += 1


class BucketedDDP(nn.Module):
    """Bucketed all-reduce overlapped with backward. Call `finish_gradient_sync()` after backward (it
    waits for the in-flight buckets and writes the averaged gradients back); inside `no_sync()` the hooks
    only accumulate (gradient accumulation: communicate once, on the last micro-batch)."""

    def __init__(self, module: nn.Module, bucket_mb: float = 25.0, group=None):
        super().__init__()
        self.module, self.group = module, group
        self.world = dist.get_world_size(group)
        broadcast_module_(module, group=group)
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets: list[list[nn.Parameter]] = []
        size, limit = 0, int(bucket_mb * 2**20)
        for p in reversed(params):  # backward meets the last layers first
            nbytes = p.numel() * p.element_size()
            if not self.buckets or size + nbytes > limit:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self._launcher = InOrderLauncher(self.buckets, self._launch)
        self._inflight: list[tuple[int, torch.Tensor, object]] = []
        self._sync = True
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _on_grad(self, p: torch.Tensor) -> None:
        if self._sync:
            self._launcher.ready(p)

    def _launch(self, i: int) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[i]]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one message per bucket
        self._inflight.append((i, flat, dist.all_reduce(flat, group=self.group, async_op=True)))

    @torch.no_grad()
    def finish_gradient_sync(self) -> None:
        """Launch buckets whose parameters got no gradient (unused in this forward), wait, unpack; a
        parameter no rank used keeps grad None."""
        self._launcher.launch_rest()
        params = [p for b in self.buckets for p in b]
        used = dict(zip(params, used_anywhere(params, [p.grad is not None for p in params], self.group)))
        for i, flat, work in self._inflight:
            work.wait()
            flat.div_(self.world)
            offset = 0
            for p in self.buckets[i]:
                averaged = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
                if not used[p]:  # no rank used it: the zeros sent for it are no gradient
                    continue
                if p.grad is None:  # used on another rank only: zeros were sent for it
                    p.grad = averaged.clone()
                else:
                    p.grad.copy_(averaged)
        self._launcher.reset()
        self._inflight = []
