"""A model with a SentencePiece-style tokenizer generates and chats: a HF-format directory holding a Llama-2-style
tokenizer.json, and an lmforge checkpoint that carries the tokenizer (save_checkpoint writes it, LLM.load reads it)."""

from __future__ import annotations

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
