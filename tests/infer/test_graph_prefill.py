"""Steps holding prefill chunks on CUDA graphs (EngineConfig.graph_prefill_tokens, lmforge.infer.graphs): a step of
up to graph_prefill_tokens tokens replays the graph of its token bucket, attention through the varlen path from
device metadata (AttnMetadata.varlen_tiles); longer steps run eagerly. On a CPU the same static-buffer step runs
eagerly (cuda_graphs=True without a GPU: the varlen reference); on a GPU the captured graphs replay the Triton
varlen kernel."""

from __future__ import annotations

import pytest
import torch
from .infer_helpers import full_greedy, tiny_model
from .test_engine_api import check_prompt_logprobs

from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.sampling import SamplingParams

G = torch.Generator().manual_seed(0)
PROMPTS = [torch.randint(1, 250, (n,), generator=G).tolist() for n in (3, 30, 9, 70, 1, 17)]
"""one prompt (70 tokens) longer than graph_prefill_tokens=48 below: its step runs eagerly"""


def record_chunks(graphs) -> list[list[int]]:
    """Wrap graphs.run_mixed to record the chunk lengths of every step it runs."""
    seen, run = [], graphs.run_mixed

    def recording(batch, idx, late=None, **kw):
        seen.append([n for _, n in batch.chunks])
        return run(batch, idx, late, **kw)

    graphs.run_mixed = recording
    return seen


def greedy(engine, prompts, n: int = 8, **kw) -> list:
    """Greedy requests arriving one by one, two steps apart (a served workload: a step holds one new prompt
    and the decodes of the earlier ones; a step is on the graphs only when all of its chunks fit them)."""
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)
    ids, done = [], {}
    for p in prompts:
        ids.append(engine.add_request(p, sp))
        for _ in range(2):
            done.update({o.request_id: o for o in engine.step() if o.finished})
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[i] for i in ids]


def mixed_keys(engine) -> set:
    return set(engine.runner.graphs.mixed_entries)


@pytest.mark.parametrize("config", [
    dict(block_size=4),  # whole prompts, each in a step with the decodes of the earlier ones
    dict(block_size=4, max_num_batched_tokens=8),  # chunked: later chunks read the earlier ones' keys
    dict(block_size=8, max_num_seqs=2),  # fewer sequences per step: prompts wait, then join decodes
])
def test_prefill_steps_on_graphs_match_the_reference(arch, tok, config):
    model = tiny_model(arch, init_std=0.3)
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prefill_tokens=48, **config))
    seen = record_chunks(engine.runner.graphs)
    outs = greedy(engine, PROMPTS)
    assert [o.outputs[0].token_ids for o in outs] == [full_greedy(model, p, 8) for p in PROMPTS]
    assert seen and all(sum(chunks) <= 48 for chunks in seen)
    prefills = [n for chunks in seen for n in chunks if n > 1]
    budget = config.get("max_num_batched_tokens", 4096)  # chunks of a step beside its decodes
    assert max(prefills) == 30 if budget > 30 else budget - 2 <= max(prefills) <= budget  # the 30-token prompt's
    if budget > 70:  # the 70-token prompt's step ran eagerly
        assert 70 not in prefills
    assert all(key[0] >= 16 and key[0] & (key[0] - 1) == 0 for key in mixed_keys(engine))  # token buckets


def test_graphs_give_the_eager_steps_logprobs_and_prompt_logprobs(tok):
    """The same requests with graph_prefill_tokens on and off: sampled log-probs agree to fp32 rounding, and prompt
    log-probs (extra logits rows of the graph) equal a full forward's."""
    model = tiny_model("llama", init_std=0.3)
    outs = {}
    for tokens in (0, 48):
        engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prefill_tokens=tokens, block_size=4))
        seen = record_chunks(engine.runner.graphs)
        outs[tokens] = greedy(engine, PROMPTS[:3], logprobs=0, prompt_logprobs=2)
        assert bool(seen) == (tokens > 0)
    for eager, graphed, prompt in zip(outs[0], outs[48], PROMPTS):
        assert graphed.outputs[0].token_ids == eager.outputs[0].token_ids
        assert graphed.outputs[0].logprobs == pytest.approx(eager.outputs[0].logprobs, abs=1e-5)
        check_prompt_logprobs(model, prompt, graphed.prompt_logprobs, 2)


@pytest.mark.parametrize("variant", ["sliding", "window-pattern", "sinks", "softcap", "qk-norm", "moe", "mla"])
def test_prefill_graphs_for_attention_variants(tok, variant):
    """Sliding windows (each query's own window), sinks, soft-capping, QK-norm, MoE layers and MLA's latent cache
    (every token through the absorbed path: lmforge.kernels.paged_latent's varlen rows) on the mixed graphs: the
    full forward's greedy tokens."""
    from .test_attention_variants import variant_model

    model = variant_model(variant)
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prefill_tokens=48, block_size=4))
    seen = record_chunks(engine.runner.graphs)
    outs = greedy(engine, PROMPTS[:3])
    assert [o.outputs[0].token_ids for o in outs] == [full_greedy(model, p, 8) for p in PROMPTS[:3]]
    assert seen


def test_prefix_hits_and_draft_models_take_prefill_graphs(tok):
    """A prompt after a prefix-cache hit runs its new tokens on the graphs reading the cached keys; a draft model's
    own runner takes its prompts' steps there too."""
    model = tiny_model("llama", init_std=0.3)
    shared = PROMPTS[1]
    prompts = [shared + [5, 6], shared + [7, 8, 9, 10]]
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prefill_tokens=48, block_size=4))
    seen = record_chunks(engine.runner.graphs)
    first = greedy(engine, prompts[:1])
    second = greedy(engine, prompts[1:])
    assert [first[0].outputs[0].token_ids, second[0].outputs[0].token_ids] == [full_greedy(model, p, 8) for p in prompts]
    assert [6] in seen  # the second prompt: its 6 tokens after the hit's 28 (the last block is recomputed)
    from lmforge.infer.llm import LLM

    draft = tiny_model("llama", seed=3, n_layers=1, init_std=0.3)
    llm = LLM(model, tok, config=EngineConfig(cuda_graphs=True, graph_prefill_tokens=48, block_size=4), draft=draft,
              num_draft_tokens=3)
    draft_seen = record_chunks(llm.engine.draft_model.runner.graphs)
    texts = ["abc", "the quick brown fox jumps over it", "hello"]
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outs] == [full_greedy(model, tok.encode(t), 8) for t in texts]
    assert max(n for chunks in draft_seen for n in chunks) > 4  # a prompt, not only catch-up chunks of k + 1


def test_state_models_and_bad_values_keep_prefill_eager(tok):
    from .test_state_cache import tiny_state_model

    model = tiny_state_model("hybrid")
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prefill_tokens=48, block_size=4))
    assert engine.runner.graphs.mixed_tokens == 0  # a recurrent state advances token by token
    assert Engine(tiny_model("llama"), tok, EngineConfig(cuda_graphs=True)).runner.graphs.mixed_tokens == 0  # CPU default
    for bad in (-1, 1 << 20):
        with pytest.raises(ConfigError, match="graph_prefill_tokens must be"):
            EngineConfig(graph_prefill_tokens=bad)
    with pytest.raises(ConfigError, match="graph_prefill_tokens=64 replays .* but cuda_graphs=False; drop one"):
        EngineConfig(graph_prefill_tokens=64, cuda_graphs=False)
    assert EngineConfig(graph_prefill_tokens=0, cuda_graphs=False).graph_prefill_tokens == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_prefill_graphs_match_eager(tok):
    """Steps holding prompts replayed from captured graphs (the Triton varlen kernel) give the eager engine's greedy
    tokens and log-probs (fp32 model)."""
    model = tiny_model("llama", init_std=0.3).cuda()
    prompts = PROMPTS * 2
    eager = greedy(Engine(model, tok, EngineConfig(cuda_graphs=False)), prompts, logprobs=0)
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prefill_tokens=48))
    seen = record_chunks(engine.runner.graphs)
    got = greedy(engine, prompts, logprobs=0)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in eager]
    for a, b in zip(got, eager):
        assert a.outputs[0].logprobs == pytest.approx(b.outputs[0].logprobs, abs=1e-3)
    assert max(n for chunks in seen for n in chunks) == 30
    graphs = engine.runner.graphs
    entries = [*graphs.entries.values(), *graphs.mixed_entries.values()]
    assert mixed_keys(engine) and all(e.graph is not None for e in entries)


def test_the_varlen_kernel_serves_the_prefill_graphs(tok):
    """decode_attention='kernel' (on a CPU through Triton's interpreter): the mixed steps' attention runs the varlen
    kernel (counted), not the reference, and tokens stay the full forward's."""
    from lmforge.kernels import paged_varlen as pa
    from lmforge.kernels.decode import available

    if not available("cuda" if torch.cuda.is_available() else "cpu"):
        pytest.skip("needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")
    model = tiny_model("llama", init_std=0.3).to("cuda" if torch.cuda.is_available() else "cpu")
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prefill_tokens=48, block_size=4,
                                             decode_attention="kernel"))
    calls, kernel = [], pa.paged_varlen_attention
    pa.paged_varlen_attention = lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    try:
        outs = greedy(engine, PROMPTS[:3], n=4)
    finally:
        pa.paged_varlen_attention = kernel
    assert [o.outputs[0].token_ids for o in outs] == [full_greedy(model, p, 4) for p in PROMPTS[:3]]
    assert len(calls) >= 2 * model.cfg.n_layers  # every layer of at least two mixed steps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_failed_mixed_capture_keeps_decode_graphs(tok):
    """A model whose forward cannot be captured on mixed steps (a host sync there): those steps run eagerly with
    a warning naming why, decode steps keep their graphs, and tokens stay the eager engine's."""
    from torch import nn

    class SyncsOnPrefill(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def cache_spec(self):
            return self.model.cache_spec()

        def forward(self, ids, positions=None, cache=None, meta=None):
            if meta is not None and meta.varlen_tiles is not None:
                int(meta.context_lens.max())  # a host sync: not capturable
            return self.model(ids, positions, cache, meta)

    model = SyncsOnPrefill(tiny_model("llama", init_std=0.3).cuda())
    eager = greedy(Engine(model, tok, EngineConfig(cuda_graphs=False)), PROMPTS[:3])
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prefill_tokens=48))
    with pytest.warns(UserWarning, match="steps holding prefill chunks run eagerly"):
        got = greedy(engine, PROMPTS[:3])
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in eager]
    graphs = engine.runner.graphs
    assert graphs.failed_mixed and graphs.failed is None
    assert any(e.graph is not None for e in graphs.entries.values())


def test_long_contexts_keep_mixed_steps_eager(tok):
    """A step where a sequence would hold more than mixed_context keys (MIXED_MAX_CONTEXT: the varlen kernel has no
    split over keys) runs eagerly; the others replay graphs, and tokens stay the full forward's."""
    model = tiny_model("llama", init_std=0.3)
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prefill_tokens=48, block_size=4))
    engine.runner.graphs.mixed_context = 25
    seen = record_chunks(engine.runner.graphs)
    outs = greedy(engine, PROMPTS[:3])
    assert [o.outputs[0].token_ids for o in outs] == [full_greedy(model, p, 8) for p in PROMPTS[:3]]
    assert seen and 30 not in [n for chunks in seen for n in chunks]  # the 30-token prompt's step ran eagerly
    assert all(n <= 25 for chunks in seen for n in chunks)


def test_async_scheduling_feeds_the_mixed_graphs_late_tokens(tok):
    """Under async scheduling a mixed step is launched before the previous step's tokens are read: its decode rows'
    ids are copied into the graph's buffer on the device (LateIds), and tokens stay the full forward's."""
    model = tiny_model("llama", init_std=0.3)
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prefill_tokens=48, block_size=4,
                                             async_scheduling=True))
    seen = record_chunks(engine.runner.graphs)
    late = []
    run = engine.runner.graphs.run_mixed
    engine.runner.graphs.run_mixed = lambda batch, idx, late_ids=None, **kw: late.append(late_ids is not None) or run(
        batch, idx, late_ids, **kw)
    outs = greedy(engine, PROMPTS)
    assert [o.outputs[0].token_ids for o in outs] == [full_greedy(model, p, 8) for p in PROMPTS]
    assert seen and any(late)  # some mixed steps took device-side ids


def test_a_mixed_workload_gives_the_eager_engines_outputs(tok):
    """Greedy, seeded sampling, n = 2, beam search, penalties, prompt log-probs and a stop string, arriving two steps
    apart on a pool small enough to preempt: the engine with mixed-step graphs gives the eager engine's tokens,
    texts and log-probs."""
    model = tiny_model("llama", init_std=0.3)
    asks = [dict(temperature=0), dict(temperature=0.8, seed=1), dict(temperature=0.9, seed=2, n=2),
            dict(temperature=0, beam_width=2), dict(temperature=0.7, seed=3, repetition_penalty=1.3),
            dict(temperature=0, prompt_logprobs=1), dict(temperature=0, stop=["a"])]
    params = [SamplingParams(max_tokens=10, ignore_eos=True, logprobs=0, **a) for a in asks]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    got = {}
    for tokens in (0, 48):
        engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prefill_tokens=tokens, block_size=4,
                                                 num_kv_tokens=96, max_num_batched_tokens=40))
        seen = record_chunks(engine.runner.graphs)
        ids, done = [], {}
        for p, sp in zip(prompts, params):
            ids.append(engine.add_request(p, sp))
            for _ in range(2):
                done.update({o.request_id: o for o in engine.step() if o.finished})
        while engine.has_unfinished():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        got[tokens] = [done[i] for i in ids]
        assert bool(seen) == (tokens > 0)
    assert engine.stats()["preemptions"] > 0
    for eager, graphed in zip(got[0], got[48]):
        assert [o.token_ids for o in graphed.outputs] == [o.token_ids for o in eager.outputs]
        assert [o.text for o in graphed.outputs] == [o.text for o in eager.outputs]
        for a, b in zip(graphed.outputs, eager.outputs):
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        if eager.prompt_logprobs is not None:
            for x, y in zip(graphed.prompt_logprobs[1:], eager.prompt_logprobs[1:]):
                assert list(x.values()) == pytest.approx(list(y.values()), abs=1e-4)
