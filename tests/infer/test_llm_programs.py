"""LLM's program API (submit / wait / completed) and batch calls when something fails: a failed engine step
leaves the LLM usable, and errors="return" keeps the rest of a batch (found by the LM-programs sweep)."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmforge.errors import ConfigError, RequestError
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _dead_end(ids, logits):  # a constraint that allows nothing after two tokens: that request's own failure
    return torch.full_like(logits, float("-inf")) if len(ids) >= 2 else logits


def _fail_next_step(llm: LLM, monkeypatch, exc: Exception) -> None:
    """The engine's next step raises `exc` (a model or engine failure, not one request's input), later ones run."""
    real = llm.engine.step

    def step(*args, **kwargs):
        monkeypatch.setattr(llm.engine, "step", real)
        raise exc
    monkeypatch.setattr(llm.engine, "step", step)


def test_a_failed_step_through_wait_does_not_wedge_the_llm(tok, monkeypatch):
    llm = LLM(tiny_model(), tok)
    ref = llm.generate(["hello", "fresh"], GREEDY)
    good, bad = llm.submit("hello", GREEDY), llm.submit("bad", GREEDY)
    _fail_next_step(llm, monkeypatch, RuntimeError("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):  # the step's own exception, once
        llm.wait([bad])
    assert not llm.engine.requests and bad not in llm._held  # all aborted; the caller's own output taken
    with pytest.raises(RequestError, match="aborted: an engine step failed \\(RuntimeError: shape mismatch"):
        llm.wait([good])  # the other request's output: failed, with the step's error
    assert not llm._held and not llm._submitted
    assert llm.generate("fresh", GREEDY)[0].token_ids == ref[1].token_ids  # usable again
    assert llm.wait([llm.submit("hello", GREEDY)])[0].token_ids == ref[0].token_ids


def test_a_failed_step_marks_outputs_for_completed_and_generate_recovers(tok, monkeypatch):
    llm = LLM(tiny_model(), tok)
    ids = [llm.submit(p, GREEDY) for p in ("a", "b")]
    _fail_next_step(llm, monkeypatch, ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        list(llm.completed())
    outs = list(llm.completed(errors="return"))  # each aborted request, failed, the step's error as cause
    assert sorted(o.request_id for o in outs) == sorted(ids)
    assert all(isinstance(o.error, RequestError) and isinstance(o.error.__cause__, ValueError) and o.finished
               and o.finish_reason == "abort" for o in outs)
    _fail_next_step(llm, monkeypatch, ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        llm.generate("x", GREEDY)
    assert not llm.engine.requests and not llm._held
    assert len(llm.generate("x", GREEDY)[0].token_ids) == 6


def test_generate_errors_return_keeps_the_other_prompts(tok):
    llm = LLM(tiny_model(), tok)
    params = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                             logits_processors=(_dead_end,) if i == 2 else ()) for i in range(5)]
    prompts = [f"q{i}" for i in range(5)]
    with pytest.raises(RequestError, match="prompt 2"):
        llm.generate(prompts, params)  # the default is unchanged
    outs = llm.generate(prompts, params, errors="return")
    assert [o.error is None for o in outs] == [True, True, False, True, True]
    assert isinstance(outs[2].error, RequestError) and outs[2].finish_reason == "abort"
    assert outs[2].prompt == "q2" and len(outs[2].token_ids) == 2
    alone = llm.generate(prompts[:2] + prompts[3:], params[:2] + params[3:])
    assert [o.token_ids for o in outs if o.error is None] == [o.token_ids for o in alone]
    assert not llm.engine.requests and not llm._held
    with pytest.raises(ConfigError, match="errors must be 'raise' or 'return'"):
        llm.generate("x", GREEDY, errors="ignore")


def test_chat_errors_return(tok):
    llm = LLM(tiny_model(), tok)
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=5, logits_processors=(_dead_end,))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outs = llm.chat(convs, params, template="plain", errors="return")
    assert outs[0].error is None and len(outs[0].token_ids) == 6 and outs[1].error is not None


def test_wait_and_completed_errors_return(tok):
    llm = LLM(tiny_model(), tok)
    bad_params = SamplingParams(temperature=0, max_tokens=5, logits_processors=(_dead_end,))
    good, bad = llm.submit("hello", GREEDY), llm.submit("bad", bad_params)
    outs = llm.wait([bad, good], errors="return")
    assert outs[0].error is not None and outs[1].error is None and not llm._submitted
    # completed(): "raise" ends the generator at the failure, a new one goes on with the rest
    ids = [llm.submit("one", GREEDY), llm.submit("bad", bad_params), llm.submit("two", GREEDY)]
    seen = []
    with pytest.raises(RequestError):
        for out in llm.completed():
            seen.append(out.request_id)
    seen += [o.request_id for o in llm.completed()]
    assert sorted(seen) == sorted([ids[0], ids[2]])
    # "return": the failed output is yielded and the loop goes on
    ids = [llm.submit("one", GREEDY), llm.submit("bad", bad_params), llm.submit("two", GREEDY)]
    outs = {o.request_id: o for o in llm.completed(errors="return")}
    assert sorted(outs) == sorted(ids) and [outs[i].error is None for i in ids] == [True, False, True]


def test_chat_warns_once_when_it_falls_back_to_plain(tok):
    llm = LLM(tiny_model(), tok)  # the byte tokenizer has no chatml special tokens
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.warns(UserWarning, match="plain template"):
        llm.chat(msgs, GREEDY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm.chat(msgs, GREEDY)  # once per LLM
        llm.chat(msgs, GREEDY, template="plain")  # asked for: nothing to say
