"""Draft room in the scheduler (Request.lookahead): reserved only where a sequence drafts, so the prefill that
samples a speculative request's first token (before its n samples fork) leaves the step's budget and blocks to
others; each sample then gets its own room."""

from __future__ import annotations

from lmforge.infer.blocks import BlockPool
from lmforge.infer.request import Request, Sequence
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scheduler import Scheduler, SchedulerConfig


def _request(rid: int, prompt_len: int, lookahead: int = 0, n: int = 1) -> Sequence:
    ids = list(range(prompt_len))
    req = Request(str(rid), None, ids, SamplingParams(n=n, temperature=0.7, seed=1), rid, lookahead=lookahead,
                  max_len=prompt_len + 20)
    req.seqs.append(Sequence(rid, req, 0, list(ids)))
    return req.seqs[0]


def test_the_last_prefill_chunk_reserves_no_draft_room_the_samples_do():
    pool = BlockPool(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=8), pool)
    spec = _request(0, 12, lookahead=3, n=2)
    sched.add(spec)
    batch = sched.schedule()
    assert [(s.seq_id, n) for s, n in batch.chunks] == [(0, 8)]
    spec.num_computed += 8
    other = _request(1, 6)
    sched.add(other)
    batch = sched.schedule()  # the prompt's last 4 tokens sample its first token: no drafts this step
    assert batch.room == {} and [(s.seq_id, n) for s, n in batch.chunks] == [(0, 4), (1, 4)]
    assert len(spec.block_table) == 3  # 12 slots: none held for drafts
    spec.num_computed += 4
    other.num_computed += 4
    spec.request.forked = True  # (the engine forks the n samples from the prefill's logits)
    child = Sequence(2, spec.request, 1, list(spec.tokens))
    child.num_computed, child.block_table = spec.num_computed, pool.fork(spec.block_table)
    sched.add_running(child, spec)
    for s in (spec, child):
        s.tokens.append(7)
    batch = sched.schedule()
    assert batch.room == {0: 3, 2: 3}  # each sample drafts into room of its own
    assert [(s.seq_id, n) for s, n in batch.chunks] == [(0, 1), (2, 1)]  # 2 x (1 + 3): the step's 8 tokens
