"""LLM.score's lm-eval conventions at their edges: is_greedy means each continuation token IS the argmax (the first
maximal id, what greedy decoding picks), not merely tied with it; and an empty context whose continuation opens
with the end-of-text token takes that token as its context (no doubled end-of-text), as lm-eval's loglikelihood."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.llm import LLM
from lmforge.infer.sampler import logprob_entries, token_logprobs
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.byte import ByteTokenizer

from .infer_helpers import tiny_model

CTX = [65, 66, 67]


def tied_model(twin_offset: int):
    """A tiny model whose output head has row `twin` copied from the argmax row after CTX: exactly tied logits."""
    model = tiny_model(init_std=0.3, max_seq_len=64, tie_embeddings=False)
    with torch.no_grad():
        a = int(model(torch.tensor([CTX]))[0, -1].argmax())
        twin = a + twin_offset
        model.lm_head.weight[twin] = model.lm_head.weight[a]
        logits = model(torch.tensor([CTX]))[0, -1]
    assert float(logits[a]) == float(logits[twin])
    return model, min(a, twin), max(a, twin)


@pytest.mark.parametrize("twin_offset", [1, -1])
def test_is_greedy_is_the_token_greedy_decoding_picks_on_a_tie(twin_offset):
    model, first, second = tied_model(twin_offset)
    llm = LLM(model, ByteTokenizer())
    assert llm.generate([CTX], SamplingParams(max_tokens=1, temperature=0))[0].token_ids == [first]
    (lp_first, greedy_first), (lp_second, greedy_second) = llm.score([(CTX, [first]), (CTX, [second])])
    assert lp_first == lp_second
    assert greedy_first and not greedy_second  # lm-eval: cont == logits.argmax (the first maximum)


def test_top_logprobs_start_with_the_argmax_on_ties():
    logits = torch.zeros(3, 50257)
    logits[0, [7, 900, 30000]] = 1.0  # topk(2) of these lists 900 before 7
    logits[1, [3, 5]] = 2.0
    logits[2, 40] = 3.0
    _, values, ids = token_logprobs(logits, torch.tensor([900, 5, 40]), 2)
    assert ids[:, 0].tolist() == logits.argmax(-1).tolist() == [7, 3, 40]
    assert ids[0].tolist() == [7, 900] and ids[1].tolist() == [3, 5]
    assert torch.equal(values, logits.log_softmax(-1).gather(-1, ids))
    entries = logprob_entries(logits, [900, 5, 40], [1, 1, 1])
    assert [list(e)[-1] for e in entries] == [7, 3, 40]  # with k = 1 the last key is the argmax


def test_empty_context_with_a_leading_end_of_text_token_is_not_doubled():
    tok = ByteTokenizer()
    eot = tok.eot_id
    llm = LLM(tiny_model(init_std=0.3, max_seq_len=64), tok)
    got = llm.score([([], [eot, 72, 105]), ([eot], [72, 105]), ([], [72, 105])])
    assert got[0] == got[1]
    assert got[2] == llm.score([([eot], [72, 105])])[0]  # an empty context stands for the end-of-text token
    with pytest.raises(LmforgeError, match="only the end-of-text"):
        llm.score([([], [eot])])


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("twin_offset", [1, -1])
def test_read_score_reads_is_greedy_from_any_number_of_prompt_logprobs(k, twin_offset):
    # the argmax was taken as the entry's last key, right only for k = 1: a request's own prompt_logprobs=2 or 5 read
    # the greedy token as not greedy
    from lmforge.infer.score import read_score

    model, first, second = tied_model(twin_offset)
    llm = LLM(model, ByteTokenizer())
    params = SamplingParams(max_tokens=0, prompt_logprobs=k, prompt_logprobs_start=len(CTX))
    got = [read_score(o) for o in llm.generate([CTX + [first], CTX + [second], CTX + [first, 70]], params)]
    assert [s.is_greedy for s in got[:2]] == [True, False]
    want = llm.score([(CTX, [first]), (CTX, [second]), (CTX, [first, 70])])
    assert [s.is_greedy for s in got] == [g for _, g in want]
    assert [s.logprob for s in got] == pytest.approx([lp for lp, _ in want], abs=1e-5)
