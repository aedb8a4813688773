"""A wait that finds its request already finished must hand out that request's output, never a later request's
that reused the id: between the wait's look-up and its taking the output, another thread may abort the finished
request (or collect it) and submit a new one under the same id, which may finish before the wait resumes."""

from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError, RequestError
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.byte import ByteTokenizer

from .infer_helpers import tiny_model

SHORT = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def _finished(llm: LLM, prompt: str, rid: str) -> None:
    """Submit a request and step the engine until it is finished and held for its caller."""
    llm.submit(prompt, SHORT, request_id=rid)
    while rid in llm.engine.requests:
        llm._step(finished_only=True)
    assert rid in llm._held


def _between_lookup_and_take(llm: LLM, act) -> None:
    """Run act() where another thread could run it: after the wait looked its ids up (under the lock), before
    its loop takes the outputs."""
    loop = llm._collect_loop

    def late(*a, **k):
        llm._collect_loop = loop
        act()
        return loop(*a, **k)

    llm._collect_loop = late


def test_wait_on_a_finished_request_aborted_and_resubmitted_meanwhile_raises_not_the_new_output():
    llm = LLM(tiny_model(), ByteTokenizer())
    _finished(llm, "first prompt", "X")

    def abort_and_reuse():
        assert llm.abort("X").prompt_token_ids == llm.text_ids("first prompt")
        _finished(llm, "second", "X")

    _between_lookup_and_take(llm, abort_and_reuse)
    with pytest.raises(RequestError, match="request 'X' was aborted"):
        llm.wait(["X"])
    new = llm.wait(["X"])[0]  # the new X is untouched: its own output, for its own caller
    assert new.prompt_token_ids == llm.text_ids("second") and len(new.token_ids) == 3
    assert not llm._held and not llm._submitted and not llm._waiters


def test_wait_on_a_finished_request_collected_elsewhere_and_id_reused_raises_not_the_new_output():
    llm = LLM(tiny_model(), ByteTokenizer())
    _finished(llm, "first prompt", "X")
    taken = []

    def collect_and_reuse():
        taken.append(llm.engine.abort("X") if "X" in llm.engine.requests else llm._held.pop("X"))
        llm._handed_out(["X"])  # (what another thread's wait does once it has collected X)
        _finished(llm, "second", "X")

    _between_lookup_and_take(llm, collect_and_reuse)
    with pytest.raises(LmforgeError, match="another caller"):
        llm.wait(["X"])
    assert taken[0].prompt_token_ids == llm.text_ids("first prompt")
    new = llm.wait(["X"])[0]
    assert new.prompt_token_ids == llm.text_ids("second") and len(new.token_ids) == 3
