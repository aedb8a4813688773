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


def test_a_file_encoded_in_ranges_decodes_to_its_text(tmp_path, monkeypatch):
    """encode_to_shards cuts a large file into ranges (lmforge.tokenizer.train.CHUNK_BYTES, 4 MiB; 2 KiB here): a
    range continuing a document is encoded where="inside", so a SentencePiece tokenizer puts no "▁" at each cut
    (each cut added a space to the decoded text)."""
    import numpy as np

    from lmforge.data.shards import TokenFile
    from lmforge.tokenizer import train
    from lmforge.tokenizer.corpus import encode_to_shards
    from lmforge.tokenizer.pretokenize import PATTERNS

    from .sp_files import corpus

    monkeypatch.setattr(train, "CHUNK_BYTES", 2048)
    tok = SentencePieceBPE(sp_doc("llama"))
    text = "".join(line + "\n" for line in corpus(300, seed=3))
    src = tmp_path / "doc.txt"
    src.write_text(text)
    rep = encode_to_shards(tok, [str(src)], tmp_path / "out", progress=False, workers=1)
    ids = np.asarray(TokenFile(rep.shards["train"]).tokens).tolist()
    assert len(train.file_ranges(src, PATTERNS["gpt2"], ())) > 3  # (several ranges)
    assert ids[0] == tok.eot_id and tok.eot_id not in ids[1:]  # (the document's separator, then its text)
    assert tok.decode(ids[1:]) == text


def test_long_words_are_encoded_but_not_cached():
    """The word cache keeps words of up to 256 characters (a CJK paragraph without spaces is one word: caching
    such words held ~730 MB per encoding process at the cache's 65,536 entries); their ids are the same."""
    doc = sp_doc("llama")  # Llama 2's layout over merges learnt within words (no merge across "▁": cut into words)
    doc["model"] = sp_doc("metaspace", "always", True)["model"]
    tok, ref = SentencePieceBPE(doc), hf(doc)
    assert tok._words is not None
    long_word, short = "日本東京" * 80, "the king"
    for text in (long_word, short, long_word):
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids
    assert tok._cache and all(len(w) <= 256 for w in tok._cache)
