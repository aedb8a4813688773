"""Each logits processor against its definition on hand-made distributions."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer import processors as P
from lmforge.infer.request import seed_for
from lmforge.infer.sampling import SamplingParams

PROBS = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_top_k():
    assert kept(P.top_k(LOGITS, None, 2)) == [0, 1]
    assert kept(P.top_k(LOGITS, None, 10)) == [0, 1, 2, 3, 4]
    ties = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert kept(P.top_k(ties, None, 2)) == [1, 2]


def test_top_p_smallest_set_reaching_mass():
    assert kept(P.top_p(LOGITS, None, 0.5)) == [0]  # 0.5 alone reaches 0.5
    assert kept(P.top_p(LOGITS, None, 0.6)) == [0, 1]  # 0.5 < 0.6 <= 0.7
    assert kept(P.top_p(LOGITS, None, 0.86)) == [0, 1, 2, 3]  # 0.85 < 0.86 <= 0.95
    assert kept(P.top_p(LOGITS, None, 1.0)) == [0, 1, 2, 3, 4]
    # renormalised distribution is the truncated one
    probs = P.top_p(LOGITS, None, 0.6).softmax(-1)
    torch.testing.assert_close(probs[0, :2], torch.tensor([0.5, 0.2]) / 0.7)


def test_min_p_relative_to_max():
    assert kept(P.min_p(LOGITS, None, 0.3)) == [0, 1, 2]  # threshold 0.15
    assert kept(P.min_p(LOGITS, None, 0.41)) == [0]  # threshold 0.205
    assert kept(P.min_p(LOGITS, None, 0.0)) == [0, 1, 2, 3, 4]


def test_typical_keeps_tokens_nearest_the_entropy():
    p = PROBS[0]
    H = -(p * p.log()).sum()
    order = (-p.log() - H).abs().argsort().tolist()
    mass, want = 0.0, []
    for i in order:  # smallest prefix (in typicality order) with mass >= 0.5
        want.append(i)
        mass += float(p[i])
        if mass >= 0.5:
            break
    assert kept(P.typical(LOGITS, None, 0.5)) == sorted(want)
    assert len(want) >= 2 and 0 not in want[:1]  # the mode is not the most typical token here


def test_epsilon_and_eta():
    assert kept(P.epsilon(LOGITS, None, 0.12)) == [0, 1, 2]
    assert kept(P.epsilon(LOGITS, None, 0.9)) == [0]  # the argmax always survives
    p = PROBS[0]
    H = float(-(p * p.log()).sum())
    eta = 0.1
    thr = min(eta, math.sqrt(eta) * math.exp(-H))
    assert kept(P.eta(LOGITS, None, eta)) == [i for i in range(5) if p[i] > thr]
    assert thr < 0.1 and kept(P.eta(LOGITS, None, eta)) != kept(P.epsilon(LOGITS, None, eta))


def test_ties_share_one_fate():
    """Tokens tied in probability are kept or dropped together (no dependence on ids or sort order), and the
    typical set is the paper's even when it leaves out the most likely token."""
    ties = torch.tensor([[0.3, 0.3, 0.3, 0.1]]).log()
    assert kept(P.top_p(ties, None, 0.5)) == [0, 1, 2]  # 0.3 alone is short of 0.5; its ties come along
    assert kept(P.epsilon(ties, None, 0.9)) == [0, 1, 2]  # every token tied at the top survives
    assert kept(P.typical(ties.flip(-1), None, 0.2)) == [1, 2, 3]
    peaked = torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]]).log()  # H = 1.23 nats: -log 0.1 = 2.30, -log 0.6 = 0.51
    assert kept(P.typical(peaked, None, 0.3)) == [0]  # 0.51 is nearer H than 2.30
    near = torch.tensor([[0.4, 0.3, 0.3]]).log()  # H = 1.09: -log 0.3 = 1.20 is nearer than -log 0.4 = 0.92
    assert kept(P.typical(near, None, 0.3)) == [1, 2]  # the mode is left out


@pytest.mark.parametrize("seed", range(6))
def test_filters_match_transformers_warpers(seed):
    """Each truncation filter keeps what transformers' warper keeps, over random rows with -inf entries and
    ties; where HF's choice among tied tokens depends on its sort order, lmforge keeps the whole tie."""
    L = pytest.importorskip("transformers.generation.logits_process")
    warpers = {"top_k": (P.top_k, L.TopKLogitsWarper), "top_p": (P.top_p, L.TopPLogitsWarper),
               "min_p": (P.min_p, L.MinPLogitsWarper), "typical": (P.typical, L.TypicalLogitsWarper),
               "epsilon": (P.epsilon, L.EpsilonLogitsWarper), "eta": (P.eta, L.EtaLogitsWarper)}
    gen = torch.Generator().manual_seed(seed)
    for trial in range(60):
        x = torch.randn(3, 17, generator=gen) * [0.1, 1.0, 5.0][trial % 3]
        if trial % 2:
            x = x.round()
        x[torch.rand(3, 17, generator=gen) < 0.2 * (trial % 4 == 3)] = float("-inf")
        x[:, 0] = x[:, 0].clamp(min=-50)
        for name, (ours, theirs) in warpers.items():
            a = 1 + trial % 16 if name == "top_k" else [1e-3, 0.05, 0.3, 0.6, 0.9][trial % 5]
            mine = torch.isfinite(ours(x, None, a))
            hf = torch.isfinite(theirs(a)(torch.zeros(3, 1, dtype=torch.long), x.clone()))
            for row, m, h in zip(x, mine, hf):
                ties = torch.isin(row, row[h])  # every token tied with one HF keeps
                assert (m == h).all() or (name not in ("typical", "min_p") and (h <= m).all() and (m <= ties).all()), \
                    (name, a, row, m, h)


def test_temperature_and_logit_bias():
    torch.testing.assert_close(P.temperature(LOGITS, None, 0.5), LOGITS * 2)
    out = P.logit_bias(torch.zeros(2, 4), None, {1: 3.0, 3: -1.0})
    assert out.tolist() == [[0.0, 3.0, 0.0, -1.0]] * 2


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    hist = P.TokenHistory.start([[0, 1]], 4)
    hist.add(torch.tensor([2]))
    hist.add(torch.tensor([2]))
    # CTRL: seen = prompt {0, 1} + output {2}; positive / r, negative * r
    assert P.repetition_penalty(logits, hist, 2.0).tolist() == [[1.0, -4.0, 0.5, 0.5]]
    # OpenAI: counts only over the output (token 2 twice)
    out = P.frequency_presence_penalty(logits, hist, frequency=0.5, presence=0.25)
    assert out.tolist() == [[2.0, -2.0, 1.0 - 1.0 - 0.25, 0.5]]


def test_build_processors_order_and_greedy():
    sp = SamplingParams(temperature=0.5, top_k=2, repetition_penalty=1.2)
    names = [p.func.__name__ for p in P.build_processors(sp)]
    assert names == ["repetition_penalty", "temperature", "top_k"]
    assert P.build_processors(SamplingParams(temperature=0, top_k=3)) == []


def test_sampling_matches_distribution_and_seed():
    logits = P.top_k(LOGITS, None, 3).expand(20000, -1)
    counts = torch.bincount(P.sample(logits, False), minlength=5) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=0.015, rtol=0)
    a = P.sample(LOGITS.expand(3, -1), False, [torch.Generator().manual_seed(7) for _ in range(3)])
    b = P.sample(LOGITS.expand(3, -1), False, [torch.Generator().manual_seed(7) for _ in range(3)])
    assert torch.equal(a, b) and P.sample(LOGITS, True).item() == 0


@pytest.mark.parametrize("field,value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                         ("min_p", 1.2), ("max_tokens", -1), ("n", 0), ("typical_p", 0.0),
                                         ("seed", 1.5), ("seed", "7"), ("top_k", 2.5), ("n", 1.5),
                                         ("logprobs", True), ("logit_bias", {"a": 1.0})])
def test_invalid_sampling_values_name_the_field(field, value):
    """Counts and ids must be integers (numpy's too): a request body's 1.5 or "7" is refused here, not inside
    an engine step where it would fail the batch's other requests as well."""
    with pytest.raises(ConfigError, match=f"{field}.*{re.escape(repr(value)) if isinstance(value, dict) else value}"):
        SamplingParams(**{field: value})
    ok = SamplingParams(top_k=np.int64(3), seed=np.int32(-2), logit_bias={np.int64(4): np.float32(1)}, stop=["x"])
    assert (ok.top_k, type(ok.top_k), ok.seed, ok.stop) == (3, int, -2, ("x",))  # lmforge.config.coerce_fields
    assert SamplingParams.from_dict({"logit_bias": {"50256": -100}}).logit_bias == {50256: -100}  # JSON keys


def test_equal_sampling_params_hash_equal():
    """SamplingParams is frozen, so a dict or set key; hash() raised TypeError on its logit_bias dict."""
    a = SamplingParams(temperature=0.5, logit_bias={3: 1.0, 1: -2}, stop=["x"])
    b = SamplingParams(temperature=0.5, logit_bias={1: -2.0, 3: 1}, stop=("x",))
    assert a == b and hash(a) == hash(b) and hash(SamplingParams()) == hash(SamplingParams())
    assert len({a, b, SamplingParams(), SamplingParams()}) == 2
    assert {a: 1}[b] == 1 and hash(a) != hash(dataclasses.replace(a, logit_bias={1: -2.0}))


# per-request logits processors (SamplingParams.logits_processors) ------------------------------------------
def allow(tokens):
    """A processor allowing only the given ids (a choice among options, one token at a time)."""
    def only(ids, logits):
        mask = torch.full_like(logits, float("-inf"))
        mask[list(tokens)] = 0
        return logits + mask
    return only


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_logits_processors_constrain_each_request_and_see_its_outputs(tok, async_scheduling):
    """A processor allowing a set of tokens samples as logit_bias forbidding the rest does (greedy and seeded),
    raw log-probs stay the model's, 'processed' ones include it; a processor reading the output so far forces
    a sequence whatever else runs in the batch (async scheduling on: such steps read their tokens at once)."""
    from lmforge.infer.engine import EngineConfig
    from lmforge.infer.llm import LLM

    from .infer_helpers import tiny_model

    llm = LLM(tiny_model("llama", init_std=0.3), tok,
              config=EngineConfig(block_size=4, async_scheduling=async_scheduling))
    allowed = [104, 105, 32, 111]
    ban = {t: -1e9 for t in range(257) if t not in allowed}
    for base in (SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0),
                 SamplingParams(temperature=0.9, seed=3, max_tokens=10, ignore_eos=True, logprobs=0,
                                logprobs_mode="processed")):
        with_proc = SamplingParams(**{**vars(base), "logits_processors": (allow(allowed),)})
        with_bias = SamplingParams(**{**vars(base), "logit_bias": ban})
        got, want = llm.generate("hi", with_proc)[0], llm.generate("hi", with_bias)[0]  # (one seed: one call each)
        assert got.outputs[0].token_ids == want.outputs[0].token_ids and set(got.outputs[0].token_ids) <= set(allowed)
        if base.greedy:  # raw log-probs: the model's own distribution, as logit_bias' raw ones
            assert got.outputs[0].logprobs == pytest.approx(want.outputs[0].logprobs, abs=1e-5)
        else:  # processed: the constrained distribution (the ban's -1e9 is -inf in effect)
            assert got.outputs[0].logprobs == pytest.approx(want.outputs[0].logprobs, abs=1e-4)
    target = [120, 121, 122, 120, 121]

    def spell(ids, logits):  # the next token of `target` after what was generated so far
        return allow([target[len(ids) % len(target)]])(ids, logits)

    outs = llm.generate(["a", "bb", "a"], [SamplingParams(temperature=0, max_tokens=7, ignore_eos=True,
                                                          logits_processors=(spell,)),
                                           SamplingParams(temperature=0, max_tokens=9, ignore_eos=True),
                                           SamplingParams(temperature=1.0, seed=1, max_tokens=5, ignore_eos=True,
                                                          logits_processors=(spell,))])
    assert outs[0].outputs[0].token_ids == (target * 2)[:7] and outs[2].outputs[0].token_ids == target
    alone = llm.generate("bb", SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))[0]
    assert outs[1].outputs[0].token_ids == alone.outputs[0].token_ids  # the batch's other request is untouched


def test_logits_processors_refusals(tok):
    from lmforge.errors import LmforgeError
    from lmforge.infer.llm import LLM

    from .infer_helpers import tiny_model

    with pytest.raises(ConfigError, match="logits_processors must be functions"):
        SamplingParams(logits_processors=(3,))
    only = allow([1])
    assert SamplingParams(logits_processors=only).logits_processors == (only,)  # one function as it is
    with pytest.raises(ConfigError, match="beam search ranks"):
        SamplingParams(beam_width=2, temperature=0, logits_processors=(allow([1]),))
    model = tiny_model("llama")
    llm = LLM(model, tok)
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logits_processors=(allow([1]),))
    # on an engine with a drafter it runs without speculative decoding (tests/infer/test_speculative.py)
    assert LLM(model, tok, draft="ngram").generate("hi", sp)[0].token_ids == llm.generate("hi", sp)[0].token_ids
    with pytest.raises(LmforgeError, match="left no token allowed .* after 2 output tokens"):
        llm.generate("hi", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                          logits_processors=(lambda ids, l: l if len(ids) < 2 else l - float("inf"),)))
    assert not llm.engine.requests  # the failed call's request was aborted


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_failing_processor_aborts_only_its_request(tok, async_scheduling):
    """A processor leaving no token allowed raised inside the sampler, mid-step: Engine.step failed for every
    request in the batch, with an error naming none. Now the step goes on: the failing request ends alone
    (finish_reason 'abort', its output's `error` a RequestError naming it), the others equal their outputs
    alone, the pool is free at the end; LLM.generate raises the error by prompt, wait() only for that
    request, and the engine serves the next call."""
    from lmforge.errors import RequestError
    from lmforge.infer.engine import Engine, EngineConfig
    from lmforge.infer.llm import LLM

    from .infer_helpers import full_greedy, tiny_model

    model, config = tiny_model("llama"), EngineConfig(block_size=4, async_scheduling=async_scheduling)
    good = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, seed=2, n=2, max_tokens=10, logprobs=0)
    bad = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                         logits_processors=(lambda ids, l: l if len(ids) < 3 else l - float("inf"),))
    alone = LLM(model, tok, config=config).generate(["hello there", "two"], [good, sampled])

    engine = Engine(model, tok, config)
    rids = [engine.add_request("hello there", good), engine.add_request("bad one", bad, request_id="b"),
            engine.add_request("two", dataclasses.replace(sampled, seed=seed_for(2, 1)))]
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    failed = done["b"]
    assert isinstance(failed.error, RequestError) and failed.error.request_id == "b"
    assert str(failed.error).startswith("request 'b': a logits processor left no token allowed (or gave NaN) "
                                        "after 3 output tokens")
    assert failed.finish_reason == "abort" and failed.token_ids == full_greedy(model, tok.encode("bad one"), 3)
    for rid, want in zip((rids[0], rids[2]), alone):
        assert done[rid].error is None
        assert [o.token_ids for o in done[rid].outputs] == [o.token_ids for o in want.outputs]
    assert engine.pool.num_used == 0 and not engine.requests

    llm = LLM(model, tok, config=config)
    with pytest.raises(RequestError, match=r"^prompt 1: request '\d+': a logits processor left no token allowed"):
        llm.generate(["hello there", "bad one"], [good, bad])
    assert not llm.engine.requests and llm.engine.pool.num_used == 0 and not llm._held
    ok, no = llm.submit("hello there", good), llm.submit("bad one", bad)
    with pytest.raises(RequestError, match=f"request '{no}'"):
        llm.wait([no])
    assert llm.wait([ok])[0].token_ids == alone[0].token_ids and not llm._submitted  # the other went on
    assert llm.generate("hello there", good)[0].token_ids == alone[0].token_ids
    assert llm.engine.pool.num_used == 0


class _Recorder:
    """A stateful processor: records the newest output token at every call (an incremental FSM's update) and
    checks that it is called with exactly the tokens it has recorded (its own sample's, one more each call)."""

    def __init__(self, made: list):
        self.seen: list[int] = []
        made.append(self)

    def __call__(self, ids, logits):
        if ids:
            self.seen.append(ids[-1])
        assert ids == self.seen, f"called with {ids}, but its state holds {self.seen}"
        return logits


class _PerSample:
    """A factory entry: for_sequence() makes one _Recorder per sample."""

    def __init__(self):
        self.made: list[_Recorder] = []

    def for_sequence(self):
        return _Recorder(self.made)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_factory_processors_make_one_processor_per_sample(tok, async_scheduling):
    """A logits_processors entry with for_sequence() is called once per sample (n = 3: three processors), each
    of which sees its own sample's tokens only, its first token's call included (the n first tokens are drawn
    from one prefill's logits); a plain function beside it is shared, as before; preempted samples keep theirs;
    two requests given the same params get their own. A plain stateful function (shared) mixes the samples."""
    from lmforge.infer.engine import Engine, EngineConfig
    from lmforge.infer.llm import LLM

    from .infer_helpers import run_requests, tiny_model

    model = tiny_model("llama", init_std=0.3)
    factory, calls = _PerSample(), []
    sp = SamplingParams(temperature=1.0, seed=0, n=3, max_tokens=6, ignore_eos=True,
                        logits_processors=(factory, lambda ids, l: calls.append(len(ids)) or l))
    out = LLM(model, tok, config=EngineConfig(block_size=4, async_scheduling=async_scheduling)).generate("x", sp)[0]
    assert len(factory.made) == 3 and len(calls) == 3 * 6
    assert sorted(p.seen for p in factory.made) == sorted(o.token_ids[:-1] for o in out.outputs)  # (the last: unseen)
    plain = SamplingParams(**{**vars(sp), "logits_processors": ()})
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in LLM(model, tok).generate("x", plain)[0].outputs]
    # preemption (a pool too small for every sample at once) and two requests sharing the params
    factory.made.clear()
    small = Engine(model, tok, EngineConfig(block_size=4, num_kv_tokens=48, async_scheduling=async_scheduling))
    longer = dataclasses.replace(sp, max_tokens=12)
    outs = run_requests(small, [("x", longer), ("yy", longer)])
    assert len(factory.made) == 6
    assert small.scheduler.num_preemptions > 0
    assert sorted(p.seen for p in factory.made) == sorted(o.token_ids[:-1] for r in outs for o in r.outputs)
    shared = _Recorder([])
    with pytest.raises(Exception, match="but its state holds"):  # the failure per-sample factories avoid
        LLM(model, tok).generate("x", dataclasses.replace(sp, logits_processors=(shared,)))
    with pytest.raises(ConfigError, match="or factories with a for_sequence"):
        SamplingParams(logits_processors=(object(),))
    assert SamplingParams(logits_processors=factory).logits_processors == (factory,)
