"""LLM.generate: batching, stopping, n samples, seeds, logprobs, bad input, UTF-8 safety."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from .infer_helpers import full_greedy, tiny_model

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.detok import IdTokenizer, StreamDecoder
from lmforge.infer.request import seed_for
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.byte import ByteTokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_batched_greedy_equals_one_by_one(arch, tok):
    llm = LLM(tiny_model(arch), tok)
    prompts = ["Hello there", "a", "The quick brown fox", "xyz"]
    together = llm.generate(prompts, GREEDY)
    for p, out in zip(prompts, together):
        alone = llm.generate([p], GREEDY)[0]
        assert out.token_ids == alone.token_ids == full_greedy(llm.model, tok.encode(p), 12)
        assert out.finish_reason == "length" and len(out.token_ids) == 12


def test_rows_stop_on_their_own(tok):
    model = tiny_model("llama")
    llm = LLM(model, tok)
    ref = [full_greedy(model, tok.encode(p), 10) for p in ("ab", "hello world")]
    stop_tok = ref[0][3]  # row 0 stops at its 4th token; row 1 runs on unless it meets the same id
    outs = llm.generate(["ab", "hello world"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                             stop_token_ids=(stop_tok,)))
    assert outs[0].token_ids == ref[0][:4] and outs[0].finish_reason == "stop"
    cut = ref[1].index(stop_tok) + 1 if stop_tok in ref[1] else 10
    assert outs[1].token_ids == ref[1][:cut]


def test_stop_string_cuts_text(tok):
    model = tiny_model("gpt2")
    llm = LLM(model, tok)
    full = llm.generate("abc", GREEDY)[0].text
    stop = full[4:6]
    out = llm.generate("abc", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=(stop,)))[0]
    assert out.finish_reason == "stop" and out.text == full[: full.find(stop)]


def test_seed_reproducible_and_n_samples(tok):
    """A seed gives prompt i (and sample j) its own stream (issue 16 §5): identical prompts differ, and the
    samples do not depend on how the batch is formed."""
    model = tiny_model("llama")
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=8, n=3, seed=123, ignore_eos=True)
    a = LLM(model, tok).generate(["hi", "there", "hi"], sp)
    b = LLM(model, tok, max_batch_size=1).generate(["hi", "there", "hi"], sp)  # one sequence at a time
    assert [[o.token_ids for o in r.outputs] for r in a] == [[o.token_ids for o in r.outputs] for r in b]
    assert a[0].token_ids != a[2].token_ids  # same prompt, its own stream
    assert len(a[0].outputs) == 3 and a[0].text == a[0].outputs[0].text
    assert len({tuple(o.token_ids) for o in a[0].outputs}) > 1


def test_generate_takes_one_sampling_params_per_prompt(tok):
    """lm-eval's generate_until has per-request settings: a list of SamplingParams, one per prompt. Each
    prompt gets what it would get under its params alone, seeds included: prompt i draws from (seed, i)."""
    model = tiny_model("llama")
    llm = LLM(model, tok)
    prompts = ["ab", "hello", "xyz"]
    ref = full_greedy(model, tok.encode("xyz"), 12)
    stop = ref[3]
    seeded = SamplingParams(temperature=1.0, top_k=20, seed=7, max_tokens=9, n=2, ignore_eos=True)
    per = [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), seeded,
           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=(stop,))]

    def samples(out):
        return [o.token_ids for o in out.outputs]

    outs = llm.generate(prompts, per)
    for i, sp in enumerate(per):
        assert samples(outs[i]) == samples(llm.generate(prompts, sp)[i])
    assert outs[0].token_ids == full_greedy(model, tok.encode("ab"), 5)
    assert [len(t) for t in samples(outs[1])] == [9, 9] and outs[1].outputs[0].token_ids != outs[1].outputs[1].token_ids
    assert samples(outs[1]) != samples(llm.generate("hello", seeded)[0])  # prompt 1's stream, not prompt 0's
    assert outs[2].token_ids == ref[:ref.index(stop) + 1] and outs[2].finish_reason == "stop"
    same = llm.generate(prompts, (seeded,) * 3)
    assert [samples(o) for o in same] == [samples(o) for o in llm.generate(prompts, seeded)]
    with pytest.raises(ConfigError, match="params is a list of 2 SamplingParams for 3 prompts; give one per prompt"):
        llm.generate(prompts, per[:2])
    with pytest.raises(ConfigError, match=r"params\[1\] must be a SamplingParams, got dict"):
        llm.generate(prompts, [per[0], {"temperature": 0}, per[2]])
    assert not llm.engine.has_unfinished()


def test_stream_pieces_join_to_the_generated_text_with_stop_strings(tok):
    """LLM.stream yields what each output adds to the last one's text (the hold-back of stop-string
    prefixes is in the outputs themselves: tests/infer/test_async_engine.py); joined, the pieces are the
    generated text, also where a stop string's prefix appears and is then ruled out."""
    import random

    model = tiny_model("llama", init_std=0.3)
    llm = LLM(model, tok)
    bias = {i: -100.0 for i in range(tok.vocab_size) if chr(i) not in "ab c"}
    rng = random.Random(1)
    for i in range(8):
        stop = tuple("".join(rng.choice("ab c") for _ in range(rng.randrange(2, 5))) for _ in range(2))
        sp = SamplingParams(temperature=1.0, seed=i, max_tokens=20, stop=stop, logit_bias=bias)
        prompt = "".join(rng.choice("ab c") for _ in range(rng.randrange(1, 6)))
        pieces = list(llm.stream(prompt, sp))
        assert "".join(pieces) == llm.generate(prompt, sp)[0].text and all(pieces)
        # whatever output_kind asks (lmforge chat passes --output-kind through): the same pieces, and whole outputs
        # from generate and submit/wait, also when a stream steps the engine meanwhile
        for kind in ("delta", "final"):
            other = dataclasses.replace(sp, output_kind=kind)
            assert list(llm.stream(prompt, other)) == pieces
            rid = llm.submit(prompt, dataclasses.replace(other, seed=seed_for(i, 0)))
            assert "".join(llm.stream(prompt, sp)) == "".join(pieces)  # (its steps carry the submitted request)
            assert llm.wait([rid])[0].text == llm.generate(prompt, other)[0].text == "".join(pieces)


def test_a_stream_builds_only_its_own_running_output_each_step(tok, monkeypatch):
    """LLM.stream steps the engine for one request: each step built the output of every running request
    (O(running) per step: 21 -> 9 ms a step beside 256 running requests, a stub model, 2026-12). Now only its own
    request's output is built while it runs (Engine.step(watch=)); the others' are built when they finish, and
    their tokens are what they were."""
    from collections import Counter

    from lmforge.infer.request import Request

    llm = LLM(tiny_model(), tok)
    long = dataclasses.replace(GREEDY, max_tokens=30)
    others = [llm.submit(f"other {i}", long) for i in range(4)]
    built, output = Counter(), Request.output
    monkeypatch.setattr(Request, "output", lambda self: built.update([self.request_id]) or output(self))
    steps = llm._steps
    pieces = list(llm.stream("mine", GREEDY))
    assert built == {str(len(others)): llm._steps - steps}  # its own output, once a step
    built.clear()
    assert "".join(pieces) == llm.generate("mine", GREEDY)[0].text and len(pieces) > 1
    outs = llm.wait(others)
    assert [o.token_ids for o in outs] == [o.token_ids for o in llm.generate([f"other {i}" for i in range(4)], long)]
    assert sum(built.values()) == 1 + 8  # generate's "mine"; each other request once as it finished, once in generate
    rid = llm.engine.add_request("x", GREEDY)
    llm.engine.add_request("y", GREEDY)
    assert [o.request_id for o in llm.engine.step(finished_only=True, watch={rid})] == [rid]
    assert len(llm.engine.step()) == 2  # (every changed request's, as before)


def test_logprobs_are_model_logprobs(tok):
    model = tiny_model("llama")
    llm = LLM(model, tok)
    out = llm.generate("hey", SamplingParams(temperature=0, max_tokens=5, logprobs=2, ignore_eos=True))[0]
    ids = tok.encode("hey") + out.token_ids
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].log_softmax(-1)
    want = [float(logp[len(ids) - 6 + i, t]) for i, t in enumerate(out.token_ids)]
    assert out.logprobs == pytest.approx(want, abs=1e-4)
    top = out.outputs[0].top_logprobs[0]
    assert len(top) == 2 and out.token_ids[0] in top  # greedy token is the most likely


def test_eos_stops_and_is_not_in_text(tok):
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight[tok.eot_id] = 0
        model.lm_head.bias = None
    llm = LLM(model, tok)
    sp = SamplingParams(temperature=0, max_tokens=6, logit_bias={tok.eot_id: 100.0})
    out = llm.generate("x", sp)[0]
    assert out.token_ids == [tok.eot_id] and out.text == "" and out.finish_reason == "stop"


def test_bad_input_errors(tok):
    llm = LLM(tiny_model("llama"), tok)
    with pytest.raises(LmforgeError, match="prompt 1 is empty"):
        llm.generate(["ok", ""], GREEDY)
    with pytest.raises(LmforgeError, match="200 tokens.*context window is 128"):
        llm.generate("a" * 200, GREEDY)
    out = llm.generate("a" * 200, SamplingParams(temperature=0, max_tokens=4, truncate_prompt=True))[0]
    assert len(out.prompt_token_ids) == 124 and len(out.token_ids) <= 4
    with pytest.raises(ConfigError, match="vocab_size=1000"):
        LLM(tiny_model("llama", vocab_size=300), ByteTokenizer([f"<s{i}>" for i in range(744)]))
    with pytest.raises(LmforgeError, match="token id 999"):
        llm.generate([[1, 999]], GREEDY)


def test_context_window_ends_with_length(tok):
    llm = LLM(tiny_model("llama"), tok)
    with pytest.warns(UserWarning, match="max_tokens=50 after a 120-token prompt passes the context window"):
        out = llm.generate("a" * 120, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


def test_stream_decoder_holds_back_partial_utf8(tok):
    d = StreamDecoder(tok)
    euro = "€".encode()  # 3 bytes
    assert [d.push(b) for b in euro] == ["", "", "€"]
    assert d.push(0xFF) == "\ufffd" and d.push(ord("a")) == "a"
    assert d.push(0xE2) == "" and d.flush() == "\ufffd"


def test_stream_decoder_without_token_bytes():
    class DecodeOnly:  # a tokenizer that can only decode whole lists (renders partial chars as U+FFFD)
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    d = StreamDecoder(DecodeOnly())
    assert "".join(d.push(b) for b in "é€x".encode()) + d.flush() == "é€x"


def test_stream_decoder_of_an_ids_only_tokenizer_makes_no_text():
    d = StreamDecoder(IdTokenizer(8))
    assert [d.push(i) for i in range(8)] == [""] * 8 and d.flush() == ""


def test_invalid_utf8_generation_never_crashes(tok):
    model = tiny_model("llama")
    llm = LLM(model, tok)
    sp = SamplingParams(temperature=0, max_tokens=3, logit_bias={0xF0: 100.0}, ignore_eos=True)
    out = llm.generate("q", sp)[0]
    assert out.token_ids == [0xF0] * 3 and "\ufffd" in out.text
    assert "".join(llm.stream("q", sp)) == out.text


def test_mla_and_sliding_window_models(tok):
    """Other attention layouts: MLA (its own latent cache, equal-length batches) and sliding windows."""
    from lmforge.model.config import MLAConfig

    mla = tiny_model("llama", attention="mla", rope_layout="interleaved", n_kv_heads=None,
                     mla=MLAConfig(kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                   v_head_dim=8))
    swa = tiny_model("llama", sliding_window=4)
    prompts = ["Hello there", "a", "The quick brown fox", "b"]
    for model in (mla, swa):
        outs = LLM(model, tok).generate(prompts, GREEDY)
        for p, o in zip(prompts, outs):
            assert o.token_ids == full_greedy(model, tok.encode(p), 12)
    beams = LLM(mla, tok).generate("x", SamplingParams(temperature=0, beam_width=2, max_tokens=4, ignore_eos=True))
    assert len(beams[0].token_ids) == 4  # beam search runs on MLA's paged latents too
    spec = LLM(mla, tok, draft="ngram").generate(prompts, GREEDY)  # drafts verified on paged latents
    assert [o.token_ids for o in spec] == [full_greedy(mla, tok.encode(p), 12) for p in prompts]


def test_requests_refused_before_they_can_break_a_step(tok):
    """Bad requests fail at add_request with one line and leave the engine as it was: a logit_bias id outside
    the vocabulary, non-finite biases, a prompt past the step budget with chunked prefill off, a draft model
    of another vocabulary; an automatic request id skips ids callers took."""
    from lmforge.infer.engine import Engine, EngineConfig

    model = tiny_model("llama")
    engine = Engine(model, tok)
    good = engine.add_request("the cat", GREEDY)
    with pytest.raises(LmforgeError, match="logit_bias has token id 1000 outside the model's vocabulary"):
        engine.add_request("the dog", SamplingParams(temperature=0, max_tokens=3, logit_bias={1000: 5.0}))
    for v in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ConfigError, match="finite numbers"):
            SamplingParams(logit_bias={5: v})
    assert engine.add_request("x", GREEDY, request_id=1) == "1"
    assert engine.add_request("y", GREEDY) == "2"  # '1' is taken
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step() if o.finished})
    assert outs[good].token_ids == full_greedy(model, tok.encode("the cat"), 12)
    small = Engine(model, tok, EngineConfig(max_num_batched_tokens=8, chunked_prefill=False))
    with pytest.raises(LmforgeError, match="chunked_prefill off.*14 tokens > max_num_batched_tokens=8"):
        small.add_request("the dog sat", SamplingParams(max_tokens=3))
    # (a wider draft, its extra rows past the tokenizer's ids, drafts: test_speculative.py's padded-width test)
    with pytest.raises(ConfigError, match=r"draft model's vocabulary \(200\) differs from the target's"):
        LLM(model, tok, draft=tiny_model("llama", vocab_size=200))


def test_running_outputs_have_no_finish_reason(tok):
    from lmforge.infer.engine import Engine

    engine = Engine(tiny_model("llama"), tok)
    engine.add_request("ab", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    reasons = []
    while engine.has_unfinished():
        reasons += [(o.finished, o.finish_reason) for o in engine.step()]
    assert reasons[-1] == (True, "length") and all(r == (False, None) for r in reasons[:-1])


def test_generate_takes_any_form_of_prompts_and_names_bad_ones(tok):
    import numpy as np

    llm = LLM(tiny_model("llama"), tok)
    ids = tok.encode("the")
    want = llm.generate([ids], GREEDY)[0].token_ids
    for form in (ids, torch.tensor(ids), [np.int64(t) for t in ids], (p for p in [ids])):
        assert llm.generate(form, GREEDY)[0].token_ids == want
    assert [o.token_ids for o in llm.generate(torch.tensor([ids, ids]), GREEDY)] == [want, want]
    with pytest.raises(ConfigError, match="params must be a SamplingParams or a list of them, one per prompt, "
                                          "got dict"):
        llm.generate("a", {"temperature": 0})
    with pytest.raises(LmforgeError,
                       match="prompts must be a string, a list of token ids, or a list of those; got int"):
        llm.generate(5)
    with pytest.raises(LmforgeError, match="got NoneType"):
        llm.generate(None)
    with pytest.raises(LmforgeError, match="pair 0 has token id 1000 outside"):
        llm.score([([116], [1000])])
    with pytest.raises(ConfigError, match="set cuda_graphs and max_batch_size in it"):
        from lmforge.infer.engine import EngineConfig
        LLM(llm.model, tok, max_batch_size=2, config=EngineConfig())


def test_max_batch_size_is_taken_as_given_and_a_bad_one_named(tok):
    """max_batch_size=None is 64 sequences; 1 is 1; 0 or less is refused naming max_batch_size (0 silently
    became 64 with `max_batch_size or 64`; found 2026-12-05)."""
    model = tiny_model("llama")
    assert LLM(model, tok).config.max_num_seqs == 64 and LLM(model, tok, max_batch_size=1).config.max_num_seqs == 1
    for bad in (0, -3):
        with pytest.raises(ConfigError, match=rf"^max_batch_size must be >= 1 \(sequences decoded together\), "
                                              rf"got {bad}$"):
            LLM(model, tok, max_batch_size=bad)


def test_truncate_prompt_leaves_room_for_max_tokens(tok):
    """Prompts are cut from the left so that max_tokens fit (a longer prompt never gets more output), the
    prompt keeping at least half the window (context 128 here)."""
    llm = LLM(tiny_model("llama"), tok)
    sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, truncate_prompt=True)
    for n in (100, 120, 127, 128, 300):
        out = llm.generate("a" * n, sp)[0]
        assert len(out.prompt_token_ids) == min(n, 112) and len(out.token_ids) == 16
    out = llm.generate("a" * 300, SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True,
                                                 truncate_prompt=True))[0]
    assert len(out.prompt_token_ids) == 64 and len(out.token_ids) == 64 and out.finish_reason == "length"


def test_generate_inside_a_half_read_stream_loses_nothing(tok):
    """A stream left half-read while generate steps the engine: its request may finish inside generate,
    and the stream still yields the rest of its text (it used to end early: the output was dropped)."""
    llm = LLM(tiny_model("llama"), tok)
    sp = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    full = llm.generate("the stream", sp)[0].text
    alone = [o.token_ids for o in llm.generate(["a", "b"], GREEDY)]
    s = llm.stream("the stream", sp)
    first = next(s)
    assert [o.token_ids for o in llm.generate(["a", "b"], SamplingParams(temperature=0, max_tokens=30,
                                                                         ignore_eos=True))] != alone  # (longer)
    assert first + "".join(s) == full
    assert not llm.engine.requests and not llm._held


def test_generate_leaves_other_requests_outputs_to_their_callers(tok):
    """Requests queued on the engine by someone else finish during generate: generate returns its own
    outputs (two such requests used to make it raise KeyError and leave its own requests running), and
    the others' outputs wait for their caller."""
    llm = LLM(tiny_model("llama"), tok)
    short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    ref = [o.token_ids for o in llm.generate(["zz", "zy", "a", "b"], [short, short, GREEDY, GREEDY])]
    others = [llm.engine.add_request("zz", short), llm.engine.add_request("zy", short)]
    assert [o.token_ids for o in llm.generate(["a", "b"], GREEDY)] == ref[2:]
    assert [o.token_ids for o in llm.wait(others)] == ref[:2]
    assert not llm.engine.requests and not llm._held
    with pytest.raises(LmforgeError, match="collected already"):
        llm.wait(others)


def test_submit_uses_its_seed_as_given_whatever_is_queued(tok):
    """A program's call samples the same alone or batched with others (generate derives per-index seeds)."""
    llm = LLM(tiny_model("llama"), tok)
    p = SamplingParams(temperature=1.0, max_tokens=10, seed=5, ignore_eos=True, n=2)
    alone = llm.wait([llm.submit("world", p)])[0]
    batch = llm.wait([llm.submit("hello", p), llm.submit("world", p), llm.submit([104, 105], p)])
    assert [o.token_ids for o in batch[1].outputs] == [o.token_ids for o in alone.outputs]
    assert batch[1].prompt == "world" and batch[2].prompt is None


def test_completed_resumes_programs_as_their_calls_finish(tok):
    """Programs whose next call depends on the last answer, run together through submit/completed: each
    follow-up joins the running batch, and every program gets what it gets when run alone with generate."""
    llm = LLM(tiny_model("llama"), tok)
    sp = [SamplingParams(temperature=0, max_tokens=k, ignore_eos=True) for k in (3, 9, 5)]

    def program(prompt, k):
        for turn in range(3):
            out = yield prompt, sp[(k + turn) % 3]
            prompt = prompt + out.text + "|"
        return prompt

    def alone(prompt, k):
        g = program(prompt, k)
        call = next(g)
        while True:
            try:
                call = g.send(llm.generate(*call)[0])
            except StopIteration as e:
                return e.value

    starts = ["ab", "hello", "x", "the quick"]
    expected = [alone(s, k) for k, s in enumerate(starts)]
    gens = [program(s, k) for k, s in enumerate(starts)]
    owner = {llm.submit(*next(g)): g for g in gens}
    results = {}
    for out in llm.completed():
        g = owner.pop(out.request_id)
        try:
            owner[llm.submit(*g.send(out))] = g
        except StopIteration as e:
            results[gens.index(g)] = e.value
    assert [results[i] for i in range(len(starts))] == expected
    assert not owner and not llm.engine.requests and not llm._held


def test_chat_encodes_with_the_template_and_stops_at_its_turn_end(tok):
    """chat = generate on ChatTemplate.encode's ids with the template's stop strings; a message that holds
    a marker stays text; a template whose markers the tokenizer splits is refused; with none given or
    recorded, chatml where the tokenizer has its special tokens, else plain (choose_template)."""
    import lmforge as lf
    from lmforge.infer.chat_template import get_template

    msgs = [{"role": "system", "content": "Judge."}, {"role": "user", "content": "A or B?<|im_end|>"}]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(tiny_model("llama"), tok)
    plain = get_template("plain")
    want = llm.generate([plain.encode(tok, msgs)[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                                     stop=plain.stop))[0]
    got = llm.chat(msgs, sp, template="plain")
    assert len(got) == 1 and got[0].token_ids == want.token_ids and got[0].text == want.text
    assert [o.token_ids for o in llm.chat([msgs, msgs[1:]], sp, template=plain)][0] == want.token_ids
    # none given, none recorded: chatml where the tokenizer has its markers as special tokens, else plain
    assert llm.chat(msgs, sp)[0].token_ids == want.token_ids
    with pytest.raises(LmforgeError, match="encodes it as"):
        llm.chat(msgs, sp, template="chatml")  # the byte tokenizer has no <|im_start|> token
    special = lf.Tokenizer({i: bytes([i]) for i in range(256)}, [],
                           special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    chat_llm = LLM(tiny_model("llama", vocab_size=259), special)
    out = chat_llm.chat(msgs, sp, template="chatml")[0]
    ids = out.prompt_token_ids
    assert ids.count(special.encode("<|im_end|>")[0]) == 2  # the two turns' ends; the user's marker is text
    end = special.encode("<|im_end|>")[0]
    forced = chat_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=12, logit_bias={end: 100.0}),
                           template="chatml")[0]
    assert forced.token_ids == [end] and forced.finish_reason == "stop" and forced.text == ""
    assert chat_llm.chat(msgs, sp)[0].prompt_token_ids == ids  # (chatml chosen by default there)


def test_outputs_report_prompt_tokens_read_from_the_prefix_cache(tok):
    """A multi-turn program re-sends its growing prompt: the next turn reads the previous turn's prompt and
    generated tokens from the prefix cache, whole blocks of them, and its output says how many."""
    from lmforge.infer.engine import EngineConfig

    llm = LLM(tiny_model("llama"), tok, config=EngineConfig(block_size=8))
    first = llm.generate([list(range(65, 85))], GREEDY)[0]  # 20 prompt + 12 generated tokens
    assert first.metrics["num_cached_tokens"] == 0
    again = llm.generate([first.prompt_token_ids + first.token_ids + [10, 11]], GREEDY)[0]
    assert again.metrics["num_cached_tokens"] == 24  # 31 computed tokens (the last one never ran): 3 blocks


def test_a_preempted_request_reports_only_the_prompt_tokens_its_first_admission_read(tok):
    """Readmitted after a preemption, a request hits its own prompt and generated blocks: the metric took that
    hit (12 cached tokens of a fresh 10-token prompt; found 2026-12-05). It is the first admission's, as vLLM's."""
    from lmforge.infer.engine import EngineConfig

    llm = LLM(tiny_model("llama"), tok, config=EngineConfig(block_size=4, num_kv_tokens=64))
    outs = llm.generate([list(range(10 + i, 20 + i)) for i in range(3)],
                        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    assert llm.engine.stats()["preemptions"] > 0
    assert [o.metrics["num_cached_tokens"] for o in outs] == [0, 0, 0]


def test_a_batch_sharing_a_prefix_computes_it_once(tok):
    """Few-shot programs send many prompts behind the same demonstrations in one call: the prompts behind
    the first wait one step and read its blocks from the prefix cache, instead of all computing the shared
    blocks in the same step (before the fix each request here computed the 64 shared tokens itself)."""
    from lmforge.infer.engine import EngineConfig

    model = tiny_model("llama")
    demos = list(range(40, 104))  # 64 shared tokens: 4 blocks
    prompts = [demos + [110 + i, 120 + i, 130 + i] for i in range(6)]
    llm = LLM(model, tok, config=EngineConfig(block_size=16))
    outs = llm.generate(prompts, GREEDY)
    assert [o.metrics["num_cached_tokens"] for o in outs] == [0] + [64] * 5
    assert [o.token_ids for o in outs] == [full_greedy(model, p, 12) for p in prompts]
    assert llm.engine.stats()["peak_used_blocks"] == 4 + 6 * 1  # the shared blocks once, then one block each


def test_outputs_say_which_stop_ended_them(tok):
    """stop_reason: the stop string matched or the stop_token_ids id; None for length (and the model's own
    end of text)."""
    llm = LLM(tiny_model("llama"), tok)
    free = llm.generate("hello", GREEDY)[0].outputs[0]
    text, ids = free.text, free.token_ids
    assert free.finish_reason == "length" and free.stop_reason is None
    stop = text[3:5]
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                               stop=("\x00never", stop)))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop and out.text == text[:text.index(stop)]
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(ids[2],)))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == ids[2] and out.token_ids == ids[:ids.index(ids[2]) + 1]


def test_an_abort_shows_what_the_decoder_held(tok):
    """Bytes of a character still incomplete when a request is aborted show (as U+FFFD), as at any finish."""
    euro = list("€".encode())  # three bytes

    def spell(ids, logits):
        mask = torch.full_like(logits, float("-inf"))
        mask[euro[len(ids) % 3]] = 0
        return logits + mask

    engine = LLM(tiny_model("llama"), tok).engine
    rid = engine.add_request("hi", SamplingParams(temperature=0, max_tokens=3, logits_processors=(spell,)))
    while len(engine.requests[rid].seqs[0].tokens) < 2 + 2:  # the prompt's 2 bytes, then 2 of the 3
        engine.step()
    out = engine.abort(rid).outputs[0]
    assert out.token_ids == euro[:2] and out.finish_reason == "abort" and out.text == "\ufffd"


def test_text_offsets_say_where_each_tokens_text_starts(tok):
    """With logprobs: each token's start in the text; the bytes of one character start where it does; a stop
    string's cut clips them."""
    spelled = list("a€b".encode()) + list(b"cd")  # 'a', three bytes of '€', 'b', 'c', 'd'

    def spell(ids, logits):
        mask = torch.full_like(logits, float("-inf"))
        mask[spelled[len(ids) % len(spelled)]] = 0
        return logits + mask

    llm = LLM(tiny_model("llama"), tok)
    sp = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=0, logits_processors=(spell,))
    out = llm.generate("hi", sp)[0].outputs[0]
    assert out.text == "a€bcd" and out.text_offsets == [0, 1, 1, 1, 2, 3, 4]
    assert out.cumulative_logprob == sum(out.logprobs)  # (kept as tokens come, in sum()'s order)
    assert [out.text[s] for s in out.text_offsets] == ["a", "€", "€", "€", "b", "c", "d"]
    cut = llm.generate("hi", SamplingParams(**{**vars(sp), "stop": ("bc",)}))[0].outputs[0]
    assert cut.text == "a€" and cut.text_offsets == [0, 1, 1, 1, 2, 2]  # 'c' ended the text at the cut
    assert llm.generate("hi", GREEDY)[0].outputs[0].text_offsets is None  # (without logprobs)


@pytest.mark.parametrize("bad", [2.0, True, "7"])
def test_a_token_id_that_is_no_int_is_named_as_such(tok, bad):
    # (2.0 was refused as "token id 2.0 outside the model's vocabulary [0, 257)", which it is not)
    with pytest.raises(LmforgeError, match=rf"^prompt 0 has token id {bad!r} that is not an int: token ids are ints in "
                                           r"\[0, 257\)$"):
        LLM(tiny_model("llama"), tok).generate([[1, bad]], GREEDY)


def test_a_call_waiting_on_many_requests_shows_progress(tok, monkeypatch):
    """`lmforge generate` over 1,319 GSM8K prompts, or LLM.score over MMLU's pairs, ran minutes on a CPU with nothing
    shown: a call waiting on PROGRESS_MIN requests or more counts them on a bar (tqdm's, on a terminal); fewer, or
    LLM.progress = False, none."""
    import tqdm.auto

    from lmforge.infer import llm as L

    bars = []

    class Bar:
        def __init__(self, total, initial, **kw):
            self.total, self.n, self.closed = total, initial, False
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    llm = LLM(tiny_model("llama"), tok)
    params = SamplingParams(max_tokens=2)
    llm.generate(["a"] * (L.PROGRESS_MIN - 1), params)
    assert bars == []
    llm.generate([f"p{i}" for i in range(L.PROGRESS_MIN + 3)], params)
    assert [(b.total, b.n, b.closed) for b in bars] == [(L.PROGRESS_MIN + 3, L.PROGRESS_MIN + 3, True)]
    llm.progress = False
    llm.generate([f"p{i}" for i in range(L.PROGRESS_MIN + 3)], params)
    assert len(bars) == 1
