"""One LLM called from several threads (dspy.Evaluate(num_threads=N), a thread pool of LM-program calls): each
engine step holds the LLM's lock, the threads' requests share batches, and a call whose requests finished in
another thread's step finds them held for it (found by the LM-programs sweep: two threads stepping at once
crashed the engine and left callers spinning forever)."""

from __future__ import annotations

import threading

import pytest

from lmforge.errors import LmforgeError
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import counting, tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _in_threads(fn, n: int, timeout: float = 60.0) -> tuple[dict, list]:
    """fn(i) in n threads started together; their results by i and errors. Threads still running after
    `timeout` fail the test (a hang, not a slow run: the whole call takes well under a second)."""
    results, errors, barrier = {}, [], threading.Barrier(n)

    def call(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as e:  # (collected: asserted in the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread's call never returned"
    return results, errors


def test_generate_from_eight_threads_equals_one_batched_call(tok):
    llm = LLM(tiny_model(), tok)
    prompts = [f"q{i} " * (i + 1) for i in range(8)]
    want = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    steps = llm._steps
    results, errors = _in_threads(lambda i: llm.generate(prompts[i], GREEDY)[0].token_ids, 8)
    assert not errors and [results[i] for i in range(8)] == want
    assert llm._steps - steps <= 8 * (GREEDY.max_tokens + 1)  # bounded: no thread spun on an idle engine
    assert not llm.engine.requests and not llm._held


def test_threads_mixing_chat_score_and_submit(tok):
    llm = LLM(tiny_model(), tok)
    conv = [{"role": "user", "content": "hi"}]
    want_chat = llm.chat(conv, GREEDY, template="plain")[0].token_ids
    want_score = llm.score([("The sky is", " blue")])[0]
    want_gen = llm.generate("abc", GREEDY)[0].token_ids
    calls = [lambda: llm.chat(conv, GREEDY, template="plain")[0].token_ids,
             lambda: llm.score([("The sky is", " blue")])[0],
             lambda: llm.wait([llm.submit("abc", GREEDY)])[0].token_ids]
    results, errors = _in_threads(lambda i: calls[i % 3](), 9)
    assert not errors
    for i in range(9):
        got = results[i]
        if i % 3 == 1:
            assert got[0] == pytest.approx(want_score[0], abs=1e-5) and got[1] == want_score[1]
        else:
            assert got == (want_chat if i % 3 == 0 else want_gen)
    assert not llm.engine.requests and not llm._held and not llm._submitted


def test_two_threads_waiting_on_one_request_do_not_hang(tok):
    """One collects it; the other raises (its request was taken by another caller) instead of stepping an idle
    engine forever."""
    llm = LLM(tiny_model(), tok)
    for _ in range(5):  # (races differ from run to run)
        rid = llm.submit("hello", GREEDY)
        results, errors = _in_threads(lambda i: llm.wait([rid])[0].token_ids, 2)
        assert len(results) == 1 and len(next(iter(results.values()))) == GREEDY.max_tokens
        assert len(errors) == 1 and isinstance(errors[0], LmforgeError), errors
        assert "waiting to be collected" in str(errors[0])
        assert not llm.engine.requests and not llm._held and not llm._submitted


def test_threads_find_their_finished_requests_without_rescanning(tok):
    """Each finished request is routed to the call waiting for it: a generate whose requests finish in other
    threads' steps rescanned every id it waited for after each of them, and completed() scanned every held output
    per step (both O(threads x waiting) per step under the lock: ~14 lookups per request at 80 requests a thread,
    growing with the count). Now a bounded number per request, and every output is the one-thread result."""
    llm = LLM(tiny_model(), tok, max_batch_size=8)
    short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    prompts = [[f"t{i} p{j}" for j in range(50)] for i in range(4)]
    want = {i: [o.token_ids for o in llm.generate(p, short)] for i, p in enumerate(prompts)}
    llm._held, llm._submitted = counting(dict)(), counting(set)()

    def call(i):
        if i > 0:
            return [o.token_ids for o in llm.generate(prompts[i], short)]
        ids = [llm.submit(p, short) for p in prompts[0]]
        got = {o.request_id: o.token_ids for o in llm.completed()}
        return [got[rid] for rid in ids]

    results, errors = _in_threads(call, 4)
    assert not errors and results == want
    n = sum(len(p) for p in prompts)
    assert llm._held.lookups <= 4 * n and llm._submitted.lookups <= 3 * n
    assert not llm.engine.requests and not llm._held and not llm._submitted and not llm._waiters
