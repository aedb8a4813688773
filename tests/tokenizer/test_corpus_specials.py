"""`encode_to_shards` (behind `tokenize_to_shards` and `lmforge tokenizer encode`) encodes a document's text as the
pipeline's `tokenize` stage does: `<|endoftext|>` separates documents, and any other special-token string in the
text stays text (found by the 2026-12-06 data sweep: `<|im_start|>` in a web page became a control token)."""

from __future__ import annotations

import numpy as np

import lmforge as lf
from lmforge.data.shards import TokenFile
from lmforge.tokenizer.corpus import encode_to_shards


def test_special_strings_inside_documents_stay_text(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("the river runs past the town and the mill; " * 200)
    tok = lf.train_bpe([str(train)], vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>"])
    docs = ["a web page quoting <|im_start|> as text", "a second page"]
    src = tmp_path / "doc.txt"
    src.write_text("<|endoftext|>".join(docs))
    rep = encode_to_shards(tok, [str(src)], tmp_path / "out", progress=False)
    ids = np.asarray(TokenFile(rep.shards["train"]).tokens).tolist()
    eot = tok.special_tokens["<|endoftext|>"]
    assert tok.special_tokens["<|im_start|>"] not in ids
    assert ids == [eot, *tok.encode_ordinary(docs[0]), eot, *tok.encode_ordinary(docs[1])]
    assert rep.docs["train"] == 2
