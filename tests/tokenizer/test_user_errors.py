"""What a user gets wrong when training and calling a tokenizer: a one-line error or warning naming it."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.errors import ConfigError
from lmforge.tokenizer.load import load_tokenizer
from lmforge.tokenizer.train import train_bpe

TEXT = "the cat sat on the mat, and the dog sat on the log.\n" * 40


@pytest.mark.parametrize("name", ["gpt4", "cl100k_base", "GPT2"])
def test_a_misspelt_pattern_name_is_refused(name):
    # taken as a regex it matched only itself, so each line (spaces and all) was one pre-token: merges such as
    # "the cat" were learnt without a word
    with pytest.raises(ConfigError, match=rf"pattern '{name}' is not one of the names \['gpt2', 'cl100k', 'o200k'\]"):
        train_bpe(iter([TEXT]), 300, progress=False, workers=1, pattern=name)


@pytest.mark.parametrize("name, close", [("gpt-4", "gpt2"), ("o200k-base", "o200k"), ("cl100k.base", "cl100k"),
                                         ("GPT2", "gpt2")])
def test_a_misspelt_name_with_dots_or_dashes_is_refused_naming_the_closest(name, close):
    # only \w+ words were caught: "gpt-4" or "o200k-base" trained a tokenizer splitting on nothing but itself
    from lmforge.tokenizer.pretokenize import resolve_pattern
    with pytest.raises(ConfigError, match=rf"pattern '{name}' is not one of the names .*; did you mean '{close}'\?"):
        resolve_pattern(name)
    assert resolve_pattern("...") == "..." and resolve_pattern(r"\w+|\s+") == r"\w+|\s+"  # regexes still pass


def test_vocab_size_takes_numpy_integers_and_names_a_non_integer():
    tok = train_bpe(iter([TEXT * 5]), np.int64(270), ["<|endoftext|>"], progress=False, workers=1)
    assert tok.vocab_size == 270  # was refused as "vocab_size=270 is too small"
    with pytest.raises(ConfigError, match=r"vocab_size=300.0 must be an integer"):
        train_bpe(iter([TEXT]), 300.0, progress=False, workers=1)


def test_a_corpus_too_small_for_the_vocabulary_says_so():
    with pytest.warns(UserWarning, match=r"vocab_size=5000 asked for 4743 merges, but the corpus holds only 20 .* "
                                         r"the tokenizer has 277 tokens"):
        tok = train_bpe(iter([TEXT]), 5000, ["<|endoftext|>"], progress=False, workers=1)
    assert tok.vocab_size == 277 and len(tok.merges) == 20


def test_encode_and_decode_refuse_the_wrong_type():
    tok = train_bpe(iter([TEXT]), 270, ["<|endoftext|>"], progress=False, workers=1)
    with pytest.raises(TypeError, match=r"encode takes a str, got bytes; decode the bytes first"):
        tok.encode(b"the cat")
    with pytest.raises(TypeError, match=r"encode takes a str, got NoneType"):
        tok.encode_ordinary(None)
    with pytest.raises(TypeError, match=r"decode takes token ids \(a list of ints\), got str"):
        tok.decode("104")  # decoded each digit as an id: "\x01\x00\x04"
    assert tok.decode(np.array(tok.encode("the cat"))) == "the cat"


def test_save_tiktoken_into_a_directory(tmp_path):
    tok = train_bpe(iter([TEXT]), 270, ["<|endoftext|>"], progress=False, workers=1)
    path = tok.save_tiktoken(tmp_path)  # raised IsADirectoryError; save and save_hf take a directory
    assert path == tmp_path / "bpe.tiktoken"
    assert load_tokenizer(tmp_path).encode("the cat sat") == tok.encode("the cat sat")


def test_special_tokens_given_as_one_string_are_refused_naming_the_list():
    # iterated, "<pad>" was five one-character specials ("<", "p", ...) or "special token 'd' is given twice"
    with pytest.raises(ConfigError, match=r"got the single string '<pad>': pass \['<pad>'\]"):
        train_bpe(iter([TEXT]), 300, "<pad>", progress=False, workers=1)
    from lmforge.tokenizer.bpe import Tokenizer
    with pytest.raises(ConfigError, match=r"single string '<\|endoftext\|>'"):
        Tokenizer({i: bytes([i]) for i in range(256)}, [], "<|endoftext|>")
