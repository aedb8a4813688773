"""What a sample ended by a stop string holds: its text cut before the stop string (or after it, with
include_stop_str_in_output), its token_ids every token sampled (SamplingParams.stop's documented rule)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.infer.sampling import SamplingParams


def force(ids_seq, eot):
    """A processor spelling ids_seq, then the end-of-text id."""
    def f(ids, logits):
        out = torch.full_like(logits, float("-inf"))
        out[ids_seq[len(ids)] if len(ids) < len(ids_seq) else eot] = 0.0
        return out
    return f


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("output_kind", ["cumulative", "delta"])
def test_stop_string_text_and_token_ids(tok, include, output_kind):
    """Byte tokens: '本' spans three tokens, the stop is found on its last. The text is cut before it (kept with
    include_stop_str_in_output), token_ids hold every sampled token, through the stop string's last, with their
    log-probs and offsets; a stream's text only grows and folds to the final text either way."""
    from lmforge.infer.engine import Engine

    from .infer_helpers import tiny_model

    spelled = "Action: café 日本語 more"
    ids = tok.encode(spelled)
    through = tok.encode("Action: café 日本")
    sp = SamplingParams(temperature=0, max_tokens=40, stop=("本", "zz"), logprobs=0, output_kind=output_kind,
                        include_stop_str_in_output=include, logits_processors=(force(ids, tok.eot_id),))
    engine = Engine(tiny_model("llama"), tok)
    rid = engine.add_request("Q", sp)
    seen = []
    while engine.has_unfinished():
        seen += [o.outputs[0] for o in engine.step() if o.request_id == rid]
    last = seen[-1]
    want = "Action: café 日本" if include else "Action: café 日"
    if output_kind == "delta":
        assert "".join(o.text for o in seen) == want and sum((o.token_ids for o in seen), []) == through
    else:
        assert last.text == want and last.token_ids == through and len(last.logprobs) == len(through)
        texts = [o.text for o in seen]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))  # shown text never taken back
        assert len(last.text_offsets) == len(through) and max(last.text_offsets) <= len(want)
    assert last.finish_reason == "stop" and last.stop_reason == "本"


def test_include_stop_str_in_beams_and_options(tok):
    """Beam search keeps the stop string in the text as sampling does; the option round-trips through
    from_dict, and equal params hash equal with it."""
    from lmforge.infer.llm import LLM

    from .infer_helpers import tiny_model

    llm = LLM(tiny_model("llama", init_std=0.3), tok)
    base = SamplingParams(temperature=0, beam_width=3, n=2, max_tokens=8, ignore_eos=True)
    text = llm.generate("ab", base)[0].outputs[0].text
    stop = text[2:4]
    for include in (False, True):
        out = llm.generate("ab", dataclasses.replace(base, stop=(stop,), include_stop_str_in_output=include))[0]
        stopped = [o for o in out.outputs if o.finish_reason == "stop"]
        assert stopped
        for o in stopped:
            assert o.stop_reason == stop and o.text.endswith(stop) == include and o.text.count(stop) == include
    sp = SamplingParams.from_dict({"stop": "x", "include_stop_str_in_output": True})
    same = SamplingParams(stop=("x",), include_stop_str_in_output=True)
    assert sp.include_stop_str_in_output and sp == same and hash(sp) == hash(same)


def _tokenizers():
    """A tokenizer for each StreamDecoder path: token bytes (ByteTokenizer), a window of decoded ids (the same
    without token_bytes, as a HF tokenizer), SentencePiece pieces (streamable) and its window (not streamable)."""
    from lmforge.tokenizer.byte import ByteTokenizer

    class Window(ByteTokenizer):
        token_bytes = None

    yield "bytes", ByteTokenizer()
    yield "window", Window()
    pytest.importorskip("tokenizers")
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE
    from tests.tokenizer.sp_files import sp_doc

    doc = sp_doc()
    yield "pieces", SentencePieceBPE(doc)
    doc["decoder"]["decoders"].insert(2, {"type": "Replace", "pattern": {"String": "q"}, "content": "q"})
    yield "sp-window", SentencePieceBPE(doc)


def test_stop_strings_see_whole_characters_on_every_decode_path():
    """A character split over tokens (byte tokens, SentencePiece byte fallback) is held back by the stream decoder
    until it completes: a non-ASCII stop string is found on the token completing it, a U+FFFD stop string never
    matches the incomplete tail (none is in the text), and no output's text ends in a partial character."""
    from lmforge.infer.engine import Engine

    from .infer_helpers import tiny_model

    model = tiny_model("llama", vocab_size=700)
    for name, tok in _tokenizers():
        ids = tok.encode("the king 日本語 x")

        def run(stop):
            sp = SamplingParams(temperature=0, max_tokens=40, stop=stop, logits_processors=(force(ids, tok.eot_id),))
            engine = Engine(model, tok)
            rid = engine.add_request("Q", sp)
            seen = []
            while engine.has_unfinished():
                seen += [o.outputs[0] for o in engine.step() if o.request_id == rid]
            assert not any(o.text.endswith("\ufffd") for o in seen), name
            return seen[-1]

        whole = run(())
        assert whole.text.endswith("the king 日本語 x") and whole.stop_reason is None, name
        cut = run(("日本",))
        assert (cut.text, cut.stop_reason) == (whole.text[:whole.text.index("日本")], "日本"), name
        assert len(cut.token_ids) == len(tok.encode("the king 日本")), name  # (ended on the token completing 本)
        never = run(("\ufffd",))
        assert (never.text, never.stop_reason, never.token_ids) == (whole.text, None, whole.token_ids), name


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_text_follows_include_stop_str_in_output(tok, include):
    """A stop_token_ids token that ends a sample shows its text only with include_stop_str_in_output (vLLM's
    StopChecker cuts the last token's text only without it), as a stop string does; the end-of-text id's text never
    shows (unless the caller lists it among stop_token_ids); a delta stream folds to the final text."""
    from lmforge.infer.engine import Engine

    from .infer_helpers import tiny_model

    def run(spelled, stop_ids, output_kind="cumulative", skip=False):
        sp = SamplingParams(temperature=0, max_tokens=40, stop_token_ids=stop_ids, include_stop_str_in_output=include,
                            output_kind=output_kind, skip_special_tokens=skip,
                            logits_processors=(force(spelled, tok.eot_id),))
        engine = Engine(tiny_model("llama"), tok)
        rid = engine.add_request("Q", sp)
        seen = []
        while engine.has_unfinished():
            seen += [o.outputs[0] for o in engine.step() if o.request_id == rid]
        return seen

    bang = tok.encode("!")[0]
    last = run(tok.encode("ab日!cd"), (bang,))[-1]
    assert (last.text, last.token_ids) == ("ab日!" if include else "ab日", tok.encode("ab日!"))
    assert (last.finish_reason, last.stop_reason) == ("stop", bang)
    deltas = run(tok.encode("ab日!cd"), (bang,), "delta")
    assert "".join(o.text for o in deltas) == last.text
    eos = run(tok.encode("ab"), ())[-1]  # the end-of-text id: never text
    assert (eos.text, eos.token_ids, eos.stop_reason) == ("ab", [*tok.encode("ab"), tok.eot_id], None)
    listed = run(tok.encode("ab"), (tok.eot_id,))[-1]  # listed: a stop token like any other
    assert (listed.text, listed.stop_reason) == ("ab<|endoftext|>" if include else "ab", tok.eot_id)
    assert run(tok.encode("ab"), (tok.eot_id,), skip=True)[-1].text == "ab"  # (a special token shows no text)


def test_stop_token_text_in_beams(tok):
    """Beam search keeps a stop_token_ids token's text as sampling does (include_stop_str_in_output), and never
    the end-of-text id's."""
    from lmforge.infer.llm import LLM

    from .infer_helpers import tiny_model

    llm = LLM(tiny_model("llama", init_std=0.3), tok)
    base = SamplingParams(temperature=0, beam_width=3, n=2, max_tokens=8, ignore_eos=True)
    plain = llm.generate("ab", base)[0].outputs[0]
    stop_id = plain.token_ids[2]
    for include in (False, True):
        out = llm.generate("ab", dataclasses.replace(base, stop_token_ids=(stop_id,), ignore_eos=False,
                                                     include_stop_str_in_output=include))[0]
        stopped = [o for o in out.outputs if o.stop_reason == stop_id]
        assert stopped
        for o in stopped:
            kept = tok.decode(o.token_ids if include else o.token_ids[:-1])
            assert o.finish_reason == "stop" and o.text == kept
