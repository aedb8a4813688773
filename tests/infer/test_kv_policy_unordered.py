"""KV policies with unordered slots (KVPolicy.ordered_slots = False: evicted slots filled from the tail) against
the masked reference of tests/infer/kv_policy_ref.py: H2O's heavy hitters (lmforge.infer.kv.policy.H2O, its
rule applied by hand in position space by the reference), ordered and unordered, per layer and kv head; through
the Triton kernels."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.kv.policy import H2O
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import tiny_model
from .kv_policy_ref import PROMPT, RefCache, STREAM, StreamingByPosition, check_against, model_of, replay, run


class Heavy(H2O):
    """H2O (lmforge.infer.kv.policy) with slots kept in position order: every kept key after an evicted one
    moves (O(K) copies per eviction), the same keys kept as with the tail filling of the library's H2O."""

    ordered_slots: ClassVar[bool] = True


HeavyUnordered = H2O


def heavy_by_hand(ref: RefCache, start: int, heavy: int, recent: int, alike: bool, prompt_len: int) -> None:
    """Heavy's rule in position space from the reference's own probabilities (evicted keys got 0): before a
    step at position `start` >= the request's prompt (also in a recomputation after a preemption, which restarts
    the probabilities), with more than heavy + recent keys held."""
    held = int(ref.alive[0][0].sum())
    if start < prompt_len or held <= heavy + recent:
        return
    scores = []
    for layer, alive in enumerate(ref.alive):
        kv, S = alive.shape
        p = sum(torch.nn.functional.pad(c, (0, S - c.shape[-1])).sum(1) for c in ref.probs[layer])  # (H, S)
        scores.append(p.view(kv, -1, S).sum(1))
    if alike:
        total = sum(s.sum(0) for s in scores)
        scores = [total.expand_as(s) for s in scores]
    keep = []
    for s, alive in zip(scores, ref.alive):
        s = s.masked_fill(~alive, float("-inf"))
        s[:, start - recent:] = float("inf")
        keep.append(torch.zeros_like(alive).scatter_(1, s.topk(heavy + recent, dim=-1).indices, True))
    ref.keep_positions(keep)


def counting(engine, rows: list) -> None:
    """Per step (the session's plan): rows += (slots written per (layer, head) by cache.compact, evictions,
    slots of blocks copy-on-write replaced, compactions)."""
    sess, got = engine.kv_policy, dict(moved=0, cow=0)
    cache_compact, pool_compact, plan = engine.runner.cache.compact, engine.pool.compact_in_place, sess.plan

    def compact(src, dst):
        assert src.shape == dst.shape or dst.dim() == 1  # one gather + one write per pool
        got["moved"] += src.shape[-1]
        cache_compact(src, dst)

    def in_place(table, k):
        cow = pool_compact(table, k)
        got["cow"] += sum(min(4, k - j * 4) for j in cow or ())
        return cow

    def counted(running, make_room):
        before = (got["moved"], sess.evicted_tokens, got["cow"], sess.compactions)
        out = plan(running, make_room)
        rows.append(tuple(a - b for a, b in zip((got["moved"], sess.evicted_tokens, got["cow"], sess.compactions),
                                                  before)))
        return out
    engine.runner.cache.compact, engine.pool.compact_in_place, sess.plan = compact, in_place, counted


@pytest.mark.parametrize("arch,config,n,alike", [
    ("llama", dict(chunked_prefill=False), 1, False),
    ("llama", dict(max_num_batched_tokens=12), 1, False),  # chunked prefill
    ("llama", dict(async_scheduling=True, max_num_batched_tokens=12), 1, False),
    ("llama", dict(num_kv_tokens=64, max_num_batched_tokens=16), 3, False),  # forks share blocks; preemption
    ("mla", dict(max_num_batched_tokens=12), 1, False),  # one latent head per layer
    ("llama", dict(max_num_batched_tokens=12), 1, True),  # one host list for every layer and head
])
def test_unordered_slots_equal_ordered_and_the_reference(tok, arch, config, n, alike):
    """ordered_slots = False: evicted slots are filled from the tail, so a step's one eviction per sequence
    moves one key per (layer, kv head) (plus every slot of a block copy-on-write replaces), not all K kept
    ones. Same tokens and log-probs (1e-5) and schedule as the same policy with ordered slots, and both
    equal the masked reference applying H2O's rule by position."""
    model = model_of(arch)
    sp = SamplingParams(temperature=0 if n == 1 else 1.0, n=n, seed=4, max_tokens=20, ignore_eos=True, logprobs=0)
    prompts = [PROMPT, "a short one here"]
    runs = []
    for kind in (Heavy, HeavyUnordered):
        rows = []
        config_of = EngineConfig(block_size=4, kv_policy=kind(heavy=6, recent=4, per_head=not alike), **config)
        engine, reqs, log = run(model, tok, config_of, prompts, sp, lambda e, rows=rows: counting(e, rows))

        def on_prefill(seq, ref, start):
            heavy_by_hand(ref, start, 6, 4, alike, seq.request.prompt_len)
        assert check_against(replay(model, log, kind(heavy=6, recent=4), on_prefill), reqs, greedy=n == 1) == 40 * n
        assert engine.pool.num_used == 0 and (engine.stats()["preemptions"] > 0) == (n > 1)
        runs.append((reqs, [[(s.seq_id, a, b) for s, a, b, *_ in step] for step in log], rows))
    (ordered, sched_o, rows_o), (unordered, sched_u, rows_u) = runs
    assert sched_u == sched_o
    for ro, ru in zip(ordered, unordered):
        for so, su in zip(ro.seqs, ru.seqs):
            assert su.tokens == so.tokens and su.logprobs == pytest.approx(so.logprobs, abs=1e-5)
    decode = [r for r in rows_u if r[3] and r[1] == r[3]]  # steps where every compaction evicts one key
    assert decode and all(moved == evicted + cow for moved, evicted, cow, _ in decode)
    assert sum(cow == 0 for _, _, cow, _ in decode) > len(decode) // 2  # steady state: nothing copied whole
    if not alike:  # ordered per-head plans rewrite all K = 10 kept keys of every compacting sequence
        assert all(moved == 10 * c for moved, e, _, c in rows_o if c and e == c)
    assert sum(r[0] for r in rows_u) * 3 < sum(r[0] for r in rows_o)


def test_unordered_slots_through_the_triton_kernels(tok):
    """The Triton decode kernel (reads context_lens keys through the table) and the varlen prefill kernel
    (chunks after evictions: their context gathered by slot) over unordered slots equal the reference (on a
    CPU in Triton's interpreter; head_dim 64 for the flash kernel). One layer (every layer's pool is compacted
    alike: the reference tests above check two) and 12 tokens: both sequences decode over slots compacted twice
    or more, and the prompt's last two chunks run after evictions."""
    from lmforge.kernels.decode import available

    if torch.cuda.is_available():  # the fp32 flash kernel's dots are tf32 there: beyond the 2e-4 on log-probs
        pytest.skip("the interpreter's form; on a GPU test_kv_policy.py::test_gpu_backends_read_compacted_"
                    "sequences runs this policy through the decode kernel and CUDA graphs")
    if not available("cpu"):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    model = tiny_model("llama", d_model=256, n_heads=4, n_kv_heads=2, n_layers=1)
    policy = StreamingByPosition(**STREAM)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
    engine, reqs, log = run(model, tok, EngineConfig(block_size=4, kv_policy=policy, decode_attention="kernel",
                                                     prefill_attention="kernel", max_num_batched_tokens=12),
                            [PROMPT, "a short one"], sp)
    cache = engine.runner.cache
    assert cache.kernel is not None and cache.prefill_kernel is not None  # neither fell back to the reference
    assert check_against(replay(model, log, policy), reqs, greedy=True) == 24


@pytest.mark.parametrize("n,preempt_at", [(1, None), (3, None), (1, 40)])
def test_an_h2o_generation_longer_than_the_pool_runs_in_its_budget(tok, n, preempt_at):
    """H2O holds the prompt whole, then heavy + recent keys before each step (max_slots(prompt_len, chunk) = 24
    keys: 7 blocks), so a request of 16 prompt + 60 new tokens (19 blocks) runs on a 7-block pool, which refuses it
    without the policy, and decodes exactly as on a pool that holds everything. A sequence preempted after 40 new
    tokens (as a failed compaction preempts it) is evicted from as its recomputed output comes, not held whole as a
    prompt (16 + 40 keys: 14 blocks, which the pool never has); three samples take turns through preemption. All
    equal the masked reference applying H2O's rule by position, and no sequence holds more than 24 keys."""
    model, policy = tiny_model("llama"), H2O(heavy=6, recent=4)
    prompt = "a short one here"
    sp = SamplingParams(temperature=0 if n == 1 else 1.0, n=n, seed=3, max_tokens=60, ignore_eos=True, logprobs=0)
    small = dict(block_size=4, max_num_batched_tokens=8, num_kv_tokens=28)
    assert policy.max_slots(len(prompt), 8) == 24
    with pytest.raises(LmforgeError, match="needs 19 KV blocks but the pool has 7"):
        Engine(model, tok, EngineConfig(**small)).add_request(prompt, sp)

    outs, held = [], []

    def spy(engine):  # the keys each scheduled sequence holds once its chunk is computed
        schedule = engine.scheduler.next_batch

        def counted(*a, **k):
            for seq in list(engine.scheduler.running):
                if seq.num_output == preempt_at and not seq.preemptions:
                    engine.scheduler.preempt(seq)
            batch = schedule(*a, **k)
            held.extend(seq.num_slots + n for seq, n in batch.chunks)
            return batch
        engine.scheduler.next_batch = counted
    for tokens in (28, 512):
        engine, reqs, log = run(model, tok, EngineConfig(**{**small, "num_kv_tokens": tokens}, kv_policy=policy),
                                [prompt], sp, spy)
        assert engine.pool.num_used == 0 and max(held) <= 24
        assert engine.stats()["preemptions"] == (1 if preempt_at else 0) or n > 1 and tokens == 28
        if n == 1:
            assert engine.stats()["peak_used_blocks"] <= 7

        def on_prefill(seq, ref, start):
            heavy_by_hand(ref, start, 6, 4, False, seq.request.prompt_len)
        assert check_against(replay(model, log, policy, on_prefill), reqs, greedy=n == 1) == 60 * n
        outs.append(reqs[0].seqs)
    if n == 1:
        assert outs[0][0].tokens == outs[1][0].tokens and outs[0][0].logprobs == outs[1][0].logprobs
