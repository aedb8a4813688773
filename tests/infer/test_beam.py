"""Beam search on the engine: width 1 is greedy; wider beams find sequences at least as likely as
greedy's; many requests search at once (beside sampled ones) with the results they get alone."""

from __future__ import annotations

import pytest
import torch
from .infer_helpers import full_greedy, tiny_model

from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams


def seq_logprob(model, prompt: list[int], toks: list[int]) -> float:
    ids = prompt + toks
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(toks))


def test_beam_scores_are_model_logprobs(arch, tok):
    model = tiny_model(arch)
    llm = LLM(model, tok)
    p = tok.encode("Hi!")
    one = llm.generate("Hi!", SamplingParams(temperature=0, beam_width=2, n=1, max_tokens=10, ignore_eos=True,
                                             length_penalty=0.0))[0]
    assert one.outputs[0].cumulative_logprob >= seq_logprob(model, p, full_greedy(model, p, 10)) - 1e-5
    assert one.outputs[0].cumulative_logprob == pytest.approx(seq_logprob(model, p, one.token_ids), abs=1e-4)


def test_beam_at_least_as_likely_as_greedy(tok):
    for seed in range(3):
        model = tiny_model("llama", seed=seed, init_std=0.3)
        llm = LLM(model, tok)
        p = tok.encode("abc")
        greedy = full_greedy(model, p, 8)
        outs = llm.generate([p], SamplingParams(temperature=0, beam_width=4, n=4, max_tokens=8, ignore_eos=True))[0]
        best = outs.outputs[0]
        assert abs(best.cumulative_logprob - seq_logprob(model, p, best.token_ids)) < 1e-3
        assert best.cumulative_logprob >= seq_logprob(model, p, greedy) - 1e-5
        scores = [o.cumulative_logprob for o in outs.outputs]
        assert scores == sorted(scores, reverse=True) and len(outs.outputs) == 4


def test_early_stopping_and_length_normalisation(tok):
    model = tiny_model("llama", init_std=0.3)
    llm = LLM(model, tok)
    eot = tok.eot_id
    sp = SamplingParams(temperature=0, beam_width=3, n=3, max_tokens=6, logit_bias={eot: 4.0})
    out = llm.generate("z", sp)[0]
    for o in out.outputs:
        if o.finish_reason == "stop":
            assert o.token_ids[-1] == eot and eot not in o.token_ids[:-1]
    norm = [o.cumulative_logprob / len(o.token_ids) for o in out.outputs]
    assert norm == sorted(norm, reverse=True)


def test_many_beam_requests_at_once_equal_alone(tok):
    """Beam requests share the engine's batch with each other and with sampled requests, under a small
    token budget and block pool: each gets the beams it gets alone."""
    model = tiny_model("llama", init_std=0.3)
    sp = SamplingParams(temperature=0, beam_width=3, n=2, max_tokens=7, ignore_eos=True)
    prompts = ["abc", "hello there", "z"]
    alone = [LLM(model, tok).generate(p, sp)[0] for p in prompts]
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=6, num_kv_tokens=96))
    ids = [engine.add_request(p, sp) for p in prompts]
    engine.add_request("sampled", SamplingParams(temperature=1.0, max_tokens=9, seed=0))
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    for rid, want in zip(ids, alone):
        assert [o.token_ids for o in outs[rid].outputs] == [o.token_ids for o in want.outputs]
    assert engine.pool.num_used == 0
