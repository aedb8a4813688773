"""`lmforge chat`: a terminal chat with a checkpoint, streaming tokens as they are produced.

    lmforge chat --checkpoint runs/sft --template chatml --system "Be brief."

Commands: /reset forgets the conversation, /exit (or /quit, or Ctrl-D) leaves; any other one-word line
starting with "/" is answered with the list of commands, not sent to the model. Ctrl-C stops the current answer
(what was said so far stays in the history) and returns to the prompt.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable

from lmforge.cli.sampling import Sampling, normalize_argv, past_context_notice, sampling_field
from lmforge.config import check


@dataclass(frozen=True, kw_only=True)
class ChatConfig:
    checkpoint: str
    """run directory, checkpoint directory, or HF-format model directory"""
    base: str | None = None
    """the base model of a PEFT adapter directory, or of an adapter-only checkpoint whose base moved"""
    template: str | None = None
    """chat template: chatml | llama3 | plain; default: the one the checkpoint was fine-tuned with (lmforge
    sft/dpo/... record it), else a HF checkpoint's own (its tokenizer_config.json Jinja), else chatml where
    the tokenizer has its markers as special tokens, else plain (a pretrained model); one other than the
    checkpoint's is said in a note naming both"""
    system: str = ""
    """system message that opens every conversation"""
    sampling: Sampling = sampling_field(max_tokens=512)
    """how to sample (lmforge.SamplingParams; CLI default temperature 0.8, top-p 0.95); the template's stop
    strings are added, and long conversations are cut from the left"""
    tokenizer: str | None = None
    """tokenizer when the checkpoint has none or to replace it: 'byte', a directory or file of lmforge JSON,
    GPT-2 vocab.json + merges.txt, HF tokenizer.json, or a tiktoken rank file"""
    device: str = "cpu"
    """'cpu', 'cuda', 'cuda:1', ... or 'auto'"""
    kv_policy: str | None = None
    """a KV-cache policy, NAME:key=value,... (lmforge.infer.kv.policy.policy_from_spec): 'streaming:window=256'
    (StreamingLLM; ',positions=cache' runs past the model's context window), 'h2o:heavy=64,recent=64',
    'snapkv:budget=128'"""
    max_model_len: int | None = None
    """serve this many tokens of context instead of the model's max_seq_len (EngineConfig.max_model_len: a
    rope-scaled checkpoint whose max_position_embeddings is its original context; docs/inference.md, long context)"""

    def __post_init__(self):
        check(self.sampling.n == 1 or self.sampling.beam_width > 1,
              f"--n {self.sampling.n}: lmforge chat shows one answer a turn; leave --n out (lmforge generate --n "
              "gives several samples)")
        shown = {"--logprobs": self.sampling.logprobs, "--prompt-logprobs": self.sampling.prompt_logprobs}
        asked = [flag for flag, k in shown.items() if k is not None]
        check(not asked, f"{' and '.join(asked)}: lmforge chat shows only the answer's text, never log-probs; leave "
                         f"{'them' if len(asked) > 1 else 'it'} out (lmforge sample and generate print them)")


def chat_loop(llm, cfg: ChatConfig, read: Callable[[str], str] = input,
              write: Callable[[str], object] = sys.stdout.write, *, template=None) -> list[dict[str, str]]:
    """Run the conversation until /exit or end of input; returns the final history. template: a ChatTemplate
    (a HF checkpoint's own, main's choice), else cfg.template by name."""
    from lmforge.infer.chat_template import get_template

    template = template or get_template(cfg.template or "chatml")
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history = list(start)
    sp = dataclasses.replace(cfg.sampling, truncate_prompt=True)  # a long conversation loses its oldest tokens
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
        if cmd in ("/exit", "/quit"):
            return history
        if cmd == "/reset":
            history = list(start)
            write("(conversation reset)\n")
            continue
        if cmd.startswith("/") and " " not in cmd:  # a mistyped command is not a message
            write(f"(unknown command {cmd}: /reset starts over, /exit or /quit leaves)\n")
            continue
        if not cmd:
            continue
        history.append({"role": "user", "content": line})
        # LLM.chat's encoding, the template's end markers as stop strings and (special) stop tokens
        prompt, turn = llm.chat_request(history, sp, template=template)
        history.append({"role": "assistant", "content": _answer(llm, prompt, turn, write)})


def _answer(llm, prompt: list[int], sp, write) -> str:
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


def overridden(checkpoint: str, asked: str | None, recorded) -> str | None:
    """The notice that --template `asked` replaces the template the checkpoint carries (`recorded`: the name its
    fine-tuning run recorded, or its own Jinja: checkpoint_chat_template), else None: a model answers best in the
    format it was fine-tuned on, so the switch is said, naming both."""
    if asked is None or recorded is None or recorded == asked:
        return None
    carried = (f"was fine-tuned with chat template {recorded!r}" if isinstance(recorded, str)
               else "has a chat template of its own (HF Jinja)")
    return f"{checkpoint} {carried}; using --template {asked} as asked"


def main(argv: list[str]) -> int:
    from lmforge.cli.common import load_llm, parse_config

    cfg = parse_config(ChatConfig, normalize_argv(argv, ChatConfig), prog="lmforge chat",
                       description="Chat with a checkpoint in the terminal (/reset, /exit; Ctrl-C stops an answer).")
    from lmforge.infer.chat_template import checkpoint_chat_template, choose_template, get_template

    # the fine-tuning run's, else a HF checkpoint's own Jinja (tokenizer_config.json), as LLM.load chooses
    recorded = checkpoint_chat_template(cfg.checkpoint, base=cfg.base)
    named = cfg.template or (recorded if isinstance(recorded, str) else None)
    get_template(named or "chatml")  # an unknown name is refused before the model loads
    llm = load_llm(cfg)
    template, notice = choose_template(llm.tokenizer, cfg.template, recorded, plain="--template plain")
    for line in (overridden(cfg.checkpoint, cfg.template, recorded), notice):
        if line:
            print(f"({line})")
    cfg = dataclasses.replace(cfg, template=template.name)
    print(f"lmforge chat: template {cfg.template}; /reset to start over, /exit to leave, Ctrl-C stops an answer")
    # said once, not by the engine at every turn in the middle of an answer: truncate_prompt keeps at most half the
    # window of a conversation whose answers could pass it (lmforge.infer.request.encode_prompt)
    with past_context_notice(llm, [llm.max_seq_len // 2], cfg.sampling):
        chat_loop(llm, cfg, template=template)
    return 0
