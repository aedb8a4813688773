"""SamplingParams.output_kind (vLLM's RequestOutputKind): 'delta' outputs hold only what is new since the request's
previous output, and folded in order (RequestOutput.then) they equal the cumulative output at every step - text
with stop strings held back, token ids, log-probs, top log-probs, text offsets, prompt log-probs, n > 1 samples,
chunked prefill; 'final' gives the finished output only; an AsyncEngine reader that falls behind gets the missed
deltas joined. fp32, CPU, tiny models."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from lmforge.errors import ConfigError
from lmforge.infer.async_engine import AsyncEngine
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import tiny_model

PROMPTS = ["hello there", "the quick brown fox", "a"]
CASES = {
    "greedy, logprobs, prompt logprobs": dict(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2,
                                             prompt_logprobs=1),
    "sampled n=2, stop strings": dict(temperature=1.0, n=2, seed=3, max_tokens=16, stop=("e", "ab"), logprobs=0),
    "sampled, penalties": dict(temperature=0.8, seed=1, max_tokens=10, repetition_penalty=1.3),
}


def lockstep(tok, params: SamplingParams, **config):
    """Two engines over the same requests, stepped together: cumulative and delta outputs of each step."""
    model = tiny_model("llama", init_std=0.3)
    engines = [Engine(model, tok, EngineConfig(block_size=4, **config)) for _ in range(2)]
    for eng, kind in zip(engines, ("cumulative", "delta")):
        for i, p in enumerate(PROMPTS):
            eng.add_request(p, dataclasses.replace(params, output_kind=kind), request_id=str(i))
    steps = []
    while engines[0].has_unfinished():
        cum, dlt = ({o.request_id: o for o in e.step()} for e in engines)
        assert cum.keys() == dlt.keys()
        steps.append((cum, dlt))
    assert not engines[1].has_unfinished()
    return steps


def fields(out) -> tuple:
    return (out.finished, out.prompt_logprobs,
            [dataclasses.astuple(o) for o in sorted(out.outputs, key=lambda o: o.index)])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("config", [dict(), dict(max_num_batched_tokens=6)])
def test_deltas_fold_to_the_cumulative_output_at_every_step(tok, case, config):
    folded, grew = {}, False
    for cum, dlt in lockstep(tok, SamplingParams(**CASES[case]), **config):
        for rid, d in dlt.items():
            folded[rid] = folded[rid].then(d) if rid in folded else d
            assert fields(folded[rid]) == fields(cum[rid])
            grew |= 0 < len(d.outputs[0].token_ids) < len(cum[rid].outputs[0].token_ids)
    assert grew  # deltas were pieces, not whole outputs


def test_offsets_of_tokens_inside_a_held_stop_prefix_wait_for_it(tok):
    """A tail that may begin a stop string can span tokens (a byte of an incomplete character after it, or a
    longer stop's prefix): the offsets of the tokens after its start are not known while it is held (it may be
    cut before them). They were clipped to the text shown and sent in a delta, so the deltas folded to other
    offsets than the cumulative output's, e.g. [0, 1, 1, 2, ...] for [0, 1, 2, 2, ...]. Such tokens now wait,
    log-probs and all, until the tail shows or is cut: the deltas fold to the cumulative output at every step,
    and every output's tokens, log-probs and offsets are a prefix of the finished output's."""
    model = tiny_model("llama", init_std=0.3)
    bias = {ord("a"): 5.0, ord("b"): 5.0, ord("e"): 5.0, ord("t"): 3.0, ord("h"): 3.0}
    waited = 0
    for seed in range(6):
        sp = SamplingParams(temperature=1.0, seed=seed, n=2, max_tokens=12, stop=("ab", "the"), logprobs=1,
                            logit_bias=bias, ignore_eos=True)
        engines = [Engine(model, tok, EngineConfig(block_size=4)) for _ in range(2)]
        for eng, kind in zip(engines, ("cumulative", "delta")):
            for i, p in enumerate(PROMPTS):
                eng.add_request(p, dataclasses.replace(sp, output_kind=kind), request_id=str(i))
        steps, folded = [], {}
        while engines[0].has_unfinished():
            cum, dlt = ({o.request_id: o for o in e.step()} for e in engines)
            for rid, d in dlt.items():
                folded[rid] = folded[rid].then(d) if rid in folded else d
                assert fields(folded[rid]) == fields(cum[rid])
            for rid, out in cum.items():  # tokens the engine holds beyond those in the output: waiting
                req = engines[0].requests.get(rid)
                waited += req is not None and any(len(s.tokens) - req.prompt_len > len(o.token_ids)
                                                   for s, o in zip(req.seqs, out.outputs))
            steps.append(cum)
        finals = {rid: out for cum in steps for rid, out in cum.items() if out.finished}
        for cum in steps:
            for rid, out in cum.items():
                for o in out.outputs:
                    f, k = finals[rid].outputs[o.index], len(o.token_ids)
                    assert (o.token_ids, o.logprobs, o.text_offsets) == \
                        (f.token_ids[:k], f.logprobs[:k], f.text_offsets[:k])
                    assert o.cumulative_logprob == pytest.approx(sum(o.logprobs), abs=1e-5)
                    assert all(x <= len(o.text) for x in o.text_offsets) and f.text.startswith(o.text)
    assert waited  # tokens really waited for a held tail


def test_final_gives_only_the_finished_output(tok):
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    model = tiny_model("llama", init_std=0.3)
    outs = {}
    for kind in ("cumulative", "final"):
        eng = Engine(model, tok, EngineConfig(block_size=4))
        for i, p in enumerate(PROMPTS):
            eng.add_request(p, dataclasses.replace(sp, output_kind=kind), request_id=str(i))
        seen = []
        while eng.has_unfinished():
            seen += eng.step()
        outs[kind] = {o.request_id: o for o in seen if o.finished}
        if kind == "final":
            assert all(o.finished for o in seen) and len(seen) == len(PROMPTS)
    assert {r: fields(o) for r, o in outs["final"].items()} == {r: fields(o) for r, o in outs["cumulative"].items()}


def test_delta_is_refused_for_beam_search():
    with pytest.raises(ConfigError, match="beam search.*output_kind"):
        SamplingParams(temperature=0, beam_width=2, output_kind="delta")
    with pytest.raises(ConfigError, match="output_kind=.deltas. is not one of"):
        SamplingParams(output_kind="deltas")


def test_a_slow_async_reader_gets_the_missed_deltas_joined(tok):
    """A reader that sleeps through several steps takes one output holding every piece it missed: the pieces it
    reads join to the whole text and tokens (a cumulative reader would get the newest snapshot only)."""
    model = tiny_model("llama", init_std=0.3)
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=0, output_kind="delta")

    async def main():
        aeng = AsyncEngine(Engine(model, tok, EngineConfig(block_size=4)))
        rid = await aeng.add_request("slow reader", sp)
        outs = aeng.stream(rid)
        pieces = [await anext(outs)]
        while not aeng.streams[rid].final:  # the request finishes while its reader sleeps
            await asyncio.sleep(0.005)
        async for out in outs:
            pieces.append(out)
        await aeng.shutdown()
        return pieces

    pieces = asyncio.run(main())
    want = Engine(model, tok, EngineConfig(block_size=4))
    want.add_request("slow reader", dataclasses.replace(sp, output_kind="cumulative"))
    while want.has_unfinished():
        final = [o for o in want.step() if o.finished]
    whole = pieces[0]
    for p in pieces[1:]:
        whole = whole.then(p)
    assert 2 <= len(pieces) and len(pieces[-1].outputs[0].token_ids) > 1  # the last read joined several steps
    assert fields(whole) == fields(final[0])
