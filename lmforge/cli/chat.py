"""`lmforge chat`: a terminal chat with a checkpoint, streaming tokens as they are produced.

    lmforge chat --checkpoint runs/sft --template chatml --system "Be brief."

Commands: /reset forgets the conversation, /exit (or Ctrl-D) leaves. Ctrl-C stops the current answer
(what was said so far stays in the history) and returns to the prompt.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

from lmforge.cli.sample import hyphens_to_fields


@dataclass(frozen=True, kw_only=True)
class ChatConfig:
    checkpoint: str
    template: str = "chatml"
    """chat template: chatml | llama3 | plain"""
    system: str = ""
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int | None = None
    tokenizer: str | None = None
    device: str = "cpu"


def chat_loop(llm, cfg: ChatConfig, read: Callable[[str], str] = input,
              write: Callable[[str], object] = sys.stdout.write) -> list[dict[str, str]]:
    """Run the conversation until /exit or end of input; returns the final history."""
    from lmforge.infer.chat_template import get_template
    from lmforge.infer.sampling import SamplingParams

    template = get_template(cfg.template)
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history = list(start)
    sp = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed,
                        stop=template.stop, truncate_prompt=True)
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return history
        except KeyboardInterrupt:
            write("\n(use /exit to leave)\n")
            continue
        cmd = line.strip()
        if cmd == "/exit":
            return history
        if cmd == "/reset":
            history = list(start)
            write("(conversation reset)\n")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        history.append({"role": "assistant", "content": _answer(llm, template.render(history), sp, write)})


def _answer(llm, prompt: str, sp, write) -> str:
    parts: list[str] = []
    write("bot> ")
    try:
        for piece in llm.stream(prompt, sp):
            parts.append(piece)
            write(piece)
            getattr(sys.stdout, "flush", lambda: None)()
    except KeyboardInterrupt:
        write(" [stopped]")
    write("\n")
    return "".join(parts)


def main(argv: list[str]) -> int:
    from lmforge.cli.common import parse_config
    from lmforge.infer.llm import LLM

    cfg = parse_config(ChatConfig, hyphens_to_fields(argv, ChatConfig), prog="lmforge chat",
                       description="Chat with a checkpoint in the terminal (/reset, /exit; Ctrl-C stops an answer).")
    llm = LLM.load(cfg.checkpoint, device=cfg.device, tokenizer=cfg.tokenizer)
    print(f"lmforge chat: template {cfg.template}; /reset to start over, /exit to leave, Ctrl-C stops an answer")
    chat_loop(llm, cfg)
    return 0
