"""A HF checkpoint's own chat template (tokenizer_config.json "chat_template", chat_template.jinja): LLM.load
reads it and LLM.chat renders it with jinja2 as transformers' apply_chat_template does, default system prompt
and all, instead of falling back to a built-in template (lmforge.checkpoint.hf_chat_template, JinjaTemplate)."""

from __future__ import annotations

import json

import pytest

from lmforge.checkpoint import hf_chat_template
from lmforge.errors import ConfigError
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.load import load_tokenizer

from ..conftest import shared_data
from .infer_helpers import tiny_model

transformers = pytest.importorskip("transformers")

QWEN = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are Qwen, a helpful assistant."
        "<|im_end|>\\n' }}{%- endif %}"
        "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
USER = [{"role": "user", "content": "Grade this answer from 1 to 10."}]


def _qwen_style_dir(tmp_path, template: str = QWEN):
    load_tokenizer(shared_data("gpt2")).save_hf(tmp_path)
    doc = json.loads((tmp_path / "tokenizer.json").read_text())
    for i, s in [(50257, "<|im_start|>"), (50258, "<|im_end|>")]:
        doc["added_tokens"].append({"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                                    "normalized": False, "special": True})
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "chat_template": template}))
    tiny_model("llama", vocab_size=50259, max_seq_len=128).save_pretrained(tmp_path)
    return tmp_path


def test_llm_chat_renders_the_checkpoints_own_template_as_transformers(tmp_path):
    llm = LLM.load(_qwen_style_dir(tmp_path))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    sp = SamplingParams(temperature=0, max_tokens=1)
    with_system = [{"role": "system", "content": "Be terse."}, *USER]
    partial = [*USER, {"role": "assistant", "content": "Score: "}]
    for msgs, cont in [(USER, False), (with_system, False), (partial, True)]:
        want = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=not cont,
                                      continue_final_message=cont)["input_ids"]
        assert llm.chat(msgs, sp, continue_final_message=cont)[0].prompt_token_ids == want
    assert "You are Qwen" in llm.tokenizer.decode(llm.chat(USER, sp)[0].prompt_token_ids)
    tpl = llm.chat_template
    assert tpl.stop == ("<|im_end|>",) and tpl.stop_token_ids(llm.tokenizer) == (50258,)
    assert tpl.jinja() == QWEN
    chatml = llm.chat(USER, sp, template="chatml")[0].prompt_token_ids  # asked for: the built-in one
    assert "You are Qwen" not in llm.tokenizer.decode(chatml)
    with pytest.raises(ConfigError, match="cannot mark an assistant's tokens for training"):
        tpl.segments(USER)


def test_chat_template_jinja_file_is_preferred_and_none_without_a_template(tmp_path):
    d = _qwen_style_dir(tmp_path)
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    assert hf_chat_template(d).render(USER, add_generation_prompt=False) == "user: Grade this answer from 1 to 10.\n"
    (d / "chat_template.jinja").unlink()
    config = {"eos_token": {"content": "<|x|>"}, "chat_template": "{{ eos_token }}"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    assert hf_chat_template(d).end == "<|x|>" and hf_chat_template(d).render(USER) == "<|x|>"  # an AddedToken record
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert hf_chat_template(d) is None and LLM.load(d).chat_template is None


def test_a_checkpoints_own_template_is_named_by_the_file_it_came_from(tmp_path):
    """`lmforge chat` and `lmforge export` name the template they use; one read from chat_template.jinja (where
    transformers 5 saves it) was called "(tokenizer_config.json)" (found 2026-12-07)."""
    d = _qwen_style_dir(tmp_path)
    assert hf_chat_template(d).name == f"{d.name}'s own (tokenizer_config.json)"
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert hf_chat_template(d).name == f"{d.name}'s own (chat_template.jinja)"


def test_lmforge_chat_uses_the_checkpoints_own_template(tmp_path, monkeypatch, capsys):
    """`lmforge chat --checkpoint <HF dir>` chats with the directory's Jinja (its default system prompt), as
    LLM.load does; --template still picks a built-in one."""
    from lmforge.cli import chat as chat_cli

    seen = []
    monkeypatch.setattr(chat_cli, "chat_loop", lambda llm, cfg, **kw: seen.append(kw["template"]) or [])
    path = _qwen_style_dir(tmp_path)
    assert chat_cli.main(["--checkpoint", str(path)]) == 0
    assert seen[-1].jinja() == QWEN and "tokenizer_config.json" in capsys.readouterr().out
    assert chat_cli.main(["--checkpoint", str(path), "--template", "chatml"]) == 0
    assert seen[-1].name == "chatml"
    prompt = seen[0].render(USER)  # what chat_loop encodes each turn with
    assert prompt.startswith("<|im_start|>system\nYou are Qwen")
