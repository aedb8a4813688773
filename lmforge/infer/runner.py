"""The model runner: turns a scheduled batch into one forward and one batched sampling call.

Inputs of a step are one flat row (1, N): the new tokens of every scheduled sequence back to back,
decodes first (lmforge.model.meta explains the layout). The host builds token ids, positions, slot
mapping, context lengths, logits indices and block tables and sends them to the device in one copy; the
model computes logits only at the sampled positions; sampling runs for all rows at once; the only
device->host sync of the step is reading the sampled tokens.

Two runners share that interface:
  PagedRunner      the engine's path: paged KV cache (lmforge.infer.kv) of the model's cache_spec(), with
                   two optional backends (lmforge.infer.graphs): decode-only steps - and speculative verify
                   chunks and token trees, one row per token - replayed from CUDA graphs per (rows,
                   block-table width) bucket, steps holding prefill chunks per token bucket (up to
                   graph_prefill_tokens), and one-sequence steps on the Triton kernel step; other steps
                   run eagerly.
  RecomputeRunner  for models without cache_spec() (e.g. a HF model behind lmforge.infer.hf_wrapper):
                   every sampled sequence is recomputed from scratch, the plain reference path.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from lmforge.adapt.lora import lora_layers
from lmforge.errors import LmforgeError
from lmforge.infer.config import length_dependent_rope
from lmforge.infer.features import StepHidden
from lmforge.infer.kv import new_paged_cache
from lmforge.infer.request import Sequence
from lmforge.infer.sampler import Row, Sampled, sample_rows
from lmforge.infer.scheduler import Batch
from lmforge.model.meta import AttnMetadata
from lmforge.utils import to_device

Step = list[tuple[int, int, Row]]
"""logits rows of a step: (chunk index, tokens back from the chunk's last token, row)"""
Extra = list[tuple[int, int]]
"""positions whose raw logits a step also returns, not sampled (prompt log-probs): (chunk index, back)"""


@dataclass
class LateIds:
    """Input ids of a step that are not on the host yet (async scheduling, lmforge.infer.pending): decode
    chunk chunks[i] takes the previous step's sample tokens[rows[i]], copied on the device. The host
    writes a placeholder 0 there (`token_at`); a decode chunk's id sits at its chunk index (decodes first)."""

    tokens: torch.Tensor
    """(M,) int64 on the device: the previous step's sampled tokens"""
    chunks: list[int]
    rows: list[int]

    def write(self, ids: torch.Tensor) -> None:
        """ids (>= max(chunks) + 1,) int64 on the device: fill the late positions in place (no sync)."""
        if len(self.chunks) == 1:  # one sequence (batch 1): one copy on the device, no index to send
            c, r = self.chunks[0], self.rows[0]
            ids[c:c + 1].copy_(self.tokens[r:r + 1])
            return
        idx = to_device(torch.from_numpy(np.array([self.chunks, self.rows], np.int64)), ids.device)
        ids.index_copy_(0, idx[0], self.tokens.index_select(0, idx[1]))


def token_at(seq: Sequence, p: int) -> int:
    """seq's token at position p, or the placeholder 0 when it is still on the device (LateIds)."""
    return seq.tokens[p] if p < len(seq.tokens) else 0


class PagedRunner:
    """graphs: None, or "eager" / "cuda": decode-only steps through lmforge.infer.graphs (static buffers;
    "cuda" replays captured CUDA graphs). fused_kernels: forwards run on lmforge.kernels.training.kernel_view
    of the model (Triton RMSNorm, RoPE and SwiGLU; a copy sharing the model's parameters, the model itself
    untouched): at decode a layer's dozens of small elementwise kernels are most of the non-attention time,
    at prefill the plain layers' fp32 passes over every token's activations are."""

    def __init__(self, model, cache_spec, num_blocks: int, block_size: int, device, dtype=None, *,
                 graphs: str | None = None, max_batch: int = 256, decode: str = "auto", prefill: str = "auto",
                 kernel_step: bool = False, kernel_tune: bool = False, fused_kernels: bool = False, store=None,
                 mixed_tokens: int = 0):
        self.source, self.block_size, self.device = model, block_size, torch.device(device)
        self.fused_kernels = fused_kernels
        self.rope_lengths = length_dependent_rope(model)  # each token's context length goes with the step
        # one block more than the pool hands out: the graphs' padding rows write there
        self.cache = new_paged_cache(cache_spec, num_blocks + 1, block_size, device, dtype, decode, prefill,
                                     max_seqs=max_batch, store=store)
        self.has_state = cache_spec.has_state  # recurrent-state rows (lmforge.infer.kv.state)
        self._backends = (graphs, num_blocks, max_batch, -(-cache_spec.max_seq_len // block_size), kernel_step,
                          kernel_tune)
        self.graphs_mode, self.chunk_rows, self.trees = graphs, 1, False
        # mixed steps on graphs attend through the varlen kernel on a GPU (its reference gathers every token's
        # whole block table); on a CPU the static-buffer step checks the logic. A CacheStore's cache attends its
        # own way (AttnMetadata.varlen_tiles unread): its mixed steps run eagerly
        kernel_or_cpu = self.cache.kernel is not None or self.device.type != "cuda"
        self.mixed_tokens = mixed_tokens if kernel_or_cpu and store is None else 0
        self._tree_rows_ok = (store is None and not self.has_state and getattr(self.cache, "decodes_tree_rows", False)
                              and not any(layer.window for layer in cache_spec.layers))
        self._make_backends()

    def allow_chunks(self, n: int, trees: bool = False) -> None:
        """Chunks of up to n tokens (speculative verification) run on the decode graphs too (lmforge.infer.graphs);
        trees: chunks ending in token trees as well, where the cache's decode path reads tree rows (the paged
        K/V and latent caches' reference; not a CacheStore's cache, not sliding windows)."""
        self.chunk_rows, self.trees = n, trees and self._tree_rows_ok
        if self.graphs is not None:
            self.graphs.allow_chunks(n)
            if self.trees:
                self.graphs.allow_trees()

    def _make_backends(self) -> None:
        """The decode backends (lmforge.infer.graphs). Both read the model's parameters in place: CUDA
        graphs replay their addresses, the kernel step takes the model's own weight tensors."""
        graphs, num_blocks, max_batch, max_blocks, kernel_step, kernel_tune = self._backends
        had_kernel_step = getattr(self, "kernel_step", None) is not None
        self.graphs, self.kernel_step, self.model = None, None, self.source
        if self.fused_kernels:
            from lmforge.kernels.training import kernel_view, unsupported

            self.model = kernel_view(self.source)
            if self.model is None:
                raise LmforgeError(f"fused_kernels=True but the Triton kernels cannot run on this device ("
                                   f"{unsupported(self.device)}); set fused_kernels=None (on where they run) or False")
            if self.model is not self.source:  # a copy only ever generates (Engine.step's eval mode is the source's)
                self.model.eval()
        if graphs is not None:
            from lmforge.infer.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.model, self.cache, self.block_size, num_blocks, max_batch, max_blocks,
                                       use_graphs=graphs == "cuda")
            self.graphs.allow_chunks(self.chunk_rows)
            self.graphs.allow_mixed(self.mixed_tokens)
            if self.trees:
                self.graphs.allow_trees()
        if kernel_step:
            from lmforge.infer.graphs import BatchOneKernel
            from lmforge.infer.kernel_step import generation_module, unsupported

            why = unsupported(self.source)  # asked at every rebuild: adapters may come and go (merge_lora)
            if why is None:
                self.kernel_step = BatchOneKernel(generation_module(self.source), self.cache, max_blocks,
                                                  use_graphs=graphs == "cuda", tune=kernel_tune)
            elif had_kernel_step:  # the model changed since (e.g. LoRA adapters applied): say why it stops
                warnings.warn(f"the batch-1 kernel step is off: it does not support {why}", stacklevel=3)
        self._addresses = _addresses(self.source)
        self._adapters = list(lora_layers(self.source).values())
        self._adapter_state = _adapter_state(self._adapters)

    def refresh_weights(self) -> None:
        """The model's weights changed. Changed in place (optimizer steps, load_state_dict, copy_), the
        backends stay valid; if parameters or buffers were replaced or moved (new storage), they are rebuilt, since
        captured graphs would read the old addresses (and a kernel view would hold the old tensors)."""
        if _addresses(self.source) != self._addresses or self.adapters_changed():
            self._make_backends()

    def adapters_changed(self) -> bool:
        """LoRA adapters were switched off or on (adapters_disabled) or rescaled since the backends were built:
        the fused view (a copy of the modules) and captured graphs still compute the old function."""
        return bool(self._adapters) and _adapter_state(self._adapters) != self._adapter_state

    @torch.inference_mode()
    def execute(self, batch: Batch, rows: Step, vocab_limit: int | None = None, extra: Extra = (),
                hidden: StepHidden | None = None, late: LateIds | None = None) -> Sampled:
        """Sample `rows`; also return the raw logits at `extra` positions and, with hidden, hidden states
        (the model's return_hidden=hidden.layers) at both, or at every position of hidden.chunks instead
        (Sampled.features; lmforge.infer.features). Such steps skip the batch-1 kernel step (one logits row,
        no hidden states); the decode graphs give every token's logits and states.
        late: decode inputs still on the device (the previous step's samples), copied in there."""
        self.cache.copy_blocks(batch.copies)
        if self.has_state:  # rows for sequences starting at their first token, zeroed (lmforge.infer.kv.state)
            # (a chunk after a prefix hit starts from the snapshot named by its last cached block's key)
            self.cache.start([(seq.seq_id, seq.num_computed == 0, seq.block_keys[-1] if seq.block_keys else None)
                              for seq, _ in batch.chunks])
        # a cache with a score hook (a KV policy reading attention weights) runs the eager path: the kernel step
        # and replayed graphs compute attention where no hook can see it; hidden states (a drafter's features)
        # and token trees (where the graphs take them: allow_trees) come from the graphs, not the kernel step
        graphed = self.cache.score_hook is None
        plain = graphed and not extra and hidden is None and not batch.trees
        logits = (self.kernel_step.run(batch, late) if plain and self.kernel_step is not None
                  and self.kernel_step.fits(batch) else None)
        states = None
        if logits is not None:  # the step's own buffer: one copy, in fp32 (what sampling reads)
            logits = logits[:1].float() if logits.dtype != torch.float32 else logits[:1].clone()
            if len(rows) > 1:
                logits = logits.repeat(len(rows), 1)  # every row samples the one sequence (no index list)
        elif graphed and (replayed := self._replay(batch, [*rows, *extra], late,
                                                   hidden.layers if hidden is not None else None)) is not None:
            logits, all_states, idx = replayed
            if hidden is not None:  # every token's states, copied out of the graph's buffer
                if hidden.chunks is not None:  # every position of these chunks, in order
                    first = np.cumsum([0] + [n for _, n in batch.chunks]).tolist()
                    out = _split(logits, None, rows, vocab_limit)
                    out.features = {batch.chunks[c][0].seq_id: all_states[first[c]:first[c + 1]].clone()
                                    for c in hidden.chunks}
                    return out
                states = all_states[to_device(idx, all_states.device)]
        else:
            ids, meta = self.prepare(batch, rows, extra, late)
            chunks = hidden.chunks if hidden is not None else None
            if chunks is not None:  # (set before the forward reads the metadata)
                meta.hidden_indices = chunk_indices(meta.query_lens_host, chunks, self.device)
            if hidden is not None:  # (1, M + E, V), (1, M + E or H, D): those rows only
                logits, states = (t[0] for t in self.model(ids, cache=self.cache, meta=meta,
                                                           return_hidden=hidden.layers))
            else:
                logits = self.model(ids, cache=self.cache, meta=meta)[0]
            if chunks is not None:
                out = _split(logits, None, rows, vocab_limit)
                out.features = dict(zip((batch.chunks[c][0].seq_id for c in chunks),
                                        states.split([batch.chunks[c][1] for c in chunks])))
                return out
        return _split(logits, states, rows, vocab_limit)

    def _replay(self, batch: Batch, at: list, late: LateIds | None, layers
                ) -> tuple[torch.Tensor, torch.Tensor | None, list[int]] | None:
        """(logits at the `at` positions (chunk, tokens back from its last, ...), every token's states with layers
        = a return_hidden value else None, the positions' flat token indices) from the decode graphs (every token
        a row) or, for a step holding prefill chunks, the mixed graphs; None when neither takes the step."""
        if self.graphs is None:
            return None
        if self.graphs.fits(batch):
            idx = token_rows(batch, at)
            out = self.graphs.run(batch, late, hidden=layers)
            every, states = (out, None) if layers is None else out
            return _take(every, idx), states, idx
        if self.graphs.fits_mixed(batch, len(at)):
            idx = token_rows(batch, at)
            return (*self.graphs.run_mixed(batch, idx, late, hidden=layers), idx)
        return None

    def logits_at_ends(self, batch: Batch) -> torch.Tensor:
        """(chunks, V) raw logits at each chunk's last token (a draft model's round)."""
        return self.logits_at(batch, [(c, 0) for c in range(len(batch.chunks))])

    def logits_at(self, batch: Batch, at: Extra) -> torch.Tensor:
        """(len(at), V) raw logits at (chunk, tokens back from its last) positions (a draft model's rounds: chunk
        ends, a tree's frontier nodes): replayed from the decode graphs where the batch fits them (single tokens;
        chunks up to graphs.chunk_rows; trees where allowed) or from the mixed graphs, else eager."""
        replayed = self._replay(batch, at, None, None)
        if replayed is not None:
            return replayed[0]
        ids, meta = self.prepare(batch, [(c, b, None) for c, b in at])
        return self.model(ids, cache=self.cache, meta=meta)[0]

    def run_pairs(self, batch: Batch, feats: torch.Tensor) -> torch.Tensor:
        """A draft head's (lmforge.infer.draft.PagedDraftHead) pairs over the batch's tokens: (N, d) predicted
        features, one per token in chunk order; replayed from the decode graphs where the batch fits them."""
        if self.graphs is not None and self.graphs.fits(batch):
            return self.graphs.run(batch, feats=feats).clone()  # (the next replay overwrites the buffer)
        ids, meta = self.prepare(batch, [])
        return self.model.pairs(feats[None], ids, meta.positions, self.cache, meta)[0]

    def move_positions(self, table: list[int], src: list[int], dst: list[int]) -> None:
        """Copy the keys/values (latents) of a sequence at positions src to positions dst, in every layer,
        its block table mapping both to cache slots: a token tree's accepted path made contiguous."""
        bs = self.block_size
        self.cache.move_slots(*([table[p // bs] * bs + p % bs for p in ps] for ps in (src, dst)))

    def prepare(self, batch: Batch, rows: Step, extra: Extra = (), late: LateIds | None = None
                ) -> tuple[torch.Tensor, AttnMetadata]:
        bs = self.block_size
        ids, pos, slots, ctx, qlens, ends, tables = chunk_inputs(batch, bs)
        widths = [len(t) for t in tables]
        width = max(widths)
        N, S = len(ids), len(ctx)
        logits_idx = [ends[c] - back for c, back, _ in rows] + [ends[c] - back for c, back in extra]
        parents, sizes = tree_parents_row(batch) if batch.trees else ([], ())
        M = 3 * N + S + len(logits_idx)
        state = self.cache.slots([seq.seq_id for seq, _ in batch.chunks]) if self.has_state else []
        lengths = rope_lengths(batch, pos, qlens) if self.rope_lengths else []
        R = M + len(parents) + len(state)
        P = R + len(lengths)  # then the block tables, flattened: all in the step's one copy
        # numpy turns a list of ints into an array ~4x faster than torch.tensor
        head = ids + pos + slots + ctx + logits_idx + parents + state + lengths
        flat = to_device(torch.from_numpy(np.concatenate([np.array(head, np.int64),
                                                          host_block_tables(tables, S, width).numpy().ravel()])),
                         self.device)
        meta = AttnMetadata(
            positions=flat[N:2 * N][None], slot_mapping=flat[2 * N:3 * N],
            context_lens=flat[3 * N:3 * N + S].to(torch.int32), logits_indices=flat[3 * N + S:M],
            block_tables=flat[P:].view(S, width).to(torch.int32), query_lens_host=tuple(qlens),
            context_lens_host=tuple(ctx), num_decodes=batch.num_decodes, block_size=bs,
            seq_ids_host=tuple(seq.seq_id for seq, _ in batch.chunks),
            drafted_host=(tuple(batch.drafts.get(seq.seq_id, 0) for seq, _ in batch.chunks)
                          if self.has_state and batch.drafts else ()),
            decode_groups=decode_groups(widths[:batch.num_decodes]),
            tree_parents=flat[M:M + len(parents)][None] if parents else None, tree_sizes_host=sizes,
            state_slots=flat[R - len(state):R] if state else None, rope_lengths=flat[R:P][None] if lengths else None)
        if late is not None:
            late.write(flat[:N])
        return flat[:N][None], meta


def chunk_inputs(batch: Batch, bs: int) -> tuple[list, ...]:
    """The step's flat row on the host, chunk after chunk: token ids, positions, cache slots; per chunk its
    context length after the step (in slots), query count, last token's index, block table."""
    ids, pos, slots, ctx, qlens, ends, tables = [], [], [], [], [], [], []
    for seq, n in batch.chunks:
        # queries keep their positions (RoPE); keys go to the next cache slots: a KV policy's eviction
        # (lmforge.infer.kv.policy) leaves e = seq.evicted fewer slots than positions (0 without one), and a
        # policy with positions within the cache moves positions back with them (at = s - pos_shift: the slot)
        s, e, table = seq.num_computed, seq.evicted, seq.block_table
        at = s - seq.pos_shift  # the first query's position
        if n == 1:  # a decode (most rows of a large batch): no slices or ranges to build
            ids.append(token_at(seq, s))
            pos.append(at)
            slots.append(table[(s - e) // bs] * bs + (s - e) % bs)
        else:
            ids += seq.tokens[s:s + n]
            tree = batch.trees.get(seq.seq_id) if batch.trees else None
            pos += range(at, at + n) if tree is None else tree_chunk_positions(s, n, tree)
            slots += [table[p // bs] * bs + p % bs for p in range(s - e, s - e + n)]  # tree nodes: node order
        ctx.append(s - e + n)
        qlens.append(n)
        ends.append(len(ids) - 1)
        tables.append(table)
    return ids, pos, slots, ctx, qlens, ends, tables


def rope_lengths(batch: Batch, pos: list[int], qlens: list[int]) -> list[int]:
    """Each token's context length for a length-dependent RoPE (AttnMetadata.rope_lengths): the one transformers'
    generate gives it, max(its sequence's prompt length, position + 1) - a prompt's tokens the prompt's length
    however it is chunked, a decoded token its position + 1 (also when a preempted sequence recomputes it)."""
    prompts = np.repeat([seq.request.prompt_len for seq, _ in batch.chunks], qlens)
    return np.maximum(np.array(pos, np.int64) + 1, prompts).tolist()


def tree_chunk_positions(s: int, n: int, tree: list[int]) -> list[int]:
    """Positions of a chunk of n tokens from position s whose last len(tree) tokens form a tree with these
    parents (lmforge.model.meta): the chain's own, then the tree's root position + depth per node."""
    depth: list[int] = []
    for p in tree:  # parents precede their children
        depth.append(depth[p] + 1 if p >= 0 else 0)
    base = s + n - len(tree)
    return [*range(s, base), *(base + d for d in depth)]


def tree_parents_row(batch: Batch) -> tuple[list[int], tuple[int, ...]]:
    """AttnMetadata.tree_parents of a step's flat row (each tree's parents at its chunk's end, -1 elsewhere:
    unread) and tree_sizes_host (tokens of each chunk that form its tree; 0 = a chain)."""
    parents, sizes = [], []
    for seq, n in batch.chunks:
        tree = batch.trees.get(seq.seq_id, ())
        parents += [-1] * (n - len(tree))
        parents += tree
        sizes.append(len(tree))
    return parents, tuple(sizes)


def host_block_tables(tables: list[list[int]], rows: int, width: int) -> torch.Tensor:
    """(rows, width) int32 host tensor: table i left-aligned in row i, the rest 0. Numpy row fills: ~3x
    faster than nested lists and ~8x faster than a tensor per row (256 rows: ~0.2 ms on a CPU core)."""
    out = np.zeros((rows, width), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, :len(t)] = t
    return torch.from_numpy(out)


def decode_groups(widths: list[int], rows_per_group: int = 64) -> tuple[tuple[int, int, int], ...]:
    """(lo, hi, max width) over runs of decode rows sorted by table width (the engine sorts them)."""
    return tuple((lo, min(lo + rows_per_group, len(widths)), max(widths[lo:lo + rows_per_group]))
                 for lo in range(0, len(widths), rows_per_group))


class RecomputeRunner:
    """No cache: each sampling sequence runs its whole token list through the model."""

    def __init__(self, model, device):
        self.model, self.device = model, torch.device(device)

    def refresh_weights(self) -> None:
        pass  # nothing here depends on the weights

    @torch.inference_mode()
    def execute(self, batch: Batch, rows: Step, vocab_limit: int | None = None, extra: Extra = (),
                hidden: StepHidden | None = None, late: LateIds | None = None) -> Sampled:
        """As PagedRunner.execute: one forward over each chunk's sequence up to the chunk's end (every
        token read on the host: the engine never schedules ahead of this runner)."""
        if late is not None:
            raise LmforgeError("the recompute runner needs every input token on the host; run it without "
                               "async scheduling")
        wanted = [(c, back) for c, back, _ in rows] + list(extra)
        chunks = hidden.chunks if hidden is not None else None
        outs = {}
        for c in dict.fromkeys([c for c, _ in wanted] + list(chunks or ())):
            seq, n = batch.chunks[c]
            ids = torch.tensor([seq.tokens[:seq.num_computed + n]], device=self.device)
            logits, states = (self.model(ids, return_hidden=hidden.layers) if hidden is not None
                              else (self.model(ids), None))
            outs[c] = (logits[0], states[0] if states is not None else None)  # (T, V), (T, D)
        if not wanted:
            out = Sampled(torch.empty(0, dtype=torch.long), None, None, None)
        else:
            logits = torch.stack([outs[c][0][-1 - back] for c, back in wanted])
            at_rows = hidden is not None and chunks is None
            states = torch.stack([outs[c][1][-1 - back] for c, back in wanted]) if at_rows else None
            out = _split(logits, states, rows, vocab_limit)
        if chunks is not None:  # every position of the chunk: the last n of its sequence's
            out.features = {batch.chunks[c][0].seq_id: outs[c][1][-batch.chunks[c][1]:] for c in chunks}
        return out


def chunk_indices(query_lens: tuple[int, ...], chunks: list[int], device) -> torch.Tensor:
    """(H,) int64 flat indices of every token of these chunks in the step's row, chunk by chunk."""
    cu = np.cumsum((0,) + tuple(query_lens))
    return to_device(torch.from_numpy(np.concatenate([np.arange(cu[c], cu[c + 1]) for c in chunks])), device)


def token_rows(batch: Batch, rows) -> list[int]:
    """Where `rows` (chunk index, tokens back from the chunk's last token, ...) sit in a flat row of the
    batch's tokens (chunk after chunk): a decode-only batch's rows are their chunk indices."""
    if batch.num_decodes == len(batch.chunks):
        return [c for c, _, *_ in rows]
    ends = np.cumsum([n for _, n in batch.chunks]).tolist()
    return [ends[c] - 1 - back for c, back, *_ in rows]


def _take(logits: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """logits[idx], without an index copy and a gather when idx is 0, 1, ... (every chunk samples once)."""
    return logits[:len(idx)] if idx == list(range(len(idx))) else logits[to_device(idx, logits.device)]


def _split(logits: torch.Tensor, hidden: torch.Tensor | None, rows: Step, vocab_limit: int | None) -> Sampled:
    """logits (M + E, V): sample the first M (the rows), keep the rest raw (the extra positions)."""
    out = sample_rows(logits[:len(rows)], [r for _, _, r in rows], vocab_limit)
    out.extra = logits[len(rows):] if logits.shape[0] > len(rows) else None
    out.hidden = hidden
    return out


def copy_weights(model, weights, partial: bool = False) -> None:
    """Copy a state_dict (or a module's) into model in place (Engine.update_weights), checked whole before any
    copy (load_state_dict copies what fits before it raises); partial: only the tensors it names."""
    state = weights.state_dict() if isinstance(weights, torch.nn.Module) else weights
    own = model.state_dict()
    missing = [] if partial else sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    from lmforge.checkpoint import CAST_RULE, castable

    dtypes = [k for k in own if k in state and not castable(state[k].dtype, own[k].dtype)]
    if missing or unexpected or shapes or dtypes:
        detail = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected
                  else f"{shapes[0]} has shape {tuple(state[shapes[0]].shape)}, the model's "
                       f"{tuple(own[shapes[0]].shape)}" if shapes
                  else f"{dtypes[0]} is {state[dtypes[0]].dtype}, the model's {own[dtypes[0]].dtype}: {CAST_RULE}")
        fix = _prefix_hint(own, state, partial) or "pass a state_dict of the same architecture"
        raise LmforgeError(f"update_weights: these weights do not fit the engine's model ({detail}); {fix}; nothing "
                           "was changed")
    with torch.no_grad():
        model.load_state_dict(state, strict=not partial)  # copy_ per tensor: floats cast, onto any device


def _prefix_hint(own, state, partial: bool) -> str:
    """Where the names differ by one prefix (a policy's state_dict for an engine on PolicyWithValue, whose model is
    'backbone.'; a compiled or DDP-wrapped module's '_orig_mod.' / 'module.'), the fix, else ''. The prefix must map
    every name of the shorter side (two at least) onto the longer side's."""
    for longer, shorter, add in ((set(own), set(state), True), (set(state), set(own), False)):
        key = next((k for k in longer if k not in shorter), None)
        base = next((b for b in shorter if key is not None and key.endswith("." + b)), None)
        if base is None or len(shorter) < 2:
            continue
        prefix = key[:-len(base)]
        if all(prefix + k in longer for k in shorter):
            named = {prefix + n for n in state} if add else set()
            rest = add and not partial and any(k not in named for k in own)  # (a value head besides)
            fix = "add it to every name" if add else "drop it from every name"
            return (f"its names {'lack' if add else 'carry'} the prefix {prefix!r}: {fix} (or call update_weights() "
                    "with no argument where the engine's own model was changed in place)"
                    + ("; partial=True copies only the tensors it names" if rest else ""))
    return ""


def _addresses(model) -> list[int]:
    """Where the model's tensors live: parameters, and buffers too (a quantized layer keeps its codes and
    scales in buffers; captured graphs read those addresses as well)."""
    return [t.data_ptr() for t in (*model.parameters(), *model.buffers())]


def _adapter_state(layers) -> list[tuple[bool, float]]:
    return [(m.enabled, m.scale) for m in layers]


def sampling_rows(batch: Batch, make_rows) -> Step:
    """The logits rows of every chunk that reaches the end of its sequence's tokens (those still on the
    device included): make_rows(seq, n) -> [(tokens back from the chunk's end, row)]."""
    out: Step = []
    for c, (seq, n) in enumerate(batch.chunks):
        if seq.num_computed + n == len(seq.tokens) + seq.inflight:
            for back, r in make_rows(seq, n):
                out.append((c, back, r))
    return out


def prompt_rows(batch: Batch) -> Extra:
    """The extra rows of a step: each prompt position computed now whose next token's log-prob its
    request owes (position p gives prompt token p + 1's; each once, also when a preempted sequence
    recomputes its prompt)."""
    out: Extra = []
    for c, (seq, n) in enumerate(batch.chunks):
        req = seq.request
        if req.prompt_logprobs is None:  # not asked for (owed_prompt_logprob is None): most rows
            continue
        owed = req.owed_prompt_logprob
        if owed is not None:
            end = seq.num_computed + n - 1
            out += [(c, end - p) for p in range(max(seq.num_computed, owed - 1), min(end + 1, req.prompt_len - 1))]
    return out


def row_for(seq: Sequence, generator) -> Row:
    req = seq.request
    return Row(req.params, generator, seq.tokens, req.prompt_len, req.kind, req.request_id)
