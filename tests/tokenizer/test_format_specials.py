"""Special tokens through the GPT-2 and tiktoken files: kept where the format can hold them, warned about where not."""

from __future__ import annotations

import warnings

import pytest

from lmforge.tokenizer.load import load_tokenizer
from lmforge.tokenizer.train import train_bpe

TEXT = "the cat sat on the mat, and the dog sat on the log.\n" * 40


def test_gpt2_files_keep_specials_of_any_form(tmp_path):
    # a chat tokenizer's specials: only <|...|> ones were read back as specials, "<s>" and "[PAD]" became
    # ordinary tokens no merge makes, so "</s>" in a chat template encoded as four bytes
    tok = train_bpe(iter([TEXT]), 300, ["<s>", "</s>", "[PAD]", "<|endoftext|>"], progress=False, workers=1)
    tok.save_gpt2(tmp_path)
    back = load_tokenizer(tmp_path / "vocab.json")
    assert back.special_tokens == {"<s>": 256, "</s>": 257, "[PAD]": 258, "<|endoftext|>": 259}
    text = "<s>the cat</s>[PAD]<|endoftext|>"
    assert back.encode(text) == tok.encode(text) == [256] + tok.encode_ordinary("the cat") + [257, 258, 259]
    assert back.merges == tok.merges and back.vocab == tok.vocab


def test_tiktoken_export_warns_when_the_specials_cannot_come_back(tmp_path):
    # the rank file holds no specials; a reader puts <|endoftext|> at the first free id (256 here), so this
    # tokenizer's <|endoftext|> (257) came back as another id, and <|im_start|> not at all, without a word
    tok = train_bpe(iter([TEXT]), 300, ["<|im_start|>", "<|endoftext|>"], progress=False, workers=1)
    with pytest.warns(UserWarning, match=r"special tokens \{'<\|im_start\|>': 256, '<\|endoftext\|>': 257\} "
                                         r"\(read back as \{'<\|endoftext\|>': 256\}\)"):
        path = tok.save_tiktoken(tmp_path / "t.tiktoken")
    assert load_tokenizer(path).special_tokens == {"<|endoftext|>": 256}
    plain = train_bpe(iter([TEXT]), 300, ["<|endoftext|>"], progress=False, workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # <|endoftext|> at 256 comes back as it was: nothing to say
        plain.save_tiktoken(tmp_path / "plain.tiktoken")
    assert load_tokenizer(tmp_path / "plain.tiktoken").special_tokens == plain.special_tokens
