"""Generation leaves torch's global RNG alone: unseeded requests draw from the engine's own stream (Engine.rng),
so sampling inside a training loop (RL rollouts, evaluation) does not change the training's random state."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import run_requests, tiny_model

PROMPTS = [[5, 6, 7], [9, 9, 9, 9, 9, 9, 9, 9], [3]]


def _tokens(outs) -> list[list[int]]:
    return [o.token_ids for out in outs for o in out.outputs]


@pytest.mark.parametrize("options", [{}, {"cuda_graphs": True}, {"async_scheduling": True}])
def test_unseeded_generation_leaves_torchs_rng_untouched(tok, options):
    """Also through the graphs' static-buffer step (run eagerly without a GPU) and async scheduling."""
    llm = LLM(tiny_model(), tok, config=EngineConfig(**options))
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, n=2, ignore_eos=True)
    state = torch.get_rng_state()
    outs = llm.generate(PROMPTS, params)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(len(t) == 12 for t in _tokens(outs))


def test_unseeded_speculative_generation_leaves_torchs_rng_untouched(tok):
    """Drafts and their verification (speculative decoding) draw from the engine's stream too."""
    llm = LLM(tiny_model(), tok, draft="ngram", num_draft_tokens=3)
    params = SamplingParams(temperature=0.8, max_tokens=16, ignore_eos=True)
    state = torch.get_rng_state()
    outs = llm.generate(PROMPTS, params)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(len(t) == 16 for t in _tokens(outs))


def test_unseeded_samples_are_reproducible_from_the_seed_the_engine_was_built_under(tok):
    model = tiny_model()
    params = SamplingParams(temperature=1.0, max_tokens=10, n=2, ignore_eos=True)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        engine = Engine(model, tok)
        torch.rand(7)  # (torch's RNG moving after the engine was built changes nothing it samples)
        runs.append(_tokens(run_requests(engine, [(p, params) for p in PROMPTS])))
    assert runs[0] == runs[1]
    torch.manual_seed(124)
    other = _tokens(run_requests(Engine(model, tok), [(p, params) for p in PROMPTS]))
    assert other != runs[0]
    # the engine's stream advances: a second batch on the same engine samples anew
    torch.manual_seed(123)
    engine = Engine(model, tok)
    first = _tokens(run_requests(engine, [(p, params) for p in PROMPTS]))
    assert _tokens(run_requests(engine, [(p, params) for p in PROMPTS])) != first


def test_seeded_samples_do_not_depend_on_the_engines_stream_or_torchs(tok):
    """A seeded request samples the same beside unseeded ones, whatever stream the engine was built with."""
    model = tiny_model()
    seeded = SamplingParams(temperature=1.0, max_tokens=10, seed=7, ignore_eos=True)
    free = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    got = []
    for build_seed in (0, 1):
        torch.manual_seed(build_seed)
        engine = Engine(model, tok)
        reqs = [(PROMPTS[0], free), (PROMPTS[1], seeded), (PROMPTS[2], free)] if build_seed else [(PROMPTS[1], seeded)]
        outs = run_requests(engine, reqs)
        got.append(next(o for o in outs if o.outputs[0].token_ids and o.prompt_token_ids == PROMPTS[1]))
    assert got[0].outputs[0].token_ids == got[1].outputs[0].token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_unseeded_generation_on_a_gpu_leaves_torchs_rngs_untouched(tok):
    """CUDA graphs and async scheduling (on by default on a GPU): neither torch's CPU nor its CUDA RNG moves, and
    an engine built under the same seed samples the same."""
    params = SamplingParams(temperature=1.0, max_tokens=12, n=2, ignore_eos=True)
    model, runs = tiny_model().cuda(), []
    for _ in range(2):
        torch.manual_seed(5)
        llm = LLM(model, tok)
        cpu, cuda = torch.get_rng_state(), torch.cuda.get_rng_state()
        runs.append(_tokens(llm.generate(PROMPTS, params)))
        assert torch.equal(torch.get_rng_state(), cpu) and torch.equal(torch.cuda.get_rng_state(), cuda)
    assert runs[0] == runs[1]


def test_seeds_take_torchs_int64_range_each_its_own_stream(tok):
    """A seed is an int64 (what vLLM's API takes; torch.Generator reads a seed's 64 bits, -1 as 2**64 - 1), refused
    in one line outside it; each seed_for(seed, index) is an int64 too, the sum wrapped mod 2**64 (times 1_000_003,
    odd: distinct seeds, distinct generator seeds). The reduction mod 2**63 - 1 gave seed 2**63 - 1 the stream of
    seed 0 and took any Python int. On a CPU, torch's generator (mt19937) reads a seed's low 32 bits, which the
    wrap keeps apart for seeds apart mod 2**32: small ones, negative ones, differ in samples."""
    from lmforge.errors import ConfigError
    from lmforge.infer.request import seed_for

    for bad in (2**63, -2**63 - 1, 10**30):
        with pytest.raises(ConfigError, match=rf"seed must be an int in \[-2\*\*63, 2\*\*63\) .*, got {bad}"):
            SamplingParams(temperature=1.0, seed=bad)
    edges = [0, 1, -1, 2**63 - 1, -2**63, 2**63 - 2, 2**32]
    assert seed_for(7, 2) == 7 * 1_000_003 + 2 * 7_919 + 1  # small seeds: the sum itself, as before
    assert seed_for(0, 0) == 1 and seed_for(2**63 - 1, 0) == 2**63 - 1_000_002  # (mod 2**63 - 1: 1 as well)
    assert seed_for(-1, 0) == -1_000_002 and seed_for(-2**63, 0) == -2**63 + 1
    assert len({seed_for(seed_for(s, i), j) for s in edges for i in range(3) for j in range(3)}) == len(edges) * 9
    assert all(-2**63 <= seed_for(s, j) < 2**63 for s in edges for j in range(3))
    llm = LLM(tiny_model(), tok)  # each seed as prompt 0 of its own batch, on a CPU: seeds apart mod 2**32
    samples = [_tokens(llm.generate([[5, 6, 7]], SamplingParams(temperature=1.0, max_tokens=16, n=2, seed=s,
                                                                  ignore_eos=True))) for s in (0, 1, -1, 2**31, 99)]
    assert len({tuple(t) for ts in samples for t in ts}) == 2 * 5
