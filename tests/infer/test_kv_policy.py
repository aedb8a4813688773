"""KV policies on the engine (lmforge.infer.kv.policy) against an independent reference: a contiguous cache
holding every key at its original position, whose attention sees exactly the keys the policy's definition
keeps (StreamingLLM: the first sinks and the last window; SnapKV: the paper's Eq. 1-2 computed by hand). The
reference replays the engine's own schedule (chunks, forks, preemptions) and scores the engine's tokens:
greedy tokens and every log-prob must agree."""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError, RequestError
from lmforge.infer.blocks import BlockPool
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.kv.policy import H2O, KVPolicy, SnapKV, StreamingLLM
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import run_requests, tiny_model
from .kv_policy_ref import (PROMPT, RefCache, STREAM, StreamingByPosition, check_against, model_of,
                             replay, run, snapkv_by_hand, streaming_keep)



@pytest.mark.parametrize("policy", [StreamingLLM(**STREAM), StreamingByPosition(**STREAM)])
@pytest.mark.parametrize("arch,config", [
    ("llama", dict(chunked_prefill=False)),
    ("llama", dict(max_num_batched_tokens=12)),  # chunked prefill: evictions between chunks of the prompt
    ("llama", dict(cuda_graphs=True)),  # the static-buffer decode step (eager on a CPU): context lengths in slots
    ("llama", dict(async_scheduling=True, max_num_batched_tokens=12)),
    ("mla", dict(max_num_batched_tokens=12)),
])
def test_streaming_llm_equals_the_masked_reference(tok, arch, config, policy):
    """Also with unordered slots (StreamingByPosition): the same keys kept, so the same outputs."""
    model = model_of(arch)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    engine, reqs, log = run(model, tok, EngineConfig(block_size=4, kv_policy=policy, **config),
                            [PROMPT, "a short one"], sp)
    assert check_against(replay(model, log, policy), reqs, greedy=True) == 48
    assert engine.stats()["evicted_tokens"] > 0 and engine.pool.num_used == 0


@pytest.mark.parametrize("kv_tokens,chunk,seed,new,prompts,checked", [
    (64, 16, 1, 20, [PROMPT, "another prompt here"], 120),
    # 48 slots: the plans once preempt every running sequence (their compactions find no free blocks); that step
    # then schedules again and admits from the queue (it raised "could not fit any sequence in the KV pool" with
    # the whole pool free, 2026-12-05)
    (48, 8, 4, 30, [PROMPT, "another prompt"], 180),
])
def test_streaming_llm_with_n_samples_and_preemption(tok, monkeypatch, kv_tokens, chunk, seed, new, prompts, checked):
    """n = 3 samples fork from the compacted prompt (copy-on-write when each evicts), and a pool too small
    for all of them preempts (also a sample whose compaction finds no free block for its copies: a plan is
    never skipped): recomputed from token 0, the policy applied again. Sampled tokens: the reference scores
    the engine's own choices."""
    from lmforge.infer.scheduler import Scheduler

    early, real = [], Scheduler.preempt
    monkeypatch.setattr(Scheduler, "preempt", lambda self, seq, last=False: early.append(seq.seq_id) or
                        real(self, seq, last))
    model = tiny_model("llama")
    policy = StreamingLLM(**STREAM)
    sp = SamplingParams(temperature=1.0, n=3, seed=seed, max_tokens=new, ignore_eos=True, logprobs=0)
    engine, reqs, log = run(model, tok, EngineConfig(block_size=4, kv_policy=policy, num_kv_tokens=kv_tokens,
                                                      max_num_batched_tokens=chunk), prompts, sp)
    assert engine.stats()["preemptions"] >= len(early) > 0
    assert all(log)  # every step ran chunks
    assert check_against(replay(model, log, policy), reqs, greedy=False) == checked
    assert engine.pool.num_used == 0


@pytest.mark.parametrize("positions", ["original", "cache"])
def test_beams_under_a_policy_are_pool_checked_without_shared_blocks(tok, positions):
    """A policy's compactions write each beam's kept keys to blocks of its own, so the pool check counts no prompt
    block as shared: a 3-beam request that fit only by sharing (it then deadlocked after a preemption: the idle
    beams held the blocks the preempted one needed) is refused with one line; a pool of 9 blocks runs it."""
    model = tiny_model("llama", max_seq_len=48)
    policy = StreamingLLM(sink_tokens=4, window=8, slack=1, positions=positions)
    sp = SamplingParams(temperature=0, beam_width=3, max_tokens=5, ignore_eos=True)
    prompt = PROMPT[:17]
    small = Engine(model, tok, EngineConfig(block_size=8, kv_policy=policy, num_kv_tokens=40, max_num_seqs=4))
    with pytest.raises(LmforgeError, match="in 3 beams needs 9 KV blocks but the pool has 5"):
        small.add_request(prompt, sp)
    engine = Engine(model, tok, EngineConfig(block_size=8, kv_policy=policy, num_kv_tokens=72, max_num_seqs=4))
    engine.add_request(prompt, sp)
    while engine.has_unfinished():
        outs = engine.step()
    assert len(outs[0].outputs[0].token_ids) == 5 and engine.pool.num_used == 0


@pytest.mark.parametrize("policy", [H2O(heavy=6, recent=4, per_head=False), StreamingLLM(window=8)])
def test_beam_searches_waiting_on_each_others_blocks_make_progress(tok, policy):
    """Two width-3 beam searches on a 12-block pool: the idle beams of each held the blocks that the other's
    preempted beams needed, and every running beam waited on a sibling ("could not fit any sequence", 2026-12-05).
    The newest request's beams now give their blocks back and recompute later; each request gets the beams it
    gets alone. (Prefix caching off: with it the second prompt shares the first's named prompt blocks, and the
    pool no longer runs short.)"""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, beam_width=3, max_tokens=5, ignore_eos=True)
    prompts = [PROMPT[:11], PROMPT[:10]]
    config = dict(block_size=4, kv_policy=policy, max_num_seqs=4, max_num_batched_tokens=64, prefix_caching=False)
    alone = [run_requests(Engine(model, tok, EngineConfig(**config)), [(p, sp)])[0] for p in prompts]
    engine = Engine(model, tok, EngineConfig(**config, num_kv_tokens=48))
    outs = run_requests(engine, [(p, sp) for p in prompts])
    assert engine.stats()["preemptions"] > 0 and engine.pool.num_used == 0
    for got, want in zip(outs, alone):
        assert [o.token_ids for o in got.outputs] == [o.token_ids for o in want.outputs]


class _Mixed:
    def plan(self, seq, state):
        keep = super().plan(seq, state)
        return keep if keep is None or seq.seq_id % 2 == 0 else torch.tensor(keep).expand(2, 2, -1)


class MixedForms(_Mixed, StreamingLLM):
    """StreamingLLM's keep, as a host list for even sequence ids and an (L, kv heads, K) tensor for odd ones."""


class MixedByPosition(_Mixed, StreamingByPosition):
    """The same with unordered slots: host-list destinations and per-head ones in one step's copy."""


@pytest.mark.parametrize("kind", [MixedForms, MixedByPosition])
@pytest.mark.parametrize("config,n", [(dict(chunked_prefill=False), 1),
                                      (dict(num_kv_tokens=64, max_num_batched_tokens=16), 3)])
def test_a_steps_compactions_are_one_copy_per_pool(tok, config, n, kind):
    """Sequences compacting in the same step (every step under H2O or TOVA) share one cache.compact: one
    gather and one write per pool, sources of every form widened to (L, heads, M); every source is read
    before any destination is written (a block one compaction releases may be another's fresh block).
    Same outputs as the reference: greedy, and n = 3 samples under preemption (a prefix hit, PROMPT[:21])."""
    model = tiny_model("llama")
    policy = kind(**STREAM)
    engine = Engine(model, tok, EngineConfig(block_size=4, kv_policy=policy, **config))
    calls, real = [], engine.runner.cache.compact
    engine.runner.cache.compact = lambda src, dst: calls.append(src.dim()) or real(src, dst)
    log, per_step, real_exec = [], [], engine.runner.execute

    def spy(batch, *a, **k):
        per_step.append((len(calls), engine.kv_policy.compactions))
        log.append([(seq, seq.num_computed, n) for seq, n in batch.chunks])
        return real_exec(batch, *a, **k)
    engine.runner.execute = spy
    retried, real_room = set(), engine.scheduler.preempt_for  # a compaction that found no room is retried
    engine.scheduler.preempt_for = lambda seq, retry: retried.add(len(per_step)) or real_room(seq, retry)
    sp = SamplingParams(temperature=0 if n == 1 else 1.0, n=n, seed=2, max_tokens=20, ignore_eos=True, logprobs=0)
    prompts = (PROMPT, "a short one", PROMPT[:21], "yes")[:4 if n == 1 else 3]
    reqs = [engine.requests[engine.add_request(p, sp)] for p in prompts]
    while engine.has_unfinished():
        engine.step()
    steps = [(c1 - c0, k1 - k0, i + 1 in retried) for i, ((c0, k0), (c1, k1)) in enumerate(zip(per_step, per_step[1:]))]
    assert all(c <= 1 + again for c, _, again in steps)  # one copy per round of compactions (the retries: one more)
    assert bool(retried) == (n > 1)  # (the samples under preemption: a compaction retried)
    assert max(k for c, k, _ in steps if c == 1) >= 2  # several sequences, one copy
    assert 3 in calls and check_against(replay(model, log, policy), reqs, greedy=n == 1) == 20 * n * len(prompts)
    assert (engine.stats()["preemptions"] > 0) == (n > 1) and engine.pool.num_used == 0
    assert engine.pool.stats.hit_blocks > 0  # replay: a prefix hit is planned after its first chunk


def test_whole_block_eviction_moves_table_entries_and_releases_blocks(tok):
    """sink_tokens and slack multiples of the block size: each eviction drops whole middle blocks from the
    table (no key is copied) and hands them back to the pool."""
    model = tiny_model("llama")
    policy = StreamingLLM(sink_tokens=4, window=8, slack=4)
    engine = Engine(model, tok, EngineConfig(block_size=4, kv_policy=policy, chunked_prefill=False))
    moved, real = [], engine.runner.cache.compact
    engine.runner.cache.compact = lambda *a: moved.append(a) or real(*a)
    rid = engine.add_request(PROMPT[:16], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    seq, held = engine.requests[rid].seqs[0], []
    while engine.has_unfinished():
        engine.step()
        if seq.status.value == "running":
            held.append((seq.num_computed, seq.num_slots, len(seq.block_table), engine.pool.num_used,
                         engine.stats()["evicted_tokens"]))
    assert moved == []  # 16-token prompt, then 4 more keys at a time: every eviction drops one whole block
    assert all(s <= 4 + 8 + 4 and b == -(-s // 4) == used and ev == pos - s for pos, s, b, used, ev in held)
    assert held[-1][0] == 16 + 28 and engine.stats()["evicted_tokens"] == 8 * 4 == engine.stats()["kv_compactions"] * 4
    assert engine.stats()["peak_used_blocks"] == 4 and engine.pool.num_used == 0  # without the policy: 12


@pytest.mark.parametrize("arch,config,n", [
    ("llama", dict(max_num_batched_tokens=20), 1),  # the observation window straddles two prefill chunks
    ("llama", dict(async_scheduling=True, max_num_batched_tokens=20), 1),
    ("llama", dict(), 2),  # two samples fork from the compacted prompt and share its blocks
    ("mla", dict(max_num_batched_tokens=20), 1),  # one latent head: every query head's attention summed
])
def test_snapkv_keeps_what_the_papers_equations_pick_and_decodes_like_the_reference(tok, arch, config, n):
    """The kept slots per (layer, kv head) equal Eq. 1-2 with pooling, computed by hand from the reference's
    probabilities, and decoding over them equals the reference's attention over exactly those keys."""
    model = model_of(arch)
    heads = 1 if arch == "mla" else 2
    policy = SnapKV(budget=7, window=5, pool_kernel=3, pooling="avg")
    sp = SamplingParams(temperature=0 if n == 1 else 1.0, n=n, seed=3, max_tokens=10, ignore_eos=True, logprobs=0)
    engine = Engine(model, tok, EngineConfig(block_size=4, kv_policy=policy, **config))
    kept, real = [], engine.kv_policy.compact
    engine.kv_policy.compact = lambda seq, keep, *a: kept.append(keep.clone()) or real(seq, keep, *a)
    log, real_exec = [], engine.runner.execute

    def spy(batch, *a, **k):
        log.append([(seq, seq.num_computed, n) for seq, n in batch.chunks])
        return real_exec(batch, *a, **k)
    engine.runner.execute = spy
    ids = tok.encode(PROMPT)
    P = len(ids)
    req = engine.requests[engine.add_request(ids, sp)]
    while engine.has_unfinished():
        engine.step()
    assert len(kept) == 1 and kept[0].shape[:2] == (2, heads)  # once, before the forks: they share it
    assert engine.stats()["evicted_tokens"] == P - 5 - 7 and engine.pool.num_used == 0

    def on_prefill(seq, ref, start):
        if start == P:  # the prompt is computed: the reference keeps what the equations pick
            keep = []
            for layer, js_of in enumerate(snapkv_by_hand(ref.probs, P, 7, 5, 3, "avg", heads)):
                k = torch.zeros(heads, ref.length, dtype=torch.bool)
                for h, js in enumerate(js_of):
                    k[h, js] = True
                    k[h, P - 5:] = True
                assert kept[0][layer, :, :7].tolist() == js_of
                keep.append(k)
            ref.keep_positions(keep)

    assert check_against(replay(model, log, policy, on_prefill), [req], greedy=n == 1) == 10 * n


def test_snapkv_pooling_max_and_short_prompts(tok):
    """Max pooling picks by hand too; a prompt of at most budget + window tokens is kept whole (Algorithm 1)."""
    model = tiny_model("llama")
    policy = SnapKV(budget=6, window=4, pool_kernel=5, pooling="max")
    engine = Engine(model, tok, EngineConfig(block_size=4, kv_policy=policy))
    kept = []
    real = engine.kv_policy.compact
    engine.kv_policy.compact = lambda seq, keep, *a: kept.append(keep.clone()) or real(seq, keep, *a)
    ids = tok.encode(PROMPT)
    engine.add_request(ids, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.add_request(ids[:10], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    ref = RefCache(2, 2)
    with torch.no_grad():
        model(torch.tensor([ids]), positions=torch.arange(len(ids))[None], cache=ref)
    want = snapkv_by_hand(ref.probs, len(ids), 6, 4, 5, "max", 2)  # max pooling ties: compare pooled values
    assert len(kept) == 1
    for layer in range(2):
        for h in range(2):
            got = kept[0][layer, h, :6].tolist()
            assert got == want[layer][h] or _ties(ref.probs[layer], h, len(ids), got, want[layer][h])
    assert engine.stats()["evicted_tokens"] == len(ids) - 4 - 6


@pytest.mark.parametrize("kind", [StreamingLLM, StreamingByPosition])
def test_beam_search_beams_keep_their_own_windows(tok, kind):
    """Beams fork from live beams every round (each fork applies its parent's plan first) and drop: each
    final hypothesis's log-probs equal a linear reference over its own tokens (prompt in one chunk, then one
    token at a time, StreamingLLM's rule before each)."""
    model = tiny_model("llama")
    policy = kind(**STREAM)
    engine = Engine(model, tok, EngineConfig(block_size=4, kv_policy=policy, chunked_prefill=False))
    rid = engine.add_request(PROMPT, SamplingParams(beam_width=3, n=3, temperature=0, max_tokens=12, ignore_eos=True,
                                                     logprobs=0))
    outs = None
    while engine.has_unfinished():
        outs = next((o for o in engine.step() if o.request_id == rid), outs)
    ids = tok.encode(PROMPT)
    assert len(outs.outputs) == 3 and engine.stats()["evicted_tokens"] > 0 and engine.pool.num_used == 0
    for out in outs.outputs:
        ref, tokens, pos = RefCache(2, 2), ids + out.token_ids, 0
        for n in [len(ids)] + [1] * (len(out.token_ids) - 1):
            streaming_keep(ref, policy.sink_tokens, policy.window, policy.slack)
            with torch.no_grad():
                lp = model(torch.tensor([tokens[pos:pos + n]]), positions=torch.arange(pos, pos + n)[None],
                           cache=ref)[0, -1].log_softmax(-1)
            pos += n
            assert abs(float(lp[tokens[pos]]) - out.logprobs[pos - len(ids)]) < 2e-4


def _ties(probs, h: int, P: int, got: list[int], want: list[int]) -> bool:
    """got and want are both top-6 of the max-pooled scores (they differ only among equal values)."""
    p = torch.cat(probs, 1)[h * 2:(h + 1) * 2, P - 4:P, :P - 4].sum((0, 1))
    pooled = torch.nn.functional.max_pool1d(p[None], 5, stride=1, padding=2)[0]
    return sorted(pooled[got].tolist()) == pytest.approx(sorted(pooled[want].tolist()), abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", [StreamingLLM(**STREAM), StreamingLLM(sink_tokens=4, window=8, slack=4),
                                    StreamingByPosition(**STREAM)])
def test_gpu_backends_read_compacted_sequences(tok, policy):
    """On a GPU the defaults run: the Triton decode kernel and varlen prefill kernel (context lengths in
    slots), replayed CUDA graphs, async scheduling; the batch-1 kernel step is off. Same as the reference."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=0)
    engine, reqs, log = run(copy.deepcopy(model).cuda(), tok, EngineConfig(block_size=4, kv_policy=policy,
                                                                              max_num_batched_tokens=12),
                            [PROMPT, "a short one"], sp)
    assert engine.runner.kernel_step is None and engine.async_scheduling
    assert check_against(replay(model, log, policy), reqs, greedy=True) == 48


def test_no_policy_and_a_policy_that_never_evicts_are_bit_identical(tok):
    """A policy that keeps everything changes nothing: same tokens, bit-equal log-probs, slots = positions."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)

    def outs(policy):
        engine = Engine(model, tok, EngineConfig(block_size=4, kv_policy=policy, max_num_batched_tokens=12))
        rids = [engine.add_request(p, sp) for p in (PROMPT, "hi")]
        got = {}
        while engine.has_unfinished():
            got.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
        assert engine.stats()["evicted_tokens"] == 0
        return [(got[r].token_ids, got[r].logprobs) for r in rids]

    assert outs(None) == outs(StreamingLLM(window=1000))


@pytest.mark.parametrize("kind", [StreamingLLM, StreamingByPosition])
def test_prefix_cache_never_hands_out_lossy_blocks(tok, kind):
    """A prompt computed in one chunk is lossless: its blocks are named before the first eviction and never
    written after it (a compaction writes fresh blocks), so the same prompt again hits them and decodes the
    same. A chunk computed after an eviction saw a lossy context: its blocks are never named."""
    model = tiny_model("llama")
    policy = kind(**STREAM)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    engine = Engine(model, tok, EngineConfig(block_size=4, kv_policy=policy, chunked_prefill=False))
    first = engine.requests[engine.add_request(PROMPT, sp)]
    while engine.has_unfinished():
        engine.step()
    assert len(engine.pool.cached) == len(PROMPT) // 4  # the prompt's full blocks, none after the eviction
    second = engine.requests[engine.add_request(PROMPT, sp)]
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.stats.hit_blocks == (len(PROMPT) - 1) // 4
    assert second.seqs[0].tokens == first.seqs[0].tokens and second.seqs[0].logprobs == pytest.approx(
        first.seqs[0].logprobs, abs=1e-5)
    chunked = Engine(model, tok, EngineConfig(block_size=4, kv_policy=policy, max_num_batched_tokens=12))
    chunked.add_request(PROMPT, sp)
    while chunked.has_unfinished():
        chunked.step()
    # chunks of 12: 24 keys held before the first eviction; the chunks after it saw a lossy context
    assert len(chunked.pool.cached) == 24 // 4 < len(PROMPT) // 4


@pytest.mark.parametrize("policy,hits", [(StreamingLLM(**STREAM), (len(PROMPT) - 1) // 4),
                                          (SnapKV(budget=7, window=6, pool_kernel=3), (len(PROMPT) - 6) // 4)])
def test_n_samples_name_their_prompt_blocks_before_the_fork_compacts(tok, policy, hits):
    """n > 1: the fork after the prompt's step compacts the parent first (the samples share its compacted
    blocks), and a sequence that evicted is never named, so the lossless prompt blocks were never named and the
    same prompt again hit nothing (0 of its blocks). They are named before that compaction, as with n = 1."""
    model = tiny_model("llama")
    engine = Engine(model, tok, EngineConfig(block_size=4, kv_policy=policy, chunked_prefill=False))
    sp = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, n=2, seed=3, logprobs=0)
    outs = []
    for _ in range(2):
        req = engine.requests[engine.add_request(PROMPT, sp)]
        while engine.has_unfinished():
            engine.step()
        outs.append([(s.tokens, s.logprobs) for s in req.seqs])
    assert engine.pool.stats.hit_blocks == hits > 0
    assert [t for t, _ in outs[1]] == [t for t, _ in outs[0]]
    for (_, a), (_, b) in zip(outs[0], outs[1]):
        assert b == pytest.approx(a, abs=1e-5)


def test_snapkv_computes_its_window_after_a_prefix_hit(tok):
    """The same prompt again: its leading blocks come from the prefix cache (lossless: named before the
    compaction, never written after), the observation window is computed (observed_tail), so SnapKV picks
    the same keys and the outputs match."""
    model = tiny_model("llama")
    engine = Engine(model, tok, EngineConfig(block_size=4, kv_policy=SnapKV(budget=7, window=6, pool_kernel=3)))
    kept, real = [], engine.kv_policy.compact
    engine.kv_policy.compact = lambda seq, keep, *a: kept.append(keep.clone()) or real(seq, keep, *a)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    outs = []
    for _ in range(2):
        req = engine.requests[engine.add_request(PROMPT, sp)]
        while engine.has_unfinished():
            engine.step()
        outs.append((req.seqs[0].tokens, req.seqs[0].logprobs))
    P = len(tok.encode(PROMPT))
    assert engine.pool.stats.hit_blocks == (P - 6) // 4 > 0  # every full block before the window
    assert torch.equal(kept[0], kept[1]) and outs[0][0] == outs[1][0]
    assert outs[1][1] == pytest.approx(outs[0][1], abs=1e-5)


def test_pool_compaction_copies_shared_and_named_blocks_and_keeps_fills():
    pool = BlockPool(12, 4)
    table = []
    pool.append(table, 0, 14)  # 4 blocks: 4, 4, 4, 2 tokens
    pool.register(table[0], 11)
    child = pool.fork(table)  # every block shared
    old = list(table)
    write = pool.compact(table, [0, None, 3], 10)  # keep block 0 as is, write block 1, move block 3 to 2
    assert write == [1] and table[0] == old[0] and table[2] == old[3]
    assert table[1] not in old  # block 1 was shared: written into a fresh block
    assert [pool.ref[b] for b in old] == [2, 1, 1, 2] and pool.ref[table[1]] == 1
    pool.release(child)
    assert pool.num_used == 3 and pool.tokens_held == 10
    mine = []
    pool.append(mine, 0, 8)
    assert pool.compact(mine, [None], 3) == [0] and pool.num_used == 4 and mine[0] in range(12)
    # a block moved whole to the partly filled end: later keys are written into it, so a shared one is copied
    pool, table = BlockPool(12, 4), []
    pool.append(table, 0, 12)
    other, old = pool.fork(table), list(table)
    assert pool.compact(table, [0, 2], 6) == [1] and table[0] == old[0] and table[1] not in old
    assert other == old and [pool.ref[b] for b in old] == [2, 1, 1]  # the other holder keeps its blocks
    mine = []
    pool.append(mine, 0, 12)
    old = list(mine)
    assert pool.compact(mine, [0, 2], 6) == [] and mine == [old[0], old[2]] and pool.filled[old[2]] == 2


def filled_caches(*models):
    """(paged cache of 6 blocks of 4 filled with noise, a copy of its pools, kv heads per pool row) per model."""
    from lmforge.infer.kv.paged import PagedKVCache, PagedLatentCache

    for model in models:
        spec = model.cache_spec()
        cache = (PagedLatentCache if spec.latent else PagedKVCache)(spec, 6, 4)
        for p in cache.pools():
            p.copy_(torch.randn_like(p))
        yield cache, [p.clone() for p in cache.pools()], 1 if spec.latent else 2


def test_compaction_moves_every_layers_keys_and_mla_latents(tok):
    """cache.compact: per-head slots for K/V pools, one slot list for MLA's latents and rope keys."""
    for cache, before, heads in filled_caches(tiny_model("llama"), model_of("mla")):
        src = torch.tensor([[[5, 9, 22][:3] if h == 0 else [6, 7, 21] for h in range(heads)]] * 2)
        cache.compact(src, torch.tensor([0, 1, 2]))
        for i, (b, p) in enumerate(zip(before, cache.pools())):
            fb, fp = b.flatten(0, 1), p.flatten(0, 1)
            for h in range(heads):
                sel = fb[src[0, h]] if fp.dim() == 2 else fb[src[0, h], h]
                got = fp[:3] if fp.dim() == 2 else fp[:3, h]
                torch.testing.assert_close(got, sel)


def test_cache_compact_with_per_head_destinations():
    """cache.compact(src, dst) with dst (L, heads, M): kv head h's key at src[l, h, m] goes to dst[l, h, m]
    (each head fills its own holes); heads = 1 moves whole rows (MLA latents, every head alike). Sources are
    read before any write (a chain of moves through one slot)."""
    for cache, before, heads in filled_caches(tiny_model("llama"), model_of("mla")):
        src = torch.tensor([[[9, 3, 22], [6, 7, 21]][:heads], [[1, 2, 3], [4, 5, 6]][:heads]])
        dst = torch.tensor([[[3, 0, 9], [7, 21, 6]][:heads], [[8, 9, 10], [0, 1, 2]][:heads]])
        cache.compact(src, dst)
        for i, (b, p) in enumerate(zip(before, cache.pools())):
            layer, fb, fp, want = i % 2, b.flatten(0, 1), p.flatten(0, 1), b.flatten(0, 1).clone()
            for h in range(heads):
                if fp.dim() == 2:
                    want[dst[layer, h]] = fb[src[layer, h]]
                else:
                    want[dst[layer, h], h] = fb[src[layer, h], h]
            assert torch.equal(fp, want)


def test_pool_compact_in_place_makes_written_blocks_private():
    """Unordered compaction's pool step: the first blocks stay where they are when private; a block another
    sequence holds or the prefix cache names is replaced by a fresh one (the others keep the old one); blocks
    past the end are released (also counted as room: the caller reads them before writing); fills follow."""
    pool = BlockPool(8, 4)
    table = []
    pool.append(table, 0, 15)  # 4 blocks: 4, 4, 4, 3 tokens
    pool.register(table[0], 11)
    child = pool.fork(table)
    pool.release(child[1:])  # the child keeps block 0; blocks 1-3 are this sequence's only
    old = list(table)
    assert pool.compact_in_place(table, 7) == [0] and table[1] == old[1] and table[0] not in old
    assert pool.ref[old[0]] == 1 and pool.key[old[0]] == 11 and pool.ref[old[2]] == pool.ref[old[3]] == 0
    assert pool.filled[table[0]] == 4 and pool.filled[table[1]] == 3 and pool.tokens_held == 4 + 7
    mine = []
    pool.append(mine, 0, 8)
    assert pool.compact_in_place(mine, 5) == [] and len(mine) == 2 and pool.tokens_held == 4 + 7 + 5
    full, other = BlockPool(3, 4), []
    full.append(other, 0, 8)
    shared = full.fork(other)
    full.append(shared, 8, 1)  # 3 blocks in use, none free: replacing block 0 or 1 needs room
    assert full.compact_in_place(other, 5) is None and full.ref[other[0]] == 2  # nothing changed
    assert full.compact_in_place(shared, 5) is None  # two to replace, one released
    assert full.compact_in_place(shared, 4) == [0] and full.num_used == 3  # the released tail made room
    assert shared[0] not in other and full.ref[other[0]] == full.ref[other[1]] == 1
    named, table = BlockPool(2, 4), []
    named.append(table, 0, 8)
    named.register(table[0], 1), named.register(table[1], 2)
    old = list(table)  # no free block: replacing the two named ones takes them back (read before written)
    assert named.compact_in_place(table, 6) == [0, 1] and sorted(table) == sorted(old) and not named.cached
    assert named.num_used == 2 and named.tokens_held == 6


class NoSpec(torch.nn.Module):
    """A causal LM without cache_spec(): the engine runs it on the recompute runner."""

    max_seq_len, vocab_size = 64, 257

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))


class KeepTooMany(KVPolicy):
    def plan(self, seq, state):
        return list(range(seq.num_slots)) if seq.num_slots > 20 else None


class KeepWrongShape(KVPolicy):
    def plan(self, seq, state):
        return torch.zeros(3, 2, 4, dtype=torch.long) if seq.num_slots > 20 else None


def test_refusals(tok):
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="speculative decoding"):
        Engine(model, tok, EngineConfig(kv_policy=StreamingLLM(window=8)), draft="ngram")
    with pytest.raises(ConfigError, match="windows on cache slots"):
        Engine(tiny_model("llama", sliding_window=5), tok, EngineConfig(kv_policy=StreamingLLM(window=8)))
    with pytest.raises(ConfigError, match="kernel_step=True"):
        Engine(model, tok, EngineConfig(kv_policy=StreamingLLM(window=8), kernel_step=True))
    with pytest.raises(ConfigError, match="kv_policy must be a KVPolicy"):
        EngineConfig(kv_policy="streaming")
    with pytest.raises(ConfigError, match="window must be >= 1"):
        StreamingLLM(window=0)
    with pytest.raises(ConfigError, match="pool_kernel must be odd"):
        SnapKV(budget=4, pool_kernel=4)
    engine = Engine(model, tok, EngineConfig(kv_policy=KeepTooMany()))
    engine.add_request(PROMPT, SamplingParams(max_tokens=3))
    with pytest.raises(LmforgeError, match="KeepTooMany.plan kept"):
        while engine.has_unfinished():
            engine.step()
    engine = Engine(model, tok, EngineConfig(kv_policy=KeepWrongShape()))
    engine.add_request(PROMPT, SamplingParams(max_tokens=3))
    with pytest.raises(LmforgeError, match=r"KeepWrongShape.plan returned a tensor of shape \(3, 2, 4\)"):
        while engine.has_unfinished():
            engine.step()
    with pytest.raises(ConfigError, match="ordered_slots must be True"):
        Engine(model, tok, EngineConfig(kv_policy=type("Odd", (KeepTooMany,), {"ordered_slots": "no"})()))
    # the refusal names the fix too: the model as lmforge's Transformer (HFCausalLM has no cache_spec()), or no policy
    with pytest.raises(ConfigError, match=r"recompute runner.*Transformer\.from_pretrained.*or drop kv_policy"):
        Engine(NoSpec(), tok, EngineConfig(kv_policy=StreamingLLM(window=8)))


@pytest.mark.parametrize("kind", ["ssm", "hybrid"])
def test_recurrent_state_models_are_refused_for_their_own_reason(tok, kind):
    """A model with recurrent-state layers is refused naming those layers (it was refused with the sliding-window
    reason, masks measuring windows on slots, which such a model does not have) and the fix."""
    from .state_models import tiny_state_model

    with pytest.raises(ConfigError, match=r"recurrent-state layers .*keep no keys.*drop kv_policy") as e:
        Engine(tiny_state_model(kind), tok, EngineConfig(kv_policy=StreamingLLM(window=8)))
    assert "windows on cache slots" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="windows on cache slots"):  # the sliding-window refusal is unchanged
        Engine(tiny_model("llama", sliding_window=5), tok, EngineConfig(kv_policy=StreamingLLM(window=8)))


class PaddedPyramid(KVPolicy):
    """PyramidKV's wish (fewer keys in upper layers) forced into one K: layer 1's 8 newest slots, padded to
    layer 0's 16 by repeating one of them (attention would count that key 9 times)."""

    def plan(self, seq, state):
        n = seq.num_slots
        if n < 20:
            return None
        upper = [n - 8] * 8 + list(range(n - 8, n))
        return torch.tensor([[list(range(n - 16, n))] * 2, [upper] * 2])


class PaddedUnordered(PaddedPyramid):
    ordered_slots = False

    def plan(self, seq, state):
        keep = super().plan(seq, state)
        return None if keep is None else keep.flip(-1)  # (any order along K; still one slot repeated)


class OutOfRange(KVPolicy):
    def plan(self, seq, state):
        n = seq.num_slots
        return torch.tensor([[list(range(n - 4, n))] * 2, [list(range(n - 3, n + 1))] * 2]) if n >= 20 else None


@pytest.mark.parametrize("policy,match", [
    (PaddedPyramid(), r"PaddedPyramid.plan repeats a slot in layer 1, kv head 0 of sequence 0: keep K distinct"),
    (PaddedUnordered(), r"PaddedUnordered.plan repeats a slot in layer 1, kv head 0 of sequence 0"),
    (OutOfRange(), r"OutOfRange.plan keeps a slot outside \[0, \d+\) in layer 1, kv head 0"),
])
def test_a_tensor_plan_with_repeated_or_outside_slots_is_refused(tok, policy, match):
    """A per-layer budget padded by repeating a slot was accepted silently (a tensor plan's values were never
    read) and attention double-counted the key. CPU tensors are now checked (free: no device sync); the error
    names the policy, the layer and head, and what to return."""
    engine = Engine(tiny_model("llama"), tok, EngineConfig(block_size=4, kv_policy=policy))
    engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    with pytest.raises(LmforgeError, match=match) as err:
        while engine.has_unfinished():
            engine.step()
    assert "\n" not in str(err.value) and engine.stats()["kv_compactions"] == 0


class PaddedChecked(PaddedPyramid):
    check_plans = True  # (a device plan's values are read only then: a sync per compaction)

    def plan(self, seq, state):
        keep = super().plan(seq, state)
        return None if keep is None else keep.cuda()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_check_plans_reads_a_device_plan(tok):
    engine = Engine(tiny_model("llama").cuda(), tok, EngineConfig(block_size=4, kv_policy=PaddedChecked()))
    engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    with pytest.raises(LmforgeError, match="PaddedChecked.plan repeats a slot in layer 1, kv head 0"):
        while engine.has_unfinished():
            engine.step()


def test_the_guide_runs(tmp_path, monkeypatch):
    """docs/kv_policies.md's python blocks run as written (their asserts check real values)."""
    from ..test_docs import run_guide

    monkeypatch.chdir(tmp_path)
    scope, _ = run_guide("kv_policies.md")
    assert scope["stats"]["kv_compactions"] > 0


def test_a_streaming_request_longer_than_the_pool_runs_in_bounded_blocks(tok):
    """add_request sizes its pool check with the policy's max_slots: a StreamingLLM request of 100 tokens on a
    16-block pool (which refuses it without the policy) runs, holds at most max_slots keys, and decodes exactly
    as on a pool large enough for everything."""
    model = tiny_model("llama")
    policy = StreamingLLM(sink_tokens=4, window=16, slack=4)
    prompt, params = list(range(1, 41)), SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, logprobs=0)
    small = dict(block_size=4, max_num_batched_tokens=8, num_kv_tokens=64)
    with pytest.raises(LmforgeError, match="needs 25 KV blocks but the pool has 16"):
        Engine(model, tok, EngineConfig(**small)).add_request(prompt, params)

    outs = []
    for tokens in (64, 512):
        engine = Engine(model, tok, EngineConfig(**{**small, "num_kv_tokens": tokens}, kv_policy=policy))
        engine.add_request(prompt, params)
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    outs.append(out.outputs[0])
        assert engine.stats()["preemptions"] == 0
        assert engine.stats()["peak_used_blocks"] <= engine.pool.blocks_for(policy.max_slots(len(prompt), 8)) + 1
    assert outs[0].token_ids == outs[1].token_ids and outs[0].logprobs == outs[1].logprobs
    assert len(outs[0].token_ids) == 60


@pytest.mark.parametrize("positions", ["original", "cache"])
def test_a_prefix_hit_too_long_for_the_pool_with_its_chunk_is_shortened(tok, positions):
    """Two requests of one 49-token prompt on a 6-block pool: the second finds the first's lossless chunk (16 tokens)
    cached, but that hit and its 16-token chunk need 8 blocks, more than the pool (add_request counted the policy's
    bound of keys, 20: it evicts after each chunk). It waited for room it would never get, and the step raised
    "could not fit any sequence" for both requests; now the hit is shortened to fit, and the outputs follow the
    policy (the reference replays the schedule)."""
    model = tiny_model("llama", max_seq_len=32 if positions == "cache" else 128)
    policy = StreamingLLM(sink_tokens=2, window=1, slack=2, positions=positions)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    config = EngineConfig(block_size=4, max_num_batched_tokens=16, num_kv_tokens=24, kv_policy=policy)
    engine, reqs, log = run(model, tok, config, [list(range(1, 50))] * 2, sp, max_steps=100)
    assert check_against(replay(model, log, policy), reqs, greedy=True) == 8
    assert reqs[1].seqs[0].num_cached_tokens == 4 and engine.pool.num_used == 0  # 1 of the 4 blocks cached


@dataclass(frozen=True, kw_only=True)
class UnderReported(StreamingLLM):
    """A policy whose max_slots under-reports: it holds up to sink_tokens + window + slack keys, not 8."""

    def max_slots(self, prompt_len: int, chunk: int) -> int:
        return 8


@pytest.mark.parametrize("prefix_caching,overlap", [(False, False), (True, False), (False, True)])
def test_a_sequence_outgrowing_the_whole_pool_fails_alone(tok, prefix_caching, overlap):
    """add_request's pool check trusts max_slots (8 keys), but the sequence grows to 64 keys, the whole 16-block
    pool, and its next token needs a 17th block. It was preempted and recomputed forever (prefix caching off), or
    the step raised 'could not fit any sequence' for the whole engine (on: its readmission hit its own blocks).
    Now its request fails with a one-line RequestError; the request beside it decodes as it does alone (also with
    async scheduling: the failed sequence's token still in flight is dropped)."""
    model = tiny_model("llama")
    policy = UnderReported(sink_tokens=4, window=60)
    config = EngineConfig(block_size=4, max_num_batched_tokens=8, num_kv_tokens=64, kv_policy=policy,
                          prefix_caching=prefix_caching, async_scheduling=overlap)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine = Engine(model, tok, config)
    long_id, short_id = engine.add_request(list(range(1, 41)), params), engine.add_request(list(range(50, 60)), short)
    outs = {}
    for _ in range(200):  # a bound: a regression fails here instead of hanging
        if not engine.has_unfinished():
            break
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    assert not engine.has_unfinished() and engine.pool.num_used == 0
    err = outs[long_id].error
    assert isinstance(err, RequestError) and err.request_id == long_id
    assert str(err) == (f"request {long_id!r}: its sequence needs 17 KV blocks for its next step but the "
                        "pool has 16; raise num_kv_tokens (or gpu_memory_utilization), or fix UnderReported.max_slots "
                        "(add_request checked the pool against its bound of 8 keys; the sequence holds 64)")
    # 25 tokens make 65 keys (the last is never computed); async scheduling drops the 25th, in flight at the abort
    assert outs[long_id].outputs[0].finish_reason == "abort" and len(outs[long_id].outputs[0].token_ids) == 25 - overlap
    alone = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=8, kv_policy=policy))
    alone.add_request(list(range(50, 60)), short)
    while alone.has_unfinished():
        done = [o for o in alone.step() if o.finished]
    assert outs[short_id].error is None and outs[short_id].outputs[0].token_ids == done[0].outputs[0].token_ids
    assert len(done[0].outputs[0].token_ids) == 8


def test_samples_of_a_request_outgrowing_the_pool_fail_together(tok):
    """n = 2 samples under an under-reporting policy on a 9-block pool: sample 1 is preempted while sample 0 grows
    to the whole pool. Sample 0's failure ends the request, and its waiting sample 1 is not admitted (the step
    admitted it and then ran it with its blocks freed: IndexError)."""
    model = tiny_model("llama")
    config = EngineConfig(block_size=4, max_num_batched_tokens=8, num_kv_tokens=36, prefix_caching=False,
                          kv_policy=UnderReported(sink_tokens=4, window=30, slack=3))
    engine = Engine(model, tok, config)
    rid = engine.add_request(list(range(1, 11)), SamplingParams(temperature=1.0, seed=0, n=2, max_tokens=40,
                                                               ignore_eos=True))
    outs = []
    for _ in range(200):  # a bound: preempted and recomputed forever before
        if not engine.has_unfinished():
            break
        outs += [o for o in engine.step() if o.finished]
    assert not engine.has_unfinished() and engine.pool.num_used == 0 and engine.scheduler.waiting == deque()
    assert [o.request_id for o in outs] == [rid] and isinstance(outs[0].error, RequestError)
    assert "needs 10 KV blocks for its next step but the pool has 9" in str(outs[0].error)
    assert [c.finish_reason for c in outs[0].outputs] == ["abort", "abort"]


def test_a_pool_too_small_for_a_policys_bound_names_the_policy_not_the_prompt(tok):
    """StreamingLLM(window=100) on a 64-token pool refused a request "(or shorten the prompt: ...)", which no prompt
    length helps: the policy's bound (sinks + window + a step's tokens) decides; a window that fits runs."""
    from lmforge.infer.llm import LLM

    def llm(window: int) -> LLM:
        return LLM(tiny_model("llama", max_seq_len=512), tok, config=EngineConfig(
            num_kv_tokens=64, block_size=16, max_num_batched_tokens=16, kv_policy=StreamingLLM(window=window)))

    params = SamplingParams(max_tokens=300, ignore_eos=True)
    with pytest.raises(LmforgeError, match=r"the KV policy holds up to 120 keys a sequence, 16 of them a step's new "
                                           r"tokens, whatever the prompt: lower its window or budget"):
        llm(100).generate(["x" * 150], params)
    assert len(llm(20).generate(["x" * 150], params)[0].token_ids) == 300
