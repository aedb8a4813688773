"""Recurrent-state caches: where the engine keeps the state of layers that carry a fixed-size state per
sequence (kind 'state' in a model's cache_spec(): Mamba, linear attention, the SSM half of a hybrid).

A Mamba layer (Gu & Dao 2023, §3.4 and Algorithm 2) carries, per sequence, the last k - 1 inputs of its
causal depthwise convolution (conv state, (d_inner, k - 1)) and the selective SSM's hidden state h_t of
h_t = Ā_t h_{t-1} + B̄_t x_t (ssm state, (d_inner, n); Mamba-2, Dao & Gu 2024 §7: (heads, head_dim, n)).
Unlike keys and values they do not grow with the sequence: a sequence's whole past is these tensors.

Layout: per state layer, one tensor per state of shape (max_seqs + 1, *shape), beside the paged K/V (or
MLA latent) blocks of the same cache object, so a hybrid's attention layers call `attend` and its state
layers `read_state` / `write_state` (through lmforge.model.cache.recur) on the one cache the runner passes.
A running sequence holds one row, its slot (AttnMetadata.state_slots); row max_seqs is the null row,
which no sequence holds (a CUDA-graph step's padding rows write there).
  start    before each step (PagedRunner.execute): a chunk beginning at the sequence's first token (a new
           prompt, or a prompt recomputed after preemption) gets a row if it holds none, and the row is
           zeroed, so every layer and kernel reads an initial state (no "fresh" flag to branch on); a
           chunk beginning after a prefix hit gets a row holding the hit's snapshot (below)
  fork     n > 1: each sample copies its parent's row after the parent's prefill (Engine.fork)
  release  finished or aborted; preempt: the same (the sequence restarts from its first token)
Rows: max_seqs, one per running sequence. The scheduler counts a request's n samples against max_num_seqs
from its admission (SchedulerConfig.reserve_samples), so a fork always finds a free row.

Prefix caching (EngineConfig.state_snapshots = N > 0; off with 0): a cached block holds its tokens' keys,
not the recurrent state after them, so a prefix hit also needs the state at the hit's end. The cache keeps
up to N snapshots (copies of a state row) named by the prefix key of the block they end (the key of
lmforge.infer.blocks, which names the whole prefix), least recently used evicted first. A hit is trimmed to
the longest run of cached blocks ending at a snapshot. Snapshots are taken only where they are likely to be
hit again (Marconi's admission policy, Pan et al., MLSys 2025, §4.1: a state at every block boundary would
cost a row per block): the scheduler cuts a prefill chunk (Sequence.snapshot_marks) at
  - the branch point: the end of the cached blocks its prompt matched when no snapshot ends there (a second
    request sharing a system prompt with an earlier one saves the state after the shared blocks; the third
    one on hits them: Marconi's speculative insertion);
  - its tokens' last block boundary (the next turn of a conversation resends them and extends them; Marconi
    keeps the state after the last decoded token instead, which block-aligned hits cannot use),
and the engine copies the row after that step (`save_snapshots`). A sequence admitted on a hit gets a row
with the snapshot copied in (`start`). Cost: an extra prefill step per cut, one row copy per snapshot.
Eviction is least recently used (Marconi's FLOP-aware eviction, §4.2, is not built).
What the engine does not do on such models, and why (`check_engine`, `check_request`: one-line errors):
  token trees      refused: each branch would need a state of its own
  hidden-state drafters (EAGLE, Medusa), draft models with state layers: refused (not built)
  the kernel step  off: its batch-1 Triton step implements attention blocks only
CUDA graphs, chunked prefill, preemption, n > 1, aborts and async scheduling work (a state row, like a
block table, is known before the step's tokens are). Beam search works: a new beam is a fork (its parent's
row copied) made before the old beams are dropped, so a search holds up to 2 x beam_width rows, which the
scheduler reserves at admission (SchedulerConfig.reserve_samples). Speculative decoding with a chain
drafter (a draft model, 'ngram') works: a rejected draft has to be undone, so recurrent layers run a drafted
chunk (the pending token + k drafts) one token at a time and the cache keeps the state after each
(`stage_states`); once verified, the row gets the state after the pending token and the accepted drafts
(`verified`), and the rejected drafts leave no trace (their attention keys are overwritten as usual).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from lmforge.errors import ConfigError, LmforgeError, warn_caller
from lmforge.infer.kv.paged import PagedKVCache, PagedLatentCache
from lmforge.model.cache import CacheSpec
from lmforge.utils import to_device


class StatePools:
    """The state rows of a paged cache (mixed into PagedKVCache / PagedLatentCache, module docstring).
    states[layer]: one (max_seqs + 1, *shape) tensor per entry of that layer's state_shapes."""

    def __init__(self, spec: CacheSpec, num_blocks: int, block_size: int, device=None, dtype=None,
                 decode: str = "auto", prefill: str = "auto", *, max_seqs: int = 256):
        super().__init__(spec, num_blocks, block_size, device, dtype, decode, prefill)
        if max_seqs < 1:
            raise LmforgeError(f"a state cache needs max_seqs >= 1 rows, got {max_seqs}")
        self.max_seqs, self.null_slot = max_seqs, max_seqs
        self.states: dict[int, tuple[torch.Tensor, ...]] = {
            # (dtype is the K/V blocks' - EngineConfig.kv_cache_dtype -: states default to the model's)
            i: tuple(torch.zeros((max_seqs + 1, *shape), dtype=layer.state_dtype_of(j, spec.dtype),
                                 device=self.device) for j, shape in enumerate(layer.state_shapes))
            for i, layer in enumerate(spec.layers) if layer.kind == "state"}
        self.free_slots = list(range(max_seqs - 1, -1, -1))  # popped from the end: row 0 first
        self.slot_of: dict[int, int] = {}
        """seq_id -> its row"""
        self.staged: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {}
        """seq_id -> layer -> its states after each token of this step's drafted chunk (`stage_states`)"""
        self.keep_snapshots(0)

    def keep_snapshots(self, n: int) -> None:
        """Room for n state snapshots (prefix caching, module docstring); any kept before are dropped."""
        if n < 0:
            raise LmforgeError(f"state snapshots must be >= 0, got {n}")
        self.snaps: dict[int, tuple[torch.Tensor, ...]] = {
            i: tuple(torch.zeros((n, *pool.shape[1:]), dtype=pool.dtype, device=self.device) for pool in pools)
            for i, pools in self.states.items()}
        self.max_snapshots = n
        self.snapshot_rows: OrderedDict[int, int] = OrderedDict()
        """prefix key -> snapshot row, least recently used first (`in` is what the scheduler asks)"""
        self.free_snaps = list(range(n - 1, -1, -1))

    # the layers' side (lmforge.model.cache.recur) --------------------------------------------------------
    def read_state(self, layer: int, meta) -> tuple[torch.Tensor, ...]:
        """Each sequence's state before this step: one (S, *shape) tensor per state (a gathered copy)."""
        return tuple(pool.index_select(0, meta.state_slots) for pool in self.states[layer])

    def write_state(self, layer: int, states, meta) -> None:
        """Each sequence's state after this step: one (S, *shape) tensor per state, stored at its row."""
        pools = self.states[layer]
        if len(states) != len(pools):
            raise LmforgeError(f"layer {layer} keeps {len(pools)} state tensors (cache_spec state_shapes), "
                               f"write_state got {len(states)}")
        for pool, new in zip(pools, states):
            pool.index_copy_(0, meta.state_slots, new.to(pool.dtype))

    def stage_states(self, layer: int, meta, lo: int, hi: int, after) -> None:
        """Speculative decoding: sequences lo..hi of the step's row, chunks of one length, ran their last m
        tokens one at a time (lmforge.model.cache.recur); after: one (hi - lo, m, *shape) tensor per state,
        the states after each of those tokens. A sequence whose chunk ends in d drafts keeps the last d + 1
        (after its pending token, then after each draft) until `verified`."""
        for r in range(lo, hi):
            d = meta.drafted_host[r]
            if d:
                self.staged.setdefault(meta.seq_ids_host[r], {})[layer] = tuple(a[r - lo, -d - 1:] for a in after)

    def verified(self, seq_id: int, kept: int) -> None:
        """The first `kept` tokens of seq_id's drafted chunk were verified (the pending token and the
        accepted drafts): its row gets the state after them (the rejected drafts' updates are undone)."""
        staged = self.staged.pop(seq_id, None)
        if staged is None:
            return
        slot = self.slot_of[seq_id]
        for layer, after in staged.items():
            for pool, states in zip(self.states[layer], after):
                pool[slot].copy_(states[kept - 1])

    # the engine's side ----------------------------------------------------------------------------------
    def start(self, chunks: list[tuple[int, bool, int | None]]) -> None:
        """Before a step: (seq_id, whether its chunk begins at the sequence's first token, the prefix key of
        its last cached block or None) of every chunk. Those that begin get a row if they hold none, zeroed;
        one holding no row that begins after a prefix hit gets one with the hit's snapshot; the others must
        hold one already."""
        zero, src, dst = [], [], []
        for seq_id, first, key in chunks:
            slot = self.slot_of.get(seq_id)
            if first:
                zero.append(self._take(seq_id) if slot is None else slot)
            elif slot is None:
                row = self.snapshot_rows.get(key) if key is not None else None
                if row is None:
                    raise LmforgeError(f"sequence {seq_id} continues from a computed prefix but holds no state row "
                                       "and no snapshot of it is kept: a state model's sequence must restart from "
                                       "token 0 or from a prefix hit's snapshot")
                self.snapshot_rows.move_to_end(key)
                src.append(row)
                dst.append(self._take(seq_id))
        if zero:
            idx = to_device(zero, self.device)
            for pools in self.states.values():
                for pool in pools:
                    pool.index_fill_(0, idx, 0)
        if src:
            self._copy(self.snaps, src, self.states, dst)

    def save_snapshots(self, pairs: list[tuple[int, int]]) -> None:
        """After a step: (seq_id, prefix key) - the sequence's state, which now ends that prefix, is kept
        under the key (a key kept already is only marked recently used; the least recently used snapshot
        makes room)."""
        src, dst = [], []
        for seq_id, key in pairs:
            if key in self.snapshot_rows:
                self.snapshot_rows.move_to_end(key)
                continue
            if not self.max_snapshots:
                return
            row = self.free_snaps.pop() if self.free_snaps else self.snapshot_rows.popitem(last=False)[1]
            if row in dst:  # more new keys this step than rows: the earlier one is overwritten
                del src[dst.index(row)], dst[dst.index(row)]
            self.snapshot_rows[key] = row
            src.append(self.slot_of[seq_id])
            dst.append(row)
        if src:
            self._copy(self.states, src, self.snaps, dst)

    def drop_snapshots(self) -> None:
        """Forget every snapshot (the prefix cache was reset, e.g. after a weight update)."""
        self.free_snaps = list(range(self.max_snapshots - 1, -1, -1))
        self.snapshot_rows.clear()

    def _copy(self, frm: dict, src: list[int], to: dict, dst: list[int]) -> None:
        """Rows src of every state tensor of `frm` into rows dst of `to`'s (one gather and write per tensor)."""
        s, d = to_device(src, self.device), to_device(dst, self.device)
        for layer, pools in frm.items():
            for a, b in zip(pools, to[layer]):
                b.index_copy_(0, d, a.index_select(0, s))

    def slots(self, seq_ids) -> list[int]:
        return [self.slot_of[s] for s in seq_ids]

    def fork(self, parent: int, child: int) -> None:
        """The child starts from the parent's state (n samples after the shared prefill)."""
        src, dst = self.slot_of[parent], self._take(child)
        for pools in self.states.values():
            for pool in pools:
                pool[dst].copy_(pool[src])

    def release(self, seq_id: int) -> None:
        """A finished, aborted or preempted sequence gives its row back (nothing is cleared: `start` zeroes
        a row when a sequence begins in it)."""
        slot = self.slot_of.pop(seq_id, None)
        if slot is not None:
            self.free_slots.append(slot)
        self.staged.pop(seq_id, None)

    preempt = release  # its state is gone with its blocks: it is recomputed from its first token

    @property
    def num_free_slots(self) -> int:
        return len(self.free_slots)

    @property
    def num_free_snapshots(self) -> int:
        return len(self.free_snaps)

    def _take(self, seq_id: int) -> int:
        if not self.free_slots:
            raise LmforgeError(f"all {self.max_seqs} recurrent-state rows are in use (one per running sequence); "
                               "the scheduler should have held this sequence back (SchedulerConfig.reserve_samples)")
        slot = self.slot_of[seq_id] = self.free_slots.pop()
        return slot


class PagedStateCache(StatePools, PagedKVCache):
    """Paged K/V blocks for the attention layers (none for a pure state model) + state rows."""


class PagedLatentStateCache(StatePools, PagedLatentCache):
    """Paged MLA latents for the attention layers + state rows."""


def new_state_cache(spec: CacheSpec, num_blocks: int, block_size: int, device=None, dtype=None,
                    decode: str = "auto", prefill: str = "auto", max_seqs: int = 256) -> StatePools:
    kind = PagedLatentStateCache if spec.latent else PagedStateCache
    return kind(spec, num_blocks, block_size, device, dtype, decode, prefill, max_seqs=max_seqs)


def check_engine(config, draft, has_state: bool = True, model_name: str = "the model") -> None:
    """One-line errors for the engine options a model with state layers cannot use (module docstring), and one
    warning for state_snapshots where it is ignored: prefix_caching=False, or a model without state layers (allowed:
    one config may serve hybrids and plain transformers, with prefix caching on or off)."""
    if config.state_snapshots and not (has_state and config.prefix_caching is not False):
        warn_caller(f"state_snapshots={config.state_snapshots} is ignored: " + (
            "prefix_caching=False, and the snapshots serve prefix caching only; leave it at 0, or prefix_caching "
            "unset" if has_state else f"{model_name} has no recurrent-state layers, whose states it keeps for "
            "prefix caching (its prefix caching needs none); leave it at 0 for this model"))
    if not has_state:
        return
    if getattr(draft, "proposes_trees", False):
        raise ConfigError("a token tree's branches need one recurrent state each, and the state cache follows one "
                          "chain of tokens per sequence: use a chain drafter (a draft model, 'ngram') on models "
                          "with state layers")
    if getattr(draft, "uses_hidden_states", False):
        raise ConfigError("drafters reading the target's hidden states (EAGLE, Medusa) are not supported on models "
                          "with state layers yet: use a draft model or 'ngram'")
    spec = draft.cache_spec() if hasattr(draft, "cache_spec") else None
    if spec is not None and spec.has_state:
        raise ConfigError("the draft model has recurrent-state layers, but a draft model's cache keeps no state rows: "
                          "draft with an attention model or 'ngram'")
    if config.prefix_caching and config.state_snapshots == 0:
        raise ConfigError("prefix_caching=True, but a cached block holds keys, not the recurrent state after them: "
                          "set state_snapshots > 0 to cache prefixes on models with state layers, or leave "
                          "prefix_caching unset (off here)")
    if config.kernel_step:
        raise ConfigError("kernel_step=True, but the batch-1 kernel step implements attention blocks only and this "
                          "model has recurrent-state layers: leave kernel_step at None or False")


def check_request(params, max_num_seqs: int) -> None:
    """One-line errors for the requests a model with state layers cannot serve (module docstring)."""
    if 2 * params.beam_width > max_num_seqs and params.beam_width > 1:
        raise LmforgeError(f"beam_width={params.beam_width}: beam search forks the next beams before it drops the "
                           f"old ones, {2 * params.beam_width} recurrent-state rows at once, but the engine has "
                           f"max_num_seqs={max_num_seqs} rows; lower beam_width or raise max_num_seqs")
    if params.n > max_num_seqs:
        raise LmforgeError(f"n={params.n} samples each keep a recurrent state row, but the engine has "
                           f"max_num_seqs={max_num_seqs} rows; lower n or raise max_num_seqs")


def marked(chunks) -> list[tuple[int, int]]:
    """(seq_id, prefix key) of the step's chunks that end where their sequence keeps a snapshot (before the
    engine adds the chunk to num_computed)."""
    return [(seq.seq_id, key) for seq, n in chunks
            if seq.snapshot_marks and (key := seq.snapshot_marks.get(seq.num_computed + n)) is not None]
