"""Model-based quality: CCNet-style perplexity with a tiny bigram LM, and the hashed n-gram classifier."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from lmforge.data.classifier import ClassifierConfig, HashedNgramClassifier, QualityConfig, quality, train_classifier
from lmforge.data.document import Document
from lmforge.data.perplexity import PerplexityConfig, load_scorer, perplexity, score_documents
from lmforge.data.stage import StageContext
from lmforge.tokenizer.byte import ByteTokenizer
from tests.data.conftest import shared

ENGLISH = ("the cat sat on the mat and the dog sat on the log. the children played in the park while "
           "their parents talked about the weather and the news of the day. ") * 20


class Bigram(nn.Module):
    """logits[b, t] = log P(next byte | byte at t), counted from a text with add-one smoothing."""

    def __init__(self, text: str, vocab: int = 257):
        super().__init__()
        counts = torch.ones(vocab, vocab)
        ids = list(text.encode())
        for a, b in zip(ids, ids[1:]):
            counts[a, b] += 1
        self.register_buffer("table", (counts / counts.sum(1, keepdim=True)).log())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]  # (B, T, V)


class Uniform(nn.Module):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, 257)


def test_uniform_model_perplexity_is_vocab_size():
    assert perplexity(Uniform(), ByteTokenizer(), "any text at all", context=4) == pytest.approx(257.0)
    assert perplexity(Uniform(), ByteTokenizer(), "x") == math.inf


def test_perplexity_matches_hand_computed_bigram_nll():
    model, tok = Bigram(ENGLISH), ByteTokenizer()
    text = "the dog sat"
    ids = list(text.encode())
    nll = -sum(float(model.table[a, b]) for a, b in zip(ids, ids[1:])) / (len(ids) - 1)
    assert perplexity(model, tok, text, context=3) == pytest.approx(math.exp(nll), rel=1e-5)


def test_ccnet_buckets_and_filter():
    model, tok = Bigram(ENGLISH), ByteTokenizer()
    docs = [Document(id="en", text="the children sat on the mat and talked about the park."),
            Document(id="junk", text="zx9#qv@@ 77kq ~~ vvv %%% jjj ^^^ 1x1x1x"),
            Document(id="mid", text="the cat sat on the Mat, talking about the park!")]
    out = score_documents(model, tok, docs, PerplexityConfig(model="unused", max_perplexity=100.0, head_max=10.0,
                                                             middle_max=100.0))
    ppl = {d.id: d.meta["perplexity"] for d in out}
    assert ppl["en"] == pytest.approx(9.242, abs=1e-3) and ppl["mid"] == pytest.approx(14.070, abs=1e-3)
    assert ppl["junk"] > 300
    assert [d.meta["ccnet_bucket"] for d in out] == ["head", "tail", "middle"]
    assert [d.drop for d in out] == [None, "perplexity:too_high", None]


def test_model_spec_loads_a_factory(tmp_path, monkeypatch):
    (tmp_path / "my_scorer.py").write_text(
        "from tests.data.test_quality import Uniform\nfrom lmforge.tokenizer.byte import ByteTokenizer\n"
        "def make():\n    return Uniform(), ByteTokenizer()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model, tok = load_scorer("my_scorer:make")
    assert isinstance(model, Uniform) and tok.vocab_size == 257


def _gsm_examples(n: int) -> tuple[list[str], list[str]]:
    """Positives: GSM8K questions; negatives: the same questions with their words shuffled, so only
    word order (bigrams) tells them apart."""
    lines = shared("gsm8k", "train.jsonl").read_text().splitlines()[: 2 * n]
    qs = [json.loads(x)["question"] for x in lines]
    rng = random.Random(0)
    neg = []
    for q in qs[n:]:
        w = q.split()
        rng.shuffle(w)
        neg.append(" ".join(w))
    return qs[:n], neg


def test_classifier_learns_word_order_from_bigrams():
    pos, neg = _gsm_examples(400)
    cfg = ClassifierConfig(buckets=1 << 15, epochs=5)
    model = train_classifier(pos[:320], neg[:320], cfg)
    acc = ((model.predict_proba(pos[320:]) >= 0.5).mean() + (model.predict_proba(neg[320:]) < 0.5).mean()) / 2
    assert acc >= 0.85
    unigram = train_classifier(pos[:320], neg[:320], ClassifierConfig(buckets=1 << 15, epochs=5, ngrams=1))
    p = unigram.predict_proba(pos[320:] + neg[320:])
    assert np.abs(p - 0.5).max() < 0.2 or abs(((p[:80] >= 0.5).mean() + (p[80:] < 0.5).mean()) / 2 - 0.5) < 0.1


def test_train_classifier_cli_and_quality_stage(tmp_path):
    from lmforge.cli import main

    pos, neg = _gsm_examples(300)
    (tmp_path / "pos.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in pos))
    (tmp_path / "neg.txt").write_text("\n".join(neg) + "\n")
    out = tmp_path / "clf"
    assert main(["data", "train-classifier", "--positive", str(tmp_path / "pos.jsonl"), "--negative",
                 str(tmp_path / "neg.txt"), "--out", str(out), "--buckets", "32768"]) == 0
    model = HashedNgramClassifier.load(out)
    assert model.emb.shape == (32768, 16)
    docs = [Document(id="good", text=pos[0]), Document(id="bad", text=neg[0])]
    res = quality(QualityConfig(model=str(out), threshold=0.5), docs, StageContext())
    assert res[0].meta["quality_score"] > 0.5 > res[1].meta["quality_score"]
    assert [d.drop for d in res] == [None, "quality:low_score"]
    # a file of the directory names the directory: the .json was read as a fastText model, rejecting every document
    for name in ("quality_classifier.json", "quality_classifier.safetensors"):
        docs = [Document(id="good", text=pos[0]), Document(id="bad", text=neg[0])]
        again = quality(QualityConfig(model=str(out / name), threshold=0.5), docs, StageContext())
        assert [(d.drop, d.meta["quality_score"]) for d in again] == [(d.drop, d.meta["quality_score"]) for d in res]


def test_perplexity_stage_with_an_lmforge_checkpoint(tmp_path):
    """A tiny lmforge Transformer saved as a checkpoint directory scores documents through the stage."""
    import lmforge as lf
    from lmforge.data.perplexity import perplexity_filter

    cfg = lf.ModelConfig.preset("llama-tiny", vocab_size=257, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                max_seq_len=64)
    model = lf.Transformer(cfg).eval()
    model.save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)
    text = "the cat sat on the mat " * 5
    want = perplexity(model, ByteTokenizer(), text, context=32)
    docs = perplexity_filter(PerplexityConfig(model=str(tmp_path), context=32, max_perplexity=1e9),
                             [Document(id="a", text=text)], StageContext())
    assert docs[0].meta["perplexity"] == pytest.approx(want, rel=1e-4) and docs[0].drop is None
    assert 100 < want < 600  # an untrained model is close to uniform over 257 ids
