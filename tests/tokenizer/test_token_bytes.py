"""token_bytes, which streaming detokenization decodes through one id at a time, agrees with decode on every id."""

from __future__ import annotations

import pytest

from lmforge.infer.detok import StreamDecoder
from lmforge.tokenizer.byte import ByteTokenizer
from lmforge.tokenizer.train import train_bpe

TEXT = "the cat sat on the mat, and the dog sat on the log. 日本語 👍\n" * 40


@pytest.fixture(scope="module", params=["bpe", "byte"])
def tok(request):
    if request.param == "byte":
        return ByteTokenizer()
    return train_bpe(iter([TEXT]), 280, ["<|endoftext|>"], progress=False, workers=1)


def test_ids_that_are_no_token_stream_as_replacement_characters(tok):
    # a model's padded vocabulary rows (or any id past the tokenizer's) raised KeyError / IndexError mid-stream
    for bad in (tok.vocab_size, tok.vocab_size + 40, -1):
        assert tok.token_bytes(bad) == "\ufffd".encode() and tok.decode([bad]) == "\ufffd"
        dec = StreamDecoder(tok)
        assert dec.push(bad) + dec.flush() == "\ufffd"
    ids = tok.encode("日本語 👍 cat") + [tok.vocab_size + 3] + [tok.eot_id]
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == "日本語 👍 cat\ufffd<|endoftext|>" == tok.decode(ids)
    assert "\ufffd" not in "".join(pieces[:-3])  # a character split across tokens is held back, not replaced
    if hasattr(tok, "decode_bytes"):  # the BPE tokenizer: every id's bytes as decode gives them
        assert all(tok.token_bytes(i) == tok.decode_bytes([i]) for i in range(tok.vocab_size))


def test_byte_tokenizer_checks_its_special_tokens_as_bpe_training_does():
    """ByteTokenizer(special_tokens="<|eot|>") made seven one-character specials (vocab 263, '|' twice, no end of
    text): the specials go through check_specials, train_bpe's check."""
    import pytest

    from lmforge.errors import ConfigError
    from lmforge.tokenizer.byte import ByteTokenizer

    with pytest.raises(ConfigError, match=r"got the single string '<\|eot\|>': pass \['<\|eot\|>'\]"):
        ByteTokenizer(special_tokens="<|eot|>")
    with pytest.raises(ConfigError, match="special token '<a>' is given twice"):
        ByteTokenizer(("<a>", "<a>"))
    assert ByteTokenizer(("<|endoftext|>", "<pad>")).vocab_size == 258
