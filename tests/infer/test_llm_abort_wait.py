"""LLM.abort and wait across callers: a wait whose request is aborted raises at once (it never hands out a later
request reusing the id), and a wait refused because another caller took one of its requests loses none of the
others (they stay submitted, for completed() or a later wait)."""

from __future__ import annotations

import threading
import time

import pytest

from lmforge.errors import LmforgeError, RequestError
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.byte import ByteTokenizer

from .infer_helpers import tiny_model

LONG = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def test_abort_wakes_a_thread_waiting_for_the_request_even_when_its_id_is_reused_at_once():
    llm = LLM(tiny_model(), ByteTokenizer())
    llm.submit("first prompt", LONG, request_id="X")
    got: dict = {}

    def waiter():
        try:
            got["out"] = llm.wait(["X"])
        except Exception as e:
            got["error"] = e

    # the abort and the id's reuse between two of the waiter's steps, made where it steps (under the LLM's lock,
    # which the waiter holds while stepping: another thread taking it then could come after X has finished)
    step, calls, aborted = llm.engine.step, [], []

    def step_then_abort(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            aborted.append(llm.abort("X"))
            llm.submit("second", SHORT, request_id="X")
        return step(*a, **k)

    llm.engine.step = step_then_abort
    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert "out" not in got, "the waiter of the aborted X got the new X's output"
    err = got["error"]
    assert isinstance(err, RequestError) and err.request_id == "X"
    assert str(err) == "request 'X' was aborted (LLM.abort) while this call waited for it"
    assert aborted[0].finish_reason == "abort" and len(aborted[0].token_ids) < 40
    llm.engine.step = step
    new = llm.wait(["X"])[0]  # the new X is untouched: its own output, for its own caller
    assert new.prompt_token_ids == llm.text_ids("second") and len(new.token_ids) == 3
    assert not llm._held and not llm._submitted and not llm._waiters


def test_wait_refused_for_a_request_taken_elsewhere_keeps_the_others_submitted():
    llm = LLM(tiny_model(), ByteTokenizer())
    x, y = llm.submit("xx", SHORT), llm.submit("yy", SHORT)
    llm.wait([y])  # y collected here: a later wait([x, y]) is refused
    with pytest.raises(LmforgeError, match=repr(y)):
        llm.wait([x, y])
    assert x in llm._submitted  # still running, still owed to the program
    assert [o.request_id for o in llm.completed()] == [x]
    assert not llm._held and not llm._submitted


def test_wait_refused_keeps_a_finished_request_held_for_completed_not_forever():
    llm = LLM(tiny_model(), ByteTokenizer())
    x, y = llm.submit("xx", SHORT), llm.submit("yy", SHORT)
    z = llm.submit("zz", LONG)
    llm.wait([z])  # x and y finish meanwhile: held
    assert {x, y} <= set(llm._held)
    llm.abort(y)
    with pytest.raises(LmforgeError, match=repr(y)):
        llm.wait([x, y])
    outs = list(llm.completed())  # x comes out of completed() (it was held forever, its id in use)
    assert [o.request_id for o in outs] == [x] and len(outs[0].token_ids) == 3
    assert not llm._held and not llm._submitted
    llm.submit("again", SHORT, request_id=x)  # its id is free again
