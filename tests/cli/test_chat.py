"""`lmforge chat` and the other chat front ends (LLM.chat, a server on an AsyncEngine): where an answer ends, and
which chat template a checkpoint is talked to with."""

from __future__ import annotations

import asyncio

import pytest

from lmforge.cli.chat import ChatConfig, chat_loop
from lmforge.infer.async_engine import AsyncEngine
from lmforge.infer.chat_template import JinjaTemplate, get_template
from lmforge.infer.engine import Engine
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.tokenizer.byte import ByteTokenizer

from ..infer.infer_helpers import tiny_model
from ..infer.test_chat_continue import _force  # a logits processor writing a text, then end-of-text

TOK = ByteTokenizer()


# what a model SFT-trained on the plain template writes: the answer, of several lines, then the end-of-text token SFT
# closes a plain answer with (its end marker "\n" cannot tell an answer's end: lmforge.align.data.Encoder.chat)
ANSWER = "It is 4.\nBecause 2 and 2 make 4."


def _server_answer(llm: LLM, msgs: list[dict], params: SamplingParams):
    async def main():
        aeng = AsyncEngine(Engine(llm.model, TOK))
        try:
            rid = await aeng.add_chat_request(msgs, params, template=get_template("plain"))
            return [o async for o in aeng.stream(rid)][-1].outputs[0]
        finally:
            await aeng.shutdown()
    return asyncio.run(main())


def test_a_plain_template_answer_of_several_lines_ends_at_end_of_text_in_every_chat_front_end():
    """A plain answer ends where the model writes end-of-text (what SFT trains it to close an answer with), whole,
    in LLM.chat, a server and `lmforge chat`; the plain stop strings are only the next turns' headers, so an answer
    may span lines (cutting it at its first "\n" cut GSM8K-style answers before their 'Answer:' line)."""
    assert get_template("plain").stop == ("\nSystem:", "\nUser:", "\nAssistant:", "\nTool:")
    llm = LLM(tiny_model("llama"), TOK)
    msgs = [{"role": "user", "content": "2+2?"}]
    p = SamplingParams(temperature=0, max_tokens=60, logits_processors=(_force(ANSWER, TOK),))
    out = llm.chat(msgs, p, template="plain")[0].outputs[0]  # LLM.chat
    assert (out.text, out.finish_reason) == (ANSWER, "stop")
    served = _server_answer(llm, msgs, p)  # a server on an AsyncEngine
    assert (served.text, served.finish_reason) == (ANSWER, "stop")
    lines, written = iter(["2+2?"]), []

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    history = chat_loop(llm, ChatConfig(checkpoint="-", template="plain", sampling=p), read, written.append)
    assert history[-1] == {"role": "assistant", "content": ANSWER}  # `lmforge chat`
    assert "".join(written) == f"bot> {ANSWER}\n\n"


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_marker_templates_keep_their_stops(name):
    """The end marker less the newline after it, and the marker opening any next turn, as before."""
    t = get_template(name)
    assert t.stop == (t.end.strip(), t.header.split("{role}")[0])


def test_chat_says_once_when_template_overrides_the_one_the_checkpoint_records(tmp_path, capsys, monkeypatch):
    """`lmforge chat --template X` on a checkpoint fine-tuned with another template switched formats without a
    word: one notice names both (recorded, asked); none when they agree or nothing is asked."""
    import lmforge as lf
    from lmforge.checkpoint import save_checkpoint
    from lmforge.cli import chat as chat_cli

    specials = lf.Tokenizer({i: bytes([i]) for i in range(256)}, [],
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    ckpt = save_checkpoint(tmp_path / "sft", 1, tiny_model("llama", vocab_size=259), tokenizer=specials,
                           extra={"chat_template": "chatml"})
    monkeypatch.setattr(chat_cli, "chat_loop", lambda llm, cfg, **kw: [])  # no terminal: the setup is what is tested
    assert chat_cli.main(["--checkpoint", str(ckpt), "--template", "plain", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("chat template") == 1
    assert f"({ckpt} was fine-tuned with chat template 'chatml'; using --template plain as asked)\n" in out
    assert "lmforge chat: template plain;" in out
    for argv in (["--template", "chatml"], []):
        assert chat_cli.main(["--checkpoint", str(ckpt), "--max-tokens", "8", *argv]) == 0
        out = capsys.readouterr().out
        assert "fine-tuned with" not in out and "lmforge chat: template chatml;" in out
    jinja = JinjaTemplate(name="hf's own", source="{{ messages }}")  # a HF checkpoint's own template
    assert chat_cli.overridden("hf", "chatml", jinja) == "hf has a chat template of its own (HF Jinja); using " \
                                                         "--template chatml as asked"
