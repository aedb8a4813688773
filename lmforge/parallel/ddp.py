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


@torch.no_grad()
def average_gradients(params, group=None) -> None:
    """All-reduce each existing gradient over `group` and divide by its size: the replicas' mean gradient."""
    world = dist.get_world_size(group)
    for p in params:
        if p.grad is not None:
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
        self._bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        self._sync = True
        self._reset()
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _reset(self) -> None:
        self._ready = [0] * len(self.buckets)
        self._next = 0  # the next bucket to launch; launches stay in index order on every rank
        self._inflight: list[tuple[int, torch.Tensor, object]] = []

    @contextlib.contextmanager
    def no_sync(self):
        self._sync = False
        try:
            yield
        finally:
            self._sync = True

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._sync:
            return
        i = self._bucket_of[p]
        self._ready[i] += 1
        while self._next < len(self.buckets) and self._ready[self._next] == len(self.buckets[self._next]):
            self._launch(self._next)
            self._next += 1

    def _launch(self, i: int) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[i]]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one message per bucket
        self._inflight.append((i, flat, dist.all_reduce(flat, group=self.group, async_op=True)))

    @torch.no_grad()
    def finish_gradient_sync(self) -> None:
        """Launch buckets whose parameters got no gradient (unused in this forward), wait, unpack."""
        while self._next < len(self.buckets):
            self._launch(self._next)
            self._next += 1
        for i, flat, work in self._inflight:
            work.wait()
            flat.div_(self.world)
            offset = 0
            for p in self.buckets[i]:
                averaged = flat[offset:offset + p.numel()].view_as(p)
                if p.grad is None:  # a parameter this forward did not use: zeros were sent for it
                    p.grad = averaged.clone()
                else:
                    p.grad.copy_(averaged)
                offset += p.numel()
        self._reset()
