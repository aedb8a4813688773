"""Short prompts on the decode graphs (EngineConfig.graph_prompts, lmforge.infer.graphs): a prefill chunk whose
sequence holds at most graph_prompts slots after it runs as one decode row per token, in the static buffers of a
(rows, width) bucket; longer ones run eagerly. On a CPU the same static-buffer step runs eagerly (cuda_graphs=True
without a GPU); on a GPU the captured graphs are replayed."""

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
"""one prompt (70 tokens) longer than graph_prompts=48 below: its prefill runs eagerly"""


def record_chunks(graphs) -> list[list[int]]:
    """Wrap graphs.run to record the chunk lengths of every batch it runs."""
    seen, run = [], graphs.run

    def recording(batch, late=None, **kw):
        seen.append([n for _, n in batch.chunks])
        return run(batch, late, **kw)

    graphs.run = recording
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


@pytest.mark.parametrize("config", [
    dict(block_size=4),  # whole prompts, several in one step with decodes of others
    dict(block_size=4, max_num_batched_tokens=8),  # chunked: later chunks read the earlier ones' keys
    dict(block_size=8, max_num_seqs=2),  # fewer rows per step: prompts wait, then join decodes
])
def test_short_prompts_run_as_rows_and_match_the_reference(arch, tok, config):
    model = tiny_model(arch, init_std=0.3)
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prompts=48, **config))
    seen = record_chunks(engine.runner.graphs)
    outs = greedy(engine, PROMPTS)
    assert [o.outputs[0].token_ids for o in outs] == [full_greedy(model, p, 8) for p in PROMPTS]
    prefills = [n for chunks in seen for n in chunks if n > 1]
    budget = config.get("max_num_batched_tokens", 4096)  # chunks of a step beside its decodes
    assert max(prefills) == 30 if budget > 30 else budget - 2 <= max(prefills) <= budget  # the 30-token prompt's
    # the 70-token prompt's chunks past slot 48 never ran on the graphs: its prefill tokens there sum below 48
    assert sum(prefills) < sum(len(p) for p in PROMPTS)


def test_rows_give_the_eager_steps_logprobs_and_prompt_logprobs(tok):
    """The same requests with graph_prompts on and off: sampled log-probs agree to fp32 rounding, and prompt
    log-probs (read from every row's logits) equal a full forward's."""
    model = tiny_model("llama", init_std=0.3)
    outs = {}
    for slots in (0, 48):
        engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prompts=slots, block_size=4))
        seen = record_chunks(engine.runner.graphs)
        outs[slots] = greedy(engine, PROMPTS[:3], logprobs=0, prompt_logprobs=2)
        assert any(n > 1 for chunks in seen for n in chunks) == (slots > 0)
    for eager, rows, prompt in zip(outs[0], outs[48], PROMPTS):
        assert rows.outputs[0].token_ids == eager.outputs[0].token_ids
        assert rows.outputs[0].logprobs == pytest.approx(eager.outputs[0].logprobs, abs=1e-5)
        check_prompt_logprobs(model, prompt, rows.prompt_logprobs, 2)


@pytest.mark.parametrize("variant", ["sliding", "sinks", "softcap", "mla", "mla-sliding", "moe"])
def test_prompt_rows_for_attention_variants(tok, variant):
    """Prompt rows over sliding windows (each row's own window), sinks, soft-capping, MLA latents and MoE layers:
    the full forward's greedy tokens, and the prompts ran on the graphs."""
    from .test_attention_variants import variant_model

    model = variant_model(variant)
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prompts=48, block_size=4))
    seen = record_chunks(engine.runner.graphs)
    outs = greedy(engine, PROMPTS[:3])
    assert [o.outputs[0].token_ids for o in outs] == [full_greedy(model, p, 8) for p in PROMPTS[:3]]
    assert max(n for chunks in seen for n in chunks) == 30


def test_prefix_hits_and_draft_models_take_prompt_rows(tok):
    """A prompt after a prefix-cache hit runs its new tokens as rows reading the cached ones; a draft model's own
    runner takes prompt rows too (its catch-up of a short prompt)."""
    model = tiny_model("llama", init_std=0.3)
    shared = PROMPTS[1]
    prompts = [shared + [5, 6], shared + [7, 8, 9, 10]]
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prompts=48, block_size=4))
    seen = record_chunks(engine.runner.graphs)
    first = greedy(engine, prompts[:1])
    second = greedy(engine, prompts[1:])
    assert [first[0].outputs[0].token_ids, second[0].outputs[0].token_ids] == [full_greedy(model, p, 8) for p in prompts]
    assert [6] in seen  # the second prompt: its 6 tokens after the hit's 28 (the last block is recomputed)
    from lmforge.infer.llm import LLM

    draft = tiny_model("llama", seed=3, n_layers=1, init_std=0.3)
    llm = LLM(model, tok, config=EngineConfig(cuda_graphs=True, graph_prompts=48, block_size=4), draft=draft,
              num_draft_tokens=3)
    draft_seen = record_chunks(llm.engine.draft_model.runner.graphs)
    texts = ["abc", "the quick brown fox jumps over it", "hello"]
    outs = llm.generate(texts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert [o.token_ids for o in outs] == [full_greedy(model, tok.encode(t), 8) for t in texts]
    assert llm.engine.draft_model.runner.graphs.prompt_slots == 48
    assert max(n for chunks in draft_seen for n in chunks) > 4  # a prompt, not only catch-up chunks of k + 1


def test_state_models_and_bad_values_keep_prompts_eager(tok):
    from .test_state_cache import tiny_state_model

    engine = Engine(tiny_state_model("hybrid"), tok, EngineConfig(cuda_graphs=True, graph_prompts=48, block_size=4))
    assert engine.runner.graphs.prompt_slots == 0  # a recurrent state advances token by token within one row
    assert Engine(tiny_model("llama"), tok, EngineConfig(cuda_graphs=True)).runner.graphs.prompt_slots == 0
    for bad in (-1, 513):
        with pytest.raises(ConfigError, match="graph_prompts must be"):
            EngineConfig(graph_prompts=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_prompt_graphs_match_eager(tok):
    """Prompt rows replayed from captured graphs (the Triton decode kernel reading each row's keys) give the eager
    engine's greedy tokens and log-probs within bf16-free fp32 tolerance."""
    model = tiny_model("llama", init_std=0.3).cuda()
    prompts = PROMPTS * 2
    eager = greedy(Engine(model, tok, EngineConfig(cuda_graphs=False)), prompts, logprobs=0)
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, graph_prompts=48))
    seen = record_chunks(engine.runner.graphs)
    rows = greedy(engine, prompts, logprobs=0)
    assert [o.outputs[0].token_ids for o in rows] == [o.outputs[0].token_ids for o in eager]
    assert max(n for chunks in seen for n in chunks) == 30
    assert all(e.graph is not None for e in engine.runner.graphs.entries.values())
