"""The text of a top-k alternative (a completion's top_logprobs, a prompt's prompt_logprobs: the CLI's rows, OpenAI's
"token" and "bytes") is what the token adds after the text before it, as the completion's own text is made: decoded
alone, a byte of a split character read U+FFFD (bytes [239, 191, 189], not its own) and a SentencePiece "▁the" lost
its space."""

from __future__ import annotations

import pytest

from lmforge.cli.sampling import completion_rows, top_logprobs_rows
from lmforge.infer.detok import special_ids, token_text
from lmforge.infer.outputs import CompletionOutput, RequestOutput
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.byte import ByteTokenizer


class WindowTokenizer(ByteTokenizer):
    """A byte tokenizer read through decode alone (as a HF tokenizer is): StreamDecoder's window path."""
    token_bytes = None


def test_a_split_character_reads_as_its_escaped_bytes():
    tok = ByteTokenizer()
    ids = tok.encode("a日")  # 61 e6 97 a5
    top = [{ids[1]: -0.1, tok.encode("b")[0]: -2.0}, {ids[2]: -0.2}, {ids[3]: -0.3}]
    rows = top_logprobs_rows(tok, top, tok.encode("Q"), ids[1:])
    assert [(r[0]["token"], r[0]["bytes"]) for r in rows] == [("\\xe6", [0xE6]), ("\\x97", [0x97]), ("\\xa5", [0xA5])]
    assert rows[0][1] == {"id": 98, "token": "b", "bytes": [98], "logprob": -2.0}
    assert bytes(b for r in rows for b in r[0]["bytes"]).decode() == "日"
    # without token bytes (a window decode), the text shows U+FFFD and the bytes are not known: None
    assert token_text(WindowTokenizer(), tok.encode("Qa"), ids[1]) == ("\ufffd", None)
    assert token_text(WindowTokenizer(), tok.encode("Qa"), ids[0]) == ("a", [0x61])


@pytest.mark.parametrize("streamable", [True, False])
def test_a_sentencepiece_alternative_keeps_its_space_after_text(streamable):
    pytest.importorskip("tokenizers")
    from lmforge.tokenizer.sentencepiece import SentencePieceBPE
    from tests.tokenizer.sp_files import sp_doc

    doc = sp_doc()
    if not streamable:  # (a decoder step after ByteFallback: decoded in a window)
        doc["decoder"]["decoders"].insert(2, {"type": "Replace", "pattern": {"String": "q"}, "content": "q"})
    tok = SentencePieceBPE(doc)
    assert tok.streamable == streamable
    the, king = tok.encode("the"), tok.encode("the king")[1:]  # "▁the", "king" (its space is the "▁the▁" before it)
    assert len(the) == len(king) == 1 and tok.decode(the) == "the"  # decoded alone: no space
    prompt = [tok.bos_id, *tok.encode("speak")]
    out = RequestOutput(None, prompt, [CompletionOutput(0, " theking", the + king, "length",
                                                        top_logprobs=[{the[0]: -1.0}, {the[0]: -1.5, king[0]: -0.5}])])
    rows = completion_rows(tok, out, out.outputs[0], SamplingParams())
    assert [[e["token"] for e in r] for r in rows] == [[" the"], ["king", " the"]]
    assert rows[0][0]["bytes"] == list(b" the")
    # a completion opening the text (a prompt of specials only) shows no space before its first token
    alone = RequestOutput(None, [tok.bos_id], out.outputs)
    assert completion_rows(tok, alone, alone.outputs[0], SamplingParams())[0][0]["token"] == "the"
    # a prompt's alternatives continue the prompt's text before them (its special tokens are none); the first has none
    prompt_rows = top_logprobs_rows(tok, [None, {the[0]: -1.0}, {king[0]: -2.0}], ids=[tok.bos_id, *the, *king],
                                    skip=special_ids(tok))
    assert prompt_rows[0] is None and [r[0]["token"] for r in prompt_rows[1:]] == ["the", "king"]
