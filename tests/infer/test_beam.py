"""Beam search: width 1 is greedy; wider beams find sequences at least as likely as greedy's."""

from __future__ import annotations

import pytest
import torch
from .infer_helpers import full_greedy, tiny_model

from lmforge.infer.beam import beam_search
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams


def seq_logprob(model, prompt: list[int], toks: list[int]) -> float:
    ids = prompt + toks
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(toks))


def test_width_one_is_greedy(arch, tok):
    model = tiny_model(arch)
    llm = LLM(model, tok)
    p = tok.encode("Hi!")
    one = beam_search(llm, "Hi!", p, SamplingParams(temperature=0, beam_width=1, max_tokens=10, ignore_eos=True))
    assert one.token_ids == full_greedy(model, p, 10)
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
