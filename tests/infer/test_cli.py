"""lmforge sample / generate / chat on a tiny saved checkpoint."""

from __future__ import annotations

import json

import pytest
from .infer_helpers import tiny_model

from lmforge.cli import generate as gen_cli
from lmforge.cli import sample as sample_cli
from lmforge.cli.chat import ChatConfig, chat_loop
from lmforge.errors import LmforgeError
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams


@pytest.fixture
def ckpt(tmp_path, tok):
    from lmforge.train.checkpoint import save_checkpoint

    return save_checkpoint(tmp_path / "run", 1, tiny_model("llama"), tokenizer=tok)


def test_llm_load_matches_in_memory_model(ckpt, tok):
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    assert LLM.load(ckpt).generate("hi", sp)[0].token_ids == LLM(tiny_model("llama"), tok).generate("hi", sp)[0].token_ids


def test_sample_prints_samples(ckpt, capsys):
    assert sample_cli.main(["--checkpoint", str(ckpt), "--prompt", "ab", "--max-tokens", "5", "--num-samples", "2",
                            "--top-k", "10", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2 and "/2 (" in out


def test_generate_writes_jsonl(ckpt, tmp_path):
    pf = tmp_path / "p.jsonl"
    pf.write_text('{"prompt": "x"}\n{"prompt": "hello"}\n')
    out = tmp_path / "o.jsonl"
    gen_cli.main(["--checkpoint", str(ckpt), "--prompts", "a", "--prompts_file", str(pf), "--output", str(out),
                  "--max_tokens", "4", "--temperature", "0", "--n", "2", "--logprobs", "0"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a", "x", "hello"]
    assert all(len(r["samples"]) == 2 and len(r["logprobs"]) == len(r["token_ids"]) for r in rows)
    with pytest.raises(LmforgeError, match="no prompts"):
        gen_cli.main(["--checkpoint", str(ckpt)])


def test_stream_holds_back_stop_string_prefixes(tok):
    llm = LLM(tiny_model("llama"), tok)
    ascii_only = {i: -100.0 for i in range(128, 257)}
    full = llm.generate("q", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                            logit_bias=ascii_only))[0].text
    stop = full[5:8]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=(stop,), logit_bias=ascii_only)
    pieces = list(llm.stream("q", sp))
    assert "".join(pieces) == llm.generate("q", sp)[0].text == full[: full.find(stop)]
    assert all(stop[:2] not in p for p in pieces[:-1])  # a stop-string prefix is never streamed early


class FakeLLM:
    """Streams a fixed answer; raises KeyboardInterrupt after two pieces when asked to."""

    def __init__(self):
        self.prompts, self.interrupt = [], False

    def stream(self, prompt, sp):
        self.prompts.append(prompt)
        for i, piece in enumerate(["Hel", "lo", "!"]):
            if self.interrupt and i == 2:
                raise KeyboardInterrupt
            yield piece


def test_chat_loop_streams_resets_and_survives_ctrl_c():
    llm, written = FakeLLM(), []
    script = iter(["hi", "/reset", "again", "stop me", "/exit", "never"])

    def read(_):
        line = next(script)
        llm.interrupt = line == "stop me"
        return line

    hist = chat_loop(llm, ChatConfig(checkpoint="-", template="chatml", system="S"), read, written.append)
    text = "".join(written)
    assert "Hello!" in text and "[stopped]" in text and "(conversation reset)" in text
    assert llm.prompts[1].count("<|im_start|>user") == 1  # the reset dropped the first exchange
    assert hist[-1] == {"role": "assistant", "content": "Hello"}  # the interrupted answer is kept
    assert llm.prompts[2].endswith("<|im_start|>assistant\n") and len(llm.prompts) == 3
