"""The paged block pool: which cache blocks are free, who holds each, and which hold a known prefix.

Blocks are reference-counted: `n > 1` samples (and beam candidates) fork from their parent and share its
blocks; a sequence about to write into a block someone else also holds (or a prefix key names) gets a private
one first - every such block of the range a step writes, not only the partly filled tail: a table may already
hold room reserved for speculative drafts when it forks (copy-on-write; the engine copies the contents in the
cache, `BlockPool.append` reports the pairs; a block with none of the sequence's keys yet is not copied).

Prefix caching (SGLang's RadixAttention idea, vLLM's block-hash form): a block that is full gets the
key hash((parent block's key, its token ids)), so a key names the whole prefix up to the block's end. A
new sequence walks its prompt block by block and reuses every block whose key is cached. Blocks nobody
holds any more keep their contents and key and sit in an LRU list; they are reused as they are on a hit,
and evicted (key dropped) only when a fresh block is needed and no never-used block is left.
Why a hash chain rather than a radix tree: blocks are the unit of sharing anyway (a tree would still
match at block granularity), lookup is one dict probe per block, eviction is an LRU of whole blocks
with no tree to rebalance, and forked or preempted sequences need no tree surgery. Keys are Python
hashes of (parent key, token tuple): the dict compares the token tuple on a hash match, so two prefixes
collide only if their parents' 64-bit keys collide.

KV memory utilisation: the fraction of the allocated KV slots that hold tokens, = tokens stored in the
distinct blocks in use / (blocks in use x block_size). A block shared by several sequences (a prefix hit,
the n samples of a request, beams) is counted once, so the fraction never exceeds 1 - summing each
sequence's length instead counts a shared prefix once per holder. The pool learns each block's fill from
`append` (the slots a step is about to write, which it has written by the time anyone reads the numbers;
slots reserved for speculative drafts count as written even when the drafts are rejected), and records the
utilisation when the blocks in use reach their peak (`peak_used`, `peak_utilization`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from lmforge.errors import LmforgeError


@dataclass
class PrefixStats:
    """Prefix-cache hits of admitted sequences. queried_blocks counts the blocks each lookup could have hit: the
    full blocks of the tokens looked up, the last token left to compute - not the whole prompt where less is
    looked up (a KV policy's observed tail, H2O's whole prompt: none; prompt log-probs owed from a token)."""

    queried_blocks: int = 0
    hit_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / max(self.queried_blocks, 1)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise LmforgeError(f"a block pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, "
                               f"{block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.key: list[int | None] = [None] * num_blocks
        self.fresh: deque[int] = deque(range(num_blocks))  # never used, or used and evicted
        self.idle: OrderedDict[int, None] = OrderedDict()  # ref 0 but holding a cached prefix (LRU first)
        self.cached: dict[int, int] = {}  # key -> block
        self.stats = PrefixStats()
        self.filled = [0] * num_blocks  # token slots written in each block (kept while a cached block idles)
        self.tokens_held = 0  # sum of `filled` over the blocks in use (ref > 0)
        self.peak_used, self.peak_utilization = 0, 0.0
        self.null = num_blocks
        """a block id never handed out: table entries of blocks dropped behind a sliding window point here
        (the cache has one block more, never read unmasked)"""

    # accounting --------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.fresh) + len(self.idle)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def request_blocks(self, prompt_len: int, length: int, samples: int = 1, window: int = 0,
                       step_tokens: int = 0, bound: int | None = None, policy: bool = False) -> int:
        """Blocks a request of `length` tokens (prompt + output) holds at most at once (Engine.add_request refuses
        one the pool cannot ever hold). Its `samples` sequences (n samples, or beam search's beams) share the
        prompt's full blocks and each own theirs from the prompt's last partial one on; a sliding window (every
        layer's) drops blocks behind it after every step (step_tokens: a step's most tokens); a KV policy
        (`policy`) keeps at most `bound` keys per sequence (KVPolicy.max_slots; None: no bound), and its
        compactions write each sequence's kept keys to blocks of its own: samples then share none."""
        per = self.blocks_for(length)  # one sequence's
        if window:
            per = min(per, self.blocks_for(window + step_tokens) + 1)
        if bound is not None:
            per = min(per, self.blocks_for(bound) + 1)
        shared = 0 if policy else min(prompt_len // self.block_size, per)
        return shared + samples * (per - shared)

    @property
    def utilization(self) -> float:
        """Tokens stored in the blocks in use / their slots (each shared block once); 0 when none is."""
        return self.tokens_held / (self.num_used * self.block_size) if self.num_used else 0.0

    def _fill(self, b: int, upto: int) -> None:
        """Block b (in use) holds tokens in its first `upto` slots."""
        if upto > self.filled[b]:
            self.tokens_held += upto - self.filled[b]
            self.filled[b] = upto

    def _note_peak(self) -> None:
        used = self.num_blocks - len(self.fresh) - len(self.idle)  # num_used, inlined: once per sequence-step
        if used >= self.peak_used:  # at a tie, the later state: its blocks are fuller
            self.peak_used = used
            self.peak_utilization = self.tokens_held / (used * self.block_size) if used else 0.0

    # allocation ----------------------------------------------------------------------------------------
    def _take(self) -> int:
        if self.fresh:
            b = self.fresh.popleft()
        elif self.idle:
            b, _ = self.idle.popitem(last=False)  # least recently used cached block
            del self.cached[self.key[b]]
            self.key[b], self.filled[b] = None, 0
        else:
            raise LmforgeError("the KV block pool is exhausted (the scheduler should have preempted)")
        self.ref[b] = 1
        return b

    def hold(self, b: int) -> None:
        """One more holder of block b (a prefix hit or a fork)."""
        if b == self.null:
            return
        if self.ref[b] == 0:
            self.idle.pop(b, None)
            self.tokens_held += self.filled[b]
        self.ref[b] += 1

    def release(self, table: list[int]) -> None:
        """Drop one hold on each block (tail first, so that a prefix's first blocks stay cached longest)."""
        for b in reversed(table):
            if b == self.null:
                continue
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.tokens_held -= self.filled[b]
                if self.key[b] is not None:
                    self.idle[b] = None
                else:
                    self.filled[b] = 0
                    self.fresh.append(b)
        table.clear()

    def can_append(self, table: list[int], num_tokens: int, new_tokens: int) -> bool:
        return self.needed(table, num_tokens, new_tokens) <= len(self.fresh) + len(self.idle)

    def needed(self, table: list[int], num_tokens: int, new_tokens: int) -> int:
        """Fresh blocks that writing new_tokens after the first num_tokens takes: the blocks past the table's end,
        and a private one for each block of the written range someone else may read (copy-on-write, `_shared`)."""
        bs = self.block_size
        i, last = num_tokens // bs, -(-(num_tokens + new_tokens) // bs)
        return max(0, last - len(table)) + sum(1 for b in table[i:last] if self._shared(b))

    def _shared(self, b: int) -> bool:
        """Whether a sequence holding block b must not write into it: another sequence holds it too (a fork, a
        prefix hit) or a prefix key names it (later prompts read it as it is)."""
        return b != self.null and (self.ref[b] > 1 or self.key[b] is not None)

    def append(self, table: list[int], num_tokens: int, new_tokens: int) -> list[tuple[int, int]]:
        """Make `table` cover num_tokens + new_tokens; returns the (src, dst) blocks to copy first."""
        copies = self.try_append(table, num_tokens, new_tokens)
        if copies is None:
            raise LmforgeError("the KV block pool is exhausted (the scheduler should have preempted)")
        return copies

    def try_append(self, table: list[int], num_tokens: int, new_tokens: int) -> list[tuple[int, int]] | None:
        """append, or None (nothing changed) when the free blocks cannot cover it (the scheduler's one call
        per sequence and step)."""
        if not self.can_append(table, num_tokens, new_tokens):
            return None
        bs = self.block_size
        i, end = num_tokens // bs, num_tokens + new_tokens
        last = -(-end // bs)
        copies = []
        # copy-on-write of every block the step writes into that is not this sequence's alone: the partly filled
        # tail, and blocks already in the table past it (room reserved for drafts before a fork shared it)
        for j in range(i, min(last, len(table))):
            b = table[j]
            if self._shared(b):
                dst = self._take()
                if j * bs < num_tokens:  # its first slots hold this sequence's keys: copied before the step
                    copies.append((b, dst))
                self.release([b])  # one hold fewer (a named block nobody else holds idles, still cached)
                table[j] = dst
        while len(table) < last:
            table.append(self._take())
        for j in range(i, last):  # the copied head of a CoW block, then the new slots
            self._fill(table[j], min(bs, end - j * bs))
        self._note_peak()
        return copies

    def drop_behind(self, table: list[int], first_visible: int) -> None:
        """Sliding-window models: release the blocks wholly before position first_visible (no query from
        now on can see them), keeping the table's positions (their entries become `null`)."""
        for i in range(min(first_visible // self.block_size, len(table))):
            if table[i] != self.null:
                self.release([table[i]])
                table[i] = self.null

    def compact(self, table: list[int], reuse: list[int | None], num_tokens: int) -> list[int] | None:
        """KV-policy eviction (lmforge.infer.kv.policy): `table` becomes len(reuse) blocks holding num_tokens
        slots. reuse[j] = i: old block table[i] becomes block j as it is (its keys move whole, no copy);
        None: the caller writes block j. A written block is table[j] itself when only this sequence holds
        it, no prefix key names it and it is not moved elsewhere; otherwise a fresh one (other holders and the
        prefix cache keep the old contents: copy-on-write). A block moved whole that ends up partly filled
        (the new last block) must be private and unnamed too, since new keys are written into it. Blocks left
        over are released. Returns the indices j to write and edits table, or None (nothing changed) when
        the free blocks cannot cover the fresh ones."""
        bs, last = self.block_size, len(reuse) - 1
        tail = table[reuse[last]] if reuse and reuse[last] is not None else None
        shared = tail is not None and (self.ref[tail] > 1 or self.key[tail] is not None)
        if shared and num_tokens - last * bs < self.filled[tail]:
            reuse = reuse[:last] + [None]  # written instead: later keys would overwrite shared memory
        moved = {i for i in reuse if i is not None}
        private = [j < len(table) and j not in moved and self.ref[table[j]] == 1 and self.key[table[j]] is None
                   for j in range(len(reuse))]
        kept = {table[i] for i in moved} | {table[j] for j, r in enumerate(reuse) if r is None and private[j]}
        left = [b for b in table if b not in kept]
        fresh = sum(1 for j, r in enumerate(reuse) if r is None and not private[j])
        # blocks freed by this very release count: their contents were read (gathered) before any write
        freed = sum(1 for b in set(left) if b != self.null and self.ref[b] == 1)
        if fresh > len(self.fresh) + len(self.idle) + freed:
            return None
        new = [table[r] if r is not None else table[j] if private[j] else -1 for j, r in enumerate(reuse)]
        self.release(left)
        for j, b in enumerate(new):
            if b == -1:
                new[j] = self._take()
        for b in new:  # fills: block j holds min(bs, num_tokens - j * bs) keys
            self.tokens_held -= self.filled[b]
            self.filled[b] = 0
        for j, b in enumerate(new):
            self._fill(b, min(bs, num_tokens - j * bs))
        table[:] = new
        return [j for j, r in enumerate(reuse) if r is None]

    def compact_in_place(self, table: list[int], num_tokens: int) -> list[int] | None:
        """Unordered KV-policy eviction (lmforge.infer.kv.policy, ordered_slots = False): `table` keeps its
        first blocks_for(num_tokens) blocks, into which the caller writes (evicted slots filled from the
        tail), so each must be private: one that another sequence holds or a prefix key names is replaced by
        a fresh block (copy-on-write: the caller writes every slot of it, the old one keeps its contents for
        its other holders and the prefix cache). Blocks past the end are released. Returns the indices j of
        the replaced blocks (edits table), or None (nothing changed) when the free blocks cannot cover them.
        O(blocks) host work, no per-slot loop; the same accounting as compact(table, [None] * blocks, ...)."""
        bs, nb, ref, key = self.block_size, self.blocks_for(num_tokens), self.ref, self.key
        cow = [j for j in range(nb) if ref[table[j]] > 1 or key[table[j]] is not None]
        tail = table[nb:]
        # blocks freed by this very release (the tail, replaced blocks no one else holds) count: the caller
        # reads their keys before writing any block
        if cow and len(cow) > len(self.fresh) + len(self.idle) + sum(
                1 for b in {*tail, *(table[j] for j in cow)} if b != self.null and ref[b] == 1):
            return None
        self.release(tail)  # (release empties the list it is given: tail is a copy)
        del table[nb:]
        for j in cow:
            self.release([table[j]])  # one hold fewer; a named block nobody else holds idles, still cached
            table[j] = self._take()
        last = table[nb - 1]  # the only block whose fill changes (earlier ones stay full)
        self.tokens_held -= self.filled[last]
        self.filled[last] = 0
        self._fill(last, num_tokens - (nb - 1) * bs)
        for j in cow:
            self._fill(table[j], min(bs, num_tokens - j * bs))
        return cow

    def fork(self, table: list[int]) -> list[int]:
        for b in table:
            self.hold(b)
        return list(table)

    # prefix caching ------------------------------------------------------------------------------------
    def block_keys(self, tokens: list[int], parent: int | None = None, start_block: int = 0) -> list[int]:
        """Keys of the full blocks of tokens from block start_block on, chained from `parent`."""
        return list(self._keys(tokens, parent, start_block))

    def _keys(self, tokens: list[int], parent: int | None = None, start_block: int = 0):
        bs = self.block_size
        for i in range(start_block, len(tokens) // bs):
            parent = hash((parent, tuple(tokens[i * bs:(i + 1) * bs])))
            yield parent

    def lookup(self, tokens: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of tokens, leaving at least the last token to compute
        (its logits are needed) - not yet held: `hold` each one to use it. Hashes up to the first miss
        only (a sequence waiting for room is looked up again every step)."""
        if not self.prefix_caching:
            return []
        usable = (len(tokens) - 1) // self.block_size
        hits = []
        for key in self._keys(tokens[: usable * self.block_size]):
            b = self.cached.get(key)
            if b is None:
                break
            hits.append(b)
        return hits

    def count_lookup(self, num_tokens: int, hits: int) -> None:
        """Hit-rate statistics of one admitted sequence (blocks it could have hit, blocks it did)."""
        if self.prefix_caching:
            self.stats.queried_blocks += max(0, num_tokens - 1) // self.block_size  # (0 tokens: no block)
            self.stats.hit_blocks += hits

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (keys, idle blocks, hit statistics), e.g. after a weight update."""
        for b in self.idle:  # back to fresh: empty, as _take expects
            self.filled[b] = 0
            self.fresh.append(b)
        self.idle.clear()
        self.cached.clear()
        self.key = [None] * self.num_blocks
        self.stats = PrefixStats()

    def register(self, b: int, key: int) -> None:
        """Block b is full and holds the prefix named by key."""
        if self.prefix_caching and self.key[b] is None and key not in self.cached:
            self.key[b] = key
            self.cached[key] = b
