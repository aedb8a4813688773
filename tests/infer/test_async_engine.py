"""AsyncEngine as a server uses it (fp32, CPU, tiny models): a stream left under a cancelled task or an
anyio cancel scope (Starlette's client disconnect) aborts its request; bad input raises at add_request,
before any stream starts; a slow reader holds one snapshot, never loses the final one; a failing step
fails every running stream and leaves the engine clean for the next request; streamed text only grows."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.async_engine import AsyncEngine
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import full_greedy, tiny_model

LONG = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)


def slow_steps(engine: Engine, in_step: threading.Event, after: int) -> None:
    """From step `after` on each step takes 50 ms and sets `in_step` while it runs, so that a test can
    cancel a stream while a step is in flight (when the cleanup cannot touch the engine)."""
    step, calls = engine.step, [0]

    def slow(*args):
        calls[0] += 1
        if calls[0] >= after:
            in_step.set()
            time.sleep(0.05)
        return step(*args)

    engine.step = slow


@pytest.mark.parametrize("via", ["generate", "add_request + stream"])
@pytest.mark.parametrize("how", ["anyio cancel scope", "task.cancel"])
def test_a_stream_cancelled_during_a_step_aborts_its_request(tok, how, via):
    """Starlette cancels a disconnected client's response through an anyio cancel scope, which cancels
    again at every await: the stream's cleanup must abort without awaiting (it once awaited the step lock,
    was cancelled there, and the request ran to max_tokens). The other request runs on unchanged."""
    anyio = pytest.importorskip("anyio") if how.startswith("anyio") else None
    model = tiny_model("llama")

    async def main():
        engine = Engine(model, tok, EngineConfig(block_size=4))
        in_step = threading.Event()
        slow_steps(engine, in_step, after=4)
        aeng = AsyncEngine(engine)
        other = asyncio.ensure_future(collect(aeng.generate("stays", SamplingParams(temperature=0, max_tokens=12,
                                                                                   ignore_eos=True))))
        reqs = []

        async def consume():
            if via == "generate":
                outs = aeng.generate("leaves", LONG, request_id="leaves")
            else:
                outs = aeng.stream(await aeng.add_request("leaves", LONG, request_id="leaves"))
            async for _ in outs:
                reqs.append(engine.requests.get("leaves"))

        async def cancel_during_a_step(cancel):
            while not in_step.is_set():
                await asyncio.sleep(0.001)
            cancel()

        if anyio is not None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await cancel_during_a_step(tg.cancel_scope.cancel)
        else:
            task = asyncio.ensure_future(consume())
            await cancel_during_a_step(task.cancel)
            with pytest.raises(asyncio.CancelledError):
                await task
        return reqs[0], await other, engine

    req, other, engine = asyncio.run(main())
    seq = req.seqs[0]
    assert seq.finish == "abort" and 3 <= seq.num_output <= 5  # aborted right after the step in flight
    assert seq.tokens[req.prompt_len:] == full_greedy(model, tok.encode("leaves"), seq.num_output)
    assert other[-1].finished and other[-1].token_ids == full_greedy(model, tok.encode("stays"), 12)
    assert not engine.has_unfinished() and engine.pool.num_used == 0


def test_a_stream_left_between_steps_aborts_at_once(tok):
    model = tiny_model("llama")

    async def main():
        aeng = AsyncEngine(Engine(model, tok, EngineConfig(block_size=4)))
        rid = await aeng.add_request("leaves", LONG)
        outs = aeng.stream(rid)
        first = await anext(outs)
        async with aeng._between_steps():  # no step can run: the abort cannot wait for the loop
            await outs.aclose()
            assert rid not in aeng.engine.requests and aeng.engine.pool.num_used == 0 and not aeng._aborts
        return first

    assert asyncio.run(main()).token_ids == full_greedy(model, tok.encode("leaves"), 1)


async def collect(stream) -> list:
    return [o async for o in stream]


def test_bad_input_raises_at_add_request_before_any_stream(tok):
    """A server turns these into HTTP 400 before it starts a streaming response; nothing is queued."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        aeng = AsyncEngine(Engine(model, tok))
        with pytest.raises(LmforgeError, match="prompt 0 has 300 tokens but the context window is 128"):
            await aeng.add_request("x" * 300, sp)
        with pytest.raises(ConfigError, match="params must be a SamplingParams, got dict"):
            await aeng.add_request("a", {"temperature": 0})
        with pytest.raises(LmforgeError, match="prompt 0 is empty"):
            await aeng.add_request("", sp)
        assert not aeng.engine.requests and not aeng.streams and aeng._loop_task is None
        with pytest.raises(LmforgeError, match="no request 'nope' to stream"):
            aeng.stream("nope")  # at the call, not at the first anext
        rid = await aeng.add_request("a", sp, request_id="r1")
        with pytest.raises(LmforgeError, match="request id 'r1' is already in use"):
            await aeng.add_request("b", sp, request_id="r1")
        outs = await collect(aeng.stream(rid))
        with pytest.raises(LmforgeError, match="no request 'r1' to stream"):
            aeng.stream(rid)  # streamed once
        again = await aeng.add_request("a", sp, request_id="r1")  # the id is free once its stream ended
        return rid, outs, await collect(aeng.stream(again))

    rid, outs, again = asyncio.run(main())
    want = full_greedy(model, tok.encode("a"), 4)
    assert rid == "r1" and [len(o.token_ids) for o in outs] == [1, 2, 3, 4] and outs[-1].finished
    assert outs[-1].token_ids == again[-1].token_ids == want


def test_a_slow_reader_holds_the_newest_snapshot_and_gets_the_final_one(tok):
    """Each output is a cumulative snapshot: a reader that falls behind finds only the newest, not one
    per step it missed, and the finished one is not replaced by anything after it."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def main():
        aeng = AsyncEngine(Engine(model, tok, EngineConfig(block_size=4)))
        rid = await aeng.add_request("slow", sp)
        outs = aeng.stream(rid)
        first = await anext(outs)
        while not aeng.streams[rid].final:  # the request finishes while its reader sleeps
            await asyncio.sleep(0.005)
        held = aeng.streams[rid].item
        with pytest.raises(LmforgeError, match="no running request"):
            await aeng.abort(rid)  # too late: changes nothing
        return first, held, await collect(outs), aeng

    first, held, rest, aeng = asyncio.run(main())
    want = full_greedy(model, tok.encode("slow"), 20)
    assert first.token_ids == want[:1] and not first.finished
    assert len(rest) == 1 and rest[0] is held and rest[0].finished and rest[0].finish_reason == "length"
    assert rest[0].token_ids == want and not aeng.streams


def test_abort_releases_a_request_that_finished_unread(tok):
    """A request added but never streamed runs to its end and holds its output: abort returns it and lets
    it go (it used to raise "no running request", and only a stream could release it)."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    async def main():
        aeng = AsyncEngine(Engine(model, tok, EngineConfig(block_size=4)))
        rid = await aeng.add_request("unread", sp)
        while not aeng.streams[rid].final:
            await asyncio.sleep(0.005)
        out = await aeng.abort(rid)
        with pytest.raises(LmforgeError, match="no running request"):
            await aeng.abort(rid)  # released: nothing left to abort
        return out, aeng

    out, aeng = asyncio.run(main())
    assert out.finished and out.token_ids == full_greedy(model, tok.encode("unread"), 5) and not aeng.streams


def test_automatic_ids_skip_held_ones_and_a_left_stream_aborts_only_its_own_request(tok):
    """A server's id "1" finishes while its reader is slow (its output held): automatic ids then skip "1",
    and when the old reader leaves, the request running beside it is not the one aborted."""
    model = tiny_model("llama")
    short, long = (SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, 30))

    async def main():
        aeng = AsyncEngine(Engine(model, tok, EngineConfig(block_size=4)))
        old = aeng.stream(await aeng.add_request("old", short, request_id="1"))
        while aeng.engine.has_unfinished():
            await asyncio.sleep(0.005)
        a, b = await aeng.add_request("auto a", short), await aeng.add_request("auto b", long)
        assert "1" not in (a, b)
        assert (await anext(old)).finished
        await collect(old)
        return a, b, await collect(aeng.stream(b))

    a, b, got = asyncio.run(main())
    assert got[-1].outputs[0].finish_reason == "length" and got[-1].token_ids == full_greedy(model, tok.encode("auto b"), 30)


@pytest.mark.parametrize("where", ["Engine.step", "the runner"])
def test_a_failing_step_fails_every_running_stream_and_leaves_the_engine_clean(tok, where):
    """A step that raises is an engine failure: every running request's stream raises it and the request
    is aborted (blocks freed), a request that had finished keeps its final output, and a request added
    afterwards runs as on a fresh engine."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)

    async def main():
        engine = Engine(model, tok, EngineConfig(block_size=4))
        owner, name = (engine, "step") if where == "Engine.step" else (engine.runner, "execute")
        real, calls = getattr(owner, name), [0]

        def fails_once(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 4:
                raise RuntimeError("device lost")
            return real(*args, **kwargs)

        setattr(owner, name, fails_once)
        aeng = AsyncEngine(engine)
        done_early = await aeng.add_request("early", short)  # finishes at step 2, read only after the failure
        streams = [asyncio.ensure_future(collect(aeng.generate(p, sp))) for p in ("one", "two", "three")]
        results = await asyncio.gather(*streams, return_exceptions=True)
        early = await collect(aeng.stream(done_early))
        clean = not engine.requests and engine.pool.num_used == 0
        after = await collect(aeng.generate("after", sp))
        return results, early, clean, after

    results, early, clean, after = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and str(r) == "device lost" for r in results)
    assert len(early) == 1 and early[0].finished and early[0].token_ids == full_greedy(model, tok.encode("early"), 2)
    assert clean
    fresh = Engine(model, tok, EngineConfig(block_size=4))
    rid = fresh.add_request("after", sp)
    want = {}
    while fresh.has_unfinished():
        want.update({o.request_id: o for o in fresh.step() if o.finished})
    assert after[-1].finished
    assert after[-1].token_ids == want[rid].token_ids == full_greedy(model, tok.encode("after"), 20)


def maybe_stop_at(text: str, stops: tuple[str, ...]) -> int:
    """Where the first place a stop string may begin is, given the text so far (len(text): nowhere)."""
    return next((p for p in range(len(text)) if any(len(text) - p < len(s) and s.startswith(text[p:]) for s in stops)),
                len(text))


def test_streamed_text_only_grows_and_never_shows_a_stop_prefix(tok):
    """Random prompts over a small alphabet with stop strings over the same alphabet (so stop prefixes
    keep appearing): every intermediate text, from Engine.step and from AsyncEngine, is a prefix of the
    final text and is the text so far up to the first place a stop string may begin; the final text is the whole decoded
    output cut before the first stop string (unchanged by the hold-back)."""
    model = tiny_model("llama", init_std=0.3)
    alphabet = [ord(c) for c in "ab c"]
    bias = {i: -100.0 for i in range(tok.vocab_size) if i not in alphabet}
    rng = random.Random(0)
    mix = []
    for i in range(16):
        stop = tuple("".join(rng.choice("ab c") for _ in range(rng.randrange(2, 5)))
                     for _ in range(rng.choice([1, 2])))
        mix.append(("".join(rng.choice("ab c") for _ in range(rng.randrange(1, 9))),
                    SamplingParams(temperature=1.0, seed=i, max_tokens=24, stop=stop, logit_bias=bias, n=1 + i % 2)))

    def check(seen: dict[str, list], finals: dict) -> int:
        held = 0
        for rid, outs in seen.items():
            final = finals[rid]
            for j, f in enumerate(final.outputs):
                stops = mix[int(rid.split("-")[1])][1].stop
                whole = tok.decode(f.token_ids)
                cut = min((k for k in (whole.find(s) for s in stops) if k >= 0), default=None)
                assert f.text == (whole if cut is None else whole[:cut])
                assert f.finish_reason == ("stop" if cut is not None else "length")
                for o in outs[:-1]:
                    if j >= len(o.outputs):  # the n samples fork after the prompt
                        continue
                    text = o.outputs[j].text
                    assert f.text.startswith(text)
                    if o.outputs[j].finish_reason is None:  # (the other sample may have ended)
                        so_far = tok.decode(o.outputs[j].token_ids)
                        assert text == so_far[:maybe_stop_at(so_far, stops)]
                        held += len(so_far) > len(text)
        return held

    engine = Engine(model, tok, EngineConfig(block_size=4))
    seen: dict[str, list] = {}
    for i, (p, sp) in enumerate(mix):
        seen[engine.add_request(p, sp, request_id=f"r-{i}")] = []
    while engine.has_unfinished():
        for o in engine.step():
            seen[o.request_id].append(o)
    held = check(seen, {rid: outs[-1] for rid, outs in seen.items()})
    assert held >= 5  # the hold-back really happened
    finals = {rid: outs[-1] for rid, outs in seen.items()}
    assert {f.finish_reason for o in finals.values() for f in o.outputs} == {"stop", "length"}

    async def through_async():
        aeng = AsyncEngine(Engine(model, tok, EngineConfig(block_size=4)))
        rids = [await aeng.add_request(p, sp, request_id=f"r-{i}") for i, (p, sp) in enumerate(mix)]
        return dict(zip(rids, await asyncio.gather(*[collect(aeng.stream(r)) for r in rids])))

    streamed = asyncio.run(through_async())
    check(streamed, finals)
    assert {r: [f.text for f in o[-1].outputs] for r, o in streamed.items()} == \
        {r: [f.text for f in o.outputs] for r, o in finals.items()}
