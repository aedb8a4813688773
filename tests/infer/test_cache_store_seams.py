"""What a CacheStore (lmforge.infer.kv.paged.CacheStore) opts into and is told of: CUDA-graph steps only with
graph_safe (their host metadata are placeholders), scoring KV policies only with calls_score_hook, every KV-policy
compaction per sequence (PagedCache.compacted, also when only block-table entries move), its per-sequence bytes in
the pool budget; and prefix-cache statistics when a policy keeps the prompt out of the lookup."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.config import pool_blocks
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.kv.paged import CacheStore, PagedKVCache
from lmforge.infer.kv.policy import H2O, SnapKV, StreamingLLM
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import run_requests, tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=0)
PROMPT = "a prompt long enough that a small KV policy evicts from it"


class LoggedCache(PagedKVCache):
    """The default cache, logging the KV-policy events it is told of: ("move", slots) per cache.compact,
    ("told", seq_id, keep, old_num_slots) per compacted."""

    skip_hook_layer = -1  # a layer whose attention never calls the score hook (a store written wrong)

    def __init__(self, *args):
        super().__init__(*args)
        self.log: list[tuple] = []

    def compact(self, src, dst):
        self.log.append(("move", int(src.shape[-1])))
        super().compact(src, dst)

    def compacted(self, seq_id, keep, old_num_slots):
        keep = keep.tolist() if isinstance(keep, torch.Tensor) else list(keep)
        self.log.append(("told", seq_id, keep, old_num_slots))

    def _probs_hook(self, layer):
        return None if layer == self.skip_hook_layer else super()._probs_hook(layer)


class Store(CacheStore):
    """A store building LoggedCache (the default attention, so every result is the default cache's)."""

    def __init__(self, graph_safe=False, calls_score_hook=False, per_sequence=0, skip_hook_layer=-1):
        self.graph_safe, self.calls_score_hook, self.per_sequence = graph_safe, calls_score_hook, per_sequence
        self.skip_hook_layer, self.max_seqs, self.cache = skip_hook_layer, None, None

    def build(self, spec, num_blocks, block_size, device, dtype, decode, prefill, max_seqs):
        self.max_seqs = max_seqs
        self.cache = LoggedCache(spec, num_blocks, block_size, device, dtype, decode, prefill)
        self.cache.skip_hook_layer = self.skip_hook_layer
        return self.cache

    def bytes_per_sequence(self, spec, dtype):
        return self.per_sequence


def generate(model, tok, config, prompts=(PROMPT,), sp=GREEDY):
    engine = Engine(model, tok, config)
    return engine, [o.outputs[0] for o in run_requests(engine, [(p, sp) for p in prompts])]


def test_graph_steps_need_a_graph_safe_store(tok):
    """A graph step's AttnMetadata has placeholder host fields (no sequence ids, unit lengths): a store whose
    cache keys state by seq_ids_host computed nonsense there silently (0.45 nats off, Lexico's recent buffer).
    Graphs are now refused to a store that does not declare graph_safe; one that does keeps them, equal to eager."""
    model = tiny_model("llama", init_std=0.3)
    with pytest.raises(ConfigError, match="cannot serve cuda_graphs: it does not declare graph_safe") as e:
        Engine(model, tok, EngineConfig(kv_cache=Store(), cuda_graphs=True))
    assert "\n" not in str(e.value)
    assert Engine(model, tok, EngineConfig(kv_cache=Store())).runner.graphs is None  # default: off
    engine, (got,) = generate(model, tok, EngineConfig(block_size=4, kv_cache=Store(graph_safe=True),
                                                       cuda_graphs=True))
    assert engine.runner.graphs is not None and engine.runner.graphs.entries  # decode steps ran on the graphs
    _, (want,) = generate(model, tok, EngineConfig(block_size=4, kv_cache=Store(graph_safe=True)))
    assert got.token_ids == want.token_ids
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-5)


@pytest.mark.parametrize("policy", [H2O(heavy=8, recent=8), H2O(heavy=8, recent=8, per_head=False),
                                    SnapKV(budget=8, window=8, pool_kernel=3)])
def test_a_scoring_policy_needs_a_store_that_calls_the_score_hook(tok, policy):
    """Refused when the engine is built (it failed mid-generation: H2O with a bare KeyError, SnapKV after the whole
    prefill); with a store that calls the hook, the same outputs as the default cache."""
    model = tiny_model("llama", init_std=0.3)
    with pytest.raises(ConfigError, match=f"kv_policy={type(policy).__name__} scores keys .* calls_score_hook") as e:
        Engine(model, tok, EngineConfig(kv_cache=Store(), kv_policy=policy))
    assert "\n" not in str(e.value)
    engine, (got,) = generate(model, tok, EngineConfig(block_size=4, kv_policy=policy,
                                                       kv_cache=Store(calls_score_hook=True)))
    _, (want,) = generate(model, tok, EngineConfig(block_size=4, kv_policy=policy))
    assert engine.stats()["evicted_tokens"] > 0
    assert got.token_ids == want.token_ids and got.logprobs == want.logprobs


@pytest.mark.parametrize("per_head", [True, False])
def test_h2o_names_a_layer_its_scores_never_reached(tok, per_head):
    """A store that declares calls_score_hook but skips layer 1: H2O's plan says which layers it observed (a bare
    KeyError: 1 before), as SnapKV's does."""
    store = Store(calls_score_hook=True, skip_hook_layer=1)
    with pytest.raises(LmforgeError, match="H2O observed 1 of 2 layers of sequence 0: a layer's attention did not "
                                           "reach the cache's score hook"):
        generate(tiny_model("llama"), tok, EngineConfig(block_size=4, kv_cache=store,
                                                        kv_policy=H2O(heavy=8, recent=8, per_head=per_head)))


@pytest.mark.parametrize("slack,compactions,moves", [(4, 10, 1), (1, 39, 39)])
def test_the_cache_is_told_of_every_compaction(tok, slack, compactions, moves):
    """StreamingLLM with sink_tokens and slack multiples of block_size drops whole middle blocks from the table and
    copies nothing (cache.compact ran once in 10 compactions, so a store never heard of the other 9); now every
    applied plan reaches PagedCache.compacted(seq_id, keep, old_num_slots), after the keys moved."""
    store = Store()
    engine, _ = generate(tiny_model("llama"), tok, EngineConfig(block_size=4, kv_cache=store, kv_policy=StreamingLLM(
        sink_tokens=4, window=8, slack=slack)), prompts=["p" * 30], sp=SamplingParams(max_tokens=40, ignore_eos=True))
    told = [e for e in store.cache.log if e[0] == "told"]
    assert engine.stats()["kv_compactions"] == len(told) == compactions
    assert sum(e[0] == "move" for e in store.cache.log) == moves
    n = 4 + 8 + slack  # held when a decode step's plan fires: the sinks, the window and the slack
    assert told[0] == ("told", 0, [0, 1, 2, 3, *range(22, 30)], 30)  # after the 30-token prompt
    assert all(e == ("told", 0, [0, 1, 2, 3, *range(n - 8, n)], n) for e in told[1:])
    first_told = store.cache.log.index(told[0])
    if moves == compactions:  # each copy reaches the cache before its event
        assert store.cache.log[first_told - 1][0] == "move"


def test_the_cache_is_told_of_per_head_compactions(tok):
    """H2O's per-(layer, kv head) plans: the cache gets the permutation (L, heads, K), once per compaction."""
    store = Store(calls_score_hook=True)
    engine, _ = generate(tiny_model("llama"), tok, EngineConfig(block_size=4, kv_cache=store,
                                                                kv_policy=H2O(heavy=6, recent=4)))
    told = [e for e in store.cache.log if e[0] == "told"]
    n_prompt = len(tok.encode(PROMPT))
    assert len(told) == engine.stats()["kv_compactions"] == GREEDY.max_tokens - 1  # (the last token is never run)
    assert told[0][3] == n_prompt and all(e[3] == 11 for e in told[1:])  # the prompt, then 10 kept + 1 new
    assert all(torch.tensor(e[2]).shape == (2, 2, 10) for e in told)


def test_a_store_reserves_its_per_sequence_bytes(tok):
    """CacheStore.bytes_per_sequence: max_num_seqs of it come off the pool's budget (1 GiB on a CPU), and build
    learns max_seqs."""
    model = tiny_model("llama")
    spec, cpu = model.cache_spec(), torch.device("cpu")
    config = EngineConfig(block_size=16, max_num_seqs=8, kv_cache=Store(per_sequence=2**26))
    per_token = spec.bytes_per_token()
    assert pool_blocks(config, spec, cpu, 10**7) == (2**30 - 8 * 2**26) // per_token // 16
    assert pool_blocks(EngineConfig(block_size=16, max_num_seqs=8, kv_cache=Store()), spec, cpu, 10**7) == (
        2**30 // per_token // 16)
    store = Store(per_sequence=2**26)
    Engine(model, tok, EngineConfig(block_size=16, max_num_seqs=8, kv_cache=store))
    assert store.max_seqs == 8


def test_prefix_stats_when_a_policy_keeps_the_prompt_out_of_the_lookup(tok):
    """H2O observes every prompt query (observed_tail: the lookup gets no token): queried_blocks stays 0 (it lost
    a block per admission: -3 after 3 requests). Without a policy the same prompt is queried in full."""
    model, prompt = tiny_model("llama"), "the same forty-byte prompt, asked three"
    for policy, queried, hits in ((H2O(heavy=8, recent=8), 0, 0), (None, 3 * 9, 2 * 9)):
        engine = Engine(model, tok, EngineConfig(block_size=4, kv_policy=policy))
        for _ in range(3):
            run_requests(engine, [(prompt, SamplingParams(max_tokens=4))])
        assert len(tok.encode(prompt)) == 39  # (39 - 1) // 4 = 9 blocks looked up per request
        assert (engine.pool.stats.queried_blocks, engine.pool.stats.hit_blocks) == (queried, hits)
