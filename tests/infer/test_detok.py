"""lmforge.infer.detok's context decoding: the text a completion (or a top-k alternative) adds after the prompt ids
before it decodes that context once per row of alternatives, and drops from its end only the ids of a character
left incomplete, never a U+FFFD the text truly holds."""

from __future__ import annotations

import pytest

from lmforge.infer.detok import complete_context, decode_after, token_text, token_texts
from lmforge.tokenizer.byte import ByteTokenizer


class CountingTokenizer(ByteTokenizer):
    """A byte tokenizer read through decode alone (as a HF tokenizer is), counting its decodes."""

    token_bytes = None

    def __init__(self):
        super().__init__()
        self.decodes = 0

    def decode(self, ids) -> str:
        self.decodes += 1
        return super().decode(ids)


def test_a_rows_alternatives_decode_their_context_once():
    """Each row's context is decoded once, then each alternative after it once (it was three decodes per
    alternative: the context's completeness, the context, the context with the token); decode_after: two."""
    tok = CountingTokenizer()
    context, ids = tok.encode("Q: "), tok.encode("ab")
    rows = token_texts(tok, context, ids, [tok.encode("abcde"), None, tok.encode("xyz")])
    assert rows == [[(t, chr(t), [t]) for t in tok.encode("abcde")], None,
                    [(t, chr(t), [t]) for t in tok.encode("xyz")]]
    assert tok.decodes == (1 + 5) + (1 + 3)
    tok.decodes = 0
    assert token_text(tok, context, tok.encode("a")[0]) == ("a", [0x61]) and tok.decodes == 2
    tok.decodes = 0
    assert decode_after(tok, context, ids) == "ab" and tok.decodes == 2


def test_a_real_trailing_replacement_character_stays_in_the_context():
    """A text holding U+FFFD (bytes EF BF BD, a whole character) is complete: its ids stay (they were dropped
    as if they were an incomplete character, whose text also ends in U+FFFD); an incomplete one's ids go."""
    tok = ByteTokenizer()
    assert complete_context(tok, tok.encode("ab\ufffd")) == tok.encode("ab\ufffd")
    assert complete_context(tok, tok.encode("ab\ufffd日")[:-2]) == tok.encode("ab\ufffd")
    assert complete_context(tok, [*tok.encode("a"), 0xE6, *tok.encode("\ufffd")]) == [0x61, 0xE6, 0xEF, 0xBF, 0xBD]


def test_a_sentencepiece_completion_after_replacement_characters_keeps_its_space():
    """A prompt ending in U+FFFD (SentencePiece's byte pieces <0xEF><0xBF><0xBD>, whole characters): "▁the" after
    it reads " the", as decoding prompt and completion together shows (the context was dropped whole and the
    completion decoded as the text's start: "the")."""
    pytest.importorskip("tokenizers")
    from lmforge.infer.detok import continuation_context, special_ids
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE
    from tests.tokenizer.sp_files import sp_doc

    tok = SentencePieceBPE(sp_doc())
    prompt, the = [tok.bos_id, *tok.encode("\ufffd\ufffd\ufffd")], tok.encode("the")
    context = continuation_context(prompt, special_ids(tok))
    assert complete_context(tok, context) == context
    assert decode_after(tok, context, the) == " the" and tok.decode(prompt + the).endswith("\ufffd the")
