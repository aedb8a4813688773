"""LLM programs that call the model with tools (ReAct, Toolformer, LM-program modules): request ids never
collide with an output still owed to a caller, wait / completed / abort hand each output out once, and chat
calls can be submitted and rendered with a checkpoint's own Jinja tools (found by the tools-and-programs sweep)."""

from __future__ import annotations

import json

import pytest

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.chat_template import JinjaTemplate, get_template
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import tiny_model


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _prompt(tok, out) -> str:
    return tok.decode(out.prompt_token_ids)


def test_automatic_ids_skip_an_uncollected_submitted_id(tok):
    llm = LLM(tiny_model(), tok)
    llm.submit("submitted call", greedy(1), request_id="1")  # the automatic counter reaches "1" next
    llm.generate("first generate", greedy(4))  # id "0"; "1" finishes meanwhile and waits for completed()
    out = llm.generate("second generate", greedy(4))[0]
    assert _prompt(tok, out) == "second generate" and out.request_id not in ("0", "1")
    done = list(llm.completed())
    assert [(o.request_id, _prompt(tok, o)) for o in done] == [("1", "submitted call")]


def test_an_explicit_id_in_use_is_refused_until_collected(tok):
    llm = LLM(tiny_model(), tok)
    llm.submit("short", greedy(1), request_id="x")
    llm.wait([llm.submit("long one", greedy(8))])  # "x" finished meanwhile: held
    with pytest.raises(LmforgeError, match="request id 'x' is in use"):
        llm.submit("another", greedy(3), request_id="x")
    assert [_prompt(tok, o) for o in llm.completed()] == ["short"]  # its own output, not lost
    assert llm.submit("another", greedy(3), request_id="x") == "x"  # collected: free again
    assert _prompt(tok, llm.wait(["x"])[0]) == "another"


def test_waiting_inside_completed_on_a_call_finished_in_the_same_step(tok):
    llm = LLM(tiny_model(), tok)
    want = {p: o.token_ids for p, o in zip("ab", llm.generate(["a", "b"], greedy(3)))}
    a, b = llm.submit("a", greedy(3)), llm.submit("b", greedy(3))  # same length: they finish together
    got = []
    for out in llm.completed():
        got.append((out.request_id, out.token_ids))
        if out.request_id == a:
            waited = llm.wait([b])[0]  # the program needs b's answer now
            got.append((waited.request_id, waited.token_ids))
    assert got == [(a, want["a"]), (b, want["b"])] and not llm._submitted and not llm._held


def test_wait_on_the_same_id_twice_returns_its_output_at_each_place(tok):
    llm = LLM(tiny_model(), tok)
    want = llm.generate("a", greedy(3))[0].token_ids
    r, s = llm.submit("a", greedy(3)), llm.submit("b", greedy(2))
    outs = llm.wait([r, s, r])
    assert [o.request_id for o in outs] == [r, s, r] and outs[0].token_ids == outs[2].token_ids == want
    assert not llm._submitted and not llm._held


def test_abort_cancels_running_and_finished_uncollected_calls(tok):
    llm = LLM(tiny_model(), tok)
    done, running, kept = llm.submit("a", greedy(1)), llm.submit("b", greedy(20)), llm.submit("c", greedy(3))
    llm.wait([kept])  # "a" finished meanwhile (held), "b" runs on
    finished = llm.abort(done)
    assert finished.finished and finished.outputs[0].finish_reason == "length" and len(finished.token_ids) == 1
    cut = llm.abort(running)
    assert cut.outputs[0].finish_reason == "abort" and 0 < len(cut.token_ids) < 20
    assert list(llm.completed()) == [] and not llm._submitted and not llm.engine.requests
    with pytest.raises(LmforgeError, match="no request with id"):
        llm.abort(running)
    with pytest.raises(LmforgeError, match="no request with id"):
        llm.wait([done])
    assert llm.submit("again", greedy(2), request_id=done) == done  # its id is free again


def test_a_jinja_template_is_compiled_once(monkeypatch):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    compiled = []
    real = ImmutableSandboxedEnvironment.from_string
    monkeypatch.setattr(ImmutableSandboxedEnvironment, "from_string",
                        lambda env, src, *a, **k: compiled.append(src) or real(env, src, *a, **k))
    tpl = JinjaTemplate(name="t", source="{# compiled once #}{% for m in messages %}{{ m['content'] }}|{% endfor %}")
    for i in range(5):
        assert tpl.render([{"role": "user", "content": str(i)}]) == f"{i}|"
    assert len(compiled) == 1


# a Qwen2.5-like template: tool schemas in a system turn, assistant tool_calls, enable_thinking (Qwen3)
TOOLS_JINJA = (
    "{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n' }}{%- for t in tools %}{{- t | tojson }}{{- '\\n' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' }}{%- if m.tool_calls %}"
    "{%- for c in m.tool_calls %}{{- '<tool_call>' + c.function.name + (c.function.arguments | tojson) }}"
    "{{- '</tool_call>' }}{%- endfor %}{%- else %}{{- m['content'] }}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}{{- '<think></think>' }}{%- endif %}{%- endif %}")
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two ints",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]
CALL = [{"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "content": "5"}]


def _specials_tokenizer():
    import lmforge as lf

    return lf.Tokenizer({i: bytes([i]) for i in range(256)}, [],
                        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])


def test_jinja_tools_and_template_variables_render_as_transformers():
    tpl = JinjaTemplate(name="qwen", source=TOOLS_JINJA, end="<|im_end|>")
    text = tpl.render(CALL, True, tools=TOOLS, enable_thinking=False)
    assert text == ("<|im_start|>system\n# Tools\n" + json.dumps(TOOLS[0]) + "\n<|im_end|>\n"
                    "<|im_start|>user\n2+3?<|im_end|>\n"
                    '<|im_start|>assistant\n<tool_call>add{"a": 2, "b": 3}</tool_call><|im_end|>\n'
                    "<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n<think></think>")
    assert "# Tools" not in tpl.render(CALL, True) and "<think>" not in tpl.render(CALL, True, enable_thinking=True)
    utils = pytest.importorskip("transformers.utils.chat_template_utils")
    hf, _ = utils.render_jinja_template(conversations=[CALL], tools=TOOLS, chat_template=TOOLS_JINJA,
                                        add_generation_prompt=True, enable_thinking=False)
    assert hf == [text]


def test_llm_chat_passes_tools_and_chat_calls_can_be_submitted():
    tok = _specials_tokenizer()
    llm = LLM(tiny_model("llama", vocab_size=259, max_seq_len=512), tok)
    tpl = JinjaTemplate(name="qwen", source=TOOLS_JINJA, end="<|im_end|>")
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, stop=("Obs:",))
    out = llm.chat(CALL, sp, template=tpl, tools=TOOLS, chat_template_kwargs={"enable_thinking": False})[0]
    assert out.prompt_token_ids == tok.encode(tpl.render(CALL, True, tools=TOOLS, enable_thinking=False))
    ids, params = llm.chat_request(CALL, sp, template=tpl, tools=TOOLS, chat_template_kwargs={"enable_thinking": False})
    assert ids == out.prompt_token_ids
    assert params.stop == ("Obs:", "<|im_end|>") and params.stop_token_ids == (tok.encode("<|im_end|>")[0],)
    rid = llm.submit(ids, params)  # a chat call among a program's other calls
    assert llm.wait([rid])[0].token_ids == out.token_ids


def test_builtin_templates_refuse_tools_and_tool_calls():
    chatml, tok = get_template("chatml"), _specials_tokenizer()
    with pytest.raises(ConfigError, match="built-in chat template 'chatml' cannot render tools: use a checkpoint"):
        chatml.encode(tok, CALL[:1], tools=TOOLS)
    with pytest.raises(ConfigError, match="cannot render enable_thinking"):
        chatml.render(CALL[:1], enable_thinking=False)
    llm = LLM(tiny_model("llama", vocab_size=259), tok)
    with pytest.raises(ConfigError, match="cannot render tools"):
        llm.chat(CALL[:1], greedy(1), template="chatml", tools=TOOLS)
    assert chatml.render(CALL[:1], tools=[]) == "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n"


def test_builtin_templates_refuse_assistant_tool_calls():
    for content in (None, ""):  # None was refused as 'no content'; "" dropped the call without a word
        msgs = [CALL[0], {**CALL[1], "content": content}, CALL[2]]
        with pytest.raises(ConfigError, match="message 1 has tool_calls, which the built-in chat template 'chatml'"):
            get_template("chatml").render(msgs)
        with pytest.raises(ConfigError, match="message 1 has tool_calls, which the built-in chat template 'plain'"):
            get_template("plain").segments(msgs)  # SFT's path too


def test_chat_request_refuses_a_list_of_conversations(tok):
    llm = LLM(tiny_model(), tok)
    with pytest.raises(LmforgeError, match="a conversation is a list of"):
        llm.chat_request([[{"role": "user", "content": "hi"}]], template="plain")


def test_react_turn_resent_as_ids_reuses_the_generated_tokens_cache(tok):
    """docs/inference.md: a program re-sending prompt ids + generated ids + the observation's ids hits the
    prefix cache in the generated tokens' blocks too (re-encoded text may tokenize them otherwise)."""
    llm = LLM(tiny_model(), tok)
    first = llm.generate("Question: 2+3? Thought:", greedy(24))[0]
    again = llm.generate(first.prompt_token_ids + first.token_ids + tok.encode(" Obs: 5"), greedy(2))[0]
    block = llm.engine.config.block_size
    computed = len(first.prompt_token_ids) + len(first.token_ids) - 1  # (the last token was sampled, never run)
    assert again.metrics["num_cached_tokens"] == computed // block * block > len(first.prompt_token_ids)


def test_chat_template_kwargs_must_be_a_dict():
    from lmforge.errors import LmforgeError
    from lmforge.infer.llm import LLM
    from lmforge.tokenizer.byte import ByteTokenizer

    from .infer_helpers import tiny_model

    llm = LLM(tiny_model(), ByteTokenizer())
    with pytest.raises(LmforgeError, match=r"^chat_template_kwargs is a dict of the template's variables, e\.g\. "
                                           r"\{'enable_thinking': False\}; got list"):
        llm.chat_request([{"role": "user", "content": "hi"}], template="plain", chat_template_kwargs=[1])


def test_submitting_many_requests_takes_linear_time(tok):
    """Each automatic id was checked against a copy of every uncollected id (held and submitted): 20,000 submits
    took ~21 s here (quadratic); now ~0.4 s. The engine's own queueing is stubbed out: what is timed is LLM's.
    Linear by the ratio of two sizes' times (10x the submits: ~10x the time, 100x when quadratic), not by a
    wall-clock limit a loaded machine misses."""
    import time

    model, params = tiny_model(), greedy(1)

    def timed(n: int) -> float:
        llm = LLM(model, tok)  # a fresh one: the ids of an earlier run would still be uncollected
        llm.engine.add_request = lambda prompt, params, rid: rid
        t = time.perf_counter()
        ids = [llm.submit([65], params) for _ in range(n)]
        took = time.perf_counter() - t
        assert len(set(ids)) == n and llm._submitted == set(ids)
        return took

    small = min(timed(2_000) for _ in range(3))
    assert timed(20_000) / small < 35
