"""A model with a SentencePiece-style tokenizer generates and chats: a HF-format directory holding a Llama-2-style
tokenizer.json, and an lmforge checkpoint that carries the tokenizer (save_checkpoint writes it, LLM.load reads it)."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.sentencepiece import SentencePieceBPE

from ..infer.infer_helpers import tiny_model
from .sp_files import hf, sp_doc

pytest.importorskip("tokenizers")
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _hf_dir(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps(sp_doc()))
    tiny_model("llama", vocab_size=656).save_pretrained(tmp_path)
    return tmp_path


def test_generate_and_chat_on_a_hf_dir_with_a_llama2_style_tokenizer(tmp_path):
    d = _hf_dir(tmp_path)
    llm = LLM.load(d, tokenizer=str(d))
    assert isinstance(llm.tokenizer, SentencePieceBPE)
    out = llm.generate("the king", GREEDY)[0]
    assert out.prompt_token_ids == hf(sp_doc()).encode("the king").ids  # <s> first, as HF's encode
    assert out.prompt_token_ids[0] == 1 and len(out.outputs[0].token_ids) == 12
    assert out.outputs[0].text == llm.tokenizer.decode(out.outputs[0].token_ids)
    streamed = "".join(llm.stream("the king", GREEDY))
    assert streamed == out.outputs[0].text
    with pytest.warns(UserWarning):  # (no chat template of its own: the plain one)
        chat = llm.chat([{"role": "user", "content": "speak, my lord"}], GREEDY)[0]
    assert chat.outputs[0].text == llm.tokenizer.decode(chat.outputs[0].token_ids)


def test_an_lmforge_checkpoint_carries_the_tokenizer(tmp_path):
    from lmforge.checkpoint import save_checkpoint

    tok = SentencePieceBPE(sp_doc())
    model = tiny_model("llama", vocab_size=656)
    save_checkpoint(tmp_path / "run", 1, model, tokenizer=tok)
    llm = LLM.load(tmp_path / "run")
    assert isinstance(llm.tokenizer, SentencePieceBPE) and llm.tokenizer.doc == tok.doc
    assert llm.generate("the king", GREEDY)[0].outputs[0].token_ids == \
        LLM(model, tok).generate("the king", GREEDY)[0].outputs[0].token_ids


def test_llm_load_of_a_hf_dir_reads_its_sentencepiece_tokenizer(tmp_path):
    # (LLM.load(hf_dir) opened tokenizer.json as byte-level BPE only, refusing Llama 2's, Mistral's, Gemma's)
    from lmforge.checkpoint import load_model

    d = _hf_dir(tmp_path)
    llm = LLM.load(d)
    assert isinstance(llm.tokenizer, SentencePieceBPE) and llm.tokenizer.doc == sp_doc()
    assert llm.generate("the king", GREEDY)[0].prompt_token_ids == hf(sp_doc()).encode("the king").ids
    assert isinstance(load_model(d)[1], SentencePieceBPE)


def _forced(ids: list[int]):
    """A logits processor making the completion `ids`, then </s>."""
    import torch

    def force(out_ids, row):
        allowed = torch.full_like(row, float("-inf"))
        allowed[ids[len(out_ids)] if len(out_ids) < len(ids) else 2] = 0.0
        return allowed
    return force


@pytest.mark.parametrize("window", [False, True])
def test_a_completion_keeps_the_space_its_first_token_has_after_the_prompt(tmp_path, window):
    """A completion's text is what it adds to the prompt's, as vLLM's detokenizer gives it: decoded alone, Llama 2's
    Strip decoder dropped the leading space of "▁the▁" right after the prompt "the king", so prompt + completion
    read "the kingthe king the " (lmdeploy#1743; HumanEval's lost indentation, declare-lab/instruct-eval#19). The
    token-by-token stream, the window decode of other decoder chains, n samples, deltas and beam search all agree;
    a prompt of special tokens alone (a lone <s>) still starts the text."""
    from lmforge.infer.async_engine import AsyncEngine

    d = _hf_dir(tmp_path)
    llm = LLM.load(d)
    if window:  # (the decoder chain as one that cannot go token by token: the window decode's path)
        llm.tokenizer.streamable = False
    ref = hf(sp_doc())
    the, king = ref.token_to_id("▁the▁"), ref.token_to_id("king")
    sp = SamplingParams(max_tokens=8, n=2, logits_processors=(_forced([the, king, the]),))
    out = llm.generate("the king", sp)[0]
    prompt = ref.decode(out.prompt_token_ids, skip_special_tokens=True)
    whole = ref.decode(out.prompt_token_ids + out.token_ids, skip_special_tokens=True)
    assert prompt == "the king" and whole == "the king the king the "
    assert [o.text for o in out.outputs] == [" the king the "] * 2 and out.token_ids == [the, king, the, 2]
    assert "".join(llm.stream("the king", dataclasses.replace(sp, n=1))) == " the king the "

    async def deltas():
        engine = AsyncEngine(llm.engine)
        texts = [o.text async for o in engine.generate("the king", dataclasses.replace(sp, output_kind="delta"))]
        await engine.shutdown()
        return texts
    assert "".join(asyncio.run(deltas())) == " the king the "
    stop = dataclasses.replace(sp, stop=(" king",))  # a stop string that starts with the kept space
    assert llm.generate("the king", stop)[0].text == " the"
    alone = llm.generate([1], sp)[0]  # (nothing before it: the text starts with it, as HF's decode gives it)
    assert alone.text == "the king the " == ref.decode([1, the, king, the], skip_special_tokens=True)

    from lmforge.infer.detok import continuation_context, decode_after

    beam = llm.generate("the king", SamplingParams(temperature=0, beam_width=2, max_tokens=6, ignore_eos=True))[0]
    context = continuation_context(beam.prompt_token_ids, frozenset({0, 1, 2}))
    assert beam.text == decode_after(llm.tokenizer, context, beam.token_ids)
    assert beam.text == ref.decode(beam.prompt_token_ids + beam.token_ids)[len(ref.decode(beam.prompt_token_ids)):]
