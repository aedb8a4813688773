"""The engine against the plain reference decoder (full recompute, one request at a time, fp32): random
request mixes under chunked prefill, preemption and prefix hits; seeds; aborts; bad input; padded
vocabularies; a HF model through the wrapper; the asyncio front."""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.async_engine import AsyncEngine
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.byte import ByteTokenizer

from .infer_helpers import tiny_model


def reference(model, tok, prompt: list[int], params: SamplingParams) -> tuple[list[int], list[float], str]:
    """Greedy by full recompute, then the stop rules applied by hand: tokens, their logprobs, text."""
    ids, lps = list(prompt), []
    stops = set(params.stop_token_ids)
    with torch.no_grad():
        for _ in range(min(params.max_tokens, model.cfg.max_seq_len - len(prompt))):
            logp = model(torch.tensor([ids]))[0, -1].log_softmax(-1)
            ids.append(int(logp.argmax()))
            lps.append(float(logp[ids[-1]]))
            if ids[-1] in stops:
                break
    out = ids[len(prompt):]
    for i in range(1, len(out) + 1):
        text = tok.decode([t for t in out[:i] if t not in stops])
        hit = [text.find(s) for s in params.stop if s in text]
        if hit:
            return out[:i], lps[:i], text[: min(hit)]
    return out, lps, tok.decode([t for t in out if t not in stops])


def random_mix(rng: random.Random, model, tok, n_requests: int):
    shared = [rng.randrange(1, 250) for _ in range(13)]
    mix = []
    for i in range(n_requests):
        own = [rng.randrange(1, 250) for _ in range(rng.randrange(1, 30))]
        prompt = (shared + own) if i % 2 else own
        probe = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        toks, _, text = reference(model, tok, prompt, probe)
        kw = dict(temperature=0, ignore_eos=True, max_tokens=rng.randrange(1, 17), n=rng.choice([1, 1, 2]),
                  logprobs=rng.choice([None, 2]))
        if i % 3 == 1:
            kw["stop_token_ids"] = (toks[rng.randrange(len(toks))],)
        elif i % 3 == 2 and len(text) > 3 and text[2:4].isascii():  # (a U+FFFD would match partial bytes)
            kw["stop"] = (text[2:4],)
        mix.append((prompt, SamplingParams(**kw)))
    return mix


@pytest.mark.parametrize("arch,config", [
    ("llama", dict(block_size=4, max_num_batched_tokens=16, num_kv_tokens=96)),  # chunks, preemption, hits
    ("gpt2", dict(block_size=8, max_num_batched_tokens=40, num_kv_tokens=512)),
    ("mqa-softcap", dict(block_size=4, max_num_batched_tokens=7, num_kv_tokens=128, max_num_seqs=3)),
    ("llama", dict(block_size=4, max_num_batched_tokens=16, num_kv_tokens=96, cuda_graphs=True)),  # static decode
])
def test_random_mix_equals_reference_one_by_one(arch, config, tok):
    model = tiny_model(arch, init_std=0.3)
    mix = random_mix(random.Random(len(arch)), model, tok, 10)
    engine = Engine(model, tok, EngineConfig(**config))
    ids = [engine.add_request(p, sp) for p, sp in mix]
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    for rid, (prompt, sp) in zip(ids, mix):
        want_toks, want_lps, want_text = reference(model, tok, prompt, sp)
        assert len(done[rid].outputs) == sp.n
        for o in done[rid].outputs:
            assert o.token_ids == want_toks and o.text == want_text, rid
            if sp.logprobs is not None:
                assert o.logprobs == pytest.approx(want_lps, abs=1e-4)
                assert all(len(t) == 2 and tt in t for t, tt in zip(o.top_logprobs, o.token_ids))
    stats = engine.stats()
    assert stats["used_blocks"] == 0 and all(r == 0 for r in engine.pool.ref)  # no leak
    assert stats["prefix_hit_blocks"] > 0
    if arch == "llama":
        assert stats["preemptions"] > 0


def test_seeded_sampling_does_not_depend_on_the_batch(tok):
    model = tiny_model("llama")
    sp = SamplingParams(temperature=1.0, top_k=50, max_tokens=10, n=2, seed=7, ignore_eos=True)

    def run(config, others: int):
        engine = Engine(model, tok, EngineConfig(**config))
        for i in range(others):
            engine.add_request(f"other {i}", SamplingParams(temperature=0.9, max_tokens=5 + 3 * i, ignore_eos=True))
        rid = engine.add_request("seeded", sp)
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id == rid and o.finished:
                    out = o
        return [o.token_ids for o in out.outputs], engine.stats()["preemptions"]

    alone, _ = run(dict(), 0)
    crowded, preemptions = run(dict(block_size=4, max_num_batched_tokens=5, num_kv_tokens=48), 4)
    assert alone == crowded and preemptions > 0  # preempted, recomputed, same samples
    assert alone[0] != alone[1]


def test_abort_frees_blocks_and_others_finish(tok):
    model = tiny_model("llama")
    engine = Engine(model, tok, EngineConfig(block_size=4))
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a, b = engine.add_request("keep going", sp), engine.add_request("to abort", SamplingParams(max_tokens=50, n=3))
    engine.step()
    engine.step()
    out = engine.abort(b)
    assert out.finished and {o.finish_reason for o in out.outputs} == {"abort"}
    with pytest.raises(LmforgeError, match="no running request with id '1'"):
        engine.abort(b)
    final = None
    while engine.has_unfinished():
        final = engine.step()[0]
    assert final.request_id == a and final.token_ids == reference(model, tok, tok.encode("keep going"), sp)[0]
    assert engine.pool.num_used == 0


def test_bad_input_is_a_one_line_error_and_the_engine_keeps_serving(tok):
    model = tiny_model("llama")
    engine = Engine(model, tok, EngineConfig(num_kv_tokens=64, block_size=16))
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    good = engine.add_request("fine", sp)
    engine.step()
    bad = [("a" * 200, sp, "200 tokens.*context window is 128"),
           # a prompt as long as the window fits it but leaves no room: "128 tokens but the window is 128" alone
           ("a" * 128, sp, r"128 tokens but the context window is 128 and must also hold a new token \(at most 127 "),
           ([1, 999], sp, "token id 999"),
           ("", sp, "empty"),
           ("x" * 60, SamplingParams(max_tokens=60), "needs 8 KV blocks but the pool has 4; .*, or lower max_tokens$"),
           # the prompt alone outgrows the pool: fewer new tokens cannot help (it said "or lower max_tokens")
           ("x" * 100, sp, r"needs 7 KV blocks but the pool has 4; .* \(or shorten the prompt: fewer new tokens do "),
           ("ok", {"temperature": 0}, "SamplingParams")]
    for prompt, params, msg in bad:
        with pytest.raises(LmforgeError, match=msg) as e:
            engine.add_request(prompt, params)
        assert "\n" not in str(e.value)
    with pytest.raises(LmforgeError, match="already in use"):
        engine.add_request("dup", sp, request_id=good)
    with pytest.raises(ConfigError, match="unknown sampling option 'temprature'"):
        SamplingParams.from_dict({"temprature": 0.5})
    with pytest.raises(ConfigError, match="vocab_size=1000"):
        Engine(tiny_model("llama", vocab_size=300), ByteTokenizer([f"<s{i}>" for i in range(744)]))
    for field in ("decode_attention", "prefill_attention"):
        with pytest.raises(ConfigError, match=f"{field} must be one of"):
            EngineConfig(**{field: "fast"})
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert outs[-1].token_ids == reference(model, tok, tok.encode("fine"), sp)[0]


def test_padded_vocabulary_never_samples_an_undecodable_id(tok):
    model = tiny_model("llama", vocab_size=320)  # 257 byte tokens in 320 rows
    engine = Engine(model, tok)
    rid = engine.add_request("x", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                  logit_bias={300: 100.0, 319: 100.0}))
    engine.add_request("y", SamplingParams(temperature=1.5, max_tokens=30, ignore_eos=True, seed=1,
                                           logit_bias={i: 8.0 for i in range(257, 320)}))
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step()})
    assert all(t < 257 for o in outs.values() for t in o.token_ids)
    assert len(outs[rid].token_ids) == 4


def padded_model(shift: float = 2.0):
    """257 byte tokens in 320 rows, the padded rows' logits raised by `shift`: they hold most of the mass and the
    full distribution's argmax, which the engine must never draw, list or call greedy."""
    model = tiny_model("llama", vocab_size=320)
    bump = torch.zeros(320)
    bump[257:] = shift
    model.lm_head.register_forward_hook(lambda mod, args, out: out + bump)
    return model


@pytest.mark.parametrize("engine_kw", [dict(), dict(draft="ngram"), dict(config=dict(cuda_graphs=True)),
                                       dict(config=dict(max_num_batched_tokens=5))])
def test_padded_vocabulary_logprobs_are_the_models_own_distribution(tok, engine_kw):
    """Raw log-probs (generated, top, prompt and LLM.score's) are log_softmax over ALL the model's rows, what a
    plain forward and lmforge.align.token_logprobs give (an RL ratio starts at 1): the engine renormalised them
    over the tokenizer's 257 ids (0.2 nats a token at ModelConfig's 50,304-for-50,257 kind of padding, found
    2026-12-06). Padded ids are still never drawn, listed or greedy; 'processed' log-probs exclude them."""
    from lmforge.align.logprobs import token_logprobs
    from lmforge.infer.llm import LLM

    model = padded_model()
    kw = dict(engine_kw)
    llm = LLM(model, tok, config=EngineConfig(block_size=4, **kw.pop("config", {})), **kw)
    prompt = tok.encode("the cat and the cat and the")
    asks = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3, prompt_logprobs=3),
            SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, logprobs=3),
            SamplingParams(temperature=0.7, seed=4, max_tokens=8, ignore_eos=True, logprobs=3,
                           logprobs_mode="processed")]
    outs = llm.generate([prompt] * 3, asks)
    if "draft" in engine_kw:
        assert outs[0].metrics["accepted"] > 0  # (log-probs of accepted drafts come from the verify rows)
    for sp, out in zip(asks, outs):
        ids = prompt + out.token_ids
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, :-1].float()
        logp = logits.log_softmax(-1)
        assert all(t < 257 for t in out.token_ids)
        assert (logits.argmax(-1) >= 257).all()  # (the full argmax is always a padded id here)
        want = token_logprobs(logits[None], torch.tensor([ids[1:]]))[0, len(prompt) - 1:]
        if sp.logprobs_mode == "processed":  # the distribution drawn from: no padded ids
            want = (logits[:, :257] / 0.7).log_softmax(-1)[len(prompt) - 1:].gather(
                -1, torch.tensor(out.token_ids)[:, None])[:, 0]
        else:
            for i, top in enumerate(out.outputs[0].top_logprobs):
                row = logp[len(prompt) - 1 + i]
                best = row[:257].topk(3)
                assert sorted(top) == sorted(best.indices.tolist())
                assert [top[t] for t in best.indices.tolist()] == pytest.approx(best.values.tolist(), abs=1e-5)
        assert out.outputs[0].logprobs == pytest.approx(want.tolist(), abs=1e-5)
        if sp.temperature == 0:
            assert out.token_ids == logits[len(prompt) - 1:, :257].argmax(-1).tolist()  # greedy among drawable
            for t in range(1, len(prompt)):
                best = logp[t - 1, :257].topk(3)
                assert out.prompt_logprobs[t] == pytest.approx(
                    {prompt[t]: float(logp[t - 1, prompt[t]]), **dict(zip(best.indices.tolist(),
                                                                           best.values.tolist()))}, abs=1e-5)
    greedy = outs[0].token_ids[:4]
    (lp, is_greedy), (lp2, is_greedy2) = llm.score([(prompt, greedy), (prompt, [5, 6])])
    for cont, got in ((greedy, lp), ([5, 6], lp2)):
        ids = prompt + cont
        with torch.no_grad():
            want = token_logprobs(model(torch.tensor([ids[:-1]])), torch.tensor([ids[1:]]))[0, len(prompt) - 1:]
        assert got == pytest.approx(float(want.sum()), abs=1e-4)
    assert is_greedy and not is_greedy2  # greedy: the argmax among the ids the engine can produce


def test_hf_model_through_the_wrapper_matches_hf_greedy(tok):
    transformers = pytest.importorskip("transformers")
    from lmforge.infer.hf_wrapper import HFCausalLM
    from lmforge.infer.llm import LLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    prompts = ["Hello", "a longer prompt here"]
    outs = LLM(HFCausalLM(hf), tok).generate(prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for p, o in zip(prompts, outs):
        ids = torch.tensor([tok.encode(p)])
        want = hf.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert o.token_ids == want


def test_the_wrapper_stops_at_the_hf_models_end_of_sequence_id(tok):
    """HFCausalLM never passed the model's eos_token_id to the engine, so it ran past it to max_tokens where HF's
    generate() and LLM.load of the same weights stop (found 2026-12-05)."""
    transformers = pytest.importorskip("transformers")
    from lmforge.infer.hf_wrapper import HFCausalLM
    from lmforge.infer.llm import LLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ids = torch.tensor([tok.encode("hello world")])
    free = transformers.LlamaForCausalLM(cfg).eval().generate(ids, max_new_tokens=8, do_sample=False,
                                                              pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:]
    torch.manual_seed(0)
    cfg.eos_token_id = int(free[3])  # the fourth greedy token ends the sample
    hf = transformers.LlamaForCausalLM(cfg).eval()
    want = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
    out = LLM(HFCausalLM(hf), tok).generate([ids[0].tolist()], SamplingParams(temperature=0, max_tokens=8))[0]
    assert out.token_ids == want == free[:want.index(int(free[3])) + 1].tolist() and out.finish_reason == "stop"


def test_prefix_caching_on_the_wrapper_is_refused(tok):
    """HFCausalLM has no cache_spec(), so the engine recomputes every sequence: prefix_caching=True has no
    blocks to reuse and was accepted silently; it is refused like kv_cache_dtype there, and None stays accepted."""
    transformers = pytest.importorskip("transformers")
    from lmforge.infer.hf_wrapper import HFCausalLM

    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = HFCausalLM(transformers.LlamaForCausalLM(cfg).eval())
    with pytest.raises(ConfigError, match=r"^prefix_caching=True needs a model with cache_spec\(\).*HFCausalLM has "
                                          r"none.*leave prefix_caching unset$"):
        Engine(model, tok, EngineConfig(prefix_caching=True))
    assert not Engine(model, tok, EngineConfig()).pool.prefix_caching  # (None: off, no hits counted for recomputes)
    Engine(model, tok, EngineConfig(prefix_caching=False))


def test_async_engine_streams_each_request(tok):
    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = reference(model, tok, tok.encode("one"), sp)[0]

    async def main():
        engine = AsyncEngine(Engine(model, tok))

        async def collect(prompt, params):
            return [o async for o in engine.generate(prompt, params)]

        a, b = await asyncio.gather(collect("one", sp), collect("two", SamplingParams(temperature=0, max_tokens=3)))
        with pytest.raises(LmforgeError, match="empty"):
            await collect("", sp)
        return a, b, engine

    a, b, engine = asyncio.run(main())
    assert [len(o.token_ids) for o in a] == [1, 2, 3, 4, 5] and a[-1].finished and not a[0].finished
    assert a[-1].token_ids == want and len(b[-1].token_ids) <= 3 and not engine.engine.has_unfinished()


def test_sliding_window_blocks_are_freed_behind_the_window(tok):
    """Every layer slides (window 4): blocks wholly behind the window return to the pool as sequences
    advance, so a long generation holds O(window) blocks; the tokens stay the reference's."""
    model = tiny_model("llama", sliding_window=4, init_std=0.3)
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    engine = Engine(model, tok, EngineConfig(block_size=2, num_kv_tokens=64, max_num_batched_tokens=8))
    prompts = ["a prompt of some length", "hi"]
    ids = [engine.add_request(p, sp) for p in prompts]
    engine.add_request("forked", SamplingParams(temperature=0.8, n=2, seed=3, max_tokens=30))
    outs, peak = {}, 0
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step()})
        peak = max(peak, engine.pool.num_used)
    for rid, p in zip(ids, prompts):
        assert outs[rid].token_ids == reference(model, tok, tok.encode(p), sp)[0]
    assert peak <= 4 * (4 // 2 + 2) and engine.pool.num_used == 0 and all(r == 0 for r in engine.pool.ref)


def test_leaving_a_stream_early_aborts_the_request(tok):
    from lmforge.infer.llm import LLM

    llm = LLM(tiny_model("llama"), tok, config=EngineConfig(block_size=4))
    stream = llm.stream("hello", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                logit_bias={i: -100.0 for i in range(128, 257)}))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished() and llm.engine.pool.num_used == 0

    async def main():
        engine = AsyncEngine(Engine(tiny_model("llama"), tok))
        sp = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
        async with contextlib.aclosing(engine.generate("hi", sp)) as stream:
            async for _ in stream:
                break  # the client goes away
        return engine.engine

    engine = asyncio.run(main())
    assert not engine.has_unfinished() and engine.pool.num_used == 0


def test_many_decode_rows_run_in_groups_of_similar_length(tok):
    """More than 64 decode rows: the gather reference attends per group of rows sorted by context
    length (AttnMetadata.decode_groups); every row still gets the reference's tokens."""
    from lmforge.infer.runner import decode_groups

    assert decode_groups([1, 1, 2, 5, 7], rows_per_group=2) == ((0, 2, 1), (2, 4, 5), (4, 5, 7))
    model = tiny_model("llama")
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 250) for _ in range(rng.randrange(1, 40))] for _ in range(70)]
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=4096))
    ids = [engine.add_request(p, sp) for p in prompts]
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step(finished_only=True)})
    for rid, p in zip(ids, prompts):
        assert outs[rid].token_ids == reference(model, tok, p, sp)[0]


# penalties: the kept, incrementally advanced history (sampler.token_history) against the rebuild-every-step
# reference (sampler._history, INCREMENTAL = False), bit for bit --------------------------------------------
PEN = dict(repetition_penalty=1.6, frequency_penalty=0.6, presence_penalty=0.4)
LONG = [(7 * i + 3) % 250 + 1 for i in range(37)]  # a shared prefix (prefix-cache hits)


def _penalty_script(kind: str) -> tuple[dict, list]:
    """(EngineConfig kwargs, [(step, action)]): penalized rows of every kind (greedy, seeded, unseeded, n > 1,
    processed log-probs, prompt log-probs, stop at EOS) beside unpenalized ones, arriving at different steps and
    ending at different ones; action = (prompt, SamplingParams, request id) to add, or a request id to abort."""
    sp = SamplingParams
    mix = [(0, ([5, 9, 5, 9, 5, 2], sp(temperature=0, max_tokens=14, ignore_eos=True, logprobs=1, **PEN), "g")),
           (0, ("the cat sat", sp(temperature=0.9, seed=3, n=3, max_tokens=9, logprobs=2, logprobs_mode="processed",
                                  frequency_penalty=0.8, presence_penalty=0.3, ignore_eos=True), "s")),
           (0, ([1, 2, 3], sp(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1), "plain-greedy")),
           (1, ("abcabc", sp(temperature=1.1, top_k=40, max_tokens=17, repetition_penalty=1.4, ignore_eos=True,
                             logprobs=1, logprobs_mode="processed"), "unseeded")),
           (1, ("xyz", sp(temperature=0.8, seed=11, n=2, max_tokens=5, ignore_eos=True), "plain-seeded")),
           (2, (LONG + [4], sp(temperature=0.7, seed=5, max_tokens=11, prompt_logprobs=1, **PEN), "eos")),
           (4, (LONG + [9, 9], sp(temperature=0, max_tokens=8, n=2, ignore_eos=True, presence_penalty=2.0), "late")),
           (6, (LONG + [4, 4], sp(temperature=0.6, seed=8, max_tokens=10, ignore_eos=True, **PEN), "later"))]
    configs = {"mixed": dict(block_size=4), "prefix": dict(block_size=4),
               "preempt": dict(block_size=4, max_num_batched_tokens=5, num_kv_tokens=64),
               "async": dict(block_size=4, async_scheduling=True), "abort": dict(block_size=4)}
    if kind == "prefix":  # two prompts sharing the first one's prefix arrive after its blocks are cached
        mix = [(at + 12 if a[2] in ("late", "later") else at, a) for at, a in mix]
    if kind == "abort":  # a penalized n > 1 request aborted mid-run; its id (and another's) reused by a new request
        mix += [(3, "s"), (4, ("again", sp(temperature=0.9, seed=4, n=2, max_tokens=7, ignore_eos=True, **PEN), "s")),
                (5, "unseeded"), (5, ("abcabc", sp(temperature=0, max_tokens=6, ignore_eos=True, **PEN), "unseeded"))]
    return configs[kind], mix


def _penalty_run(model, tok, kind: str) -> tuple[list, dict]:
    """Every output a request ends with (finished or aborted): token ids, log-probs, top entries, cumulative
    log-prob, finish reason, prompt log-probs; and the engine's stats. Rows of ended sequences keep no history."""
    from lmforge.infer import sampler

    config, script = _penalty_script(kind)
    torch.manual_seed(0)  # unseeded rows draw from the default stream
    engine = Engine(model, tok, EngineConfig(**config))
    released, on_release = [], engine.scheduler.on_release
    engine.scheduler.on_release = lambda s: (released.append(s), on_release(s))
    outs, step, live = [], 0, 0

    def record(o):
        outs.append((o.request_id, o.prompt_logprobs, [(c.index, c.token_ids, c.logprobs, c.top_logprobs,
                                                        c.cumulative_logprob, c.finish_reason) for c in o.outputs]))

    while script or engine.has_unfinished():
        for _, action in [a for a in script if a[0] == step]:
            if isinstance(action, str):
                record(engine.abort(action))
            else:
                engine.add_request(*action)
        script = [a for a in script if a[0] > step]
        for o in engine.step():
            if o.finished:
                record(o)
        running = list(engine.scheduler.running) + list(engine.scheduler.waiting)
        kept = sum(1 for r in engine.requests.values() for s in r.seqs if s.row is not None and s.row.history)
        live = max(live, kept)
        assert kept <= sum(1 for s in running if s.params.penalized)  # (V,) states only for live sequences
        step += 1
    assert released and all(s.row is None or s.row.history is None for s in released)
    assert bool(live) == sampler.INCREMENTAL  # (the reference keeps none)
    return outs, engine.stats()


@pytest.mark.parametrize("kind", ["mixed", "preempt", "prefix", "async", "abort"])
def test_penalized_requests_equal_the_rebuild_every_step_reference(tok, kind, monkeypatch):
    """Penalized requests (repetition / frequency / presence) among unpenalized ones give the same tokens, log-probs
    (raw and processed) and top entries, bit for bit, whether the sampler advances each row's kept history by the
    tokens appended since its last step or rebuilds every row's history from its token list each step: with
    greedy, seeded and unseeded sampling, n > 1 forks, arrivals and endings at different steps, preemption and
    recompute (a tiny KV pool), chunked prefill, prefix-cache hits, async scheduling beside them, and an abort
    mid-run whose request ids are reused. The per-step debug comparison (CHECK_HISTORY) is on for the
    incremental run too. (Beam search and speculative decoding refuse penalties: test_beam, test_speculative.)"""
    from lmforge.infer import sampler

    model = tiny_model("llama")
    monkeypatch.setattr(sampler, "INCREMENTAL", False)
    ref, ref_stats = _penalty_run(model, tok, kind)
    monkeypatch.setattr(sampler, "INCREMENTAL", True)
    monkeypatch.setattr(sampler, "CHECK_HISTORY", True)
    got, stats = _penalty_run(model, tok, kind)
    assert got == ref
    assert stats == ref_stats
    if kind == "preempt":
        assert stats["preemptions"] > 0
    if kind == "prefix":
        assert stats["prefix_hit_blocks"] > 0
    outs = dict((rid, o) for rid, _, o in got)
    assert len(outs["s"]) == (2 if kind == "abort" else 3) and len({tuple(o[1]) for o in outs["s"]}) > 1


def test_penalized_comparison_catches_a_skipped_history_update(tok, monkeypatch):
    """The test above fails on outputs alone (no debug comparison) when the incremental update is wrong: here
    every row's newest appended token is never counted nor seen."""
    from lmforge.infer import sampler

    model = tiny_model("llama")
    monkeypatch.setattr(sampler, "INCREMENTAL", False)
    ref, _ = _penalty_run(model, tok, "mixed")
    monkeypatch.setattr(sampler, "INCREMENTAL", True)
    real = sampler._appended
    monkeypatch.setattr(sampler, "_appended", lambda h, r: real(h, r)[:-1])
    got, _ = _penalty_run(model, tok, "mixed")
    assert got != ref
