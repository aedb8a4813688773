"""Beam search on the engine: width 1 is greedy; wider beams find sequences at least as likely as
greedy's; many requests search at once (beside sampled ones) with the results they get alone."""

from __future__ import annotations

import pytest
import torch
from .infer_helpers import full_greedy, run_requests, tiny_model

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams


def seq_logprob(model, prompt: list[int], toks: list[int]) -> float:
    ids = prompt + toks
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(toks))


def test_beam_scores_are_model_logprobs(arch, tok):
    model = tiny_model(arch)
    llm = LLM(model, tok)
    p = tok.encode("Hi!")
    one = llm.generate("Hi!", SamplingParams(temperature=0, beam_width=2, n=1, max_tokens=10, ignore_eos=True,
                                             length_penalty=0.0))[0]
    assert one.outputs[0].cumulative_logprob >= seq_logprob(model, p, full_greedy(model, p, 10)) - 1e-5
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
    # a stop token the search meets: the greedy continuation's second token
    stop = llm.generate("z", SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0].token_ids[1]
    sp = SamplingParams(temperature=0, beam_width=3, n=3, max_tokens=6, stop_token_ids=(stop,))
    out = llm.generate("z", sp)[0]
    assert any(o.finish_reason == "stop" for o in out.outputs)
    for o in out.outputs:
        if o.finish_reason == "stop":
            assert o.token_ids[-1] in (stop, tok.eot_id) and stop not in o.token_ids[:-1]
            # the stop token id that ended it, as a sampled sample reports (None: the end-of-text id)
            assert o.stop_reason == (stop if o.token_ids[-1] == stop else None)
        else:
            assert o.stop_reason is None
    norm = [o.cumulative_logprob / len(o.token_ids) for o in out.outputs]
    assert norm == sorted(norm, reverse=True)


@pytest.mark.parametrize("seed", range(4))
def test_beams_equal_transformers_beam_search(tok, tmp_path, seed):
    """The same hypotheses and normalised scores as transformers' generate(num_beams=W) on the exported model,
    over random widths, lengths, length penalties, early stopping and a stop token the search meets."""
    import random

    transformers = pytest.importorskip("transformers")
    from lmforge.model.hf import save_pretrained

    rng = random.Random(seed)
    model = tiny_model("llama", seed=seed, init_std=0.1)
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    llm = LLM(model, tok)
    for _ in range(6):
        prompt = [rng.randrange(256) for _ in range(rng.randint(1, 6))]
        W, T, early = rng.randint(2, 5), rng.randint(1, 10), rng.random() < .5
        alpha = rng.choice([0.0, 0.5, 1.0, 2.0, -1.0])
        n, stop = rng.randint(1, W), rng.choice([None, *full_greedy(model, prompt, 4)])
        out = llm.generate([prompt], SamplingParams(
            temperature=0, beam_width=W, n=n, max_tokens=T, ignore_eos=True,
            stop_token_ids=() if stop is None else (stop,), length_penalty=alpha, early_stopping=early))[0].outputs
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              num_beams=W, num_return_sequences=n, max_new_tokens=T, do_sample=False, eos_token_id=stop,
                              pad_token_id=0, length_penalty=alpha, early_stopping=early, return_dict_in_generate=True,
                              output_scores=True)
        theirs = [s[len(prompt):] for s in ref.sequences.tolist()]
        theirs = [t[:t.index(stop) + 1] if stop in t else t for t in theirs]
        assert [o.token_ids for o in out] == theirs, (prompt, W, n, T, alpha, early, stop)
        mine = [o.cumulative_logprob / len(o.token_ids) ** alpha for o in out]
        assert mine == pytest.approx(ref.sequences_scores.tolist(), abs=1e-4)


@pytest.mark.parametrize("case", ["length_limit_fills_the_set", "more_stops_than_beams"])
def test_beam_edge_cases_equal_transformers(case, tmp_path):
    """length_limit_fills_the_set: early stopping, the W-th finished hypothesis arrives on the last step; the
    beams reaching the length limit then still compete for the finished set (they were dropped, and a worse
    one-token hypothesis returned). more_stops_than_beams: four stop ids, three of them among the first step's
    2·W best candidates; W beams must live on (HF ranks (1 + stop ids)·W candidates; only one lived)."""
    transformers = pytest.importorskip("transformers")
    from lmforge.infer.detok import IdTokenizer
    from lmforge.model.config import ModelConfig
    from lmforge.model.hf import save_pretrained
    from lmforge.model.transformer import Transformer

    V, seed, std, prompt, W, T, alpha, stops, early = {
        "length_limit_fills_the_set": (8, 28, 0.6, [7, 6, 3], 3, 3, 0.5, [3], True),
        "more_stops_than_beams": (6, 110, 0.3, [4, 5, 1, 2, 2, 2, 2], 2, 7, 2.0, [1, 5, 2, 4], False)}[case]
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=V, d_model=32, n_layers=2, max_seq_len=64, init_std=std, n_heads=4,
                                    n_kv_heads=2)).eval()
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    out = LLM(model, IdTokenizer(V)).generate([prompt], SamplingParams(
        temperature=0, beam_width=W, n=W, max_tokens=T, ignore_eos=True, stop_token_ids=tuple(stops),
        length_penalty=alpha, early_stopping=early))[0].outputs
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          num_beams=W, num_return_sequences=W, max_new_tokens=T, do_sample=False, eos_token_id=stops,
                          pad_token_id=stops[0], length_penalty=alpha, early_stopping=early,
                          return_dict_in_generate=True, output_scores=True)
    theirs = [s[len(prompt):] for s in ref.sequences.tolist()]
    theirs = [t[:min(t.index(x) for x in stops if x in t) + 1] if any(x in t for x in stops) else t for t in theirs]
    assert [o.token_ids for o in out] == theirs
    assert [o.cumulative_logprob / len(o.token_ids) ** alpha for o in out] == pytest.approx(
        ref.sequences_scores.tolist(), abs=1e-4)


def test_many_beam_requests_at_once_equal_alone(tok):
    """Beam requests share the engine's batch with each other and with sampled requests, under a small
    token budget and block pool: each gets the beams it gets alone."""
    model = tiny_model("llama", init_std=0.3)
    sp = SamplingParams(temperature=0, beam_width=3, n=2, max_tokens=7, ignore_eos=True)
    prompts = ["abc", "hello there", "z"]
    alone = [LLM(model, tok).generate(p, sp)[0] for p in prompts]
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=6, num_kv_tokens=96))
    ids = [engine.add_request(p, sp) for p in prompts]
    engine.add_request("sampled", SamplingParams(temperature=1.0, max_tokens=9, seed=0))
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    for rid, want in zip(ids, alone):
        assert [o.token_ids for o in outs[rid].outputs] == [o.token_ids for o in want.outputs]
    assert engine.pool.num_used == 0


def test_a_preempted_beam_comes_back_whatever_the_seats(tok):
    """Two beam requests of width 3 with max_num_seqs=2 on a small pool: a preempted beam comes back though the
    seats are taken (by its own request's idle beams, which wait for it); it waited forever, then "could not fit
    any sequence", 2026-12-05. Each request gets the beams it gets alone."""
    model = tiny_model("llama", init_std=0.3)
    sp = SamplingParams(temperature=0, beam_width=3, max_tokens=12, ignore_eos=True)
    prompts = ["hello there friend of mine and more text", "another prompt that is long enough"]
    alone = [LLM(model, tok).generate(p, sp)[0] for p in prompts]
    engine = Engine(model, tok, EngineConfig(block_size=8, max_num_seqs=2, num_kv_tokens=128,
                                             max_num_batched_tokens=16))
    outs = run_requests(engine, [(p, sp) for p in prompts])
    assert engine.stats()["preemptions"] > 0 and engine.pool.num_used == 0
    for got, want in zip(outs, alone):
        assert [o.token_ids for o in got.outputs] == [o.token_ids for o in want.outputs]


@pytest.mark.parametrize("k", [0, 1])
def test_beam_top_logprobs_are_the_k_most_likely(tok, k):
    """A beam's top_logprobs hold what a sample's do (CompletionOutput.top_logprobs): at each step the k most likely
    ids and their log-probs, the chosen token only where it is among them (its own log-prob is in `logprobs`);
    they held the chosen token first besides, k + 1 entries (one with logprobs=0)."""
    model = tiny_model("llama", init_std=0.3)
    sp = SamplingParams(temperature=0, beam_width=3, n=3, max_tokens=6, ignore_eos=True, logprobs=k)
    prompt = tok.encode("ab")
    outs = LLM(model, tok).generate([prompt], sp)[0].outputs
    chosen_outside = 0
    for o in outs:
        with torch.no_grad():
            logp = model(torch.tensor([prompt + o.token_ids]))[0, len(prompt) - 1:-1].float().log_softmax(-1)
        for t, row, top in zip(o.token_ids, logp, o.top_logprobs):
            best = row.topk(k) if k else None
            assert list(top) == (best.indices.tolist() if k else [])
            assert list(top.values()) == pytest.approx(best.values.tolist() if k else [], abs=1e-5)
            chosen_outside += t not in top
    assert chosen_outside  # (some beam took a token outside the k best: the case that listed k + 1)


def test_beam_top_logprobs_are_computed_once_per_step_for_all_live_beams(tok, monkeypatch):
    """Each beam's top-k entries do not depend on the token it extends with: one token_logprobs over every live
    beam per step, not one (a log_softmax and topk over the vocabulary, two host syncs) per ranked candidate."""
    import lmforge.infer.beam as beam

    calls, real = [], beam.token_logprobs

    def counted(logits, *args):
        calls.append(len(logits))
        return real(logits, *args)

    monkeypatch.setattr(beam, "token_logprobs", counted)
    sp = SamplingParams(temperature=0, beam_width=3, n=3, max_tokens=5, ignore_eos=True, logprobs=2)
    out = LLM(tiny_model("llama", init_std=0.3), tok).generate(["ab"], sp)[0].outputs
    assert [len(o.top_logprobs) for o in out] == [5, 5, 5]
    assert calls == [1, 3, 3, 3, 3]  # one per step, over its live beams: the prompt's, then 3


def test_beam_stop_strings_logprobs_stream_and_running_outputs(tok):
    """A stop string ends a beam (text cut before it); logprobs come only when asked, with top-k entries
    that equal the model's; while the search runs the request shows its n best live beams, unfinished;
    LLM.stream yields the best beam's text."""
    model = tiny_model("llama", init_std=0.3)
    llm = LLM(model, tok)
    base = SamplingParams(temperature=0, beam_width=3, n=2, max_tokens=8, ignore_eos=True)
    free = llm.generate("ab", base)[0]
    text = free.outputs[0].text
    stop = text[2:4]  # met by the best beam (unless an earlier stop ends another one first)
    stopped = llm.generate("ab", SamplingParams(**{**base.__dict__, "stop": (stop,)}))[0]
    assert any(o.finish_reason == "stop" for o in stopped.outputs)
    for o in stopped.outputs:
        assert stop not in o.text
        if o.finish_reason == "stop":
            assert stop in tok.decode(o.token_ids) and o.stop_reason == stop  # (was None)
        else:
            assert o.stop_reason is None
    assert free.outputs[0].logprobs is None and free.outputs[0].top_logprobs is None
    with_lp = llm.generate("ab", SamplingParams(**{**base.__dict__, "logprobs": 2}))[0].outputs[0]
    assert with_lp.token_ids == free.outputs[0].token_ids and len(with_lp.top_logprobs) == 8
    with torch.no_grad():
        logp = model(torch.tensor([tok.encode("ab") + with_lp.token_ids]))[0].log_softmax(-1)
    for i, (t, top) in enumerate(zip(with_lp.token_ids, with_lp.top_logprobs)):
        row = logp[len(tok.encode("ab")) - 1 + i]
        assert list(top) == row.topk(2).indices.tolist()  # (the chosen token's log-prob: logprobs)
        assert with_lp.logprobs[i] == pytest.approx(float(row[t]), abs=1e-4)
    assert "".join(llm.stream("ab", base)) == free.outputs[0].text
    engine = Engine(model, tok)
    rid = engine.add_request("ab", base)
    seen = []
    while engine.has_unfinished():
        seen += [o for o in engine.step() if o.request_id == rid]
    assert all(len(o.outputs) <= 2 and {x.finish_reason for x in o.outputs} == {None} for o in seen[:-1])
    assert seen[-1].finished and [o.token_ids for o in seen[-1].outputs] == [o.token_ids for o in free.outputs]


def test_an_aborted_beam_search_ends_with_abort(tok):
    """Engine.abort, AsyncEngine.abort and shutdown of a running search: its n best live beams, finished with
    finish_reason 'abort' (they read None, a running sample's reason, in a finished output). Aborted before
    its first step, only the prompt's beam lives: one empty sample (not n)."""
    import asyncio

    from lmforge.infer.async_engine import AsyncEngine

    model = tiny_model("llama")
    beam = SamplingParams(temperature=0, beam_width=3, n=2, max_tokens=30, ignore_eos=True)
    engine = Engine(model, tok, EngineConfig(block_size=4))
    rid = engine.add_request("hello", beam)
    for _ in range(4):
        running = [o for o in engine.step() if o.request_id == rid][-1]
    out = engine.abort(rid)
    assert out.finished and [o.finish_reason for o in out.outputs] == ["abort", "abort"]
    assert [o.token_ids for o in out.outputs] == [o.token_ids for o in running.outputs]  # the live beams
    assert [len(o.token_ids) for o in out.outputs] == [4, 4] and out.outputs[0].token_ids != out.outputs[1].token_ids
    assert out.outputs[0].cumulative_logprob == pytest.approx(seq_logprob(model, tok.encode("hello"),
                                                                          out.outputs[0].token_ids), abs=1e-4)
    early = engine.abort(engine.add_request("hello", beam))
    assert early.finished and [(o.index, o.token_ids, o.text, o.finish_reason) for o in early.outputs] == \
        [(0, [], "", "abort")]
    assert engine.pool.num_used == 0 and not engine.requests

    async def main():
        aeng = AsyncEngine(Engine(model, tok, EngineConfig(block_size=4)))
        outs = {}

        async def read(rid, stop):
            outs[rid] = []
            async for o in aeng.stream(rid):
                outs[rid].append(o)
                if len(outs[rid]) == 3:
                    await stop()

        a = await aeng.add_request("hello", beam)
        await read(a, lambda: aeng.abort(a))
        b = await aeng.add_request("hello", beam)
        await read(b, aeng.shutdown)
        return outs[a][-1], outs[b][-1]

    for last in asyncio.run(main()):
        assert last.finished and [o.finish_reason for o in last.outputs] == ["abort", "abort"]


def test_beams_refuse_penalties_and_bias_and_check_their_blocks(tok):
    for bad in (dict(logit_bias={5: 1.0}), dict(repetition_penalty=1.2), dict(presence_penalty=0.5)):
        with pytest.raises(ConfigError, match="penalties and logit_bias do not apply"):
            SamplingParams(temperature=0, beam_width=2, **bad)
    # 59 prompt + 20 new tokens in blocks of 4: one sequence needs 20 blocks, two diverging beams 14 + 2 x 6
    engine = Engine(tiny_model("llama"), tok, EngineConfig(block_size=4, num_kv_tokens=84))
    sp = SamplingParams(temperature=0, beam_width=2, max_tokens=20, ignore_eos=True)
    with pytest.raises(LmforgeError, match="in 2 beams needs 26 KV blocks but the pool has 21"):
        engine.add_request(list(range(1, 60)), sp)
    assert not engine.has_unfinished()
    engine = Engine(tiny_model("llama"), tok, EngineConfig(block_size=4, num_kv_tokens=104))
    engine.add_request(list(range(1, 60)), sp)
    while engine.has_unfinished():
        engine.step()


def test_beam_scores_on_a_padded_vocabulary_are_the_models_own_logprobs(tok):
    """A model vocabulary padded past the tokenizer's (257 byte tokens in 320 rows, the padded rows holding most
    of the mass): beams never take a padded id, and their scores and log-probs are log_softmax over ALL the
    model's rows, as the sampler's raw log-probs and a plain forward (they were renormalised over the 257
    ids, ~1 nat a token here, which also changes how beams rank)."""
    from .test_engine import padded_model

    model = padded_model()
    p = tok.encode("the cat")
    sp = SamplingParams(temperature=0, beam_width=3, n=3, max_tokens=6, ignore_eos=True, length_penalty=0.0,
                        logprobs=2)
    out = LLM(model, tok).generate([p], sp)[0]
    for c in out.outputs:
        assert all(t < 257 for t in c.token_ids)
        ids = p + c.token_ids
        with torch.no_grad():
            logp = model(torch.tensor([ids]))[0, :-1].float().log_softmax(-1)[len(p) - 1:]
        want = logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
        assert c.logprobs == pytest.approx(want.tolist(), abs=1e-5)
        assert c.cumulative_logprob == pytest.approx(float(want.sum()), abs=1e-4)
        for row, top in zip(logp, c.top_logprobs):
            assert all(t < 257 for t in top)
            best = row[:257].topk(2)
            assert all(top[t] == pytest.approx(v, abs=1e-5) for t, v in zip(best.indices.tolist(),
                                                                             best.values.tolist()))


@pytest.mark.parametrize("early", [True, False])
@pytest.mark.parametrize("alpha", [1000.0, -1000.0])
def test_extreme_length_penalties_rank_as_the_quotient_does(tok, alpha, early):
    # (length ** 1000 is past a float: the step raised OverflowError, and ZeroDivisionError for -1000)
    import math

    llm = LLM(tiny_model("llama"), tok)
    first = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=1))[0].token_ids[0]
    sp = SamplingParams(temperature=0, beam_width=3, n=3, max_tokens=8, length_penalty=alpha, early_stopping=early,
                        stop_token_ids=(first,))  # (a one-token hypothesis stops at once)
    out = llm.generate("the cat", sp)[0].outputs
    # score / L**alpha = -exp(log(-score) - alpha log L): the larger alpha log L - log(-score), the better
    key = [alpha * math.log(len(o.token_ids)) - math.log(-o.cumulative_logprob) for o in out]
    lengths = [len(o.token_ids) for o in out]
    assert len(out) == 3 and key == sorted(key, reverse=True)
    assert lengths[0] == (8 if alpha > 0 else 1)  # the longest wins at +1000, the one-token stop at -1000


def test_more_samples_than_beams_is_refused_with_the_fix():
    # (the message named the problem, "n=6 beams asked for but beam_width=4", not the way out)
    with pytest.raises(ConfigError, match=r"^n=6 beams asked for but beam_width=4: a search returns at most its "
                                          r"beam_width beams; raise beam_width to 6 or lower n$"):
        SamplingParams(temperature=0, beam_width=4, n=6)


def test_beam_text_offsets_with_logprobs(tok):
    """With logprobs a beam gives text_offsets as a sample does (CompletionOutput.text_offsets: where each token's
    text starts, a byte of an incomplete character where the next one does, tokens past a stop string's cut at the
    text's end): those of a sampled request spelling the same tokens (they were None)."""
    from .test_stop_tokens import force

    llm = LLM(tiny_model("llama", init_std=0.3, seed=2), tok)  # (its beams take bytes of incomplete characters)
    base = SamplingParams(temperature=0, beam_width=3, n=3, max_tokens=8, ignore_eos=True, logprobs=0)
    plain = llm.generate("日本", base)[0].outputs
    stop = plain[0].text[1:3]  # (plain characters: a U+FFFD of the decoded whole is no stop string of a sample)
    for sp in (base, base.derived(stop=(stop,), ignore_eos=False)):
        for o in llm.generate("日本", sp)[0].outputs:
            same = sp.derived(beam_width=1, n=1, logits_processors=(force(o.token_ids, tok.eot_id),),
                              max_tokens=len(o.token_ids))
            want = llm.generate("日本", same)[0].outputs[0]
            assert (o.text, o.token_ids) == (want.text, want.token_ids)
            assert o.text_offsets == want.text_offsets and len(o.text_offsets) == len(o.token_ids)
    assert llm.generate("日本", base.derived(logprobs=None))[0].outputs[0].text_offsets is None
