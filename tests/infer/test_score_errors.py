"""LLM's scoring methods' errors: a refused pair or document is named by the caller's own index and word ("pair 2",
"document 1"), not by its place in an internal batch; errors="return" scores the others, as generate's does; token
ids may be 1-D tensors, as generate and score_rolling take them."""

from __future__ import annotations

import math
import re

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError, RequestError
from lmforge.infer.engine import EngineConfig
from lmforge.infer.llm import LLM
from lmforge.tokenizer.byte import ByteTokenizer

from .infer_helpers import tiny_model

LONG = [5] * 100  # 101 tokens with a continuation token: 7 KV blocks of 16, the pool below has 4


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(tiny_model(init_std=0.3), ByteTokenizer(), config=EngineConfig(num_kv_tokens=64, block_size=16))


@pytest.mark.parametrize("pairs, bad", [
    ([([1, 2], [3]), ([1, 2], [4]), (LONG, [6])], 2),  # the refused pair is the second of its group (firsts)
    ([([1, 2], [3]), (LONG, [6]), ([1, 2], [4])], 1),
    ([([1, 2], [3]), ([1, 2], [4]), ([7], [8]), ([1, 2], [9]), (LONG, [6])], 4),
])
def test_a_pair_refused_by_the_engine_is_named_by_its_own_index(llm, pairs, bad):
    with pytest.raises(LmforgeError, match=rf"^pair {bad}: a request of 101 prompt \+ 0 new tokens needs 7 KV blocks"
                                           r".*gpu_memory_utilization \(or shorten the prompt: it only scores") as e:
        llm.score(pairs)
    assert "lower max_tokens" not in str(e.value)  # (a score-only request has none to lower)
    with pytest.raises(LmforgeError, match=rf"^pair {bad}: "):
        llm.score_tokens(pairs)


def test_a_document_refused_by_the_engine_is_named_by_its_own_index(llm):
    with pytest.raises(LmforgeError, match=r"^document 1: a request of 129 prompt \+ 0 new tokens needs 8 KV"):
        llm.score_rolling([[1, 2, 3], list(range(1, 200))])  # document 1's windows are requests 1 and 2
    with pytest.raises(LmforgeError, match=r"^document 2: "):
        llm.score_rolling([list(range(1, 60)), [1, 2, 3], list(range(1, 200))])


def test_errors_return_puts_none_or_a_failed_score_in_a_refused_pairs_place(llm):
    good = [([1, 2], [3]), ([1, 2], [4]), (torch.tensor([7]), torch.tensor([8, 9]))]
    want = llm.score_tokens(good)
    pairs = [good[0], (LONG, [6]), good[1], "no pair", ([1], [999]), good[2], ([1], [])]
    got = llm.score_tokens(pairs, errors="return")
    assert [got[i] for i in (0, 2, 5)] == want and all(s.error is None for s in want)
    for i, why in [(1, "needs 7 KV blocks"), (3, "must be \\(context, continuation\\)"),
                   (4, "token id 999 outside"), (6, "empty continuation")]:
        s = got[i]
        assert isinstance(s.error, RequestError) and s.error.args[0].startswith(f"pair {i}")
        assert re.search(why, str(s.error)) and math.isnan(s.logprob) and not s.is_greedy and s.token_logprobs == []
    assert got[1].context_ids == LONG and got[1].token_ids == [6]  # tokenized before the engine refused it
    short = llm.score(pairs, errors="return")
    assert short == [(want[0].logprob, want[0].is_greedy), None, (want[1].logprob, want[1].is_greedy), None, None,
                     (want[2].logprob, want[2].is_greedy), None]
    assert llm.score(good, errors="raise") == [(s.logprob, s.is_greedy) for s in want]
    with pytest.raises(LmforgeError, match="^pair 3 must be"):  # errors="raise" (the default): the first refused
        llm.score(pairs[:4])  # (pair 1 is refused later, by the engine)
    with pytest.raises(ConfigError, match="errors must be 'raise' or 'return'"):
        llm.score(good, errors="ignore")
    assert not llm.engine.requests  # nothing left queued by the refusals


def test_score_rolling_errors_return_fails_only_the_refused_documents(llm):
    docs = [[1, 2, 3], list(range(1, 200)), [], [4, 5, 6, 7]]
    want = llm.score_rolling([docs[0], docs[3]])
    got = llm.score_rolling(docs, errors="return")
    assert [got[0], got[3]] == want
    assert str(got[1].error).startswith("document 1: a request of 129") and math.isnan(got[1].logprob)
    assert got[1].token_ids == docs[1]
    assert str(got[2].error) == "document 2 has no tokens: there is nothing to score" and got[2].token_ids == []
    with pytest.raises(LmforgeError, match="^document 1 has no tokens"):
        llm.score_rolling([docs[0], docs[2]])


def test_score_takes_1d_tensors_as_generate_and_score_rolling_do(llm):
    lists = [([65, 66, 67], [68, 69]), ([65], [70])]
    tensors = [(torch.tensor(c), torch.tensor(x)) for c, x in lists]
    assert llm.score(tensors) == llm.score(lists)
    assert llm.score([(torch.tensor(c), x) for c, x in lists]) == llm.score(lists)  # one of each
    ids, params = llm.score_request(torch.tensor([65, 66]), torch.tensor([67]))
    assert ids == [65, 66, 67] and all(type(t) is int for t in ids)
    assert llm.score_rolling([torch.tensor([65, 66, 67])]) == llm.score_rolling([[65, 66, 67]])
    with pytest.raises(LmforgeError, match="^pair 0: .*both token ids .*got a 2-D tensor and a 2-D tensor"):
        llm.score([(torch.tensor([[65]]), torch.tensor([[66]]))])
    with pytest.raises(LmforgeError, match="^pair 0 has token id 300 outside"):
        llm.score([(torch.tensor([65]), torch.tensor([300]))])


def test_one_pair_given_for_the_list_of_pairs_says_to_wrap_it(llm):
    """score(("The capital of France is", " Paris")) read each string as a pair and said only that "pair 0 must be
    (context, continuation), got 'The capital...'", which is what the caller believes they gave."""
    want = ("pair 0 must be (context, continuation), got 'The capital'; pairs is a list of pairs: "
            "score([(context, continuation)]), not score((context, continuation))")
    with pytest.raises(LmforgeError, match="^" + re.escape(want) + "$"):
        llm.score(("The capital", " Paris"))
    with pytest.raises(LmforgeError, match=r"got \[1, 2, 3\]$"):  # a malformed pair of ids: no hint
        llm.score([[1, 2, 3]])
