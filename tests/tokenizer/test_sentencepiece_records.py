"""Post-training data on a SentencePiece-style tokenizer (Llama 2, Mistral, Gemma): a string completion and a
process reward model's steps continue the text before them, so their ids are those of HF's encoding of the whole
text (no "▁" put before each piece, which encoding them alone would add)."""

from __future__ import annotations

import pytest

from lmforge.align.data import Encoder
from lmforge.align.prm import encode_steps
from lmforge.tokenizer.sentencepiece import SentencePieceBPE

from .sp_files import hf, sp_doc

pytest.importorskip("tokenizers")

LAYOUTS = [("llama", "first", False), ("metaspace", "first", False), ("metaspace", "always", True)]


@pytest.mark.parametrize("style,prepend,split", LAYOUTS, ids=["llama2", "metaspace-first", "metaspace-always-split"])
def test_a_string_completion_and_prm_steps_encode_as_the_whole_text(style, prepend, split):
    """(The pieces meet where HF's whole-text encoding has a token boundary, which the test asserts first: this
    tiny vocabulary, trained without word splits, has merges across spaces that real SentencePiece models lack.)"""
    doc = sp_doc(style, prepend, split)
    tok, ref = SentencePieceBPE(doc), hf(doc)
    whole = lambda text: ref.encode(text, add_special_tokens=False).ids  # noqa: E731
    for prompt, completion in [("The king:", " death and night."), ("The king:", "Death and night."),
                               ("Night:", "\nThe queen.\n")]:
        want, p = whole(prompt + completion), whole(prompt)
        assert want[:len(p)] == p  # (a token boundary where the completion starts)
        ids, mask = Encoder(tok, "plain").prompt_completion(prompt, completion, "record 0")
        assert ids == want + [tok.eot_id] and mask == [False] * len(p) + [True] * (len(ids) - len(p))
    steps = ["The king speaks:", "The queen hears:", "Death and night:"]  # (":" is a byte token: no merge across)
    ids, positions, _ = encode_steps(tok, "Night:", steps, separator="\n")
    assert ids == whole("Night:" + "".join(s + "\n" for s in steps))
    assert [ids[p] for p in positions] == [tok.encode("\n", where="inside")[-1]] * 3  # each step ends on the separator
