"""SamplingParams built per request stay cheap: the default is validated once and shared (read-only), and
`derived(**changes)` (a per-prompt seed, the window's max_tokens) checks only what changed, refusing exactly what
a new construction refuses. Counted, not timed: full validations (__post_init__) per request."""

from __future__ import annotations

import dataclasses
import pickle
import random

import pytest

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.llm import LLM
from lmforge.infer.request import seed_for
from lmforge.infer.sampling import _FIELDS, _RULES, SamplingParams

from .infer_helpers import tiny_model


@pytest.fixture
def validations(monkeypatch) -> list:
    """SamplingParams.__post_init__ calls (full validations), one entry each."""
    calls = []
    post_init = SamplingParams.__post_init__

    def counted(self):
        calls.append(self)
        post_init(self)

    SamplingParams.default()  # (made once per process: not the requests' cost)
    monkeypatch.setattr(SamplingParams, "__post_init__", counted)
    return calls


def test_requests_given_no_params_or_a_seed_validate_no_params_of_their_own(tok, validations):
    """LLM.submit(prompt) with no params, the engine's own default, generate's per-prompt seeds and the window's
    max_tokens=None used to build and fully validate a SamplingParams per request (~40 us each)."""
    llm = LLM(tiny_model(), tok)
    ids = [llm.submit(f"p{i}") for i in range(5)]
    ids.append(llm.engine.add_request("q"))
    assert validations == []
    reqs = [llm.engine.requests[r] for r in ids]
    assert all(r.params is SamplingParams.default() for r in reqs) and reqs[0].params == SamplingParams()
    assert all(len(o.token_ids) == 64 or o.finish_reason == "stop" for o in llm.wait(ids))

    seeded = SamplingParams(seed=7, max_tokens=None, temperature=0.5)
    validations.clear()
    outs = llm.generate(["a", "b", "c"], seeded)
    assert len(validations) == 0
    assert all(len(o.token_ids) > 0 for o in outs)
    rids = [llm.submit("a", seeded.derived(seed=seed_for(7, i), max_tokens=3)) for i in range(2)]
    assert [llm.engine.requests[r].params.seed for r in rids] == [seed_for(7, 0), seed_for(7, 1)]
    assert len(validations) == 0
    llm.wait(rids)


def test_the_shared_default_cannot_be_changed_by_one_caller():
    d = SamplingParams.default()
    assert d is SamplingParams.default() and d == SamplingParams() and hash(d) == hash(SamplingParams())
    with pytest.raises(LmforgeError, match="shared by every request given no params"):
        d.logit_bias[5] = 1.0
    with pytest.raises(LmforgeError, match="shared"):
        d.logit_bias.update({5: 1.0})
    assert d.logit_bias == {}
    for copy in (pickle.loads(pickle.dumps(d)), dataclasses.replace(d, logit_bias={5: 1.0})):
        assert type(copy.logit_bias) is dict  # a copy is the caller's own
    own = d.derived(logit_bias={5: 2.0})
    assert own.logit_bias == {5: 2.0} and d.logit_bias == {}


def test_every_rule_reads_only_fields_that_exist():
    """derived() runs the rules naming a changed field: a misspelt name would skip its check silently."""
    assert all(names and names <= _FIELDS for names, _, _ in _RULES)


VALUES = {  # per field, values valid and not (alone or beside others), numpy-free
    "max_tokens": [None, 0, 1, 64, -1, 2.0, 2.5], "n": [1, 2, 3, 0], "temperature": [0.0, 0, 0.7, 1.0, -1.0, "1"],
    "top_k": [0, 5, -1], "top_p": [1.0, 0.5, 0.0, 1.5], "min_p": [0.0, 0.3, 2.0], "typical_p": [1.0, 0.9, 0.0],
    "epsilon_cutoff": [0.0, 0.1, 1.0], "eta_cutoff": [0.0, 0.1, -0.1], "repetition_penalty": [1.0, 1.2, 0.0],
    "frequency_penalty": [0.0, 0.5, 3.0], "presence_penalty": [0.0, -0.5, -3.0],
    "logit_bias": [{}, {3: 1.0}, {-1: 1.0}, {3: float("inf")}], "logits_processors": [(), (lambda ids, x: x,), (3,)],
    "stop": [(), ("x",), ["y"], ("",)], "stop_token_ids": [(), (3,), (-2,)], "seed": [None, 1, 1.5],
    "logprobs": [None, 0, 2, -1], "logprobs_mode": ["raw", "processed", "other"], "prompt_logprobs": [None, 1, -1],
    "prompt_logprobs_start": [1, 3, 0], "beam_width": [1, 2, 4, 0], "skip_special_tokens": [False, True],
    "output_kind": ["cumulative", "delta", "final"], "include_stop_str_in_output": [False, True, 1],
    "length_penalty": [1.0, 0.0, -0.5, float("-inf")],
}


def _outcome(make):
    try:
        return make()
    except ConfigError as e:
        return str(e)


def test_derived_refuses_and_returns_what_replace_does():
    """On random valid params and random changes (valid or not, crossing fields: beams with temperature,
    max_tokens=0 with n), derived gives what dataclasses.replace gives, the same error where it raises."""
    rng = random.Random(0)
    bases = [SamplingParams(), SamplingParams(temperature=0, beam_width=2, n=2),
             SamplingParams(max_tokens=0, prompt_logprobs=1),
             SamplingParams(logprobs=1, logprobs_mode="processed", repetition_penalty=1.3)]
    tried = 0
    for _ in range(600):
        base = rng.choice(bases)
        changes = {f: rng.choice(VALUES[f]) for f in rng.sample(sorted(VALUES), rng.randint(1, 3))}
        want = _outcome(lambda: dataclasses.replace(base, **changes))
        got = _outcome(lambda: base.derived(**changes))
        assert got == want, changes
        if isinstance(want, SamplingParams):
            tried += 1
            assert [type(getattr(got, f)) for f in _FIELDS] == [type(getattr(want, f)) for f in _FIELDS]
            if len(bases) < 12:
                bases.append(got)
    assert tried > 50  # (enough of them valid to compare values too)
    with pytest.raises(ConfigError, match="unknown sampling option 'temprature'"):
        SamplingParams().derived(temprature=0)
    assert SamplingParams.default().derived() is SamplingParams.default()


@pytest.mark.parametrize("body", [None, [1, 2], "temperature=0"])
def test_from_dict_of_something_not_a_dict_names_what_it_got(body):
    # (a request body of JSON null raised a TypeError, a server's 500; a list read as "unknown sampling option 1")
    with pytest.raises(ConfigError, match=f"sampling options must be a dict .* got {type(body).__name__}$"):
        SamplingParams.from_dict(body)
    assert SamplingParams.from_dict({"stop": "x", "n": 2}) == SamplingParams(stop=("x",), n=2)


@pytest.mark.parametrize("alpha", [float("-inf"), float("inf"), float("nan")])
def test_a_length_penalty_that_is_not_finite_is_refused_when_made(alpha):
    # (-inf divided a beam's score by 0 inside a step, a ZeroDivisionError that took the batch with it; inf and
    # nan ranked beams by 0 / -0 / nan scores silently)
    with pytest.raises(ConfigError, match=f"length_penalty must be a finite number .* got {alpha}$"):
        SamplingParams(temperature=0, beam_width=2, length_penalty=alpha)
    assert SamplingParams(temperature=0, beam_width=2, length_penalty=-0.5).length_penalty == -0.5
