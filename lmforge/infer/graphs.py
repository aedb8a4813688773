"""The runner's CUDA-graph backend: decode-only steps replayed from captured graphs.

At large batch a decode step is a few hundred small kernels per layer stack; launching them from Python
costs milliseconds the GPU then waits for. A CUDA graph replays the whole recorded forward with one
launch, provided every tensor it touches keeps its address and shape. So a step whose chunks are all
single tokens runs in static buffers of a bucket: B' >= B rows (powers of two) and W' >= the longest
block table (powers of two), one graph per (B', W') captured on first use, all sharing one memory pool.
Rows beyond B write their keys to a scratch block the pool never hands out and attend to one key, so
they compute finite garbage nobody reads. Sampling runs outside the graph on the real rows' logits.
On a CPU (tests) the same static-buffer step runs eagerly (use_graphs=False): the logic is the same.
Mixed steps (prefill chunks) run eagerly, as before.
"""

from __future__ import annotations

import warnings

import torch

from lmforge.model.meta import AttnMetadata

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class DecodeGraphs:
    def __init__(self, model, cache, block_size: int, scratch_block: int, max_batch: int, max_blocks: int,
                 use_graphs: bool):
        self.model, self.cache, self.block_size = model, cache, block_size
        self.scratch_slot = scratch_block * block_size
        self.max_batch, self.max_blocks, self.use_graphs = _bucket(max_batch), max_blocks, use_graphs
        self.entries: dict[tuple[int, int], tuple] = {}
        self.pool = None
        self.failed: str | None = None
        """why capture failed (decode then runs eagerly, with a warning): kept for benchmarks' notes"""

    def fits(self, batch) -> bool:
        return self.failed is None and batch.num_decodes == len(batch.chunks) and len(batch.chunks) <= self.max_batch

    def run(self, batch) -> torch.Tensor:
        """logits (B, V) of a decode-only batch, one row per chunk."""
        B, bs = len(batch.chunks), self.block_size
        W = min(_bucket(max(len(s.block_table) for s, _ in batch.chunks)), self.max_blocks)
        key = (_bucket(B), W)
        graph, bufs, out = self.entries.get(key) or self._capture(*key)
        Bp = key[0]
        pos = [s.num_computed for s, _ in batch.chunks]
        host = torch.zeros(4, Bp, dtype=torch.long)
        host[0, :B] = torch.tensor([s.tokens[p] for (s, _), p in zip(batch.chunks, pos)])
        host[1, :B] = torch.tensor(pos)
        host[2] = self.scratch_slot
        host[2, :B] = torch.tensor([s.block_table[p // bs] * bs + p % bs for (s, _), p in zip(batch.chunks, pos)])
        host[3] = 1
        host[3, :B] = host[1, :B] + 1
        tables = torch.zeros(Bp, W, dtype=torch.int32)
        for i, (s, _) in enumerate(batch.chunks):
            tables[i, :len(s.block_table)] = torch.tensor(s.block_table, dtype=torch.int32)
        bufs["host"].copy_(host, non_blocking=True)
        bufs["tables"].copy_(tables, non_blocking=True)
        if graph is not None:
            graph.replay()
        else:
            out = out()  # the eager static-buffer step
        return out[:B]

    def _capture(self, Bp: int, W: int) -> tuple:
        dev = self.cache.device
        host = torch.zeros(4, Bp, dtype=torch.long, device=dev)
        host[2], host[3] = self.scratch_slot, 1
        bufs = {"host": host, "tables": torch.zeros(Bp, W, dtype=torch.int32, device=dev)}
        meta = AttnMetadata(positions=host[1][None], slot_mapping=host[2], context_lens=host[3].to(torch.int32),
                            logits_indices=torch.arange(Bp, device=dev), block_tables=bufs["tables"],
                            query_lens_host=(1,) * Bp, context_lens_host=(1,) * Bp, num_decodes=Bp,
                            block_size=self.block_size)

        def step() -> torch.Tensor:
            meta.context_lens.copy_(host[3])  # int32 view of the lengths, refreshed inside the graph
            return self.model(host[0][None], cache=self.cache, meta=meta)[0]

        if not self.use_graphs:
            self.entries[(Bp, W)] = (None, bufs, step)
            return self.entries[(Bp, W)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch requires
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                out = step()
        except RuntimeError as e:  # an op that cannot be captured: the model still runs, eagerly
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            warnings.warn(f"CUDA graph capture failed ({self.failed}); decoding eagerly", stacklevel=2)
            self.entries[(Bp, W)] = (None, bufs, step)
            return self.entries[(Bp, W)]
        self.pool = graph.pool()
        self.entries[(Bp, W)] = (graph, bufs, out)
        return self.entries[(Bp, W)]
