"""StreamingLLM on seeded random engine configurations against the masked reference (kv_policy_ref.replay of the
engine's own schedule): sinks, windows and slack, original or cache positions or unordered slots, GQA or MLA,
block sizes, token budgets, prefix caching, async scheduling, small pools (preemptions and recomputation), n
samples forking from a compacted prompt. Every output token's log-prob (and greedy tokens) equal the reference's
and no block is left in use. The sweep that built this (1,500 configurations, 79k tokens, 2026-12-05) found three
gaps of the reference, none of the engine: forks copied the parent's state after it had decoded further, a
recomputed position replaced the logits its token was drawn from, and a preempted sequence resumed from a prefix
hit at the length it had reached was not seen as restarted."""

from __future__ import annotations

import random

import pytest

from lmforge.errors import LmforgeError
from lmforge.infer.engine import EngineConfig
from lmforge.infer.kv.policy import StreamingLLM
from lmforge.infer.sampling import SamplingParams

from .kv_policy_ref import StreamingByPosition, check_against, model_of, replay, run


def _case(seed: int):
    rng = random.Random(seed)
    arch = rng.choice(["llama", "llama", "mla"])
    kw = dict(sink_tokens=rng.randint(0, 5), window=rng.randint(1, 12), slack=rng.randint(1, 6))
    kind = rng.choice(["original", "cache", "unordered"])
    policy = (StreamingLLM(**kw, positions="cache") if kind == "cache" and arch == "llama"
              else StreamingByPosition(**kw) if kind == "unordered" else StreamingLLM(**kw))
    block, budget = rng.choice([1, 2, 4, 8]), rng.choice([4, 8, 12, 64])
    chunked = policy.cache_positions or rng.random() < 0.8
    config = EngineConfig(block_size=block, kv_policy=policy, chunked_prefill=chunked,
                          max_num_batched_tokens=budget if chunked else 4096,
                          prefix_caching=rng.random() < 0.5, num_kv_tokens=rng.choice([None, 48, 64, 128]),
                          async_scheduling=rng.random() < 0.4, max_num_seqs=rng.choice([1, 2, 8]))
    prompts = ["".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 40))) for _ in range(rng.randint(1, 4))]
    greedy = rng.random() < 0.6
    params = SamplingParams(temperature=0 if greedy else 1.0, n=1 if greedy else rng.randint(1, 3), seed=seed,
                            max_tokens=rng.randint(1, 30), ignore_eos=True, logprobs=0)
    return model_of(arch), policy, config, prompts, params, greedy


# seeds 205, 364 and 997 are the sweep's cases of the three reference gaps
@pytest.mark.parametrize("seed", [205, 364, 997, *range(30)])
def test_streaming_llm_on_random_configurations_equals_the_reference(tok, seed):
    model, policy, config, prompts, params, greedy = _case(seed)
    try:
        engine, reqs, log = run(model, tok, config, prompts, params)
    except LmforgeError as e:  # a request the pool cannot hold even under the policy's bound: refused up front
        assert "KV blocks but the pool has" in str(e)
        return
    assert check_against(replay(model, log, policy), reqs, greedy=greedy) == sum(
        len(s.tokens) - r.prompt_len for r in reqs for s in r.seqs)
    assert engine.pool.num_used == 0
