"""`lmforge generate`: batch generation, prompts from arguments or a file, one JSON line per prompt.

    lmforge generate --checkpoint runs/demo --prompts "Once" "Twice" --max-tokens 32
    lmforge generate --checkpoint runs/demo --prompts-file prompts.txt --output out.jsonl --n 4 --seed 0

A prompts file is plain text (one prompt per line; \\n, \\t and \\\\ escapes) or JSONL with only a "prompt" field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

from lmforge.cli.sampling import (Sampling, completion_rows, normalize_argv, past_context_notice, sampling_field,
                                  top_logprobs_rows, unescape)
from lmforge.config import check
from lmforge.infer.detok import special_ids
from lmforge.infer.sampling import SamplingParams
from lmforge.errors import DataError, LmforgeError
from lmforge.utils import output_path_problem, read_utf8


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    checkpoint: str
    """run directory, checkpoint directory, or HF-format model directory"""
    base: str | None = None
    """the base model of a PEFT adapter directory, or of an adapter-only checkpoint whose base moved"""
    prompts: tuple[str, ...] = ()
    """prompts given on the command line (with or instead of --prompts-file)"""
    prompts_file: str | None = None
    """plain text (one prompt per line; \\n, \\t and \\\\ escapes) or JSONL with only a "prompt" field per row
    (the sampling flags apply to every prompt)"""
    output: str | None = None
    """JSONL file to write (replaced once every prompt is done: a failed or interrupted run leaves it as it was);
    None writes to standard output"""
    sampling: Sampling = sampling_field(max_tokens=64)
    """how to sample (lmforge.SamplingParams; CLI default temperature 0.8, top-p 0.95)"""
    batch_size: int = 64
    """prompts decoded together"""
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
        check(self.batch_size >= 1, f"--batch-size must be >= 1 (prompts decoded together), got {self.batch_size}")


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompts)
    for p in prompts:  # `--prompts prompts.txt` generates from the text 'prompts.txt', not from the file's lines
        if "\n" not in p and len(p) < 1024 and Path(p).is_file():
            import warnings

            warnings.warn(f"--prompts {p!r} names a file, and that name is the prompt; to read prompts from the "
                          f"file, pass --prompts-file {p}", stacklevel=2)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        text = read_utf8(path, "--prompts-file", want="a text or JSONL file of prompts", error=DataError)
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                prompts.append(jsonl_prompt(line, f"{path}:{i + 1}"))
            else:
                prompts.append(unescape(line))
    if not prompts:
        raise LmforgeError("no prompts: give --prompts TEXT ... or --prompts-file FILE")
    return prompts


def jsonl_prompt(line: str, where: str):
    """The 'prompt' field of one JSONL line (text or token ids; the engine checks which); a line that is no JSON,
    not an object, without the field or with any other field (which nothing would read: sampling options are the
    command's flags, for every prompt) is a one-line error naming the line and what it holds instead."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); each line of a .jsonl prompts "
                        'file is one object such as {"prompt": "..."}') from e
    if not isinstance(row, dict):
        raise DataError(f"{where}: a JSON {type(row).__name__}, not an object; each line of a .jsonl prompts file "
                        'is one object such as {"prompt": "..."}')
    if "prompt" not in row:
        raise DataError(f"{where}: no 'prompt' field (its fields: {', '.join(map(repr, row)) or 'none'}); each "
                        'line of a .jsonl prompts file is one object such as {"prompt": "..."}')
    extra = [k for k in row if k != "prompt"]  # read nowhere: a per-row max_tokens was dropped in silence
    if extra:
        options = {f.name for f in dataclasses.fields(SamplingParams)}
        flags = ", ".join("--" + k.replace("_", "-") for k in extra if k in options)
        raise DataError(f"{where}: field{'s' * (len(extra) > 1)} {', '.join(map(repr, extra))} "
                        f"{'are' if len(extra) > 1 else 'is'} not read (a row holds only 'prompt'"
                        + (f"; sampling options are flags for every prompt: {flags}" if flags else "") + "); each "
                        'line of a .jsonl prompts file is one object such as {"prompt": "..."}')
    prompt = row["prompt"]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        raise DataError(f"{where}: 'prompt' is a list of chat messages (TRL's conversational form); lmforge generate "
                        "takes text or token ids: apply the chat template first (LLM.chat in Python, lmforge chat), "
                        "or write the formatted text")
    return prompt


def check_output(path: str | None) -> None:
    """Refuse an --output that cannot become a file, before the model loads: empty, a directory, under a file (the
    project's one check, lmforge.utils.output_path_problem, in this command's words), in a directory that does not
    exist or cannot be written."""
    if path is None:
        return
    kind, there = output_path_problem(path, file=True) or (None, None)
    if kind == "empty":
        raise DataError("--output is empty: give a file path, or leave --output out to write to standard output")
    if kind == "directory":
        raise DataError(f"--output {path} is a directory; give a file path such as {there / 'out.jsonl'}")
    if kind == "under":
        raise DataError(f"--output {path}: {there} is a file, not a directory; give a path in a directory")
    if kind == "readonly":
        raise DataError(f"--output {path}: directory {there} is not writable; give a path in a writable directory")
    out = Path(path)
    if _special(out):  # a pipe, /dev/stdout, >(gzip > f): written in place, as it is
        return
    if not out.parent.is_dir():
        raise DataError(f"--output {path}: directory {out.parent} does not exist; create it first")


def _special(path: Path) -> bool:
    """An existing target that is not a regular file (a named pipe, a device, /dev/fd/N of a process
    substitution): a temporary file renamed onto it would replace it instead of writing through it."""
    return path.exists() and not path.is_file()


@contextlib.contextmanager
def open_output(path: str | None) -> Iterator[TextIO]:
    """Standard output, or a file written beside `path` and renamed onto it once every row is written: a refused,
    failed or interrupted (Ctrl-C) run leaves an existing file as it was, never emptied or half-written. A pipe
    or device given as `path` is written in place."""
    if path is None:
        yield sys.stdout
        return
    if _special(Path(path)):
        with open(path, "w", encoding="utf-8") as f:
            yield f
        return
    from lmforge.utils import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        yield f


def result_row(r, sp, tok) -> dict:
    """The JSON line of one prompt's result."""
    row = {"prompt": r.prompt, "text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason}
    if sp.logprobs is not None:
        row["logprobs"] = r.logprobs
        row["top_logprobs"] = completion_rows(tok, r, r.outputs[0], sp)
    if sp.prompt_logprobs is not None:  # per prompt token after the first: itself and the top k
        row["prompt_logprobs"] = top_logprobs_rows(tok, r.prompt_logprobs, ids=r.prompt_token_ids,
                                                   skip=special_ids(tok))  # (a BOS is no text before)
    if sp.n > 1 or sp.beam_width > 1:  # every sample, with its own log-probs when asked for
        row["samples"] = [{"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
                           **({"logprobs": o.logprobs, "top_logprobs": completion_rows(tok, r, o, sp)}
                              if sp.logprobs is not None else {})} for o in r.outputs]
    return row


def main(argv: list[str]) -> int:
    from lmforge.cli.common import load_llm, parse_config

    cfg = parse_config(GenerateConfig, normalize_argv(argv, GenerateConfig), prog="lmforge generate",
                       description="Generate from many prompts; write one JSON line per prompt.")
    prompts = read_prompts(cfg)
    check_output(cfg.output)
    llm = load_llm(cfg, max_batch_size=cfg.batch_size)
    sp = cfg.sampling
    # every prompt tokenized and checked (too long for the window, ...) before anything is said or written
    lengths = [len(llm.encode(p, sp, i)) for i, p in enumerate(prompts)]
    with past_context_notice(llm, lengths, sp), open_output(cfg.output) as out:
        for r in llm.generate(prompts, sp):
            out.write(json.dumps(result_row(r, sp, llm.tokenizer), ensure_ascii=False) + "\n")
    return 0
