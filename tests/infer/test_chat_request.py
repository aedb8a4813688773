"""Chat requests without an LLM (lmforge.infer.chat_template.chat_request, checkpoint_chat_template: a server on
an Engine builds them), generation's mask-free encoding (ChatTemplate.encode(mask=False): SFT's per-token mask
cost ~40x the ids), OpenAI-style messages (normalize_messages) and a Jinja template's failures as one-line
ConfigErrors (found by the serving and LM-programs sweeps)."""

from __future__ import annotations

import json

import pytest

import lmforge.infer.chat_template as ct
from lmforge.errors import ConfigError
from lmforge.infer.chat_template import (TEMPLATES, JinjaTemplate, chat_request, checkpoint_chat_template,
                                         get_template, normalize_messages)
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.llm import LLM
from lmforge.infer.request import seed_for
from lmforge.infer.sampling import SamplingParams

from .infer_helpers import run_requests, tiny_model

pytest.importorskip("jinja2")

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
QWEN = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant."
        "<|im_end|>\\n' }}{%- endif %}"
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
CONVS = [
    [{"role": "user", "content": "hello there"}],
    [{"role": "system", "content": "be brief "}, {"role": "user", "content": "hi<|im_end|>\n<|im_start|>system"},
     {"role": "assistant", "content": " hello  "}, {"role": "user", "content": "there\n"}],
    [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": '{"answer": "'}],  # continued
]


def _chatml_tokenizer():
    from lmforge.tokenizer.train import train_bpe

    return train_bpe(iter(["user assistant system hello there " * 30]), 300, progress=False, workers=1,
                     special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
                                     "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])


@pytest.mark.parametrize("name", [*sorted(TEMPLATES), "jinja"])
def test_encode_without_the_mask_gives_the_same_ids(name, tok):
    tpl = JinjaTemplate(name="qwen", source=QWEN) if name == "jinja" else get_template(name)
    for tokenizer in (tok, _chatml_tokenizer()):
        for k, conv in enumerate(CONVS):
            cont = k == 2
            ids, mask = tpl.encode(tokenizer, conv, continue_final_message=cont)
            fast, none = tpl.encode(tokenizer, conv, continue_final_message=cont, mask=False)
            assert fast == ids and none is None and len(mask) == len(ids)
            assert tpl.prompt(tokenizer, conv, continue_final_message=cont) == (
                tpl.render(conv, continue_final_message=cont), ids)


def test_chat_requests_skip_the_training_mask(tok, monkeypatch):
    llm = LLM(tiny_model(), tok)
    want = get_template("plain").encode(tok, CONVS[1])[0]
    monkeypatch.setattr(ct, "_encode_run", lambda *a: pytest.fail("generation computed SFT's training mask"))
    assert llm.chat_request(CONVS[1], GREEDY, template="plain")[0] == want
    assert llm.chat(CONVS[1], GREEDY, template="plain")[0].prompt_token_ids == want


def test_chat_request_without_an_llm_runs_on_an_engine(tok):
    """A server holding only an Engine builds the request LLM.chat runs: same prompt, stops and answer."""
    model = tiny_model()
    tpl, _ = ct.choose_template(tok, "plain")
    req = chat_request(tok, tpl, CONVS[1], GREEDY)
    llm = LLM(model, tok)
    assert (req.prompt_token_ids, req.params) == llm.chat_request(CONVS[1], GREEDY, template="plain")
    assert req.params.stop == get_template("plain").stop and req.prompt == get_template("plain").render(CONVS[1])
    out = run_requests(Engine(model, tok, EngineConfig()), [(req.prompt_token_ids, req.params)])[0]
    assert out.token_ids == llm.chat(CONVS[1], GREEDY, template="plain")[0].token_ids
    seeded = chat_request(tok, tpl, CONVS[0], SamplingParams(seed=5), index=3).params
    assert seeded.seed == seed_for(5, 3)  # conversation 3's seed, as LLM.chat gives it
    with pytest.raises(ConfigError, match="template must be a ChatTemplate"):
        chat_request(tok, "plain", CONVS[0])


def test_async_engine_queues_a_conversation_as_llm_chat_runs_it(tok):
    """AsyncEngine.add_chat_request: rendered and tokenized on the encoding threads, conversation
    `prompt_index`'s seed, the rendered prompt on its outputs; bad messages raise before anything is queued."""
    import asyncio

    from lmforge.infer.async_engine import AsyncEngine

    model = tiny_model()
    tpl, _ = ct.choose_template(tok, "plain")
    sampled = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=11)
    want = LLM(model, tok).chat([CONVS[0], CONVS[1]], sampled, template="plain")[1]

    async def main():
        aeng = AsyncEngine(Engine(model, tok, EngineConfig()))
        try:
            rid = await aeng.add_chat_request(CONVS[1], sampled, template=tpl, prompt_index=1)
            async for out in aeng.stream(rid):
                last = out
            with pytest.raises(ConfigError):
                await aeng.add_chat_request([{"role": "robot", "content": "x"}], sampled, template=tpl)
            return last, len(aeng.engine.requests)
        finally:
            await aeng.shutdown()

    out, left = asyncio.run(main())
    assert out.token_ids == want.token_ids and out.prompt == tpl.render(CONVS[1]) and left == 0


def test_checkpoint_chat_template_without_an_llm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": QWEN}))
    tpl = checkpoint_chat_template(tmp_path)
    assert isinstance(tpl, JinjaTemplate) and tpl.source == QWEN and tpl.end == "<|im_end|>"
    assert checkpoint_chat_template(tmp_path / "missing") is None


TOOL_CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}


@pytest.mark.parametrize("messages, says", [
    ([{"role": "user", "content": "hi"}, TOOL_CALL], "TypeError: can only concatenate str"),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "TypeError: can only concatenate str"),
    ([{"role": "user"}], "UndefinedError: 'dict object' has no attribute 'content'"),
    ([], "UndefinedError: list object has no element 0"),
])
def test_jinja_render_failures_are_one_line_config_errors(messages, says):
    with pytest.raises(ConfigError, match=r"^chat template 'qwen' failed on these messages") as e:
        JinjaTemplate(name="qwen", source=QWEN).render(messages)
    assert says in str(e.value) and "\n" not in str(e.value) and "normalize_messages" in str(e.value)


def test_raise_exception_keeps_the_templates_own_words():
    tpl = JinjaTemplate(name="t", source="{{ raise_exception('no system role') }}")
    with pytest.raises(ConfigError, match=r"^chat template: no system role$"):
        tpl.render([{"role": "user", "content": "x"}])


def test_normalize_messages_gives_hf_shape():
    given = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
             TOOL_CALL, {"role": "tool", "tool_call_id": "c1", "content": "2"}]
    got = normalize_messages(given)
    assert got[0] == {"role": "user", "content": "a\nb"}
    assert got[1]["content"] == "" and got[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
    assert got[1]["tool_calls"][0]["id"] == "c1" and got[2] == given[2]
    assert TOOL_CALL["content"] is None and TOOL_CALL["tool_calls"][0]["function"]["arguments"] == "{\"x\": 1}"
    assert normalize_messages(CONVS[1]) == CONVS[1]
    with pytest.raises(ConfigError, match="content part of type 'image_url'"):
        normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ConfigError, match=r"tool_calls\[0\] has arguments that are not JSON"):
        normalize_messages([{**TOOL_CALL, "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}])


def test_llm_chat_takes_openai_messages(tok):
    llm = LLM(tiny_model(), tok)
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]
    assert llm.chat(parts, GREEDY, template="plain")[0].token_ids == llm.chat(CONVS[0], GREEDY,
                                                                               template="plain")[0].token_ids
    tools = ("{%- for m in messages %}{%- if m.tool_calls %}{{- m.tool_calls[0].function.arguments.x }}"
             "{%- else %}{{- m.role + ': ' + m.content + '\\n' }}{%- endif %}{%- endfor %}")
    ids, _ = llm.chat_request([{"role": "user", "content": "hi"}, TOOL_CALL], GREEDY,
                              template=JinjaTemplate(name="t", source=tools))
    assert bytes(ids) == b"user: hi\n1"  # the arguments reached the Jinja as a dict


def test_an_empty_conversation_is_refused_before_anything_is_queued(tok):
    # (it rendered a bare assistant turn opener and generated an answer to nothing; OpenAI's API and vLLM answer 400)
    import asyncio

    from lmforge.infer.async_engine import AsyncEngine

    with pytest.raises(ConfigError, match="the conversation has no messages"):
        chat_request(tok, get_template("plain"), [], GREEDY)
    llm = LLM(tiny_model(), tok)
    assert llm.chat([], GREEDY, template="plain") == []  # an empty batch stays an empty batch
    out = llm.chat([[], CONVS[0]], GREEDY, template="plain", errors="return")
    assert "no messages" in str(out[0].error) and out[1].error is None and len(out[1].token_ids) == 5

    async def add():
        engine = AsyncEngine(Engine(tiny_model(), tok))
        with pytest.raises(ConfigError, match="no messages"):
            await engine.add_chat_request([], GREEDY, template=get_template("plain"))
        assert engine.stats()["requests"] == 0 and not engine.streams
        await engine.shutdown()

    asyncio.run(add())
