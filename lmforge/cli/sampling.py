"""What `lmforge sample | generate | chat` share: their sampling options are one nested `SamplingParams`
(its fields are the flags: `--temperature 0.7`, or `--sampling.temperature 0.7`), with one CLI default
temperature, and the checks a user wants before generating starts.

The CLI default is temperature 0.8 with top-p 0.95 for all three commands (the library's
`SamplingParams()` default is temperature 1, the model's raw distribution): plain sampling from a small
model wanders, and one default keeps the commands comparable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import sys
import warnings
from dataclasses import field
from typing import Annotated, Any, Iterator

import tyro

from lmforge.infer.detok import continuation_context, special_ids, token_texts
from lmforge.infer.sampling import SamplingParams

CLI_TEMPERATURE = 0.8
CLI_TOP_P = 0.95

# the nested options, flattened by tyro: --temperature, --top-p, ... (no "sampling." prefix needed)
Sampling = Annotated[SamplingParams, tyro.conf.OmitArgPrefixes]


def sampling_field(**overrides: Any):
    """A dataclass field holding the CLI's default SamplingParams (with per-command overrides)."""
    return field(default_factory=lambda: SamplingParams(**{"temperature": CLI_TEMPERATURE, "top_p": CLI_TOP_P,
                                                           **overrides}))


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    """The command line's escapes: \\n a newline, \\t a tab, \\\\ a backslash (a shell passes "\\n" as
    two characters; stop strings and prompts files need newlines)."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


def normalize_argv(argv: list[str], cls: type, aliases: dict[str, str] | None = None) -> list[str]:
    """Flags as tyro expects them whatever the user typed: --top-k or --top_k or --sampling.top_k all
    name the field top_k; `aliases` maps old flag names (--num-samples) to fields (n). --stop values get
    the escapes of `unescape` (--stop "\\n" stops at a newline). A beam width > 1 without a temperature
    implies temperature 0 (beam search is deterministic), said on stderr."""
    names = {f.name for f in dataclasses.fields(cls)} | {f.name for f in dataclasses.fields(SamplingParams)}
    aliases = aliases or {}
    out, stop_values = [], False
    for a in argv:
        flag, eq, val = a.partition("=")
        if flag.startswith("--"):
            name = flag[2:].removeprefix("sampling.").replace("-", "_")
            name = aliases.get(name, name)
            stop_values = name == "stop" and not eq
            if name in names:
                a = "--" + name + eq + (unescape(val) if name == "stop" else val)
        elif stop_values:
            a = unescape(a)
        out.append(a)
    beam = _flag_value(out, "--beam_width")
    if beam is not None and beam.isdigit() and int(beam) > 1 and _flag_value(out, "--temperature") is None:
        print("note: beam search is deterministic; using --temperature 0", file=sys.stderr)
        out += ["--temperature", "0"]
    return out


PAST_CONTEXT_WARNING = r"max_tokens=\d+ after a \d+-token prompt passes the context window"
"""the engine's per-request warning (lmforge.infer.engine.Engine.add_request) that past_context_notice replaces"""


@contextlib.contextmanager
def past_context_notice(llm, prompt_lengths: list[int], sp: SamplingParams) -> Iterator[None]:
    """Say once (a warning) when --max-tokens cannot be reached because the context window ends first (not with a
    positions=cache KV policy, which runs past the window); inside, the engine's same warning per prompt is
    silenced."""
    context = llm.max_seq_len
    longest = max(prompt_lengths, default=0)
    if sp.max_tokens is not None and longest + sp.max_tokens > context and llm.engine.stream_len <= context:
        room = max(context - longest, 0)
        warnings.warn(f"--max-tokens {sp.max_tokens} with a {longest}-token prompt goes past the model's "
                      f"{context}-token context; generation stops after at most {room} new tokens", stacklevel=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PAST_CONTEXT_WARNING)
        yield


def top_logprobs_rows(tok, top: list[dict[int, float] | None] | None, context: list[int] = (), ids: list[int] = (),
                      skip=frozenset()) -> list[list[dict[str, Any]] | None] | None:
    """Per token, its K most likely alternatives as OpenAI's [{"id", "token", "bytes", "logprob"}], best first (None
    stays None): each token's text as it continues context + the ids before it (lmforge.infer.detok.token_texts:
    a completion's continuation_context and token_ids, or no context and a prompt's ids)."""
    if top is None:
        return None
    ranked = [None if step is None else sorted(step.items(), key=lambda kv: -kv[1]) for step in top]
    texts = token_texts(tok, list(context), list(ids), [None if r is None else [i for i, _ in r] for r in ranked], skip)
    return [None if r is None else  # (prompt positions before prompt_logprobs_start)
            [{"id": i, "token": text, "bytes": raw, "logprob": float(lp)} for (i, text, raw), (_, lp) in zip(t, r)]
            for r, t in zip(ranked, texts)]


def completion_rows(tok, out, sample, sp) -> list[list[dict[str, Any]] | None] | None:
    """top_logprobs_rows of one sample (a CompletionOutput) of the RequestOutput `out`, generated with `sp`: its
    texts continue the prompt as the sample's own text does (continuation_context)."""
    specials = special_ids(tok)
    return top_logprobs_rows(tok, sample.top_logprobs, continuation_context(out.prompt_token_ids or [], specials),
                             sample.token_ids, specials if sp.skip_special_tokens else frozenset())
