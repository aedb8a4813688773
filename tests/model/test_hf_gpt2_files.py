"""A HF model directory whose tokenizer is GPT-2's vocab.json + merges.txt (what a slow GPT2Tokenizer saves; no
tokenizer.json) loads with that tokenizer: LLM.load said the checkpoint held no tokenizer. One with only SentencePiece's
tokenizer.model is told how to write the tokenizer.json lmforge reads."""

from __future__ import annotations

import pytest
import torch

import lmforge as lf
from lmforge.errors import LmforgeError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.train import train_bpe

TEXT = "the cat sat on the mat; the dog sat on the log\n"


def _hf_dir(path):
    tok = train_bpe(iter([TEXT * 20]), 280, ["<|endoftext|>"], progress=False, workers=1)
    torch.manual_seed(0)
    Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4, d_ff=48,
                            max_seq_len=32)).save_pretrained(path)
    tok.save_gpt2(path)
    return tok


def test_hf_directory_with_gpt2_files_loads_its_tokenizer(tmp_path):
    tok = _hf_dir(tmp_path)
    llm = lf.LLM.load(tmp_path)
    assert llm.tokenizer.encode(TEXT) == tok.encode(TEXT) and llm.tokenizer.eot_id == tok.eot_id


def test_vocab_json_without_merges_is_no_tokenizer(tmp_path):
    _hf_dir(tmp_path)
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(LmforgeError, match="holds no tokenizer"):
        lf.LLM.load(tmp_path)


def test_sentencepiece_model_file_alone_is_named(tmp_path):
    _hf_dir(tmp_path)
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        (tmp_path / name).unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\x05")  # (a SentencePiece protobuf: never parsed)
    with pytest.raises(LmforgeError, match=r"its tokenizer\.model, SentencePiece's protobuf, is not: .*"
                                           r"save_pretrained\(path\)"):
        lf.LLM.load(tmp_path)
