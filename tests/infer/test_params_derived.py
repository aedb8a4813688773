"""Per-request params are derived from the caller's (SamplingParams.derived: only the changed fields re-checked)
or the shared default (SamplingParams.default()), never built and validated whole again for each request: a
score call built one SamplingParams per scored pair, chat_request and AsyncEngine.add_request one per call."""

from __future__ import annotations

import asyncio

import pytest

from lmforge.infer.async_engine import AsyncEngine
from lmforge.infer.chat_template import chat_request, get_template
from lmforge.infer.engine import Engine
from lmforge.infer.llm import LLM
from lmforge.infer.request import seed_for
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.byte import ByteTokenizer

from .infer_helpers import tiny_model


@pytest.fixture
def built(monkeypatch) -> list:
    """SamplingParams built whole (its __init__, validating every field), counted from here on."""
    SamplingParams.default()  # (made once per process: not counted)
    made, init = [], SamplingParams.__init__

    def counting(self, *args, **kwargs):
        made.append(kwargs)
        init(self, *args, **kwargs)

    monkeypatch.setattr(SamplingParams, "__init__", counting)
    return made


def test_score_builds_no_params_per_pair(built):
    llm = LLM(tiny_model(), ByteTokenizer())
    scores = llm.score([("ab", "c"), ("abc", "de"), ("x", "yz")])
    assert built == [] and len(scores) == 3


def test_chat_request_derives_its_params(built):
    seeded = SamplingParams.default().derived(seed=7)
    reqs = [chat_request(ByteTokenizer(), get_template("plain"), [{"role": "user", "content": "hi"}], p, index=2)
            for p in (None, seeded)]
    assert built == []
    assert reqs[0].params.seed is None and reqs[1].params.seed == seed_for(7, 2)
    assert reqs[0].params.stop == tuple(get_template("plain").stop)


def test_async_add_request_derives_a_seeded_prompts_params(built):
    async def main():
        aeng = AsyncEngine(Engine(tiny_model(), ByteTokenizer()))
        rid = await aeng.add_request("hello", SamplingParams.default().derived(seed=3, max_tokens=2), prompt_index=4)
        seed = aeng.engine.requests[rid].params.seed
        await aeng.shutdown()
        return seed

    assert asyncio.run(main()) == seed_for(3, 4)
    assert built == []
