"""Seeded random engine configurations (KV policies with both position kinds, H2O, SnapKV or none; pool sizes down
to a few blocks, chunk budgets, max_num_seqs, async scheduling, static-buffer steps, n samples, output kinds):
every request added finishes with all its tokens, delta outputs fold to the cumulative ones' length, and every
block returns to the pool. A broad guard over combinations no targeted test names (the two scheduling corners found
on 2026-12-05 - plans preempting every running sequence, a prefix hit of a whole window - have their own tests in
test_kv_policy.py and test_kv_policy_positions.py; this sweep, ~450 configurations of it run by hand, found no
other). fp32, CPU."""

from __future__ import annotations

import random

import pytest

from lmforge.errors import LmforgeError
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.kv.policy import H2O, SnapKV, StreamingLLM
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import tiny_model
from .kv_policy_ref import PROMPT

MODELS = {}


def model(window: int):
    if window not in MODELS:
        MODELS[window] = tiny_model("llama", max_seq_len=window)
    return MODELS[window]


def policy_of(r: random.Random, kind: str):
    if kind.startswith("stream"):
        return StreamingLLM(sink_tokens=r.choice([0, 4]), window=r.choice([4, 8, 12]), slack=r.choice([1, 3, 4]),
                            positions="cache" if kind == "stream-cache" else "original")
    if kind.startswith("h2o"):
        return H2O(heavy=r.choice([2, 6]), recent=r.choice([2, 4]), per_head=kind == "h2o")
    if kind == "snap":
        return SnapKV(budget=r.choice([4, 8]), window=r.choice([4, 8]), pool_kernel=3)
    return None


def run_random(tok, seed: int) -> int:
    """One seeded configuration run to the end (the checks above); returns the keys it evicted."""
    r = random.Random(seed)
    kind = ["stream", "stream-cache", "h2o", "h2o-list", "snap", "none"][seed % 6]
    cfg = dict(block_size=r.choice([4, 8]), kv_policy=policy_of(r, kind), max_num_batched_tokens=r.choice([7, 16, 64]),
               max_num_seqs=r.choice([2, 4, 8]), async_scheduling=r.choice([False, True]),
               cuda_graphs=r.choice([False, True]))
    # small pools need a policy that bounds the keys a request holds (StreamingLLM's; H2O's past the prompt; SnapKV
    # keeps every generated key)
    small = [None, 32, 48, 64, 96] if cfg["block_size"] == 4 else [None, 64, 96]
    slots = r.choice(small if kind.startswith(("stream", "h2o")) else [None, 96, 128])
    if slots:
        cfg["num_kv_tokens"] = slots
    n, new = r.choice([1, 2, 3]), r.choice([5, 20, 40])
    engine = Engine(model(48 if kind == "stream-cache" else 128), tok, EngineConfig(**cfg))
    kinds, last = {}, ""
    for i in range(r.randint(2, 5)):  # the first: one sample of a short prompt, which every pool here holds
        sp = SamplingParams(temperature=r.choice([0, 1.0]), seed=seed, n=n if i else 1, max_tokens=new,
                            ignore_eos=True, output_kind=r.choice(["cumulative", "delta", "final"]))
        prompt = PROMPT[:r.randint(1, 43)] * r.choice([1, 2]) if i else PROMPT[:r.randint(1, 8)]
        if i > 1 and r.random() < 0.4:  # an earlier prompt again: prefix-cache hits
            prompt = last
        last = prompt
        try:
            kinds[engine.add_request(prompt, sp)] = sp.output_kind
        except LmforgeError as e:  # a request the pool or the window cannot hold: refused before it starts
            assert "KV blocks" in str(e) or "context window" in str(e)
    got = {rid: 0 for rid in kinds}
    for _ in range(3000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            if kinds[out.request_id] == "delta":  # (the first sample's tokens, piece by piece)
                got[out.request_id] += len(out.outputs[0].token_ids)
            elif out.finished:
                got[out.request_id] = len(out.outputs[0].token_ids)
    assert kinds and not engine.has_unfinished()
    assert all(count == new for count in got.values()), got
    assert engine.pool.num_used == 0
    return engine.stats()["evicted_tokens"]


SEEDS = range(40)
EVICTED: dict[int, int] = {}  # seed -> keys its run evicted (a seed's run is deterministic): each seed runs once


def evicted(tok, seed: int) -> int:
    if seed not in EVICTED:
        EVICTED[seed] = run_random(tok, seed)
    return EVICTED[seed]


@pytest.mark.parametrize("seed", SEEDS)
def test_random_configurations_finish_every_request_and_free_every_block(tok, seed):
    evicted(tok, seed)


def test_the_random_configurations_evict(tok):
    """The sweep exercises evictions: most seeds with a policy evict keys (the counts of the runs above; a seed
    not run yet, e.g. this test run alone, runs here with all its checks)."""
    with_policy = [seed for seed in SEEDS if seed % 6 != 5]
    assert sum(bool(evicted(tok, seed)) for seed in with_policy) >= len(with_policy) // 2
