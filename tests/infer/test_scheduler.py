"""Scheduler and block pool without a model: admission order, token budget, chunked prefill, preemption,
fairness, prefix hits, copy-on-write and block accounting."""

from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.infer.blocks import BlockPool
from lmforge.infer.request import Request, Sequence, Status
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scheduler import Scheduler, SchedulerConfig


def seq(i: int, prompt_len: int, first: int = 0) -> Sequence:
    ids = list(range(first, first + prompt_len))
    return Sequence(i, Request(str(i), None, ids, SamplingParams(), i), 0, list(ids))


def run(sched: Scheduler, batch) -> None:
    """What the engine does after a forward: count computed tokens; a finished prefill samples one token."""
    for s, n in batch.chunks:
        s.num_computed += n
        if s.remaining == 0:
            s.tokens.append(7)


def make(num_blocks=64, block_size=4, **kw) -> Scheduler:
    return Scheduler(SchedulerConfig(**kw), BlockPool(num_blocks, block_size))


def test_admission_in_arrival_order_within_budget():
    sched = make(max_num_batched_tokens=10)
    seqs = [seq(i, 4) for i in range(4)]
    for s in seqs:
        sched.add(s)
    b = sched.schedule()
    assert [(s.seq_id, n) for s, n in b.chunks] == [(0, 4), (1, 4), (2, 2)]  # third is chunked
    assert b.num_tokens == 10 and [s.seq_id for s in sched.waiting] == [3]
    run(sched, b)
    b = sched.schedule()  # decodes first, then the rest of seq 2, then seq 3 within the budget
    assert [(s.seq_id, n) for s, n in b.chunks] == [(0, 1), (1, 1), (2, 2), (3, 4)]


def test_no_chunking_waits_for_room():
    sched = make(max_num_batched_tokens=6, chunked_prefill=False)
    sched.add(seq(0, 4))
    sched.add(seq(1, 4))
    b = sched.schedule()
    assert [(s.seq_id, n) for s, n in b.chunks] == [(0, 4)]


def test_max_num_seqs_limits_the_batch():
    sched = make(max_num_seqs=2)
    for i in range(3):
        sched.add(seq(i, 3))
    assert [s.seq_id for s, _ in sched.schedule().chunks] == [0, 1]


def test_preemption_takes_the_newest_and_resumes_it_first():
    sched = make(num_blocks=4, block_size=4)  # 16 slots
    a, b, c = seq(0, 4), seq(1, 4), seq(2, 3)
    for s in (a, b, c):
        sched.add(s)
    batch = sched.schedule()
    assert len(batch.chunks) == 3 and sched.pool.num_free == 1
    run(sched, batch)  # a: 5 tokens, b: 5, c: 4 -> a and b each need a second block, one is free
    batch = sched.schedule()
    assert batch.preempted == [c] and c.status == Status.WAITING and c.block_table == []
    assert [s.seq_id for s, _ in batch.chunks] == [0, 1]
    assert c.num_computed == 0 and len(c.tokens) == 4 and sched.waiting[0] is c
    run(sched, batch)
    sched.finish(a)
    batch = sched.schedule()  # room again: c is re-prefilled with all its tokens
    assert (c, 4) in batch.chunks


def test_a_sequence_holding_the_whole_pool_that_still_does_not_fit_fails():
    """Alone in a 4-block pool, a sequence of 16 computed tokens needs a 5th block: preempting itself it would be
    recomputed up to here forever, so it leaves the batch and every queue with its blocks freed, reported in
    Batch.failed (blocks needed), and the prompt waiting behind it is admitted in the same step."""
    sched = make(num_blocks=4, block_size=4)
    a, b = seq(0, 16), seq(1, 3)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())  # a takes every block; b waits
    assert sched.pool.num_free == 0 and list(sched.waiting) == [b]
    batch = sched.schedule()
    assert batch.failed == [(a, 5)] and batch.preempted == [] and sched.num_preemptions == 0
    assert [(s.seq_id, n) for s, n in batch.chunks] == [(1, 3)] and sched.running == [b]
    assert a not in sched.waiting and a.block_table == [] and sched.pool.num_used == 1
    assert a.status == Status.FAILED  # not WAITING: it is in no queue and never will be
    sched.finish(a)  # what the engine does next (it fails a's request): found nowhere, nothing held
    assert a.status == Status.FINISHED and sched.running == [b] and sched.pool.num_used == 1


def test_a_failed_sequence_is_never_readmitted_and_finish_ends_it_once():
    """A failed sequence's status says so (FAILED, not WAITING in no queue): later steps neither run nor admit it,
    the scheduler has no work left for it, and finish() ends it - FINISHED, one release event, no block released
    twice (the prompt admitted in its place keeps its block)."""
    sched = make(num_blocks=4, block_size=4)
    released = []
    sched.on_release = released.append
    a, b = seq(0, 16), seq(1, 3)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())
    batch = sched.schedule()
    assert batch.failed == [(a, 5)] and a.status == Status.FAILED
    run(sched, batch)
    for _ in range(3):  # b decodes; a is in no step, queue or admission
        batch = sched.schedule()
        assert [s for s, _ in batch.chunks] == [b] and batch.failed == [] and a not in sched.waiting
        run(sched, batch)
    sched.finish(b)
    assert not sched.has_work() and sched.schedule().chunks == [] and a.status == Status.FAILED
    sched.finish(a)
    assert a.status == Status.FINISHED and released == [b, a] and sched.pool.num_used == 0
    assert all(r >= 0 for r in sched.pool.ref)


def test_a_sequence_waits_while_another_holds_blocks_and_fails_only_alone():
    """An older running sequence holding a block: the one that cannot grow preempts itself (it may fit once the
    other is done) and is not failed; readmitted alone it fits."""
    sched = make(num_blocks=4, block_size=4)
    a, b = seq(0, 3), seq(1, 12)
    sched.add(a)
    sched.add(b)
    run(sched, sched.schedule())
    batch = sched.schedule()  # b's 13th token needs a 4th block, a holds it
    assert batch.failed == [] and batch.preempted == [b] and list(sched.waiting) == [b]
    run(sched, batch)
    sched.finish(a)
    batch = sched.schedule()
    assert batch.failed == [] and [(s.seq_id, n) for s, n in batch.chunks] == [(1, 13)]


def test_a_sequence_that_never_fits_preempts_no_newer_one_for_nothing():
    """The oldest sequence's next chunk needs 6 blocks of a 4-block pool: it fails whatever the newer sequence beside
    it holds. That one was preempted first (and recomputed) for nothing; it keeps its block and decodes."""
    sched = make(num_blocks=4, block_size=4, max_num_batched_tokens=12)
    a, b = seq(0, 30), seq(1, 3)
    sched.add(a)
    run(sched, sched.schedule())  # a: a chunk of 12 in 3 blocks
    sched.pool.append(b.block_table, 0, 3)  # b: running beside it in the 4th block, its prompt computed
    b.num_computed = 3
    b.tokens.append(7)
    sched.add_running(b, a)
    held = list(b.block_table)
    batch = sched.schedule()
    assert batch.failed == [(a, 6)] and batch.preempted == [] and sched.num_preemptions == 0
    assert [(s.seq_id, n) for s, n in batch.chunks] == [(1, 1)] and sched.running == [b] and b.block_table == held
    assert sched.pool.num_used == 1


def test_a_failing_sequences_newer_sibling_goes_with_it():
    """A sample forked after it shares its blocks and the failure ends their request: the sibling leaves the batch
    and the queue (as when it was preempted first), not run in a step its request is failed in."""
    sched = make(num_blocks=4, block_size=4, max_num_batched_tokens=12)
    a = seq(0, 30)
    sched.add(a)
    run(sched, sched.schedule())  # a: a chunk of 12 in 3 blocks
    sib = Sequence(1, a.request, 1, list(a.tokens))
    a.request.seqs = [a, sib]
    sib.block_table, sib.num_computed = sched.pool.fork(a.block_table), 12
    sched.add_running(sib, a)
    batch = sched.schedule()
    assert batch.failed == [(a, 6)] and batch.preempted == [sib] and batch.chunks == []
    assert sched.running == [] and list(sched.waiting) == [] and sched.pool.num_used == 0
    assert a.status == sib.status == Status.FAILED  # its request ends with it: neither waits


def test_a_failed_sequences_waiting_siblings_leave_the_queue():
    """Samples of one request: when the last one holding blocks fails, its request ends, so its preempted sibling is
    not admitted in its place (the engine aborted the request after the step had admitted it). Another request's
    prompt is."""
    sched = make(num_blocks=4, block_size=4)
    a, other = seq(0, 15), seq(2, 3)
    sched.add(a)
    run(sched, sched.schedule())  # a: 16 tokens, 15 computed in 4 blocks
    sib = Sequence(1, a.request, 1, list(a.tokens))  # forked from it
    a.request.seqs = [a, sib]
    sib.block_table, sib.num_computed = sched.pool.fork(a.block_table), 15
    sched.add_running(sib, a)
    sched.add(other)
    batch = sched.schedule()  # a's copy-on-write finds no block, sib is newer: preempted
    assert batch.preempted == [sib] and batch.failed == [] and [s for s, _ in batch.chunks] == [a]
    run(sched, batch)  # a: 16 tokens, needs a 5th block
    batch = sched.schedule()
    assert batch.failed == [(a, 5)] and list(sched.waiting) == [] and sib.status == Status.FAILED
    assert [(s.seq_id, n) for s, n in batch.chunks] == [(2, 3)]


def test_next_batch_keeps_a_failure_of_a_rescheduled_round():
    """A step that reports an early preemption (a KV policy's plan) admits nothing, so next_batch schedules it
    again; a sequence failed in the first round stays reported."""
    sched = make(num_blocks=4, block_size=4, max_num_batched_tokens=11)
    c, a = seq(0, 3), seq(1, 30)
    sched.add(c)
    sched.add(a)
    run(sched, sched.schedule())  # c: 3 tokens, a: a chunk of 8 (2 blocks)
    sched.preempt(c)
    batch = sched.next_batch(idle=True)  # a alone needs 5 blocks for its next 11 tokens
    assert batch.failed == [(a, 5)] and batch.preempted == [c]
    assert [(s.seq_id, n) for s, n in batch.chunks] == [(0, 4)]


def test_running_sequences_are_never_starved_by_new_prompts():
    sched = make(max_num_batched_tokens=8)
    first = seq(0, 8)
    sched.add(first)
    run(sched, sched.schedule())
    for i in range(1, 6):
        sched.add(seq(i, 8))
    for _ in range(5):
        b = sched.schedule()
        assert b.chunks[0] == (first, 1)  # one decode every step, whatever waits
        run(sched, b)


def test_prefix_hits_reuse_full_blocks_and_leave_the_last_token():
    pool = BlockPool(16, 4)
    sched = Scheduler(SchedulerConfig(), pool)
    a = seq(0, 10)
    sched.add(a)
    run(sched, sched.schedule())
    keys = pool.block_keys(a.tokens[:8])
    for i, k in enumerate(keys):
        pool.register(a.block_table[i], k)
    b = seq(1, 9)  # same first 9 tokens: 2 full blocks hit
    sched.add(b)
    batch = sched.schedule()
    assert (b, 1) in batch.chunks and b.num_computed == 8 and b.block_table[:2] == a.block_table[:2]
    assert pool.ref[a.block_table[0]] == 2
    c = seq(2, 8)  # 8 tokens = 2 blocks, but the last token must be computed: only 1 block hits
    sched.add(c)
    batch = sched.schedule()
    assert (c, 4) in batch.chunks and c.num_cached_tokens == 4
    assert pool.stats.hit_blocks == 3 and pool.stats.queried_blocks == 2 + 2 + 1


def test_a_prefix_hit_that_with_its_chunk_outgrows_the_pool_is_shortened():
    """A 40-token prompt whose first 16 tokens are cached, on a 6-block pool, 16 tokens a step: hit + chunk need 8
    blocks, more than the pool ever has (a KV policy's sequence gets this far: it evicts after each chunk). It
    waited for that room forever; now the hit is shortened to 2 blocks, and the prompt is admitted."""
    pool = BlockPool(6, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=16), pool)
    a = seq(0, 17)
    sched.add(a)
    run(sched, sched.schedule())  # a: 16 tokens in 4 blocks, which the prefix cache names
    for b, k in zip(a.block_table, pool.block_keys(a.tokens[:16])):
        pool.register(b, k)
    cached = a.block_table[:2]
    sched.finish(a)
    b = seq(1, 40)
    sched.add(b)
    batch = sched.schedule()
    assert batch.chunks == [(b, 16)] and b.num_cached_tokens == 8 and b.block_table[:2] == cached
    assert pool.num_used == 6


def test_released_prefix_blocks_stay_cached_until_evicted_lru():
    pool = BlockPool(3, 2)
    t = [pool._take() for _ in range(3)]
    for i, b in enumerate(t):
        pool.register(b, 100 + i)
    pool.release([t[0]])
    pool.release([t[1]])
    assert pool.num_free == 2 and pool.lookup([0] * 3) == []
    assert pool._take() == t[0] and 100 not in pool.cached and 101 in pool.cached  # least recently used
    pool.hold(t[1])  # a hit takes it back off the free list
    assert pool.num_free == 0
    with pytest.raises(LmforgeError, match="exhausted"):
        pool._take()


def test_fork_shares_blocks_and_copies_on_write():
    pool = BlockPool(8, 4)
    table = []
    pool.append(table, 0, 6)  # 2 blocks, the second half full
    child = pool.fork(table)
    assert pool.ref[table[1]] == 2 and pool.needed(child, 6, 1) == 1
    copies = pool.append(child, 6, 1)
    assert copies == [(table[1], child[1])] and child[0] == table[0] and child[1] != table[1]
    assert pool.ref[table[1]] == 1 and pool.append(table, 6, 1) == []  # the parent now writes alone
    pool.release(child)
    pool.release(table)
    assert pool.num_free == 8


def _snapshot(p: BlockPool) -> tuple:
    return p.ref, p.filled, p.tokens_held, list(p.fresh), p.peak_used, p.peak_utilization


def test_try_append_is_can_append_then_append():
    """The scheduler's one call: the blocks, copies and fill of append when there is room; None and an
    untouched pool when there is not (copy-on-write blocks counted)."""
    pools, tables = [BlockPool(4, 4), BlockPool(4, 4)], [[], []]
    for pool, table in zip(pools, tables):
        pool.append(table, 0, 6)
    children = [pool.fork(table) for pool, table in zip(pools, tables)]
    for new in (1, 5, 6, 7):  # a CoW copy, then 1, 2, 3 (too many) blocks more
        fits = pools[0].can_append(children[0], 6, new)
        copies = pools[1].try_append(children[1], 6, new)
        assert (copies is not None) == fits
        if fits:
            assert copies == pools[0].append(children[0], 6, new) and children[1] == children[0]
        assert _snapshot(pools[1]) == _snapshot(pools[0])
    with pytest.raises(LmforgeError, match="exhausted"):
        pools[0].append(children[0], 12, 12)


def test_block_accounting_returns_to_empty():
    sched = make(num_blocks=6, block_size=4, max_num_batched_tokens=7)
    seqs = [seq(i, 3 + 2 * i, first=10 * i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    for step in range(40):
        b = sched.schedule()
        run(sched, b)
        for s, _ in b.chunks:
            if len(s.tokens) >= 12 and s.status == Status.RUNNING:
                sched.finish(s)
        if step == 3:
            sched.finish(seqs[4])  # an abort, wherever it is
        if not sched.has_work():
            break
    assert not sched.has_work() and sched.pool.num_free == 6 and all(r == 0 for r in sched.pool.ref)
