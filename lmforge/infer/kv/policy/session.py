"""A KV policy at work in one engine: the one-line refusals of what a policy cannot run with (`check_engine`,
`key_rotation`) and `PolicySession` (per-sequence state, the score hook, plans validated and applied as
compactions of the paged cache). The steps it takes are lmforge.infer.kv.policy's docstring."""

from __future__ import annotations

import numpy as np
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.kv.policy.base import CacheLayout, KVPolicy, Keep
from lmforge.utils import to_device


def check_engine(policy: KVPolicy, spec, draft, config) -> None:
    """One-line refusals of what a policy cannot run with (lmforge.infer.kv.policy's docstring)."""
    if not isinstance(policy, KVPolicy):
        raise ConfigError(f"kv_policy must be a KVPolicy (lmforge.infer.kv.policy), got {type(policy).__name__}")
    name = type(policy).__name__
    if not isinstance(policy.ordered_slots, bool):
        raise ConfigError(f"{name}.ordered_slots must be True (slots in position order) or False (hole filling), "
                          f"got {policy.ordered_slots!r}")
    if spec is None:
        raise ConfigError(f"kv_policy={name} needs a model with cache_spec() (the paged cache); this one runs on "
                          "the recompute runner, which keeps no cache: load the checkpoint as lmforge's Transformer "
                          "(Transformer.from_pretrained, not HFCausalLM) or drop kv_policy")
    if draft is not None:
        what = repr(draft) if isinstance(draft, str) else type(draft).__name__
        raise ConfigError(f"kv_policy={name} with speculative decoding (draft={what}) is not supported: drafts "
                          "rewind and move keys by position; use one or the other")
    kinds = {layer.kind for layer in spec.layers}
    if spec.has_state:
        raise ConfigError(f"kv_policy={name} on a model with recurrent-state layers (kinds {sorted(kinds)}) is not "
                          "supported: those layers keep no keys to evict (their state has a fixed size) and a plan "
                          "covers every layer (a hybrid's attention layers alone are not built); drop kv_policy")
    if kinds - {"full", "latent"} or any(layer.window for layer in spec.layers):
        raise ConfigError(f"kv_policy={name} on a model with sliding-window layers (kinds "
                          f"{sorted(kinds)}, window {max(layer.window for layer in spec.layers)}) is not supported: "
                          "its masks measure windows on cache slots, which eviction renumbers; use a full-attention "
                          "model")
    store = config.kv_cache
    if policy.needs_scores and store is not None and not store.calls_score_hook:
        raise ConfigError(f"kv_policy={name} scores keys by their attention, but kv_cache={type(store).__name__} "
                          "does not declare calls_score_hook = True (its attend must pass hook_for(layer, seq_ids) "
                          "to its attention, as PagedKVCache.attend does); use a policy without scores "
                          "(StreamingLLM) or the default cache")
    if config.kernel_step:
        raise ConfigError(f"kernel_step=True with kv_policy={name}: the batch-1 kernel step writes each key at "
                          "its position's slot; set kernel_step=None (off with a policy) or False")
    if policy.cache_positions:
        if not policy.ordered_slots:
            raise ConfigError(f"kv_policy={name} with positions within the cache needs ordered_slots=True (a key's "
                              "slot is its position)")
        if not config.chunked_prefill:
            raise ConfigError(f"kv_policy={name} with positions within the cache prefills a prompt in chunks that "
                              "fit the model's window: turn chunked_prefill on")
        if config.kv_cache is not None:
            raise ConfigError(f"kv_policy={name} with positions within the cache turns moved keys in the pools; a "
                              "CacheStore (EngineConfig.kv_cache) keeps its own: use the default cache")


def key_rotation(policy: KVPolicy, model, max_seq_len: int):
    """The model's key rotation for a policy with positions within the cache (None without them), or a one-line
    refusal: keys without plain RoPE, or a policy whose kept keys leave no room below the model's window."""
    if not policy.cache_positions:
        return None
    name = type(policy).__name__
    rotate = model.key_rotation() if hasattr(model, "key_rotation") else None
    if rotate is None:
        raise ConfigError(f"kv_policy={name} with positions within the cache turns cached keys by their shift: it "
                          "needs a model whose keys carry plain RoPE (not learned positions, not a scaling that "
                          "depends on the sequence length)")
    held = policy.max_slots(max_seq_len + 1, 1)  # (any prompt: a stream runs past the window)
    if held is None or held > max_seq_len:
        raise ConfigError(f"kv_policy={name} with positions within the cache holds up to {held} keys, more than the "
                          f"model's max_seq_len={max_seq_len}: a smaller window or slack")
    return rotate


class PolicySession:
    """A policy at work in one engine: per-sequence state, the score hook, compactions, counters."""

    def __init__(self, policy: KVPolicy, pool, cache, spec, rotate=None):
        self.policy, self.pool, self.cache, self.rotate = policy, pool, cache, rotate
        self.turns: list = []  # (flat slots, shifts) of keys a positions-within-the-cache compaction moved
        self.told: list = []  # (seq_id, keep, old num_slots) of compactions the cache is still to be told of
        heads = tuple(1 if layer.kind == "latent" else layer.kv_heads for layer in spec.layers)
        self.layout = CacheLayout(len(spec.layers), heads, pool.block_size)
        self.states: dict[int, object] = {}
        self.observed: dict[int, tuple[object, object]] = {}  # seq_id -> (seq, state) observed this step
        self.evicted_tokens = self.compactions = 0

    # engine events ------------------------------------------------------------------------------------
    def plan(self, running, make_room) -> None:
        """Before scheduling: apply every running sequence's plan. One whose compaction found no free block for
        its copies goes to make_room(seq, retry) (Scheduler.preempt_for: the newest running sequences are
        preempted until its retry fits, or it itself - a plan is never skipped). The copies of all of them run
        as one gather and one write per pool (`_flush`), not one per sequence: a policy evicting every step (H2O,
        TOVA) compacts every running sequence each step; the retries' as one more, after the first are written
        and turned (a preempted sequence's blocks may be the fresh ones a retry writes)."""
        moves: list = []
        failed = [seq for seq in running if not self.apply(seq, moves)]
        self._finish(moves)
        moves = []
        for seq in failed:
            make_room(seq, lambda: self.apply(seq, moves))
        self._finish(moves)

    def _finish(self, moves: list) -> None:
        """The copies of a round of compactions, then the turns of the keys they moved, then the cache told."""
        self._flush(moves)
        self._turn()
        self._tell()

    def _tell(self) -> None:
        """Tell the cache of each compaction since the last call, once its keys moved (PagedCache.compacted: a
        store's per-sequence state follows the slots)."""
        for event in self.told:
            self.cache.compacted(*event)
        self.told = []

    def _turn(self) -> None:
        """Turn the keys the compactions since the last call moved (positions within the cache), once their
        copies are written: one rotation of every key pool."""
        if self.turns:
            slots, shift = (torch.cat(t) for t in zip(*self.turns))
            self.turns = []
            self.cache.rotate_keys(slots, shift, self.rotate)

    def apply(self, seq, moves: list | None = None) -> bool:
        """seq's plan, applied (a sequence not started yet holds no keys); False: no room for its copies.
        moves: collect the copies there (plan flushes them) instead of running them now."""
        if seq.seq_id in self.states:
            state = self.states[seq.seq_id]
            keep = self.policy.plan(seq, state)
            if keep is not None:
                return self.compact(seq, keep, state, moves)
        return True

    def _flush(self, moves: list) -> None:
        """Run the (src, dst) copies of several sequences' compactions in one cache.compact, which reads every
        source before it writes any destination. Batched copies rely on that: a block one sequence's
        compaction released (its keys still to be read) may be the fresh block another one's copies write.
        Sources of mixed forms are widened to (L, heads, M), destinations too when one is per head (an
        unordered compaction's)."""
        if len(moves) > 1:
            L = self.layout.num_layers
            heads = max(1 if t.dim() == 1 else t.shape[1] for move in moves for t in move)
            wide = lambda t: t.expand(L, heads, -1) if t.dim() == 1 else t.expand(-1, heads, -1)
            src = torch.cat([wide(s) for s, _ in moves], dim=-1)
            per_head = any(d.dim() == 3 for _, d in moves)
            moves[:] = [(src, torch.cat([wide(d) if per_head else d for _, d in moves], dim=-1))]
        if moves:
            self.cache.compact(*moves[0])

    def begin_step(self, batch) -> None:
        """After scheduling: new (and readmitted) sequences start, observed chunks get the hook."""
        self.observed.clear()
        for seq, n in batch.chunks:
            state = self.states.get(seq.seq_id)
            if state is None and seq.seq_id not in self.states:
                state = self.states[seq.seq_id] = self.policy.start(seq, self.layout)
            if self.policy.needs_scores and self.policy.observes(state, seq.num_computed, n):
                self.observed[seq.seq_id] = (seq, state)
        if self.policy.needs_scores:
            self.cache.score_hook = self._observe if self.observed else None

    def fork(self, parent: int, child: int) -> None:
        if parent in self.states:
            self.states[child] = self.policy.fork(self.states[parent])

    def release(self, seq_id: int) -> None:
        self.states.pop(seq_id, None)

    def preempt(self, seq_id: int) -> None:  # recomputed from token 0: its state starts again at admission
        self.states.pop(seq_id, None)

    def _observe(self, layer: int, probs: torch.Tensor) -> None:
        """The cache's score hook: rows of probs belong to cache.hook_seq_ids (a decode group's rows padded
        to the group's widest context, or one prefill chunk); queries run before num_computed advances."""
        for r, sid in enumerate(self.cache.hook_seq_ids):
            got = self.observed.get(sid)
            if got is not None:
                seq, state = got
                self.policy.observe(state, layer, probs[r, :, :, :seq.num_slots + probs.shape[2]], seq.num_computed)

    # compaction -----------------------------------------------------------------------------------------
    def compact(self, seq, keep: Keep, state, moves: list | None = None) -> bool:
        """Apply seq's plan `keep`; False (nothing changed) when the pool cannot cover the fresh blocks
        copy-on-write needs (the plan is asked again before the next step, or at a fork). ordered_slots: the
        kept keys move to the first K slots in order; else evicted slots below K are filled from the tail
        (`_fill_moves`). moves: append the (src, dst) flat slots there instead of copying now (`plan`)."""
        n = seq.num_slots
        keep, host = self._checked(seq, keep, n)
        k = len(keep) if host else keep.shape[-1]
        old = list(seq.block_table)
        if self.policy.ordered_slots:
            got = self._ordered_moves(seq, keep, host, k, old)
        else:
            got = self._fill_moves(seq, keep, host, k, n, old)
        if got is None:
            return False
        src, dst, keep = got
        if src is not None:
            if moves is None:
                self.cache.compact(src, dst)
            else:
                moves.append((src, dst))
        if self.policy.cache_positions:  # kept key keep[i] now sits at slot i: turned by i - keep[i]
            self._shifts(seq, keep, host)
            seq.pos_shift += n - k
            if moves is None:
                self._turn()
        self.told.append((seq.seq_id, keep, n))
        if moves is None:
            self._tell()
        seq.evicted += n - k
        self.evicted_tokens += n - k
        self.compactions += 1
        self.policy.compacted(state, keep)
        return True

    def _shifts(self, seq, keep: Keep, host: bool) -> None:
        """Queue the turns of seq's kept keys that changed slots (positions within the cache: host plans only)."""
        if not host:
            raise LmforgeError(f"{type(self.policy).__name__} keeps positions within the cache: its plan must be one "
                               "list of slots for every layer and head, not a per-head tensor")
        new = np.arange(len(keep))
        shift = new - np.asarray(keep, np.int64)
        moved = np.flatnonzero(shift)
        if len(moved):
            slots = _flat(seq.block_table, new[moved], self.pool.block_size)
            self.turns.append(tuple(to_device(torch.from_numpy(a), self.cache.device) for a in (slots, shift[moved])))

    def _checked(self, seq, keep: Keep, n: int) -> tuple[Keep, bool]:
        """The plan validated: (a host list, True), or (the (L, heads, K) tensor, False), sorted along K for
        ordered slots (hole filling needs no order). A tensor's values (distinct slots in [0, n) in every
        layer and head) are checked on a CPU tensor; a device tensor's only with the policy's check_plans
        (reading them is a device sync), else its shape alone."""
        if not isinstance(keep, torch.Tensor) or keep.dim() == 1:  # (a 1-d device tensor is read: one sync)
            keep = keep.tolist() if isinstance(keep, torch.Tensor) else list(keep)
            k = len(keep)
            if not 0 < k < n or keep[0] < 0 or keep[-1] >= n or any(a >= b for a, b in zip(keep, keep[1:])):
                raise LmforgeError(f"{type(self.policy).__name__}.plan kept {keep[:8]}... ({k} slots) of sequence "
                                   f"{seq.seq_id}'s {n}: keep 1 to {n - 1} distinct slots in [0, {n}), ascending")
            return keep, True
        k = keep.shape[-1]
        L, heads = self.layout.num_layers, max(self.layout.heads)
        if keep.dim() != 3 or keep.shape[0] != L or keep.shape[1] not in (1, heads) or not 0 < k < n:
            raise LmforgeError(f"{type(self.policy).__name__}.plan returned a tensor of shape {tuple(keep.shape)} "
                               f"for sequence {seq.seq_id} ({n} slots): give ({L}, {heads} or 1, K < {n}) slots, "
                               "or one list for every layer and head")
        keep = keep.sort(dim=-1).values if self.policy.ordered_slots else keep
        if keep.device.type == "cpu" or self.policy.check_plans:
            self._refuse_repeats(seq, keep, n)
        return keep, False

    def _refuse_repeats(self, seq, keep: torch.Tensor, n: int) -> None:
        """A tensor plan's slots must be distinct and in [0, n) in every layer and head: a repeated slot (a
        smaller layer budget padded to K) would be a key attention counts twice. Reads keep on the host."""
        s = keep.detach().cpu()
        s = s if self.policy.ordered_slots else s.sort(dim=-1).values
        repeat = (s[..., 1:] == s[..., :-1]).any(-1)
        outside = (s[..., 0] < 0) | (s[..., -1] >= n)
        for bad, what in ((repeat, "repeats a slot"), (outside, "keeps a slot outside [0, {n})")):
            if bool(bad.any()):
                layer, head = (int(i) for i in bad.nonzero()[0])
                raise LmforgeError(
                    f"{type(self.policy).__name__}.plan {what.format(n=n)} in layer {layer}, kv head {head} of "
                    f"sequence {seq.seq_id}: keep K distinct slots of [0, {n}) in every layer and head (one K "
                    "for all: a smaller layer budget cannot be padded by repeating a slot, which attention "
                    "would count twice; per-layer budgets: lmforge.infer.kv.policy's docstring)")

    def _ordered_moves(self, seq, keep: Keep, host: bool, k: int, old: list[int]):
        """Kept keys to slots 0..k-1 in order: (src, dst, keep), src None when nothing is copied; None when
        the pool has no room. A destination block that is one source block whole takes its table entry."""
        bs = self.pool.block_size
        if host and not self.policy.cache_positions:  # (turned keys are written: a reused block may be shared)
            reuse = [_whole_block(keep[j * bs:(j + 1) * bs], bs) for j in range(-(-k // bs))]
        else:
            reuse = [None] * -(-k // bs)
        write = self.pool.compact(seq.block_table, reuse, k)
        if write is None:
            return None
        # the written slots and their flat cache slots, as arrays: a per-head plan writes all K slots every
        # time, so per-slot Python here would cost O(K) host work per sequence and step
        dst = (np.asarray(write, np.int64)[:, None] * bs + np.arange(bs)).ravel()
        dst = dst[dst < k]
        if not len(dst):
            return None, None, keep
        dst_flat = to_device(torch.from_numpy(_flat(seq.block_table, dst, bs)), self.cache.device)
        if host:
            src = to_device(torch.from_numpy(_flat(old, np.asarray(keep, np.int64)[dst], bs)), self.cache.device)
        else:
            slots = keep[..., to_device(torch.from_numpy(dst), keep.device)]  # (L, heads, M) slot indices
            src = to_device(old, keep.device)[slots // bs] * bs + slots % bs
        return src, dst_flat, keep

    def _fill_moves(self, seq, keep: Keep, host: bool, k: int, n: int, old: list[int]):
        """Unordered compaction (ordered_slots False): each evicted slot below k takes a surviving key from
        slots >= k, per layer and kv head, so min(k, n - k) keys per (layer, head) move, not k; a block that
        copy-on-write replaces (shared after a fork, or prefix-named) gets every slot. Returns (src, dst,
        perm): new slot i holds old slot perm[..., i] (`compacted`); None when the pool has no room."""
        bs = self.pool.block_size
        cow = self.pool.compact_in_place(seq.block_table, k)
        if cow is None:
            return None
        new, dev = seq.block_table, self.cache.device
        whole = (np.asarray(cow, np.int64)[:, None] * bs + np.arange(bs)).ravel()
        whole = whole[whole < k]  # every slot of a replaced block (its kept keys stay at their slots)
        if host:
            perm = _fill_perm(np.asarray(keep, np.int64), k)
            slots = np.union1d(np.flatnonzero(perm != np.arange(k)), whole)
            if not len(slots):
                return None, None, keep
            src = to_device(torch.from_numpy(_flat(old, perm[slots], bs)), dev)
            return src, to_device(torch.from_numpy(_flat(new, slots, bs)), dev), perm.tolist()
        holes, perm = _fill_plan(keep, n)
        slots = holes  # (L, heads, F): each head's holes (padding: kept slots copied onto themselves)
        if len(whole):
            slots = torch.cat((holes, to_device(torch.from_numpy(whole), dev).expand(*holes.shape[:2], -1)), -1)
        src = perm.gather(-1, slots)  # duplicates (a hole in a replaced block) write the same key twice
        tables = to_device(torch.from_numpy(np.asarray(old + new, np.int64)), dev)  # one host-to-device copy
        old_t, new_t = tables[:len(old)], tables[len(old):]
        return old_t[src // bs] * bs + src % bs, new_t[slots // bs] * bs + slots % bs, perm


def _fill_perm(keep: np.ndarray, k: int) -> np.ndarray:
    """Host hole fill: keep (K,) ascending -> perm (K,), new slot i holds old slot perm[i]: kept slots below
    K stay, the evicted ones (holes, ascending) take the kept slots >= K (ascending)."""
    perm = np.arange(k)
    below = int(np.searchsorted(keep, k))  # kept slots below K; the K - below others are the movers
    hole = np.ones(k, bool)
    hole[keep[:below]] = False
    perm[hole] = keep[below:]
    return perm


def _fill_plan(keep: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Device hole fill, fixed shapes (no host sync): keep (L, heads, K) distinct slots of n -> holes
    (L, heads, F), F = min(K, n - K) >= the evicted slots below K in any head (their count = kept slots
    >= K), padded with kept slots below K; and perm (L, heads, K): new slot i holds old slot perm[..., i]
    (a padding slot holds itself)."""
    L, h, K = keep.shape
    F, keep = min(K, n - K), keep.long()
    alive = torch.zeros(L, h, n, dtype=torch.bool, device=keep.device).scatter_(-1, keep, True)
    hole = ~alive[..., :K]
    # stable sorts of 0/1 keys: the holes first (ascending), the kept tail slots first (ascending)
    holes = torch.sort((~hole).to(torch.int8), dim=-1, stable=True).indices[..., :F]
    movers = K + torch.sort((~alive[..., K:]).to(torch.int8), dim=-1, stable=True).indices[..., :F]
    src = torch.where(hole.gather(-1, holes), movers, holes)
    perm = torch.arange(K, device=keep.device).expand(L, h, K).scatter(-1, holes, src)
    return holes, perm


def _flat(table: list[int], slots: np.ndarray, bs: int) -> np.ndarray:
    """Flat cache slots (block * bs + offset) of a sequence's slots through its block table."""
    return np.asarray(table, np.int64)[slots // bs] * bs + slots % bs


def _whole_block(seg: list[int], bs: int) -> int | None:
    """The source block whose slots seg (a destination block's kept slots, ascending) are, in order from
    its first slot; None when they are not one block's."""
    if seg[0] % bs or seg[-1] - seg[0] != len(seg) - 1:
        return None
    return seg[0] // bs
