"""AsyncEngine as a server uses it (fp32, CPU, tiny models): a stream left under a cancelled task or an
anyio cancel scope (Starlette's client disconnect) aborts its request; bad input raises at add_request,
before any stream starts; a slow reader holds one snapshot, never loses the final one; a failing step
fails every running stream and leaves the engine clean for the next request; streamed text only grows."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import random
import threading
import time
import traceback

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError, RequestError
from lmforge.infer.async_engine import AsyncEngine, EngineError
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.llm import LLM
from lmforge.infer.request import seed_for
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
        reqs, at_cancel = [], []

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
            leaving = engine.requests.get("leaves")  # (it may have joined a step late on a loaded machine)
            at_cancel.append(leaving.seqs[0].num_output if leaving is not None else 0)
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
        return reqs[0], await other, engine, at_cancel[0]

    req, other, engine, at_cancel = asyncio.run(main())
    seq = req.seqs[0]
    # aborted right after the step in flight (and the one async scheduling launched behind it), not run on to 60
    assert seq.finish == "abort" and max(1, at_cancel) <= seq.num_output <= at_cancel + 2
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
    # r1's steps run while "b" is tokenized in a thread, before its reader starts: a reader that late finds only
    # the newest snapshot (one step or all four, as the threads are scheduled), so r1 is checked for that. The
    # second r1 is read from before its first step (add_request returns before the loop task runs): every step.
    lengths = [len(o.token_ids) for o in outs]
    assert rid == "r1" and lengths == sorted(set(lengths)) and lengths[-1] == 4 and outs[-1].finished
    assert [len(o.token_ids) for o in again] == [1, 2, 3, 4] and again[-1].finished
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
        late = await aeng.abort(rid)  # too late: changes nothing (it raised "no running request": a server's race)
        with pytest.raises(LmforgeError, match="no running request with id 'nope'"):
            await aeng.abort("nope")  # an id never added still raises
        return first, held, late, await collect(outs), aeng

    first, held, late, rest, aeng = asyncio.run(main())
    want = full_greedy(model, tok.encode("slow"), 20)
    assert first.token_ids == want[:1] and not first.finished
    assert late is held  # the abort of a request that finished a step ago returns its final output
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


@pytest.mark.parametrize("kind", ["cumulative", "delta"])
def test_abort_of_a_running_request_never_streamed_hands_over_its_output_and_frees_its_id(tok, kind):
    """A server aborting a request before its response began (nobody streams it): the abort's caller takes its
    output (with deltas, every one it held, joined) and the id is free. Its output stayed held for good:
    stats()['streams'] stayed 1 and the id 'in use' (add_request refused it) however long the server ran."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True, output_kind=kind)
    short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def main():
        aeng = AsyncEngine(Engine(model, tok, EngineConfig(block_size=4)))
        await aeng.add_request("never read", sp, request_id="x")
        while aeng.engine.requests["x"].seqs[0].num_output < 3:
            await asyncio.sleep(0.002)
        out = await aeng.abort("x")
        after = aeng.stats()
        again = await collect(aeng.generate("never read", short, request_id="x"))  # the id is free again
        with pytest.raises(LmforgeError, match="no running request with id 'x'"):
            await aeng.abort("x")  # streamed to its end and released: nothing to abort
        return out, after, again, aeng.stats()

    out, after, again, end = asyncio.run(main())
    n = len(out.token_ids)
    assert out.finished and out.finish_reason == "abort" and 3 <= n < 50
    assert out.token_ids == full_greedy(model, tok.encode("never read"), n)  # the whole output, from its first token
    assert (after["streams"], after["requests"], after["used_blocks"]) == (0, 0, 0)
    assert again[-1].token_ids == full_greedy(model, tok.encode("never read"), 4)
    assert (end["streams"], end["requests"], end["used_blocks"]) == (0, 0, 0)


FORBID_ALL = {  # logits processors that fail on purpose (their request's own input error)
    "no token allowed at the first token": lambda ids, lg: torch.full_like(lg, float("-inf")),
    "no token allowed after 3 tokens": lambda ids, lg: lg if len(ids) < 3 else torch.full_like(lg, float("-inf")),
    "raises after 3 tokens": lambda ids, lg: lg if len(ids) < 3 else [][0],
}


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("how", list(FORBID_ALL))
def test_a_failing_logits_processor_ends_only_its_own_stream(tok, how, async_scheduling):
    """One request's logits processor leaving no token allowed (or raising) is that user's input error: its
    stream raises a RequestError naming it (a LmforgeError, a 4xx) and the other streams go on with the outputs
    they get alone, the pool freed at the end. The step raised, so every stream failed with an EngineError (a
    500) for one user's constraint."""
    config = EngineConfig(block_size=4, async_scheduling=async_scheduling)
    model = tiny_model("llama")
    goods = [("hello there", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)),
             ("sampled pair", SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=12, logprobs=0))]
    bad = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logits_processors=(FORBID_ALL[how],))

    async def main():
        aeng = AsyncEngine(Engine(model, tok, config))
        streams = [collect(aeng.generate(p, sp)) for p, sp in goods]
        bad_rid = await aeng.add_request("bad one", bad, request_id="the bad one")
        results = await asyncio.gather(*streams, collect(aeng.stream(bad_rid)), return_exceptions=True)
        state = (aeng.engine.pool.num_used, len(aeng.engine.requests), aeng.stats()["streams"])
        return results, state

    (*good_outs, err), state = asyncio.run(main())
    assert isinstance(err, RequestError) and not isinstance(err, EngineError) and err.request_id == "the bad one"
    assert "request 'the bad one': a logits processor" in str(err)
    assert ("raised IndexError" in str(err)) == how.startswith("raises")
    assert ("after 0 output tokens" in str(err)) == how.endswith("first token")
    for (p, sp), outs in zip(goods, good_outs):
        alone = LLM(model, tok, config=config).generate(p, sp)[0]  # (prompt 0's seed: as AsyncEngine derives it)
        assert outs[-1].finished and [o.token_ids for o in outs[-1].outputs] == [o.token_ids for o in alone.outputs]
        assert [o.finish_reason for o in outs[-1].outputs] == [o.finish_reason for o in alone.outputs]
    assert good_outs[0][-1].token_ids == full_greedy(model, tok.encode("hello there"), 20)
    assert state == (0, 0, 0)


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
    assert got[-1].outputs[0].finish_reason == "length"
    assert got[-1].token_ids == full_greedy(model, tok.encode("auto b"), 30)


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
    assert all(isinstance(r, EngineError) and str(r.__cause__) == "device lost" for r in results)
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
    for i, (p, sp) in enumerate(mix):  # AsyncEngine derives a seed as LLM.generate does for prompt 0
        seen[engine.add_request(p, dataclasses.replace(sp, seed=seed_for(sp.seed, 0)), request_id=f"r-{i}")] = []
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


def test_the_next_step_runs_while_the_streams_handle_the_last_output(tok):
    """A server's work on an output (JSON, SSE, socket writes) is synchronous on the loop. The next step
    must already be running then, not wait for it: here each reader blocks the loop until the next step
    has begun (it used to yield to the streams before launching the next step, so this waited in vain)."""
    model = tiny_model("llama")
    engine = Engine(model, tok, EngineConfig(block_size=4))
    started, real = threading.Semaphore(0), engine.step

    def counted(*args):
        started.release()
        return real(*args)

    engine.step = counted

    async def main():
        aeng = AsyncEngine(engine)
        overlapped = []
        async for out in aeng.generate("overlap", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)):
            started.acquire(timeout=5)  # this output's own step
            if not out.finished:
                overlapped.append(started.acquire(timeout=1))  # blocks the loop: the next step is on its own
                started.release()
        return overlapped, out

    overlapped, last = asyncio.run(main())
    assert overlapped == [True] * 5
    assert last.token_ids == full_greedy(model, tok.encode("overlap"), 6)


def test_each_stream_of_a_failed_step_raises_its_own_engine_error(tok):
    """One exception raised in every stream grew its traceback by each stream's frames (99 frames after 32
    streams) and read as the server's own RuntimeError; each stream now raises a new EngineError caused by it."""
    model = tiny_model("llama")

    async def main(n):
        engine = Engine(model, tok, EngineConfig(block_size=4))
        real, calls = engine.step, [0]

        def fails(*args):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("device lost")
            return real(*args)

        engine.step = fails
        aeng = AsyncEngine(engine)
        sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        return await asyncio.gather(*(collect(aeng.generate(f"p{i}", sp)) for i in range(n)), return_exceptions=True)

    one, many = asyncio.run(main(1)), asyncio.run(main(8))
    assert all(isinstance(e, EngineError) and isinstance(e, RuntimeError) for e in one + many)
    assert not isinstance(many[0], LmforgeError)  # not the user's input: a 500, not a 400
    assert len({id(e) for e in many}) == 8 and len({id(e.__cause__) for e in many}) == 1
    assert str(many[0].__cause__) == "device lost" and "device lost" in str(many[0])
    frames = [len(traceback.extract_tb(e.__traceback__)) for e in many]
    assert frames == [len(traceback.extract_tb(one[0].__traceback__))] * 8


def test_shutdown_ends_running_streams_with_abort_and_refuses_new_requests(tok):
    """Graceful shutdown: requests that finish within the timeout end normally, the others end with a
    final output (finish_reason 'abort') rather than a hang or a cut stream, the blocks are freed, and a
    request added afterwards is refused with EngineError (a server's 503)."""
    model = tiny_model("llama")

    async def main():
        engine = Engine(model, tok, EngineConfig(block_size=4))
        slow_steps(engine, threading.Event(), after=1)  # 50 ms a step: the long ones cannot end in time
        aeng = AsyncEngine(engine)
        short = asyncio.ensure_future(collect(aeng.generate("short", SamplingParams(temperature=0, max_tokens=3,
                                                                                    ignore_eos=True))))
        longs = [asyncio.ensure_future(collect(aeng.generate(f"long {i}", SamplingParams(
            temperature=0, max_tokens=100, ignore_eos=True)))) for i in range(2)]
        long_prompts = {tuple(tok.encode(f"long {i}")) for i in range(2)}

        def longs_started():  # both long requests in the engine (their adds race the loop) with a token each
            started = {tuple(r.seqs[0].tokens[:r.prompt_len]) for r in engine.requests.values()
                       if len(r.seqs[0].tokens) > r.prompt_len}
            return long_prompts <= started

        while not longs_started():
            await asyncio.sleep(0.001)
        await aeng.shutdown(timeout=1.0)
        stepping_after = aeng._stepping or not aeng._loop_task.done()
        with pytest.raises(EngineError, match="shut down"):
            await aeng.add_request("late", SamplingParams(max_tokens=2))
        return await short, [await t for t in longs], engine, stepping_after

    short, longs, engine, stepping_after = asyncio.run(main())
    assert short[-1].finish_reason == "length" and short[-1].token_ids == full_greedy(model, tok.encode("short"), 3)
    for i, outs in enumerate(longs):
        assert outs[-1].finished and outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) < 100
        assert outs[-1].token_ids == full_greedy(model, tok.encode(f"long {i}"), len(outs[-1].token_ids))
    assert not stepping_after and not engine.requests and engine.pool.num_used == 0


def test_stats_show_the_queue_and_the_blocks_in_use(tok):
    """What a server's /metrics shows: requests, sequences waiting and running, open streams, KV blocks."""
    model = tiny_model("llama")

    async def main():
        aeng = AsyncEngine(Engine(model, tok, EngineConfig(block_size=4, max_num_seqs=2)))
        seen = []
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

        async def watch(stream):
            async for _ in stream:
                seen.append(aeng.stats())

        rids = [await aeng.add_request(tok.encode(f"q{i}"), sp) for i in range(5)]  # ids: no yield between adds
        queued = aeng.stats()
        await asyncio.gather(*(watch(aeng.stream(r)) for r in rids))
        return queued, seen, aeng.stats()

    queued, seen, after = asyncio.run(main())
    assert (queued["requests"], queued["waiting"], queued["running"], queued["streams"]) == (5, 5, 0, 5)
    assert max(s["running"] for s in seen) == 2 and max(s["used_blocks"] for s in seen) > 0
    assert any(s["waiting"] == 3 for s in seen)
    assert (after["requests"], after["waiting"], after["running"], after["streams"], after["used_blocks"]) == (0,) * 5


def test_a_seeded_request_samples_what_llm_generate_does(tok):
    """The same prompt and seed through a server (AsyncEngine) and offline (LLM.generate, `lmforge generate`)
    give the same samples: LLM derives prompt i's seed from (seed, i), and AsyncEngine did not (it passed the
    seed to the engine as it was)."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=1.0, top_p=0.9, n=3, seed=7, max_tokens=12)
    offline = LLM(model, tok).generate(["first", "second"], sp)

    async def main():
        aeng = AsyncEngine(Engine(model, tok))
        a = await collect(aeng.generate("first", sp))
        b = await collect(aeng.generate("second", sp, prompt_index=1))
        return a[-1], b[-1]

    a, b = asyncio.run(main())
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in offline[0].outputs]
    assert [o.token_ids for o in b.outputs] == [o.token_ids for o in offline[1].outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) == 3


def test_a_long_prompt_is_tokenized_while_the_other_streams_go_on(tok):
    """Tokenizing a long prompt takes milliseconds (12k GPT-2 tokens: 20 ms); add_request did it on the
    loop while holding the step lock, so every stream and the engine stopped meanwhile. It runs in a thread
    now: a running request keeps receiving outputs while another prompt is tokenized."""
    model = tiny_model("llama")
    encoding = threading.Event()

    class SlowToEncode(type(tok)):
        def encode(self, text):
            if text.startswith("slow"):
                encoding.set()
                time.sleep(0.3)
                encoding.clear()
            return super().encode(text)

    slow_tok = SlowToEncode()

    async def main():
        aeng = AsyncEngine(Engine(model, slow_tok, EngineConfig(block_size=4)))
        during = []

        async def watch():
            async for out in aeng.generate("running", SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)):
                if encoding.is_set():
                    during.append(len(out.token_ids))
                if out.finished:
                    return out

        watcher = asyncio.ensure_future(watch())
        await asyncio.sleep(0.02)
        rid = await aeng.add_request("slow prompt", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        slow = await collect(aeng.stream(rid))
        return during, await watcher, slow[-1]

    during, running, slow = asyncio.run(main())
    assert len(during) >= 3  # steps and their outputs went on while the prompt was tokenized
    assert running.token_ids == full_greedy(model, tok.encode("running"), 100)
    assert slow.prompt == "slow prompt" and slow.token_ids == full_greedy(model, tok.encode("slow prompt"), 4)


def test_a_stream_left_after_the_loop_task_was_cancelled_mid_step_waits_for_that_step(tok):
    """Cancelling the stepping task (asyncio.run closing, a server's shutdown) does not stop the step in its
    thread. The task used to mark the step over at once, so a stream left then aborted its request while the
    thread still stepped the engine; the abort now waits for that step to end."""
    model = tiny_model("llama")
    engine = Engine(model, tok, EngineConfig(block_size=4))
    inside, real, real_abort, clashes = threading.Event(), engine.step, engine.abort, []

    def slow(*args):
        inside.set()
        time.sleep(0.1)
        try:
            return real(*args)
        finally:
            inside.clear()

    def abort(rid):
        clashes.append(inside.is_set())
        return real_abort(rid)

    engine.step, engine.abort = slow, abort

    async def main():
        aeng = AsyncEngine(engine)
        outs = aeng.generate("leaves", LONG)
        await anext(outs)
        while not inside.is_set():
            await asyncio.sleep(0.001)
        aeng._loop_task.cancel()
        await asyncio.sleep(0.01)  # the task takes its cancellation; the step is still in its thread
        await outs.aclose()
        while inside.is_set():
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert clashes == [False]
    assert not engine.requests and engine.pool.num_used == 0


@pytest.mark.parametrize("how", ["aclose", "dropped"])
def test_a_stream_left_before_its_first_output_aborts_its_request(tok, how):
    """A server adds the request, then its streaming response never starts iterating (the client left at
    once). An async generator closed or dropped before its first anext runs no cleanup: the request ran to
    max_tokens and its output stayed held for good (taken, so neither stream nor abort could release it)."""
    model = tiny_model("llama")

    async def main():
        aeng = AsyncEngine(Engine(model, tok, EngineConfig(block_size=4)))
        rid = await aeng.add_request("never read", LONG)
        other = asyncio.ensure_future(collect(aeng.generate("read", SamplingParams(temperature=0, max_tokens=8,
                                                                                   ignore_eos=True))))
        outs = aeng.stream(rid)
        if how == "aclose":
            await outs.aclose()
        else:
            del outs
            gc.collect()
        done = await other
        for _ in range(100):
            if rid not in aeng.engine.requests:
                break
            await asyncio.sleep(0.01)
        return rid, aeng, done

    rid, aeng, done = asyncio.run(main())
    assert rid not in aeng.engine.requests and not aeng.streams and aeng.engine.pool.num_used == 0
    assert done[-1].token_ids == full_greedy(model, tok.encode("read"), 8)


def instrument(engine: Engine, aeng: AsyncEngine, delay: float = 0.01) -> dict:
    """Count steps, flag while one runs (each takes `delay` s: wide windows for a race), and record, for each
    call of Engine.update_weights / reset_prefix_cache, whether a step was running then and the requests."""
    rec = {"steps": 0, "inside": False, "calls": [], "in_step": threading.Event()}
    step = engine.step

    def stepping(*args):
        rec["inside"] = True
        rec["in_step"].set()
        try:
            time.sleep(delay)
            return step(*args)
        finally:
            rec["steps"] += 1
            rec["inside"] = False

    def watched(name):
        fn = getattr(engine, name)

        def call(*args, **kwargs):
            rec["calls"].append((name, rec["inside"], aeng._stepping, len(engine.requests)))
            return fn(*args, **kwargs)
        return call

    engine.step = stepping
    engine.update_weights = watched("update_weights")
    engine.reset_prefix_cache = watched("reset_prefix_cache")  # (update_weights calls it on the instance too)
    return rec


@pytest.mark.timeout(120)  # (each wait below has its own timeout too)
def test_update_weights_racing_streams_runs_between_them_and_later_requests_see_only_the_new_weights(tok):
    """An RL rollout server syncs the policy while streams run: AsyncEngine.update_weights holds new requests
    back, lets the running ones finish on the old weights, copies the new ones under the step lock (never
    inside Engine.step: reaching into aeng.engine.update_weights from the loop once ran beside a step), and
    the requests after it equal a fresh engine built on the new weights, log-probs included."""
    model, new = tiny_model("llama"), tiny_model("llama", seed=1)
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=0)
    early = [f"early {i}" for i in range(3)]
    late = ["late 0", "early 1"]  # (a prompt the old weights cached: the prefix cache must be dropped)
    old_ref = [full_greedy(model, tok.encode(p), 10) for p in early]
    old_late = [full_greedy(model, tok.encode(p), 10) for p in late]

    async def main():
        engine = Engine(model, tok, EngineConfig(block_size=4))
        aeng = AsyncEngine(engine)
        rec = instrument(engine, aeng)
        first = [asyncio.ensure_future(collect(aeng.generate(p, sp))) for p in early]
        while rec["steps"] < 3 or not rec["inside"]:  # a step in flight, the streams half way
            await asyncio.sleep(0.001)
        update = asyncio.ensure_future(aeng.update_weights(new.state_dict()))
        await asyncio.sleep(0)
        second = [asyncio.ensure_future(collect(aeng.generate(p, sp))) for p in late]
        await asyncio.sleep(0.05)
        waiting = not any(t.done() for t in second) and aeng.stats()["requests"] <= len(early)
        await asyncio.wait_for(update, 30)
        outs = await asyncio.wait_for(asyncio.gather(*first, *second), 30)
        return outs, rec, waiting, engine

    outs, rec, waiting, engine = asyncio.run(main())
    assert rec["calls"][0] == ("update_weights", False, False, 0)  # between steps, no request left
    assert all(c[1:] == (False, False, 0) for c in rec["calls"])
    assert waiting
    for p, ref, o in zip(early, old_ref, outs[:3]):
        assert o[-1].finish_reason == "length" and o[-1].token_ids == ref, p  # finished on the old weights
    fresh = LLM(tiny_model("llama", seed=1), tok, config=EngineConfig(block_size=4)).generate(late, sp)
    for o, f in zip(outs[3:], fresh):
        assert o[-1].token_ids == f.token_ids
        assert max(abs(a - b) for a, b in zip(o[-1].outputs[0].logprobs, f.outputs[0].logprobs)) < 1e-5
    assert [o[-1].token_ids for o in outs[3:]] != old_late  # (the new weights change the tokens)
    assert not engine.requests and engine.pool.num_used == 0


@pytest.mark.timeout(120)  # (each wait below has its own timeout too)
def test_reset_prefix_cache_between_steps(tok):
    """reset_prefix_cache while a stream runs: called once that stream finished, never inside a step; the
    repeated prompt then finds no cached prefix."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompt = "a prompt of several blocks"

    async def main():
        engine = Engine(model, tok, EngineConfig(block_size=4))
        aeng = AsyncEngine(engine)
        await collect(aeng.generate(prompt, sp))
        rec = instrument(engine, aeng)
        run = asyncio.ensure_future(collect(aeng.generate(prompt, sp)))  # a prefix hit
        while not rec["inside"]:
            await asyncio.sleep(0.001)
        await asyncio.wait_for(aeng.reset_prefix_cache(), 30)
        hits = engine.stats()["prefix_hit_blocks"]
        again = await asyncio.wait_for(collect(aeng.generate(prompt, sp)), 30)
        return await run, again, rec, hits, engine.stats()["prefix_hit_blocks"]

    run, again, rec, hits, hits_after = asyncio.run(main())
    assert rec["calls"] == [("reset_prefix_cache", False, False, 0)]
    assert run[-1].finish_reason == "length" and hits == 0 and hits_after == 0
    assert again[-1].token_ids == run[-1].token_ids == full_greedy(model, tok.encode(prompt), 6)


@pytest.mark.timeout(120)  # (each wait below has its own timeout too)
def test_pause_wait_finishes_running_requests_and_admits_new_ones_only_after_resume(tok):
    """pause() (mode 'wait'): the running request steps to its end, then no step runs; a request added while
    paused waits in add_request (not refused) and runs, with the right tokens, after resume()."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)

    async def main():
        engine = Engine(model, tok, EngineConfig(block_size=4))
        aeng = AsyncEngine(engine)
        rec = instrument(engine, aeng)
        running = asyncio.ensure_future(collect(aeng.generate("running", sp)))
        while rec["steps"] < 2:
            await asyncio.sleep(0.001)
        await asyncio.wait_for(aeng.pause(), 30)
        finished_at_pause = running.done() and not engine.requests and not aeng._stepping
        steps = rec["steps"]
        added = [asyncio.ensure_future(collect(aeng.generate(f"paused {i}", sp))) for i in range(2)]
        await asyncio.sleep(0.2)
        held = (rec["steps"] == steps, not any(t.done() for t in added), not engine.requests, aeng.paused)
        await aeng.resume()
        outs = await asyncio.wait_for(asyncio.gather(*added), 30)
        return await running, finished_at_pause, held, outs, aeng.paused

    running, finished_at_pause, held, outs, paused_after = asyncio.run(main())
    assert finished_at_pause and held == (True, True, True, True) and not paused_after
    assert running[-1].finish_reason == "length"
    assert running[-1].token_ids == full_greedy(model, tok.encode("running"), 12)
    for i, o in enumerate(outs):
        assert o[-1].finish_reason == "length" and o[-1].token_ids == full_greedy(model, tok.encode(f"paused {i}"), 12)


@pytest.mark.timeout(120)  # (each wait below has its own timeout too)
def test_pause_hold_freezes_running_requests_until_resume(tok):
    """pause('hold'): the step in flight ends and no other runs; the running request stays, its stream
    waiting, and goes on after resume() with the tokens it would have had; update_weights refuses meanwhile
    (its keys come from the current weights)."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)

    async def main():
        engine = Engine(model, tok, EngineConfig(block_size=4))
        aeng = AsyncEngine(engine)
        rec = instrument(engine, aeng)
        running = asyncio.ensure_future(collect(aeng.generate("held", sp)))
        while rec["steps"] < 3:
            await asyncio.sleep(0.001)
        await asyncio.wait_for(aeng.pause("hold"), 30)
        steps, stepping = rec["steps"], aeng._stepping or rec["inside"]
        added = asyncio.ensure_future(collect(aeng.generate("added", sp)))
        await asyncio.sleep(0.2)
        held = (rec["steps"] == steps, not running.done(), not added.done(), list(engine.requests))
        with pytest.raises(LmforgeError, match="held by pause"):
            await asyncio.wait_for(aeng.update_weights(), 30)
        await aeng.resume()
        return await asyncio.wait_for(asyncio.gather(running, added), 30), stepping, held, engine

    (running, added), stepping, held, engine = asyncio.run(main())
    assert not stepping and held[:3] == (True, True, True) and len(held[3]) == 1
    assert running[-1].finish_reason == "length" and running[-1].token_ids == full_greedy(model, tok.encode("held"), 20)
    assert added[-1].token_ids == full_greedy(model, tok.encode("added"), 20)
    assert not engine.requests and engine.pool.num_used == 0


@pytest.mark.timeout(120)  # (each wait below has its own timeout too)
def test_pause_abort_ends_running_streams_and_shutdown_ends_waiting_adds(tok):
    """pause('abort') ends the running streams with finish_reason 'abort' at once; an add_request waiting
    on the pause raises EngineError when the engine shuts down (no hang); a bad mode is a one-line error."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)

    async def main():
        engine = Engine(model, tok, EngineConfig(block_size=4))
        aeng = AsyncEngine(engine)
        rec = instrument(engine, aeng)
        running = asyncio.ensure_future(collect(aeng.generate("aborted", sp)))
        while rec["steps"] < 2:
            await asyncio.sleep(0.001)
        with pytest.raises(LmforgeError, match="'wait'"):
            await aeng.pause("drain")
        await asyncio.wait_for(aeng.pause("abort"), 30)
        out = await asyncio.wait_for(running, 30)
        waiting = asyncio.ensure_future(aeng.add_request("never", sp))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await asyncio.wait_for(aeng.shutdown(), 30)
        with pytest.raises(EngineError, match="shut down"):
            await asyncio.wait_for(waiting, 30)
        return out, engine

    out, engine = asyncio.run(main())
    assert out[-1].finish_reason == "abort" and len(out[-1].token_ids) < 100
    assert out[-1].token_ids == full_greedy(model, tok.encode("aborted"), len(out[-1].token_ids))
    assert not engine.requests and engine.pool.num_used == 0


@pytest.mark.parametrize("bad", [True, 1.5, -1, "1", None])
@pytest.mark.parametrize("seed", [None, 7])
def test_a_bad_prompt_index_is_refused_at_add_request(tok, bad, seed):
    """prompt_index picks the prompt's seed (seed_for) and names it in errors: a bool, float, negative number,
    string or None is refused in one line at add_request, add_chat_request and generate (a string with a seed was
    a TypeError from seed_for, True sampled as prompt 1, -1 and 1.5 ran on), nothing queued; the engine's own
    add_request refuses it too (None there: no batch)."""
    from lmforge.infer.chat_template import get_template

    sp = SamplingParams(temperature=1.0, max_tokens=2, seed=seed)
    want = f"prompt_index must be an int >= 0 .*, got {bad!r}"

    async def main():
        aeng = AsyncEngine(Engine(tiny_model("llama"), tok))
        with pytest.raises(ConfigError, match=want):
            await aeng.add_request("a", sp, prompt_index=bad)
        with pytest.raises(ConfigError, match=want):
            await aeng.add_request([1, 2], sp, prompt_index=bad)
        with pytest.raises(ConfigError, match=want):
            await aeng.add_chat_request([{"role": "user", "content": "a"}], sp, template=get_template("plain"),
                                        prompt_index=bad)
        with pytest.raises(ConfigError, match=want):
            await anext(aeng.generate("a", sp, prompt_index=bad))
        assert not aeng.engine.requests and not aeng.streams and aeng._loop_task is None
        if bad is not None:
            with pytest.raises(ConfigError, match=want):
                aeng.engine.add_request("a", sp, prompt_index=bad)
        assert not aeng.engine.requests
        return await collect(aeng.generate("a", sp, prompt_index=3))

    assert len(asyncio.run(main())[-1].outputs[0].token_ids) == 2
