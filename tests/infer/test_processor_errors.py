"""A request's logits processor returning something unusable (a wrong shape, a mask, a non-tensor) or reopening
a padded vocabulary id fails that request alone (a RequestError naming the problem), never the engine's step."""

from __future__ import annotations

import re

import pytest
import torch

from lmforge.errors import RequestError
from lmforge.infer.sampler import Row, sample_rows
from lmforge.infer.sampling import SamplingParams


def _rows(*processors, temperature=0.0):
    """One row per entry: None = no processor, else a row running that processor."""
    return [Row(SamplingParams(temperature=temperature, seed=0, logits_processors=() if f is None else (f,)),
                None, [1, 2, 3], 2, request_id=f"r{i}") for i, f in enumerate(processors)]


def _only(*ids):
    def only(out_ids, logits):
        mask = torch.full_like(logits, float("-inf"))
        mask[list(ids)] = 0
        return logits + mask
    return only


BAD = {
    "short": (lambda ids, l: l[:10], r"returned a tensor of shape \(10,\), but the logits it is given have shape "
                                     r"\(320,\) \(the model's rows, more than the tokenizer's 257"),
    "long": (lambda ids, l: torch.cat([l, l]), r"shape \(640,\)"),
    "batched": (lambda ids, l: l[None], r"shape \(1, 320\)"),
    "scalar": (lambda ids, l: l.max(), r"shape \(\)"),
    "bool mask": (lambda ids, l: l > 0, r"returned a torch.bool tensor: return float logits"),
    "int": (lambda ids, l: l.long(), r"returned a torch.int64 tensor"),
    "none": (lambda ids, l: None, r"returned NoneType, not a torch.Tensor"),
    "list": (lambda ids, l: l.tolist(), r"returned list, not a torch.Tensor"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_bad_processor_output_fails_its_row_only(case, temperature):
    """Before: `out[i] = row` ran outside the processors' try, so a wrong shape raised out of sample_rows (the
    whole step, every request), and a 0-d tensor or bool mask broadcast / cast into the row silently."""
    f, message = BAD[case]
    torch.manual_seed(0)
    logits = torch.randn(3, 320)
    rows = _rows(None, f, _only(7), temperature=temperature)
    got = sample_rows(logits, rows, vocab_limit=257)
    assert set(got.failed) == {1}
    err = got.failed[1]
    assert isinstance(err, RequestError) and err.request_id == "r1"
    assert "request 'r1': a logits processor " in str(err) and "the request was aborted" in str(err)
    assert re.search(message, str(err)), str(err)
    assert int(got.tokens[2]) == 7  # the other processor's row is unaffected
    if temperature == 0:
        assert int(got.tokens[0]) == int(logits[0, :257].argmax())


def test_processors_cannot_reopen_padded_ids():
    """Ids at or beyond vocab_limit (a model vocabulary padded past its tokenizer's) are masked again after the
    processors: one allowing only padded ids leaves no token allowed (the request's error, not an IndexError in
    detokenization failing the step); one allowing a padded id and a real one draws the real one."""
    logits = torch.zeros(2, 320)
    logits[:, 300] = 50.0  # the padded id would win every draw
    for temperature in (0.0, 1.0):
        got = sample_rows(logits, _rows(_only(300), _only(300, 5), temperature=temperature), vocab_limit=257)
        assert set(got.failed) == {0}
        assert "left no token allowed (or gave NaN) among the ids below 257" in str(got.failed[0])
        assert int(got.tokens[1]) == 5
    got = sample_rows(logits, _rows(_only(300)))  # no padding: every id is drawable
    assert got.failed is None and int(got.tokens[0]) == 300


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_bad_processor_aborts_only_its_request_in_the_engine(tok, async_scheduling):
    """On a model with a padded vocabulary (320 rows, tokenizer 257): a processor slicing to the tokenizer's size
    and one allowing only a padded id each end their own request (finish_reason 'abort', a RequestError), the
    batch's other request equals its output alone, and the engine serves the next request."""
    from lmforge.infer.engine import Engine, EngineConfig

    from .infer_helpers import run_requests, tiny_model

    model, config = tiny_model("llama", vocab_size=320), EngineConfig(block_size=4, async_scheduling=async_scheduling)
    good = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    sliced = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                            logits_processors=(lambda ids, l: l[:257] if len(ids) == 2 else l,))
    padded = SamplingParams(temperature=1.0, seed=1, max_tokens=12, ignore_eos=True, logits_processors=(_only(300),))
    alone = run_requests(Engine(model, tok, config), [("hello there", good)])[0]
    engine = Engine(model, tok, config)
    outs = run_requests(engine, [("hello there", good), ("bad", sliced), ("pad", padded)])
    assert outs[0].error is None and outs[0].outputs[0].token_ids == alone.outputs[0].token_ids
    for out, what in ((outs[1], "returned a tensor of shape (257,)"), (outs[2], "left no token allowed")):
        assert out.finish_reason == "abort" and isinstance(out.error, RequestError)
        assert what in str(out.error)
    assert outs[1].outputs[0].token_ids and len(outs[1].outputs[0].token_ids) == 2
    assert engine.pool.num_used == 0 and not engine.requests
    assert run_requests(engine, [("hello there", good)])[0].outputs[0].token_ids == alone.outputs[0].token_ids


class _Factory:
    def __init__(self, make):
        self.make = make

    def for_sequence(self):
        return self.make()


def test_a_failing_processor_factory_aborts_only_its_request(tok):
    """A factory entry (SamplingParams.logits_processors, for_sequence()) that raises or returns no function
    fails its request with a RequestError naming it; the batch's other request runs on."""
    from lmforge.infer.engine import Engine

    from .infer_helpers import run_requests, tiny_model

    good = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    engine = Engine(tiny_model("llama"), tok)
    outs = run_requests(engine, [("hello", good),
                                 ("a", SamplingParams(temperature=0, max_tokens=5, n=2,
                                                      logits_processors=(_Factory(lambda: 1 / 0),))),
                                 ("b", SamplingParams(temperature=0, max_tokens=5,
                                                      logits_processors=(_Factory(lambda: 3),)))])
    assert outs[0].error is None and len(outs[0].outputs[0].token_ids) == 5
    assert "_Factory.for_sequence() raised ZeroDivisionError" in str(outs[1].error)
    assert "_Factory.for_sequence() returned int, not a function" in str(outs[2].error)
    assert all(isinstance(o.error, RequestError) and o.finish_reason == "abort" for o in outs[1:])
    assert engine.pool.num_used == 0 and not engine.requests


def test_a_processor_failing_on_the_first_token_leaves_n_failed_samples_as_a_refused_request(tok):
    """The n samples of a request fork from its prompt's logits: a processor failing there ended the request with one
    sample, where a refused request (errors="return") gives n; an RL group of n read one."""
    from lmforge.infer.llm import LLM

    from .infer_helpers import tiny_model

    sampled = SamplingParams(temperature=1.0, seed=0, n=3, max_tokens=4)
    dead = SamplingParams(temperature=1.0, seed=0, n=3, max_tokens=4, logits_processors=(_only(),))
    outs = LLM(tiny_model("llama"), tok).generate(["ok", "x" * 300, "dead"], [sampled, sampled, dead],
                                                  errors="return")
    assert [len(o.outputs) for o in outs] == [3, 3, 3]
    for out in outs[1:]:
        assert isinstance(out.error, RequestError)
        assert [(o.index, o.token_ids, o.finish_reason) for o in out.outputs] == [(j, [], "abort") for j in range(3)]
