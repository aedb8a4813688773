"""`lmforge export` of a model with a SentencePiece-style tokenizer (a Llama 2 / Mistral / Gemma fine-tune): the
tokenizer.json it writes reads back in HF (AutoTokenizer, `tokenizers`) and lmforge with the same ids (export
refused every tokenizer but the byte-level BPE and byte ones)."""

from __future__ import annotations

import json

import pytest

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.cli import main
from lmforge.infer.chat_template import get_template
from lmforge.tokenizer.sentencepiece import SentencePieceBPE

from ..infer.infer_helpers import tiny_model
from .sp_files import sp_doc

transformers = pytest.importorskip("transformers")
TEXTS = ["the king", " Hello  world\n", "café 日本 😀", "thou art</s>my lord", "<s>x", ""]


@pytest.mark.parametrize("style", [dict(style="llama"), dict(style="metaspace", prepend="always", split=True)],
                         ids=["llama", "metaspace"])
def test_export_of_a_sentencepiece_model_reads_back_with_the_same_ids(tmp_path, style):
    tok = SentencePieceBPE(sp_doc(**style))
    model = tiny_model("llama", vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path / "run", 1, model, tokenizer=tok, extra={"chat_template": "plain"})
    assert main(["export", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in TEXTS:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf_tok(text)["input_ids"] == tok.encode(text, add_special_tokens=True)  # <s> first
    conversation = [{"role": "user", "content": "speak, my lord"}, {"role": "assistant", "content": "the king"}]
    for gen in (True, False):
        assert hf_tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen) == \
            get_template("plain").render(conversation, add_generation_prompt=gen)
        ids = hf_tok.apply_chat_template(conversation, tokenize=True, add_generation_prompt=gen)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # (transformers 5: a BatchEncoding)
        assert ids == get_template("plain").encode(tok, conversation, gen)[0]  # what SFT trained on
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.special_tokens["</s>"] == hf_tok.eos_token_id  # an answer ends at </s>
    back = load_model(tmp_path / "hf")[1]
    assert isinstance(back, SentencePieceBPE) and back.doc == tok.doc
