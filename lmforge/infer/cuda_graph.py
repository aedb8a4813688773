"""Fast GPU decoding: one decode step captured as a CUDA graph per batch-size bucket.

At batch 1 a decode step is a few hundred small kernels; launching them from Python costs more than
running them. A CUDA graph replays the whole recorded step with one launch, provided that every tensor
it touches keeps its address and shape - hence `StaticKVCache` (write slot and masks on the device,
attention over all max_len slots) and static token/logit buffers. Batches run in the smallest captured
bucket that fits (extra rows compute garbage that nobody reads). Optionally the step is first compiled
with torch.compile (fuses norms, RoPE and the MLP activation into few kernels). SDPA keeps its default
backends here: with fixed shapes cuDNN's attention plan is built once, at capture, and it handles the mask
with GQA in one kernel (H100, 1.1B, batch 32: 9,625 tok/s with it, 2,586 without; docs/benchmarks.md).
`repeat_kv` stores kv heads per query head instead (6,412 tok/s without cuDNN). The batch-1 bucket of a
Llama-style model runs on Triton kernels instead (lmforge.infer.kernel_step: 5 kernels per block, 995
tok/s vs 625 compiled at 1.1B on an H100, after KernelStep.tune()). The CPU path runs the same
static-cache step eagerly (use_graphs=False), which tests compare against `PlainDecoder`.
"""

from __future__ import annotations

import torch

from lmforge.errors import LmforgeError
from lmforge.model.cache import StaticKVCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class GraphDecoder:
    """Decoder (see lmforge.infer.engine) over a StaticKVCache of max_batch rows x max_len slots."""

    def __init__(self, model, max_batch: int, max_len: int, *, use_graphs: bool | None = None,
                 compile: bool | str = False, repeat_kv: bool = False, buckets: tuple[int, ...] = BUCKETS,
                 kernels: bool | None = None):
        """compile: False, True (torch.compile's default mode) or a torch.compile mode name.
        kernels: run the batch-1 bucket on lmforge.infer.kernel_step's Triton kernels (default: on a GPU
        with triton installed, for the models they support); this fuses the model's q/k/v and gate/up
        projections in place (same function and state_dict, see lmforge.model.layers.fused)."""
        self.model = model
        max_len = -(-max_len // 16) * 16  # aligned key count: fused attention kernels want it
        self.cache = StaticKVCache.for_model(model, max_batch, max_len, repeat_kv=repeat_kv)
        if getattr(model, "rope", None) is not None:  # positions are not checked on the GPU: cover every slot
            model.rope.reserve(max_len)
        self.use_graphs = self.cache.k.is_cuda if use_graphs is None else use_graphs
        self.buckets = sorted({b for b in buckets if b < max_batch} | {max_batch})
        mode = compile if isinstance(compile, str) else None
        self.forward = torch.compile(self._forward, dynamic=False, mode=mode) if compile else self._forward
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.batch_size = 1
        self.kernel_step = self._kernel_step(model, kernels)

    def _kernel_step(self, model, kernels: bool | None):
        if kernels is False or self.cache.repeat_kv > 1:
            return None
        if kernels is None and not (self.cache.k.is_cuda and torch.cuda.get_device_capability(self.cache.k.device)[0] >= 8):
            return None  # automatic only on GPUs the kernels were written for (Ampere and newer)
        from lmforge.kernels.decode import available
        from lmforge.infer.kernel_step import KernelStep, unsupported

        why = "triton is not installed (pip install 'lmforge[kernels]')" if not available(self.cache.k.device) \
            else unsupported(model)
        if why is None:
            return KernelStep(model, self.cache.view(1))
        if kernels:
            raise LmforgeError(f"kernels=True, but the batch-1 kernel step cannot run: {why}")
        return None

    def step_fn(self, bucket: int):
        """The function one decode step of this bucket runs (and a graph captures)."""
        return self.kernel_step if bucket == 1 and self.kernel_step is not None else self.forward

    def bind(self, batch_size: int) -> "GraphDecoder":
        if batch_size > self.buckets[-1]:
            raise LmforgeError(f"batch of {batch_size} rows > the decoder's max_batch={self.buckets[-1]}")
        self.batch_size = batch_size
        return self

    def bucket(self, batch_size: int) -> int:
        return next(b for b in self.buckets if b >= batch_size)

    def _forward(self, cache: StaticKVCache, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (b, 1) -> logits (b, V) of one decode step at the cache's current slot."""
        return self.model(tokens, cache.positions(1), cache=cache)[:, -1]

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        B, T = ids.shape
        if T >= self.cache.max_len:
            raise LmforgeError(f"prompt of {T} tokens does not fit the decoder's cache of {self.cache.max_len}")
        self.bind(B)
        self.cache.start(pad)
        view = self.cache.view(B)
        return self.model(ids, view.positions(T).clamp(min=0), cache=view)[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        B = self.batch_size
        if self.cache.length + 1 > self.cache.max_len:
            raise LmforgeError(f"decoder cache is full ({self.cache.max_len} slots)")
        if not self.use_graphs:
            out = self.step_fn(self.bucket(B))(self.cache.view(B), tokens[:, None])[:B]
        else:
            graph, tok_buf, out_buf = self.graphs.get(self.bucket(B)) or self.capture(self.bucket(B))
            tok_buf[:B, 0].copy_(tokens)
            graph.replay()
            out = out_buf[:B]
        self.cache.length += 1
        return out

    @torch.no_grad()
    def capture(self, b: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """Record one decode step for bucket b. Warm-up runs (on a side stream, as torch requires) write
        only the slot the next real step overwrites, and the write slot is restored afterwards."""
        view = self.cache.view(b)
        tok_buf = torch.zeros(b, 1, dtype=torch.long, device=self.cache.k.device)
        saved = self.cache.pos.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                view.length = 0  # keep torch.compile's guards stable across calls
                self.step_fn(b)(view, tok_buf)
                self.cache.pos.copy_(saved)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        view.length = 0
        with torch.cuda.graph(graph):
            out_buf = self.step_fn(b)(view, tok_buf)
        self.cache.pos.copy_(saved)
        self.graphs[b] = (graph, tok_buf, out_buf)
        return self.graphs[b]
