"""LLM.score_rolling against plain forwards of a tiny byte-level model: a document within the window is one forward
after the prefix token; a longer one is scored token by token exactly once, each token given the context lm-eval's
rolling windows give it (tests/infer/test_lm_eval_parity.py compares with lm-eval's own numbers)."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.llm import LLM, rolling_windows
from lmforge.tokenizer.byte import ByteTokenizer

from .infer_helpers import tiny_model

W = 16  # the model's window: max_seq_len
TEXT = "the cat sat on the mat. the dog sat on the log. a bird sat on the dog."


@pytest.fixture(scope="module")
def llm():
    return LLM(tiny_model("llama", init_std=0.3, max_seq_len=W), ByteTokenizer())


def _forward_logprobs(model, seq: list[int]) -> list[float]:
    """log p(seq[j] | seq[:j]) for j >= 1, from one plain forward (no engine, no cache)."""
    with torch.no_grad():
        logp = model(torch.tensor([seq]))[0].log_softmax(-1)
    return logp[:-1].gather(-1, torch.tensor(seq[1:])[:, None])[:, 0].tolist()


def test_a_document_within_the_window_is_one_forward_after_the_prefix_token(llm):
    ids = ByteTokenizer().encode(TEXT[:W])
    eot = llm.tokenizer.eot_id
    (s,) = llm.score_rolling([TEXT[:W]])
    want = _forward_logprobs(llm.model, [eot] + ids)
    assert s.token_ids == ids and s.context_ids == [eot]
    assert s.token_logprobs == pytest.approx(want, abs=1e-5)
    assert s.logprob == pytest.approx(sum(want), abs=1e-4)
    assert llm.score_rolling(ids)[0].logprob == pytest.approx(s.logprob, abs=1e-6)  # ids as given == the text


def test_a_longer_document_is_scored_once_per_token_with_lm_evals_contexts(llm):
    ids = ByteTokenizer().encode(TEXT[:40])  # 40 tokens, W = 16: windows predict [0, 16), [16, 32), [32, 40)
    eot = llm.tokenizer.eot_id
    # each window's sequence (context + predicted tokens, at most W + 1) and the tokens it predicts, by hand
    want = (_forward_logprobs(llm.model, [eot] + ids[:16])             # the prefix token, then 16 predicted
            + _forward_logprobs(llm.model, ids[15:32])                 # 1 token of context, 16 predicted
            + _forward_logprobs(llm.model, ids[23:40])[-8:])           # the short last window: 9 of context
    (s,) = llm.score_rolling([ids])
    assert s.token_ids == ids and len(s.token_logprobs) == len(ids)
    assert s.token_logprobs == pytest.approx(want, abs=1e-5)
    assert s.logprob == pytest.approx(sum(want), abs=1e-4)
    assert [(len(c), len(p)) for c, p in rolling_windows(ids, eot, W)] == [(1, 16), (1, 16), (9, 8)]


def test_documents_are_batched_together_and_returned_in_order(llm):
    docs = [TEXT, "x", TEXT[:W], TEXT[5:W + 1]]  # 5 windows, one token, exactly one window, a shorter one
    alone = [llm.score_rolling(d)[0] for d in docs]
    together = llm.score_rolling(docs)
    assert [s.token_ids for s in together] == [s.token_ids for s in alone]
    assert [s.logprob for s in together] == pytest.approx([s.logprob for s in alone], abs=1e-5)
    eot, (x,) = llm.tokenizer.eot_id, ByteTokenizer().encode("x")
    assert together[1].logprob == pytest.approx(_forward_logprobs(llm.model, [eot, x])[0], abs=1e-5)
    assert llm.score_rolling([]) == []


def test_windows_cover_every_token_once():
    for n in (1, 15, 16, 17, 32, 33, 100):
        ids = list(range(n))
        pairs = rolling_windows(ids, -1, W)
        assert [t for _, cont in pairs for t in cont] == ids
        for ctx, cont in pairs[1:]:
            assert len(ctx) + len(cont) == W + 1 and ctx == ids[cont[0] - len(ctx):cont[0]]


@pytest.mark.parametrize("doc, match", [("", "document 0 is empty text"), ([], "document 0 has no tokens"),
                                        ([1, 999], "token id 999 outside the model's vocabulary")])
def test_bad_documents_are_refused_in_one_line(llm, doc, match):
    with pytest.raises(LmforgeError, match=match) as e:
        llm.score_rolling([doc])
    assert "\n" not in str(e.value)
