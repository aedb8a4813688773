"""Async scheduling (EngineConfig.async_scheduling, lmforge.infer.pending) against the synchronous engine:
random request mixes (stops that trigger, seeds, logprobs, n > 1, aborts, chunked prefill, preemption,
prefix hits, the static-buffer decode path) give the same tokens, texts and finish reasons; the next step
is really launched before the previous one's tokens are read; the pool empties."""

from __future__ import annotations

import random

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.pending import Launched
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import tiny_model

SMALL = dict(block_size=4, max_num_batched_tokens=16, num_kv_tokens=96)  # chunks, preemption, prefix hits


def random_mix(rng: random.Random, n_requests: int) -> list[tuple[list[int], dict]]:
    """Prompts (half share a 13-token prefix) with greedy or seeded sampling, n in {1, 2}, logprobs."""
    shared = [rng.randrange(1, 250) for _ in range(13)]
    mix = []
    for i in range(n_requests):
        own = [rng.randrange(1, 250) for _ in range(rng.randrange(1, 30))]
        kw = dict(max_tokens=rng.randrange(1, 17), n=rng.choice([1, 1, 2]), logprobs=rng.choice([None, 2]),
                  ignore_eos=True)
        kw.update(temperature=0) if i % 3 == 0 else kw.update(temperature=0.9, top_k=40, seed=i)
        mix.append(((shared + own) if i % 2 else own, kw))
    return mix


def with_stops(rng: random.Random, mix, outputs) -> list[tuple[list[int], SamplingParams]]:
    """Stop ids and stop strings taken from a first run's outputs, so that they trigger (seeded and greedy
    samples repeat up to the stop)."""
    out = []
    for i, ((prompt, kw), o) in enumerate(zip(mix, outputs)):
        toks, text = o.outputs[0].token_ids, o.outputs[0].text
        if i % 4 == 1 and len(toks) > 1:
            kw = {**kw, "stop_token_ids": (toks[rng.randrange(1, len(toks))],)}
        elif i % 4 == 2 and len(text) > 3 and text[2:4].isascii():
            kw = {**kw, "stop": (text[2:4],)}
        out.append((prompt, SamplingParams(**kw)))
    return out


def run(model, tok, mix, config: dict, abort_after: dict[int, int] = {}):
    """Step to the end; request i in abort_after is aborted once its sample shows that many tokens."""
    engine = Engine(model, tok, EngineConfig(**config))
    ids = [engine.add_request(p, sp) for p, sp in mix]
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
        for i, k in abort_after.items():
            if ids[i] in engine.requests and engine.requests[ids[i]].seqs[0].num_output >= k:
                done[ids[i]] = engine.abort(ids[i])
    assert engine.pool.num_used == 0 and all(r == 0 for r in engine.pool.ref)  # no leak
    return [done[r] for r in ids], engine


def assert_same(got, want):
    for g, w in zip(got, want):
        assert len(g.outputs) == len(w.outputs)
        for a, b in zip(g.outputs, w.outputs):
            assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason), g.request_id
            # a row's float bits depend on its batch companions (one step apart here): values to 1e-5, ids exact
            if b.logprobs is not None:
                assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
            if b.top_logprobs is not None:  # (beam search gives none)
                assert [list(t) for t in a.top_logprobs] == [list(t) for t in b.top_logprobs]


@pytest.mark.parametrize("arch,config,window", [
    ("llama", SMALL, 0),
    ("llama", dict(SMALL, cuda_graphs=True), 0),  # decode-only steps through the static buffers
    ("gpt2", dict(block_size=8, max_num_batched_tokens=40, num_kv_tokens=512, max_num_seqs=4), 0),
    ("llama", dict(block_size=2, max_num_batched_tokens=8, num_kv_tokens=128), 4),  # blocks freed behind
])
def test_async_equals_sync_on_random_mixes(arch, config, window, tok):
    model = tiny_model(arch, init_std=0.3, sliding_window=window)
    rng = random.Random(len(arch) + len(config))
    mix = random_mix(rng, 10)
    first, _ = run(model, tok, [(p, SamplingParams(**kw)) for p, kw in mix], dict(config, async_scheduling=False))
    mix = with_stops(rng, mix, first)
    aborts = {3: 2, 8: 1}
    want, sync = run(model, tok, mix, dict(config, async_scheduling=False), aborts)
    got, engine = run(model, tok, mix, dict(config, async_scheduling=True), aborts)
    assert engine.async_scheduling and not sync.async_scheduling
    assert_same(got, want)
    assert {o.outputs[0].finish_reason for o in want} == {"stop", "length", "abort"}
    stats = engine.stats()
    if config is SMALL:  # (the tightest pool)
        assert stats["preemptions"] > 0 and stats["prefix_hit_blocks"] > 0


def test_sync_only_requests_mixed_with_async_ones(tok, monkeypatch):
    """Penalties, prompt log-probs and beam search need token values before the next step: their steps
    read tokens at once, while steps without them still overlap; all equal the sync engine."""
    model = tiny_model("llama", init_std=0.3)
    reads, finish = [], Engine._finish
    monkeypatch.setattr(Engine, "_finish", lambda self, step, changed: reads.append(step.overlap)
                        or finish(self, step, changed))
    mix = [([5, 6, 7], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
           ([9, 8], SamplingParams(temperature=0.8, seed=3, max_tokens=9, repetition_penalty=1.3, ignore_eos=True)),
           ([1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2, ignore_eos=True)),
           ([40, 41], SamplingParams(temperature=0.7, seed=1, max_tokens=10, n=3, ignore_eos=True)),
           ([7, 7, 7], SamplingParams(temperature=0, beam_width=2, max_tokens=5, ignore_eos=True))]
    want, _ = run(model, tok, mix, dict(SMALL, async_scheduling=False))
    reads.clear()
    got, _ = run(model, tok, mix, dict(SMALL, async_scheduling=True))
    assert_same(got, want)
    assert got[2].prompt_logprobs == want[2].prompt_logprobs
    assert reads.count(True) >= 3 and reads.count(False) >= 9  # the last steps overlap


def test_next_step_launches_before_the_tokens_are_read(tok, monkeypatch):
    """The order of work, recorded: launch t + 1 (its decode inputs copied from t's sampled tensor) comes
    before reading t's tokens, and the host holds none of the tokens t + 1 runs on when it is launched."""
    model = tiny_model("llama")
    events = []
    engine = Engine(model, tok, EngineConfig(async_scheduling=True, cuda_graphs=True))
    execute, finish = engine.runner.execute, engine._finish

    def traced_execute(batch, rows, *args):
        late = args[-1]
        events.append(("launch", len(late.chunks) if late is not None else 0))
        if late is not None:
            assert all(batch.chunks[c][0].num_computed == len(batch.chunks[c][0].tokens) for c in late.chunks)
        return execute(batch, rows, *args)

    def traced_finish(step: Launched, changed):
        events.append(("read", step.overlap))
        return finish(step, changed)

    monkeypatch.setattr(engine.runner, "execute", traced_execute)
    monkeypatch.setattr(engine, "_finish", traced_finish)
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ids = [engine.add_request(p, sp) for p in ("one", "two")]
    calls, outs = 0, {}
    while engine.has_unfinished():
        calls += 1
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert events == [("launch", 0), ("launch", 2), ("read", True), ("launch", 2), ("read", True),
                      ("launch", 2), ("read", True), ("read", True)]
    assert calls == 5  # 4 tokens: 4 launches, read one step late; the last call launches nothing
    sync = Engine(model, tok, EngineConfig(async_scheduling=False))
    for p in ("one", "two"):
        sync.add_request(p, sp)
    want = {}
    while sync.has_unfinished():
        want.update({o.request_id: o.token_ids for o in sync.step() if o.finished})
    assert {r: outs[r].token_ids for r in ids} == want


def test_stop_read_late_discards_the_extra_token(tok):
    """A sample that stops at step t has computed step t + 1 already: that token appears nowhere, its
    blocks return to the pool, and the other request keeps decoding meanwhile."""
    model = tiny_model("llama", init_std=0.3)
    probe, _ = run(model, tok, [([3, 4, 5], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))],
                   dict(async_scheduling=False))
    stop = probe[0].outputs[0].token_ids[2]
    mix = [([3, 4, 5], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=(stop,), logprobs=1)),
           ([6, 7], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))]
    engine = Engine(model, tok, EngineConfig(async_scheduling=True, block_size=4))
    a, b = (engine.add_request(p, sp) for p, sp in mix)
    seen = {a: [], b: []}
    while engine.has_unfinished():
        for o in engine.step():
            seen[o.request_id].append(list(o.outputs[0].token_ids))
    want, _ = run(model, tok, mix, dict(async_scheduling=False, block_size=4))
    assert seen[a][-1] == want[0].outputs[0].token_ids == probe[0].outputs[0].token_ids[:3]
    assert [len(t) for t in seen[a]] == [1, 2, 3] and [len(t) for t in seen[b]] == list(range(1, 9))
    assert engine.requests == {} and engine.pool.num_used == 0


def test_abort_and_weight_update_with_a_step_in_flight(tok):
    model = tiny_model("llama")
    engine = Engine(model, tok, EngineConfig(async_scheduling=True, block_size=4))
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    rid = engine.add_request("abort me", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    keep = engine.add_request("keep", sp)
    engine.step()
    engine.step()
    assert engine._pending is not None
    out = engine.abort(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort" and len(out.outputs[0].token_ids) == 1
    with pytest.raises(LmforgeError, match="update_weights with 1 request"):
        engine.update_weights()
    final = {}
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step()})
    assert rid not in final and len(final[keep].token_ids) == 6
    engine.update_weights(model.state_dict())  # a stale step may still be pending: read and dropped first
    assert engine._pending is None and engine.pool.num_used == 0
    again = engine.add_request("keep", sp)
    while engine.has_unfinished():
        final.update({o.request_id: o for o in engine.step()})
    assert final[again].token_ids == final[keep].token_ids


def test_config_and_where_it_runs(tok):
    with pytest.raises(ConfigError, match="async_scheduling = .yes.: expected true or false"):
        EngineConfig(async_scheduling="yes")
    model = tiny_model("llama")
    assert not Engine(model, tok).async_scheduling  # None: on a GPU only
    assert not Engine(model, tok, EngineConfig(async_scheduling=True), draft="ngram").async_scheduling

    class NoCacheSpec(torch.nn.Module):  # the recompute runner reads every token on the host
        def __init__(self):
            super().__init__()
            self.inner, self.max_seq_len, self.vocab_size = model, 128, 257

        def forward(self, ids):
            return self.inner(ids)

    assert not Engine(NoCacheSpec(), tok, EngineConfig(async_scheduling=True)).async_scheduling


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qk_norm", [False, True])
def test_gpu_defaults_equal_the_plain_synchronous_engine(tok, qk_norm):
    """On a GPU the defaults stack every backend: CUDA graphs, the batch-1 kernel step, the fused-kernel
    view and async scheduling. Tokens, texts and finish reasons equal the synchronous engine on the plain
    model without graphs (fp32 weights, so near-ties do not flip); also for a QK-norm (Qwen3) model."""
    model = tiny_model("llama", init_std=0.3, qk_norm=qk_norm).cuda()
    rng = random.Random(7)
    mix = random_mix(rng, 12)
    plain = dict(block_size=4, async_scheduling=False, cuda_graphs=False, kernel_step=False, fused_kernels=False)
    first, _ = run(model, tok, [(p, SamplingParams(**kw)) for p, kw in mix], plain)
    mix = with_stops(rng, mix, first)
    want, _ = run(model, tok, mix, plain, {3: 2})
    got, engine = run(model, tok, mix, dict(block_size=4), {3: 2})
    assert engine.async_scheduling and engine.runner.model is not model and engine.runner.graphs.entries
    for g, w in zip(got, want):
        for a, b in zip(g.outputs, w.outputs):
            assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
    one = [([5, 6, 7], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))]  # batch 1: the kernel step
    assert run(model, tok, one, dict(block_size=4))[0][0].outputs[0].token_ids == \
        run(model, tok, one, plain)[0][0].outputs[0].token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_launching_a_step_never_waits_for_the_device(tok):
    """Async scheduling only overlaps if launching step t + 1 never synchronises with the stream (a plain
    host-to-GPU copy, an index list, .item()): with CUDA's sync debug mode set to error, launches of
    decode steps with greedy, seeded top-k and per-row top-p rows raise on any such call."""
    model = tiny_model("llama", init_std=0.3).cuda()
    engine = Engine(model, tok, EngineConfig(block_size=4))
    for i, sp in enumerate([SamplingParams(temperature=0, max_tokens=64, ignore_eos=True),
                            SamplingParams(temperature=0.8, top_k=5, seed=1, max_tokens=64, ignore_eos=True),
                            SamplingParams(temperature=0.6, top_p=0.9, max_tokens=64, ignore_eos=True)]):
        engine.add_request([5 + i, 6, 7], sp)
    for _ in range(4):  # prefill, graph capture, warm-up
        engine.step()
    launch, launched = engine._launch, []

    def checked(prev, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            step = launch(prev, *args)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        launched.append(step is not None and step.overlap)
        return step

    engine._launch = checked
    for _ in range(3):
        engine.step()
    assert launched == [True, True, True]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_reading_a_step_does_not_wait_for_the_next(tok):
    """The overlap itself: step t's tokens are copied to the host right behind step t, so reading them
    (after step t + 1 is launched) returns while t + 1 still runs. A plain .tolist() would wait for
    everything queued, t + 1 included, and the host would then build t + 2 with the device idle. Here
    every launch first queues ~200 ms of device sleep: step() must return long before it ends (at half of
    it: a step's host work is milliseconds, but one once took 28.7 ms on a busy host, past the 25 ms this
    test allowed with a 50 ms sleep)."""
    import time

    model = tiny_model("llama", init_std=0.3).cuda()
    engine = Engine(model, tok, EngineConfig(block_size=4, kernel_step=False))
    for i in range(3):
        engine.add_request([5 + i, 6, 7], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    for _ in range(4):  # prefill, graph capture, warm-up
        engine.step()
    torch.cuda.synchronize()
    execute = engine.runner.execute

    def slow(*args, **kwargs):
        torch.cuda._sleep(400_000_000)  # ~200 ms at the H200's ~2 GHz
        return execute(*args, **kwargs)

    engine.runner.execute = slow
    t0 = time.perf_counter()
    engine.step()  # launches t + 1 (behind its sleep), then reads t
    took = time.perf_counter() - t0
    busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert busy and took < 0.1, f"step() took {took * 1e3:.1f} ms; device busy after it: {busy}"
