"""LLM's front door for LM programs (found by the LM-programs sweep): errors="return" covers input refused
before it runs, add-time errors name their prompt, chat_request(index=i) is what chat runs for conversation i
(seed included), chat outputs carry their rendered prompt, score_request / read_score queue scoring beside other
calls, and score can refuse to cut a context."""

from __future__ import annotations

import warnings

import pytest

from lmforge.errors import ConfigError, LmforgeError, RequestError
from lmforge.infer.chat_template import get_template
from lmforge.infer.engine import EngineConfig
from lmforge.infer.llm import LLM, read_score
from lmforge.infer.request import seed_for
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import tiny_model

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
CONV = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("bad, says", [("x" * 200, "has 200 tokens"), ("", "is empty"), ([999], "token id 999"),
                                       (3.5, "must be a string")])
def test_generate_errors_return_covers_bad_prompts(tok, bad, says):
    llm = LLM(tiny_model(), tok)
    outs = llm.generate(["ok1", bad, "ok2"], GREEDY, errors="return")
    assert [o.error is None for o in outs] == [True, False, True]
    failed = outs[1]
    assert isinstance(failed.error, RequestError) and str(failed.error).startswith("prompt 1")
    assert says in str(failed.error) and isinstance(failed.error.__cause__, LmforgeError)
    assert failed.finished and failed.token_ids == [] and failed.text == "" and failed.finish_reason == "abort"
    assert [o.token_ids for o in outs[::2]] == [o.token_ids for o in llm.generate(["ok1", "ok2"], GREEDY)]
    with pytest.raises(LmforgeError, match="prompt 1"):
        llm.generate(["ok1", bad, "ok2"], GREEDY)  # "raise" stays the default
    assert not llm.engine.requests and not llm._held


def test_errors_return_covers_what_the_engine_refuses(tok):
    llm = LLM(tiny_model(), tok)
    bias = SamplingParams(max_tokens=4, logit_bias={10**6: 1.0}, n=2)
    outs = llm.generate(["a", "b"], [GREEDY, bias], errors="return")
    assert outs[0].error is None and len(outs[0].token_ids) == 4
    assert str(outs[1].error).startswith("prompt 1: logit_bias has token id 1000000")
    assert len(outs[1].outputs) == 2 and outs[1].prompt == "b" and outs[1].prompt_token_ids == list(b"b")
    with pytest.raises(LmforgeError, match=r"^prompt 1: logit_bias"):  # named (item: add-time errors name no prompt)
        llm.generate(["a", "b"], [GREEDY, bias])
    small = LLM(tiny_model(), tok, config=EngineConfig(num_kv_tokens=64, block_size=16))
    outs = small.generate(["a", "y" * 100], SamplingParams(max_tokens=8), errors="return")
    assert outs[0].error is None and "needs 7 KV blocks but the pool has 4" in str(outs[1].error)
    assert not small.engine.requests and not small._held


def test_chat_errors_return_and_names_the_conversation(tok):
    llm = LLM(tiny_model(), tok)
    convs = [CONV, [{"role": "robot", "content": "x"}]]
    outs = llm.chat(convs, GREEDY, template="plain", errors="return")
    assert outs[0].error is None and len(outs[0].token_ids) == 4
    assert str(outs[1].error).startswith("conversation 1: message 0 has role 'robot'") and outs[1].prompt is None
    with pytest.raises(ConfigError, match=r"^conversation 1: message 0 has role 'robot'"):
        llm.chat(convs, GREEDY, template="plain")


def test_chat_request_index_gives_chats_seed(tok):
    llm = LLM(tiny_model(), tok)
    sp = SamplingParams(temperature=1.0, max_tokens=8, seed=123, ignore_eos=True)
    convs = [[{"role": "user", "content": "other"}], CONV]
    chat = llm.chat(convs, sp, template="plain")
    ids, params = llm.chat_request(CONV, sp, template="plain", index=1)
    assert params.seed == seed_for(123, 1)  # the seed that runs, readable by a cache
    assert llm.wait([llm.submit(ids, params)])[0].token_ids == chat[1].token_ids
    assert llm.chat_request(CONV, sp, template="plain")[1].seed == 123  # index None: as given (submit's way)


def test_chat_outputs_carry_the_rendered_prompt(tok):
    llm = LLM(tiny_model(), tok)
    out = llm.chat(CONV, GREEDY, template="plain")[0]
    assert out.prompt == get_template("plain").render(CONV) == "User: hi\nAssistant: "
    assert out.prompt_token_ids == list(out.prompt.encode())


def test_score_request_submitted_reads_as_score_tokens(tok):
    llm = LLM(tiny_model(), tok)
    ctx = "Question: which colour is the sky on a clear day? Answer:"
    pairs = [(ctx, " blue"), (ctx, " green")]
    want = llm.score_tokens(pairs)
    llm.engine.reset_prefix_cache()
    rids = [llm.submit(*llm.score_request(c, x)) for c, x in pairs]
    got = [read_score(o) for o in llm.wait(rids)]
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids and g.context_ids == w.context_ids and g.is_greedy == w.is_greedy
        assert g.token_logprobs == pytest.approx(w.token_logprobs, abs=1e-5)
    # the second request's context came from the first's blocks (16-token blocks of a 58-byte context)
    rid = llm.submit(*llm.score_request(ctx, " red"))
    assert read_score(llm.wait([rid])[0]).num_cached_tokens == 48
    assert want[1].num_cached_tokens == 48 and want[0].num_cached_tokens == 0
    with pytest.raises(LmforgeError, match="no prompt log-probs"):
        read_score(llm.generate("x", GREEDY)[0])


def test_score_truncate_error_names_the_lengths(tok):
    llm = LLM(tiny_model(), tok)  # a 128-token window
    ctx = "INSTRUCTION: add. " + "Q: 1 + 1\nA: 2\n" * 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = llm.score_tokens([(ctx, " 4")])[0].context_ids  # the default: lm-eval's left cut, silent
    assert len(kept) == 126 and bytes(kept) == ctx.rstrip().encode()[-126:]  # ("\n 4": 3 continuation tokens)
    with pytest.raises(LmforgeError, match=r"pair 0: its 157-token context and 3-token continuation pass the "
                                           r"129-token window"):
        llm.score([(ctx, " 4")], truncate="error")
    with pytest.raises(ConfigError, match="truncate must be"):
        llm.score([(ctx, " 4")], truncate="right")


def test_generators_of_pairs_and_conversations_and_reserved_template_variables(tok):
    """A generator of pairs was read twice (its second pass empty: score returned []); a generator of conversations
    and a non-list were tracebacks; a chat_template_kwargs key chat_request sets itself was blamed on the messages."""
    llm = LLM(tiny_model(), tok)
    pairs = [("the cat", " sat"), ([5, 6, 7], [8, 9])]
    assert llm.score(p for p in pairs) == llm.score(pairs) and len(llm.score(pairs)) == 2
    with pytest.raises(LmforgeError, match="pairs must be a list of"):
        llm.score(None)
    sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    conv = [{"role": "user", "content": "hi"}]
    want = llm.chat([conv], sp, template="plain")[0].token_ids
    assert llm.chat((c for c in [conv]), sp, template="plain")[0].token_ids == want
    with pytest.raises(LmforgeError, match="conversations must be a list of"):
        llm.chat(5, sp, template="plain")
    with pytest.raises(ConfigError, match="key 'messages' is set by chat_request itself"):
        llm.chat_request(conv, sp, template="plain", chat_template_kwargs={"messages": []})
    with pytest.raises(LmforgeError, match=r"pair 0 has token id 999 outside"):
        llm.score([([1, 999], [2])])
