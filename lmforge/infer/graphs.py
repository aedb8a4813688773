"""The runner's CUDA-graph backend: decode-only steps replayed from captured graphs.

At large batch a decode step is a few hundred small kernels per layer stack; launching them from Python
costs milliseconds the GPU then waits for. A CUDA graph replays the whole recorded forward with one
launch, provided every tensor it touches keeps its address and shape. So a step whose chunks are all
single tokens runs in static buffers of a bucket: B' >= B rows (powers of two) and W' >= the longest
block table (`_width`), one graph per (B', W', what it returns, tree rows or not) captured on first use, all
sharing one memory pool.
Rows beyond B write their keys to a scratch block the pool never hands out and attend to one key, so
they compute finite garbage nobody reads. Sampling runs outside the graph on the real rows' logits, which
every bucket's step writes into one shared buffer (`_shared`), so the graphs' outputs cost one buffer's memory.
On a CPU (tests) the same static-buffer step runs eagerly (use_graphs=False): the logic is the same.

Speculative verification: a chunk of n <= `chunk_rows` tokens (the pending token and its drafts) becomes
n rows of the same sequence, row j at position s + j with context length s + j + 1. Every row's key is
written before any row attends, so row j reads the chunk's earlier keys from the cache: causal attention
within the chunk, as the eager varlen path computes it. The engine sets chunk_rows = 1 + the draft length
for chain drafters (and the draft model's own runner for its catch-up chunks); 1 otherwise, and models with
recurrent-state layers keep 1 (a state advances token by token within one row). A chunk ending in a
token tree (tree drafters) runs the same way where `allow_trees` was called: its tree nodes' rows carry
AttnMetadata.tree_rows (the first tree slot and a bitmask of the node's ancestors, up to 62 nodes), which the
paged caches' decode paths (the Triton kernel and the reference) turn into each row's mask; such steps replay
graphs of their own.

Mixed steps (prefill chunks beside decodes): where `allow_mixed(n)` was called (EngineConfig.graph_prefill_tokens),
a step of up to n tokens holding prefill chunks replays a graph of its own per token bucket T' >= its token count:
its tokens back to back in the eager step's flat row, every layer's attention through the varlen kernel from
device metadata alone (AttnMetadata.varlen_tiles: each sequence's query offsets, context length and block table,
and a fixed grid of tiles of 16 queries, lmforge.kernels.paged_varlen.paged_varlen_attention; its reference on
a CPU), logits at up to max_batch positions (the sampled rows and prompt log-prob rows) and, for a drafter reading
the target's features, every token's hidden states (a graph of its own per return_hidden value). A step admitting a
prompt then costs one graph launch instead of an eager forward's hundreds of kernel launches. Longer steps, steps
where a sequence holds more than MIXED_MAX_CONTEXT keys, steps with token trees and recurrent-state models run
eagerly.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.infer.config import length_dependent_rope
from lmforge.infer.runner import LateIds, chunk_inputs, host_block_tables, rope_lengths, token_at
from lmforge.kernels.paged_varlen import varlen_programs, varlen_tiles
from lmforge.model.meta import AttnMetadata
from lmforge.utils import capture_cuda_graph, copy_in

MAX_CHUNK_ROWS = 512
"""the most rows of a step with chunks as rows (speculative verification): the shared logits buffer is sized
for the largest bucket (2048 rows x a 152k vocabulary: 0.6 GB in bf16) and such a step is compute-heavy anyway
(vLLM's default largest capture is 512 as well); larger steps run eagerly"""


MIXED_MAX_CONTEXT = 4096
"""mixed steps replay graphs only while every sequence holds at most this many keys after the step: the varlen
kernel reads a sequence's keys once per tile of 16 queries (in L2 at these lengths) and has no split over keys, so a
very long context (a chunk continuing a long prompt, a decode beside it) runs eagerly, where the varlen
FlashAttention kernel and the split decode kernel serve it (an unmeasured bound, set conservatively)"""


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _width(n: int) -> int:
    """Block-table width bucket: powers of two up to 32, then multiples of 32 (a gather over the table
    reads at most 32 blocks more than the longest row, and a long context needs few graphs)."""
    return _bucket(n) if n <= 32 else -(-n // 32) * 32


class DecodeGraphs:
    def __init__(self, model, cache, block_size: int, scratch_block: int, max_batch: int, max_blocks: int,
                 use_graphs: bool):
        self.model, self.cache, self.block_size = model, cache, block_size
        self.scratch_slot = scratch_block * block_size
        self.max_batch, self.max_blocks, self.use_graphs = _bucket(max_batch), max_blocks, use_graphs
        self.entries: dict[tuple, _Entry] = {}
        """(rows B', width W', what the step returns, tree rows) -> its buffers and graph"""
        self.mixed_entries: dict[tuple, _Entry] = {}
        """mixed steps' (token bucket T', table width, what the step returns) -> its buffers and graph"""
        self.rows = 5 if hasattr(cache, "read_state") else 4  # + each row's recurrent-state row (kv.state)
        self.rope_row = self.rows if length_dependent_rope(model) else None
        """the host buffer's row of each token's RoPE context length (AttnMetadata.rope_lengths; dynamic NTK,
        LongRoPE), after the others; None for a static RoPE"""
        self.width = self.rows + (self.rope_row is not None)
        self.chunk_rows, self.max_rows = 1, self.max_batch
        """the longest chunk run as rows of one sequence (module docstring; set with `allow_chunks`)"""
        self.mixed_tokens, self.mixed_context = 0, MIXED_MAX_CONTEXT
        """steps holding prefill chunks, up to this many tokens and keys per sequence, replay graphs too
        (`allow_mixed`)"""
        self.trees = False
        """chunks ending in token trees run as rows too (`allow_trees`)"""
        self.pool = None
        self.outputs: dict[tuple, torch.Tensor] = {}
        """the steps' output buffers, one per kind of output (`_shared`)"""
        self.failed: str | None = None
        """why capture failed (decode then runs eagerly, with a warning): kept for benchmarks' notes"""
        self.failed_mixed: str | None = None
        """the same for the mixed steps' graphs (those steps then run eagerly; decode keeps its graphs)"""

    def allow_chunks(self, n: int) -> None:
        """Run chunks of up to n tokens as rows (speculative verification; not for recurrent-state models)."""
        if self.rows == 4 and n > 1:  # rows up to MAX_CHUNK_ROWS
            self.chunk_rows, self.max_rows = n, max(self.max_rows, min(_bucket(self.max_batch * n), MAX_CHUNK_ROWS))

    def allow_mixed(self, tokens: int) -> None:
        """Steps holding prefill chunks, up to `tokens` tokens, replay graphs too (caches that attend a step from
        device metadata alone: `attends_varlen`; not recurrent-state models)."""
        if self.rows == 4 and getattr(self.cache, "attends_varlen", False):
            self.mixed_tokens = tokens

    def allow_trees(self) -> None:
        """Chunks ending in token trees run as rows too (caches whose decode path reads tree_rows; no windows:
        a tree node's slot is not its position)."""
        self.trees = self.rows == 4

    def fits(self, batch) -> bool:
        if self.failed is not None or batch.trees and not (self.trees and max(map(len, batch.trees.values())) <= 62):
            return False
        if batch.num_decodes == len(batch.chunks):
            return len(batch.chunks) <= self.max_batch
        return all(n <= self.chunk_rows for _, n in batch.chunks) and batch.num_tokens <= self.max_rows

    def fits_mixed(self, batch, logits: int) -> bool:
        """A step the mixed graphs take (module docstring), `logits` rows asked of it."""
        return (self.failed_mixed is None and not batch.trees and batch.num_tokens <= self.mixed_tokens
                and len(batch.chunks) <= self.max_batch and logits <= self.max_batch
                and all(s.num_computed - s.evicted + n <= self.mixed_context for s, n in batch.chunks))

    def run_mixed(self, batch, idx: list[int], late: LateIds | None = None, hidden=None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits (len(idx), V) at flat token indices idx of the batch's row (chunk after chunk, decodes first),
        with hidden (the model's return_hidden) every token's states (T, D), else None), from the graph of the
        step's token bucket: views of the shared buffers the next step overwrites."""
        T = batch.num_tokens
        key = (max(16, _bucket(T)), self.max_blocks, hidden)  # one table width: a step copies only its own corner
        entry = self.mixed_entries.get(key) or self._capture_mixed(*key)
        Tp, S, Sp = key[0], len(batch.chunks), self.max_batch
        ids, pos, slots, ctx, qlens, _, tables = chunk_inputs(batch, self.block_size)
        host = np.zeros(entry.host.shape[0], np.int64)  # padding tokens: token 0 at position 0, into the scratch
        host[:T], host[Tp:Tp + T], host[2 * Tp:3 * Tp] = ids, pos, self.scratch_slot  # slot (RoPE length 1)
        host[2 * Tp:2 * Tp + T], host[3 * Tp:3 * Tp + len(idx)] = slots, idx
        if self.rope_row is not None:
            host[3 * Tp + Sp:], host[3 * Tp + Sp:3 * Tp + Sp + T] = 1, rope_lengths(batch, pos, qlens)
        seqs = np.zeros(2 * Sp + 1 + 2 * entry.programs, np.int32)  # padding sequences: no queries, no keys
        seqs[:S], seqs[Sp:2 * Sp + 1] = ctx, T  # query offsets of padding sequences: T (no queries)
        seqs[Sp:Sp + S + 1] = np.cumsum([0, *qlens])
        seqs[2 * Sp + 1:] = np.concatenate(varlen_tiles(qlens, entry.programs))
        copy_in(entry.host, torch.from_numpy(host))
        copy_in(entry.seqs, torch.from_numpy(seqs))
        # the tables' used corner: entries past a row's context are never read (the kernel stops at its context,
        # the reference masks them), so earlier steps' stale block ids may stay there
        w = max(map(len, tables))
        copy_in(entry.tables[:S, :w], host_block_tables(tables, S, w))
        if late is not None:
            late.write(entry.host)
        out = entry.run()
        return (out[:len(idx)], None) if hidden is None else (out[0][:len(idx)], out[1][:T])

    def run(self, batch, late: LateIds | None = None, hidden: bool | tuple[int, ...] | None = None,
            feats: torch.Tensor | None = None):
        """logits (R, V), one row per token of the batch (R = batch.num_tokens; one per chunk when every chunk
        is a decode); late: input ids still on the device, copied into the static buffer after the host's
        (decode chunks come first, so a decode chunk's row is its chunk index). hidden: the model's
        return_hidden (a speculative drafter's features): (logits, states (R, D)) from a graph of its own.
        feats (R, d): the model is an EAGLE-style head (lmforge.infer.draft.PagedDraftHead): its
        pairs(feats, ids, positions, cache, meta) -> (R, d) runs instead, feats copied into a static buffer.
        The rows are views of the bucket's output buffers, which the next step overwrites."""
        W = min(_width(max(len(s.block_table) for s, _ in batch.chunks)), self.max_blocks)
        ids, pos, slots, lens, tables, starts, bits = self._token_rows(batch)
        B = len(ids)
        key = (_bucket(B), W, hidden if feats is None else ("pairs", feats.shape[1], feats.dtype), bool(batch.trees))
        entry = self.entries.get(key) or self._capture(*key)
        if entry.tree is not None:  # padding rows: start 1 (their one key), no tree bits
            host_tree = np.zeros((2, key[0]), np.int64)
            host_tree[0], host_tree[0, :B], host_tree[1, :B] = 1, starts, bits
            copy_in(entry.tree, torch.from_numpy(host_tree))
        if feats is not None:
            entry.feats[:B].copy_(feats)
        host = np.zeros((self.width, key[0]), np.int64)  # padding rows: token 0 at position 0, into the scratch slot
        host[0, :B], host[1, :B], host[2, :B], host[2, B:], host[3] = ids, pos, slots, self.scratch_slot, 1
        host[3, :B] = lens  # context length: the token's slot + 1 (its position + 1 unless a KV policy evicted)
        if self.rows == 5:  # padding rows read and write the null state row (one row per chunk: decodes only)
            host[4, :B], host[4, B:] = self.cache.slots([s.seq_id for s, _ in batch.chunks]), self.cache.null_slot
        if self.rope_row is not None:  # padding rows: length 1 (position 0)
            host[self.rope_row] = 1
            host[self.rope_row, :B] = rope_lengths(batch, pos, [n for _, n in batch.chunks])
        copy_in(entry.host, torch.from_numpy(host))  # in place: the graph reads these buffers
        copy_in(entry.tables, host_block_tables(tables, key[0], W))
        if late is not None:
            late.write(entry.host[0])
        out = entry.run()
        return out[:B] if hidden is None or feats is not None else (out[0][:B], out[1][:B])

    def _token_rows(self, batch) -> tuple[list, ...]:
        """Per token of the batch, chunk after chunk: its id, position and cache slot (the eager step's flat row,
        runner.chunk_inputs), context length (its slot + 1) and block table, and for a step holding token trees
        its first tree slot and ancestor bits (else [], [])."""
        ids, pos, slots, ctx, qlens, _, chunk_tables = chunk_inputs(batch, self.block_size)
        if len(ids) == len(ctx):  # decodes only (most steps): one row per chunk, its context length as it is
            return ids, pos, slots, ctx, chunk_tables, [], []
        lens, tables, starts, bits = [], [], [], []
        for (seq, n), end, table in zip(batch.chunks, ctx, chunk_tables):
            q0 = end - n  # the chunk's first slot: token j reads q0 + j + 1 keys
            lens += range(q0 + 1, end + 1)
            tables += [table] * n
            if batch.trees:  # a chain row sees all its keys; a tree node, those before the tree and its ancestors
                tree = batch.trees.get(seq.seq_id) if n > 1 else None
                chain = n - len(tree) if tree else n
                starts += [*range(q0 + 1, q0 + chain + 1), *[q0 + chain] * (n - chain)]
                bits += [0] * chain + (_ancestor_bits(tree) if tree else [])
        return ids, pos, slots, lens, tables, starts, bits

    def _shared(self, role: str, t: torch.Tensor) -> torch.Tensor:
        """t (B', ...) copied into the one buffer every bucket's step writes for `role` (and t's row shape and
        dtype), sized for the largest bucket: a captured graph's output then lives there, so the graphs' outputs
        take one buffer's memory instead of one (rows x vocabulary logits) per (rows, width) bucket. Each step's
        rows are read before the next step writes them (the same stream), as with a buffer per bucket."""
        key = (role, tuple(t.shape[1:]), t.dtype)
        buf = self.outputs.get(key)
        if buf is None or buf.shape[0] < t.shape[0]:  # (made by a warm-up step, outside any capture; a larger
            # one replaces it for the graphs captured from now on - a mixed bucket's every-token states - while
            # earlier graphs keep writing the old one, which their outputs keep alive)
            rows = max(self.max_batch, self.max_rows, t.shape[0])
            buf = self.outputs[key] = torch.empty(rows, *t.shape[1:], dtype=t.dtype, device=t.device)
        out = buf[:t.shape[0]]
        out.copy_(t)
        return out

    def _capture(self, Bp: int, W: int, what, tree: bool) -> "_Entry":
        """what: None (logits), a return_hidden value (logits and states) or ("pairs", d, dtype) (a draft head);
        tree: the rows carry tree_rows (module docstring)."""
        dev = self.cache.device
        host = torch.zeros(self.width, Bp, dtype=torch.long, device=dev)
        host[2], host[3] = self.scratch_slot, 1
        if self.rows == 5:
            host[4] = self.cache.null_slot
        if self.rope_row is not None:
            host[self.rope_row] = 1
        tables = torch.zeros(Bp, W, dtype=torch.int32, device=dev)
        pairs = isinstance(what, tuple) and what[:1] == ("pairs",)
        feats = torch.zeros(Bp, what[1], dtype=what[2], device=dev) if pairs else None
        rows_tree = torch.ones(2, Bp, dtype=torch.long, device=dev) if tree else None
        # host fields are placeholders, fixed at capture (no sequence ids, unit lengths): a cache reads the device
        # tensors here; a CacheStore's cache runs on these steps only with graph_safe (kv.paged.CacheStore)
        meta = AttnMetadata(positions=host[1][None], slot_mapping=host[2], context_lens=host[3].to(torch.int32),
                            logits_indices=torch.arange(Bp, device=dev), block_tables=tables,
                            query_lens_host=(1,) * Bp, context_lens_host=(1,) * Bp, num_decodes=Bp,
                            block_size=self.block_size, state_slots=host[4] if self.rows == 5 else None,
                            tree_rows=(rows_tree[0], rows_tree[1]) if tree else None,
                            rope_lengths=host[self.rope_row][None] if self.rope_row is not None else None)

        def step():
            meta.context_lens.copy_(host[3])  # int32 copy of the lengths, refreshed inside the graph
            # what layers derive from the metadata (AttnMetadata.derived) is rebuilt by every step, so a
            # captured graph computes it from the buffers and an eager step never reads an earlier step's
            meta._derived.clear()
            if pairs:
                return self._shared("pairs", self.model.pairs(feats[None], host[0][None], host[1][None], self.cache,
                                                              meta)[0])
            if what is None:
                return self._shared("logits", self.model(host[0][None], cache=self.cache, meta=meta)[0])
            logits, states = self.model(host[0][None], cache=self.cache, meta=meta, return_hidden=what)
            return self._shared("logits", logits[0]), self._shared("states", states[0])

        # the entry holds every tensor the step reads (meta's too): a graph replays raw addresses, so a
        # tensor freed after capture would be read as whatever reuses its memory
        entry = self.entries[(Bp, W, what, tree)] = _Entry(host, tables, meta, step, feats, rows_tree)
        return self._record(entry)

    def _capture_mixed(self, Tp: int, W: int, what) -> "_Entry":
        """A mixed step's entry: Tp tokens (ids, positions, slots) and max_batch logits indices in one int64
        buffer, max_batch sequences' context lengths and query offsets and the tile list in one int32 buffer
        (`seqs`), their block tables; what: None (logits) or a return_hidden value (and every token's states)."""
        dev, Sp = self.cache.device, self.max_batch
        programs = varlen_programs(Tp, Sp)
        rope = self.rope_row is not None  # then each token's RoPE context length follows the logits indices
        host = torch.zeros(3 * Tp + Sp + rope * Tp, dtype=torch.long, device=dev)
        host[2 * Tp:3 * Tp] = self.scratch_slot  # (the warm-up steps write their keys there)
        host[3 * Tp + Sp:] = 1
        seqs = torch.zeros(2 * Sp + 1 + 2 * programs, dtype=torch.int32, device=dev)
        seqs[2 * Sp + 1:2 * Sp + 1 + programs] = -1  # (no tile: before the first step fills them)
        tables = torch.zeros(Sp, W, dtype=torch.int32, device=dev)
        tiles = (seqs[Sp:2 * Sp + 1], seqs[2 * Sp + 1:2 * Sp + 1 + programs], seqs[2 * Sp + 1 + programs:])
        meta = AttnMetadata(positions=host[Tp:2 * Tp][None], slot_mapping=host[2 * Tp:3 * Tp],
                            context_lens=seqs[:Sp], logits_indices=host[3 * Tp:3 * Tp + Sp], block_tables=tables,
                            block_size=self.block_size, varlen_tiles=tiles,
                            hidden_indices=None if what is None else torch.arange(Tp, device=dev),
                            rope_lengths=host[3 * Tp + Sp:][None] if rope else None)

        def step():
            meta._derived.clear()
            if what is None:
                return self._shared("logits", self.model(host[:Tp][None], cache=self.cache, meta=meta)[0])
            logits, states = self.model(host[:Tp][None], cache=self.cache, meta=meta, return_hidden=what)
            return self._shared("logits", logits[0]), self._shared("states", states[0])

        entry = self.mixed_entries[(Tp, W, what)] = _Entry(host, tables, meta, step, seqs=seqs, programs=programs)
        return self._record(entry, "failed_mixed")

    def _record(self, entry: "_Entry", failed: str = "failed") -> "_Entry":
        """Capture the entry's step into a CUDA graph (with use_graphs; a failed capture leaves it eager and
        says why in the attribute `failed` names: the steps of its kind then run eagerly)."""
        if not self.use_graphs:
            return entry
        step = entry.step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch requires
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        try:
            graph, out = capture_cuda_graph(step, self.pool)
        except RuntimeError as e:  # an op that cannot be captured: the model still runs, eagerly
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            setattr(self, failed, why)
            steps = "steps holding prefill chunks run" if failed == "failed_mixed" else "decoding"
            warnings.warn(f"CUDA graph capture failed ({why}); {steps} eagerly", stacklevel=3)
            return entry
        self.pool = graph.pool()
        entry.graph, entry.out = graph, out
        return entry


@dataclass
class _Entry:
    """One (batch, width, what the step returns) bucket: its input buffers, the metadata built over them, the
    step, its graph."""

    host: torch.Tensor
    """(4, B') int64 on the device: token, position, cache slot, context length of each row (and its state
    row: (5, B') for models with recurrent-state layers; then its RoPE context length for a length-dependent RoPE);
    a mixed step's (3 T' + S' [+ T']): ids, positions, slots, logits indices [, RoPE context lengths]"""
    tables: torch.Tensor
    meta: AttnMetadata
    step: object
    feats: torch.Tensor | None = None
    """(B', d) a draft head's input features (pairs), else None"""
    tree: torch.Tensor | None = None
    """(2, B') int64 each row's first tree slot and ancestor bits (AttnMetadata.tree_rows), else None"""
    seqs: torch.Tensor | None = None
    """a mixed step's int32 buffer: the sequences' context lengths, query offsets, then the tiles"""
    programs: int = 0
    """a mixed step's grid of varlen tiles"""
    graph: object | None = None
    out: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None

    def run(self):
        """The step's outputs: the captured graph replayed, else the static-buffer step run eagerly."""
        if self.graph is None:
            return self.step()
        self.graph.replay()
        return self.out


def _ancestor_bits(parents: list[int]) -> list[int]:
    """Per tree node (parents in topological order, -1 = the token before the tree): bit i set for node i
    itself and each of its ancestors."""
    out: list[int] = []
    for i, p in enumerate(parents):
        out.append((1 << i) | (out[p] if p >= 0 else 0))
    return out


def kernel_step_available(device: torch.device | str) -> str | None:
    """Why the batch-1 Triton kernel step cannot serve as a backend on `device`, the engine's (None: it can)."""
    try:
        importlib.import_module("lmforge.infer.kernel_step")  # its kernels' modules import here
        from lmforge.kernels.decode import pre_ampere, unavailable
    except ImportError as e:
        return f"cannot import it ({e})"
    # (the automatic choice, EngineConfig.kernel_step=None, takes Ampere or newer only: so does True)
    why = unavailable(device) or pre_ampere(device)
    return None if why is None else f"it {why}"


class BatchOneKernel:
    """Steps that decode one sequence run on lmforge.infer.kernel_step's Triton kernels (Llama-style
    models; 5 kernels per block): the step reads and writes the engine's paged cache through a one-row
    block table, and on a GPU replays one captured CUDA graph. The caller's model is never modified (the
    kernels read its own weight tensors). tune: time the block shapes before the first capture when no set
    for this GPU and model shape is cached or shipped (KernelStep's autotune)."""

    def __init__(self, model, cache, max_blocks: int, use_graphs: bool, tune: bool = False):
        from lmforge.infer.kernel_step import KernelStep, PagedKV

        self.table = torch.zeros(1, max_blocks, dtype=torch.int32, device=cache.device)
        self.written: list[int] = []  # the block table as last copied to self.table
        self.step = KernelStep(model, PagedKV(k=cache.k, v=cache.v, block_table=self.table), autotune=tune)
        self.use_graphs, self.captured, self.device = use_graphs, False, cache.device

    failed: str | None = None

    def fits(self, batch) -> bool:
        return self.failed is None and len(batch.chunks) == 1 and batch.num_decodes == 1

    def run(self, batch, late: LateIds | None = None) -> torch.Tensor | None:
        """Logits (1, V), or None (and the general path from now on, with a warning) if the kernels fail."""
        try:
            return self._run(batch, late)
        except Exception as e:  # noqa: BLE001 - kernels that cannot compile here must not stop serving
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            warnings.warn(f"the batch-1 kernel step failed ({self.failed}); decoding on the general path",
                          stacklevel=2)
            return None

    def _run(self, batch, late: LateIds | None) -> torch.Tensor:
        """The step's logits buffer (reused by the next step: the caller copies what it keeps). A step costs
        the GPU one host copy (token and position; the block table only when it changed, once a block),
        the previous sample's copy on the device (async scheduling) and the graph."""
        seq = batch.chunks[0][0]
        p, table = seq.num_computed, seq.block_table
        if table != self.written[:len(table)]:
            copy_in(self.table[0, :len(table)], torch.tensor(table, dtype=torch.int32))
            self.written = list(table)
        inputs = self.step.inputs
        copy_in(inputs, torch.tensor([token_at(seq, p), p]))
        if late is not None:
            late.write(inputs)
        if not self.use_graphs:
            return self.step.step(self.step.token, self.step.position)
        if not self.captured:
            self.step.capture()
            self.captured = True
        return self.step.replay()
