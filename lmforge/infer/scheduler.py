"""The scheduler: which sequences run this step, and how many of their tokens (continuous batching).

Plain Python over `Sequence` objects and a `BlockPool`; no model, no tensors (tested alone). Each step:
  1. running sequences, oldest first, each with all its pending tokens (1 for a decode, the rest of a
     prompt for a chunked prefill) within the step's token budget. When the pool cannot hold a sequence's
     next tokens, the NEWEST running sequence is preempted by recompute (its blocks are freed, it goes
     back to the front of the queue with its tokens so far, and is prefilled again later: the output is
     the same, and its random stream simply continues); if it is the sequence itself, it waits - unless
     it holds every block in use: then it never fits (recomputed, it would come back to this point forever)
     and is dropped into Batch.failed, whose requests the engine fails with an error (found so before any
     newer sequence is preempted, those keep running). A KV policy's compaction that finds no free block
     preempts the same way (`preempt_for`).
  2. then waiting sequences in arrival order (preempted ones first), while the budget, max_num_seqs and
     the pool allow; a prompt longer than the budget is split across steps (chunked prefill) unless
     chunked_prefill is off. Nothing is admitted in a step that preempted (it would only thrash).
A new sequence first reuses the longest cached prefix of its tokens (lmforge.infer.blocks), up to the
positions whose logits its request's prompt log-probs still need. One whose next block is being filled by a
sequence admitted in the same step (prompts behind shared few-shot demonstrations, sent together) waits a
step and reads that block from the cache then, instead of computing it a second time (a simple form of
cache-aware scheduling, the idea behind SGLang's prefix-aware ordering, Zheng et al. 2024; a few-shot
batch's prefix hit rate went from 0.29 to 0.90 in a CPU prototype). A running
sequence whose request has a lookahead (speculative decoding) gets budget and blocks for that many
draft tokens beyond its last one; the engine adds the drafts to its chunk. Under async scheduling a
sequence's newest token may still be on the device (Sequence.inflight): it is scheduled as a decode all
the same, unless that token is its last (max_tokens or the context window).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from lmforge.config import check
from lmforge.infer.blocks import BlockPool
from lmforge.infer.request import Sequence, Status


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    """sequences in the running batch at most"""
    max_num_batched_tokens: int = 4096
    """tokens per forward at most (decode tokens + prefill chunks)"""
    chunked_prefill: bool = True
    """split prompts longer than the remaining budget across steps"""
    reserve_samples: bool = False
    """a request's n samples (a beam search's 2 x beam_width forks) count against max_num_seqs from its
    admission, not from their fork after its prefill: models with recurrent-state layers keep one state row
    per running sequence, max_num_seqs rows"""

    def __post_init__(self) -> None:
        check(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        check(self.max_num_batched_tokens >= 1,
              f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class Batch:
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)
    """(sequence, new tokens) in run order: one-token chunks (decodes) first"""
    copies: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) blocks to copy before the forward (copy-on-write)"""
    preempted: list[Sequence] = field(default_factory=list)
    room: dict[int, int] = field(default_factory=dict)
    """seq_id -> draft tokens reserved beyond the scheduled ones (speculative lookahead)"""
    trees: dict[int, list[int]] = field(default_factory=dict)
    """seq_id -> parents of the token tree ending its chunk (speculative drafts as a tree: the pending
    token, then the nodes; -1 = the token before, lmforge.model.meta); absent = a causal chain"""
    drafts: dict[int, int] = field(default_factory=dict)
    """seq_id -> speculative drafts ending its chunk (set by the engine after drafting)"""
    failed: list[tuple[Sequence, int]] = field(default_factory=list)
    """(sequence, KV blocks its next chunk needs) of sequences that do not fit holding every block in use (with
    the newer running sequences preempted, which is not done then: it would be for nothing): they never will
    (preempting itself, one would be recomputed up to the same point, forever). Out of the batch and of every
    queue, their blocks freed, status FAILED (and their request's waiting sequences'): the caller ends their
    requests (the engine fails them; Scheduler.finish takes a failed sequence)"""

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def num_decodes(self) -> int:
        return sum(1 for _, n in self.chunks if n == 1)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool):
        self.config, self.pool = config, pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.on_release: Callable[[Sequence], None] | None = None
        """called once per finished, aborted or dropped sequence (the engine: per-sequence state elsewhere)"""
        self.max_positions: int | None = None
        """positions within the cache (a KV policy's cache_positions): no chunk reaches a position past this (the
        model's window); the policy's plans before each step keep a sequence's keys below it"""
        self.observed_tail = 0
        """a sequence's last this-many tokens are computed at admission, never taken from the prefix cache (a
        KV policy observes their attention: SnapKV's window, lmforge.infer.kv.policy)"""
        self.features_cached = False
        """a drafter reading every position's features keeps them with the cached blocks (a paged head,
        lmforge.infer.draft.PagedDraftHead): its sequences may take prefix hits like any other"""
        self.snapshots = None
        """models with recurrent-state layers and prefix caching: the prefix keys that have a state snapshot
        (a container); a hit must end at one, and prefill chunks end where snapshots are taken (`_marks`,
        lmforge.infer.kv.state)"""
        self._early = Batch()  # holds sequences preempted before the next schedule (`preempt`)

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence, after: Sequence) -> None:
        """A fork of `after` (holding its blocks already) joins the batch right behind it."""
        seq.status = Status.RUNNING
        self.running.insert(self.running.index(after) + 1, seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a finished, aborted or failed (`_fail`: in no queue, its blocks freed) sequence and release its
        blocks."""
        if seq.status == Status.RUNNING:
            self.running.remove(seq)
        elif seq.status == Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = Status.FINISHED
        self.pool.release(seq.block_table)
        if self.on_release is not None:
            self.on_release(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---------------------------------------------------------------------------------------------
    def preempt(self, seq: Sequence, last: bool = False) -> None:
        """Preempt a running sequence before schedule() (for a KV policy's compaction, `preempt_for`; idle beams,
        `next_batch`): reported among the next batch's preempted, which admits nothing new. last: it waits behind
        every waiting sequence (not in front, as a preempted sequence does)."""
        self.running.remove(seq)
        self._preempt(seq, self._early)
        if last:
            self.waiting.remove(seq)
            self.waiting.append(seq)

    def preempt_for(self, seq: Sequence, compacted: Callable[[], bool]) -> None:
        """A KV policy's compaction of seq found no free block for its copies (a plan is never skipped): retry it
        (`compacted`), and while it finds none preempt the newest running sequence as schedule() does for a chunk,
        seq itself when it is the newest (nothing to do when it was preempted for an older one). The oldest running
        sequence thus always compacts - alone, its blocks are its own, and a compaction never takes more fresh
        blocks than it releases - and runs. Preempting the sequence whose compaction failed, sequences sharing
        prefix blocks failed together, were readmitted together onto the same blocks and failed again, forever
        (positions within the cache cap a readmission's prefix hit, so it made no progress; found 2026-12-07)."""
        while seq.status == Status.RUNNING and not compacted():
            self.preempt(self.running[-1])

    def next_batch(self, idle: bool) -> Batch:
        """schedule(), again while the step would be empty with work waiting: the sequences preempted before it
        (a KV policy's plans, `preempt`) took every running one (a step that reports them admits nothing new),
        or - idle: no step in flight - every running sequence waits on a sibling the pool cannot take back (beam
        searches whose idle beams hold the blocks each other's preempted beams need). Then the newest such
        request's sequences give their blocks back too and wait behind the queue (each request once), and the
        step is scheduled again, admitting from it. Every round preempts or admits: bounded."""
        batch, first, yielded = self.schedule(), [], set()
        rounds = 2 * len(self.running) + 3
        failed = []
        while not batch.chunks and rounds:
            rounds -= 1
            if not batch.preempted:
                if not (idle and self.running and self.waiting):
                    break
                newest = max(self.running, key=lambda s: s.request.arrival).request
                if newest.request_id in yielded:
                    break
                yielded.add(newest.request_id)
                for seq in [s for s in self.running if s.request is newest]:
                    self.preempt(seq, last=True)
            first += batch.preempted
            failed += batch.failed
            batch = self.schedule()
        batch.preempted, batch.failed = first + batch.preempted, failed + batch.failed
        return batch

    def schedule(self) -> Batch:
        batch, budget = Batch(), self.config.max_num_batched_tokens
        if self._early.preempted:
            batch.preempted, self._early = self._early.preempted, Batch()
        queue, kept = deque(self.running), []
        while queue:
            seq = queue.popleft()
            if seq.inflight and len(seq.tokens) + seq.inflight >= seq.request.max_len:
                kept.append(seq)  # its last token is on the device: it finishes when the host reads it
                continue
            remaining = seq.remaining
            n = min(remaining, budget)
            if self.max_positions is not None:  # positions within the cache: a chunk's last below the window
                n = min(n, self.max_positions - seq.num_computed + seq.pos_shift)
            if n == 0 or (n < remaining and not self.config.chunked_prefill):
                kept.append(seq)
                continue
            if seq.snapshot_marks:  # a state model's prefill ends where its state is kept (`_marks`)
                n = _cut(seq, seq.num_computed, n)
            # room for drafts: never past the request's last token (k drafts + the bonus token are k + 1
            # new tokens), which add_request sized the pool check for; none before the first token is sampled
            # (the prefill's last chunk, of a request not yet forked into its n samples, scores no drafts)
            left = seq.request.max_len - len(seq.tokens) - seq.inflight - 1
            drafts = n == remaining and seq.request.forked
            extra = max(0, min(seq.request.lookahead, budget - n, left)) if drafts else 0
            copies = self.pool.try_append(seq.block_table, seq.num_slots, n + extra)
            if copies is None and self._fails_alone(seq, n + extra, queue):  # preempting newer ones: for nothing
                for sibling in [s for s in queue if s.request is seq.request]:  # (its request ends with it)
                    queue.remove(sibling)
                    self._preempt(sibling, batch)
                self._fail(seq, n + extra, batch)
                continue
            while copies is None:  # no room: preempt the newest running sequence (this one last)
                if not queue and self._alone(seq):  # nothing left to free: it never fits (`Batch.failed`)
                    self._fail(seq, n + extra, batch)
                    break
                victim = queue.pop() if queue else seq
                self._preempt(victim, batch)
                if victim is seq:
                    break
                copies = self.pool.try_append(seq.block_table, seq.num_slots, n + extra)
            if copies is None:
                continue
            if copies:
                batch.copies += copies
            batch.chunks.append((seq, n))
            if extra:
                batch.room[seq.seq_id] = extra
            budget -= n + extra
            kept.append(seq)
        self.running = kept
        if not batch.preempted:
            budget = self._admit(batch, budget)
        batch.chunks.sort(key=lambda c: c[1] != 1)  # stable: decodes first, each group in order
        return batch

    def _admit(self, batch: Batch, budget: int) -> int:
        pool, seats = self.pool, len(self.running)
        if self.config.reserve_samples:
            beams = {id(s.request): 2 * s.params.beam_width for s in self.running if s.params.beam_width > 1}
            seats = sum(beams.values()) + sum(self._seats(s) for s in self.running if s.params.beam_width == 1)
        computing: set[int] = set()  # prefix keys of the blocks this step's admitted prompts fill
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq.inflight:  # preempted with a token on the device: its prompt is known once that is read
                break
            need = self._seats(seq)
            # a preempted beam or sample whose siblings still run comes back whatever the seats: forks take no
            # seat either, and its siblings may be waiting on it (a beam search's next round needs every beam)
            if seats + need > self.config.max_num_seqs and not _has_running_sibling(seq):
                break
            owed = seq.request.owed_prompt_logprob  # cached blocks must end before its predecessor
            if seq.features is not None and not self.features_cached:  # its drafter reads each position's
                owed = min(owed if owed is not None else len(seq.tokens), seq.features.next + 1)  # features: computed
            if self.observed_tail:
                tail = max(0, len(seq.tokens) - self.observed_tail)
                owed = min(owed if owed is not None else len(seq.tokens), tail)
            tokens = seq.tokens if owed is None else seq.tokens[:owed]
            hits = pool.lookup(tokens)
            if self.snapshots is not None:
                hits = self._marks(seq, hits)
            elif computing and _next_key(pool, tokens, hits) in computing:
                break  # its next block is being computed now (a shared few-shot prefix): hit it next step
                # (FIFO: those behind it wait too, as they do behind a prompt the pool cannot hold)
            hits, n = self._first_chunk(seq, hits, budget)
            start = len(hits) * pool.block_size
            if n <= 0 or n < len(seq.tokens) - start and not self.config.chunked_prefill:
                break
            if seq.snapshot_marks:
                n = _cut(seq, start, n)
            idle_hits = sum(1 for b in hits if pool.ref[b] == 0)  # holding them takes them off the free list
            if pool.blocks_for(start + n) - len(hits) + idle_hits > pool.num_free:
                break
            for b in hits:
                pool.hold(b)
            pool.count_lookup(len(tokens), len(hits))
            seq.block_table, seq.num_computed = list(hits), start
            if seq.preemptions == 0:  # the prompt tokens read from the prefix cache, counted at the first admission
                seq.num_cached_tokens = min(start, seq.request.prompt_len)  # (a readmission hits its own blocks)
            seq.block_keys = pool.block_keys(seq.tokens[:start])
            if pool.prefix_caching:
                computing.update(pool.block_keys(seq.tokens[:start + n], seq.block_keys[-1] if seq.block_keys else None,
                                                 len(seq.block_keys)))
            batch.copies += pool.append(seq.block_table, start, n)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.chunks.append((seq, n))
            budget -= n
            seats += need
        return budget

    def _first_chunk(self, seq: Sequence, hits: list[int], budget: int) -> tuple[list[int], int]:
        """(the prefix hit an admission takes, its first chunk's tokens). Positions within the cache: the hit leaves
        room for a chunk and the chunk's last position stays below the window. A hit that, with its chunk, needs more
        blocks than the whole pool is shortened until they fit (its tokens computed instead): a KV policy bounds a
        sequence's keys by evicting after each chunk, which add_request's pool check counts on, but a hit hands
        over its lossless keys at once - it waited for room it would never get, and the step raised "could not fit
        any sequence" for every request (found 2026-12-07). (Not a state model's hit: it ends at a snapshot.)"""
        pool = self.pool
        end = len(seq.tokens)  # where the first chunk ends at most: start + n = min(end, start + budget)
        if self.max_positions is not None:
            hits = hits[:(self.max_positions - 1) // pool.block_size]
            end = min(end, self.max_positions)
        if self.snapshots is None and pool.blocks_for(end) > pool.num_blocks:  # then the hit's end + budget must fit
            hits = hits[:max(0, (pool.num_blocks * pool.block_size - budget) // pool.block_size)]
        start = len(hits) * pool.block_size
        return hits, min(end - start, budget)

    def _marks(self, seq: Sequence, hits: list[int]) -> list[int]:
        """A state model's prefix hit: the cached blocks up to the last one whose key has a state snapshot.
        Sets the positions where this sequence's state is kept (lmforge.infer.kv.state): the end of the blocks
        it matched when no snapshot ends there (the branch point), and its tokens' last block boundary."""
        pool, bs = self.pool, self.pool.block_size
        usable = len(hits)
        while usable and pool.key[hits[usable - 1]] not in self.snapshots:
            usable -= 1
        marks = {len(hits) * bs, len(seq.tokens) // bs * bs} - {usable * bs} if pool.prefix_caching else set()
        keys = pool.block_keys(seq.tokens[:max(marks)]) if marks else []
        seq.snapshot_marks = {m: keys[m // bs - 1] for m in sorted(marks) if m > usable * bs}
        return hits[:usable]

    def _seats(self, seq: Sequence) -> int:
        """Seats of max_num_seqs a running sequence takes: 1, and with reserve_samples also its request's
        samples still to fork from it; a beam search's request takes 2 x beam_width for all its beams (each
        round forks the next beams before it drops the old ones)."""
        if not self.config.reserve_samples:
            return 1
        if seq.params.beam_width > 1:
            return 2 * seq.params.beam_width
        return 1 if seq.request.forked else seq.request.params.n

    def _alone(self, seq: Sequence) -> bool:
        """Whether seq alone holds every block in use (no other sequence holds one: nothing else to preempt)."""
        own = set(seq.block_table) - {self.pool.null}
        return self.pool.num_used == len(own) and all(self.pool.ref[b] == 1 for b in own)

    def _need_alone(self, seq: Sequence, new: int) -> int:
        """The blocks seq holds for its next `new` tokens when it holds them alone (no block shared)."""
        pool = self.pool
        own = len(set(seq.block_table) - {pool.null})
        return own + max(0, pool.blocks_for(seq.num_slots + new) - len(seq.block_table))

    def _fails_alone(self, seq: Sequence, new: int, newer) -> bool:
        """Whether seq fails (`_fail`) once the `newer` running sequences, which it would preempt one by one, gave
        their blocks back: it then holds every block in use, and its next `new` tokens still need more blocks
        than the pool has. Preempting them first was for nothing (they were recomputed)."""
        pool = self.pool
        if self._need_alone(seq, new) <= pool.num_blocks:
            return False
        holders = Counter(b for s in (seq, *newer) for b in set(s.block_table) - {pool.null})
        return pool.num_used == len(holders) and all(pool.ref[b] == k for b, k in holders.items())

    def _fail(self, seq: Sequence, new: int, batch: Batch) -> None:
        """seq needs more blocks for its next `new` tokens than the whole pool: out of the running batch, its blocks
        freed, reported in batch.failed with status FAILED (in no queue; finish() ends it). Its request ends, so
        its other sequences waiting (samples preempted before) leave the queue too, FAILED as well: none is
        admitted."""
        pool = self.pool
        need = self._need_alone(seq, new)
        pool.release(seq.block_table)
        seq.status = Status.FAILED
        batch.failed.append((seq, need))
        for other in seq.request.seqs:  # (none runs: it would hold a block)
            if other is not seq and other.status == Status.WAITING and other in self.waiting:
                self.waiting.remove(other)
                other.status = Status.FAILED

    def _preempt(self, seq: Sequence, batch: Batch) -> None:
        """Recompute preemption: free the blocks; the tokens stay and are prefilled again on resume."""
        self.pool.release(seq.block_table)
        seq.num_computed, seq.evicted, seq.pos_shift, seq.block_keys, seq.status = 0, 0, 0, [], Status.WAITING
        seq.snapshot_marks = {}  # set again at admission
        seq.preemptions += 1
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)
        self.num_preemptions += 1


def _cut(seq: Sequence, start: int, n: int) -> int:
    """n, or fewer tokens so that the chunk from `start` ends at the first snapshot mark inside it."""
    return min((m - start for m in seq.snapshot_marks if start < m < start + n), default=n)


def _next_key(pool, tokens: list[int], hits: list[int]) -> int | None:
    """The prefix key of the block after a prompt's cached ones, if lookup could ever hit it (None: not)."""
    bs, i = pool.block_size, len(hits)
    if (i + 1) * bs > len(tokens) - 1:  # lookup leaves the last token to compute
        return None
    return pool.block_keys(tokens[:(i + 1) * bs], pool.key[hits[-1]] if hits else None, i)[0]


def _has_running_sibling(seq: Sequence) -> bool:
    """Whether another sequence of seq's request (a beam, a sample forked from the same prompt) is running."""
    return any(s is not seq and s.status == Status.RUNNING for s in seq.request.seqs)

