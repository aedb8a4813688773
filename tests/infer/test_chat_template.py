"""Chat templates render the published formats exactly."""

from __future__ import annotations

import pytest

from lmforge.errors import ConfigError
from lmforge.infer.chat_template import get_template

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]


def test_chatml():
    t = get_template("chatml")
    assert t.render(MSGS) == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                              "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                              "<|im_start|>assistant\n")
    assert "<|im_end|>" in t.stop


def test_llama3_matches_meta_format():
    t = get_template("llama3")
    want = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert t.render(MSGS) == want and t.stop[0] == "<|eot_id|>"


def test_segments_mark_assistant_content_and_plain():
    t = get_template("plain")
    segs = t.segments(MSGS[1:3])
    assert [s for s, a in segs if a] == ["Hello!\n"]
    assert "".join(s for s, _ in segs) == "User: Hi\nAssistant: Hello!\n"
    assert t.render(MSGS[1:2]) == "User: Hi\nAssistant: "


def test_bad_template_and_role():
    with pytest.raises(ConfigError, match="'nope'"):
        get_template("nope")
    with pytest.raises(ConfigError, match="role 'robot'"):
        get_template("chatml").render([{"role": "robot", "content": "x"}])
