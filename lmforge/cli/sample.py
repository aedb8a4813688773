"""`lmforge sample`: print samples from a checkpoint.

    lmforge sample --checkpoint runs/demo --prompt "def " --temperature 0.8 --top-k 50 --max-tokens 200
    lmforge sample --checkpoint runs/demo --prompt "def " --temperature 0 --logprobs 3   (top 3 per token)
    lmforge sample --checkpoint runs/demo --prompt "def f(x):" --max-tokens 0 --prompt-logprobs 2   (score the prompt)

Every `SamplingParams` field is a flag (`lmforge sample --help` lists them); `--num-samples` is `--n`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmforge.cli.sampling import (Sampling, completion_rows, normalize_argv, past_context_notice, sampling_field,
                                  top_logprobs_rows)
from lmforge.infer.detok import special_ids


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    checkpoint: str
    """run directory, checkpoint directory, or HF-format model directory"""
    base: str | None = None
    """the base model of a PEFT adapter directory, or of an adapter-only checkpoint whose base moved"""
    prompt: str | None = None
    """text the samples continue; None starts them after a newline"""
    sampling: Sampling = sampling_field(max_tokens=200)
    """how to sample (lmforge.SamplingParams; CLI default temperature 0.8, top-p 0.95)"""
    tokenizer: str | None = None
    """tokenizer when the checkpoint has none or to replace it: 'byte', a directory or file of lmforge JSON,
    GPT-2 vocab.json + merges.txt, HF tokenizer.json, or a tiktoken rank file"""
    device: str = "cpu"
    """'cpu', 'cuda', 'cuda:1', ... or 'auto'"""


def print_logprobs(tok, out, sample, sp) -> None:
    """One line per generated token of `sample` (a CompletionOutput of the RequestOutput `out`): its text, its
    log-probability and the K most likely alternatives, each token's text as it continues the text before it."""
    rows = completion_rows(tok, out, sample, sp) or [[] for _ in sample.token_ids]
    chosen = completion_rows(tok, out, dataclasses.replace(sample, top_logprobs=[{t: 0.0} for t in sample.token_ids]),
                             sp)
    _print_rows(chosen, sample.logprobs or [], rows)


def print_prompt_logprobs(tok, out, sp) -> None:
    """One line per prompt token that has log-probs (--prompt-logprobs K: all but the first, from
    --prompt-logprobs-start on): its text, its log-probability given the tokens before it and the K most likely
    tokens there, as `print_logprobs` shows generated ones (the JSON of `lmforge generate` holds the same)."""
    ids, plp, k = list(out.prompt_token_ids), out.prompt_logprobs or [], sp.prompt_logprobs
    skip = special_ids(tok)  # (a BOS is no text before)
    tops = top_logprobs_rows(tok, plp, ids=ids, skip=skip)
    chosen = top_logprobs_rows(tok, [None if s is None else {t: 0.0} for s, t in zip(plp, ids)], ids=ids, skip=skip)
    at = [i for i, s in enumerate(plp) if s is not None]
    print(f"--- prompt log-probs ({len(at)} of {len(ids)} tokens) ---")
    _print_rows([chosen[i] for i in at], [plp[i][ids[i]] for i in at], [tops[i][:k] for i in at])


def shown_token(row: dict) -> str:
    """A token row's text quoted and escaped once: printable characters as they are (a backslash and a quote
    escaped), others as repr writes them, and bytes that are no whole UTF-8 character as \\xNN. (The row's "token"
    already escapes such bytes, OpenAI's form, so its repr would double the backslash: '\\\\xb6' beside '\\x18'.)"""
    text = row["token"] if row.get("bytes") is None else bytes(row["bytes"]).decode("utf-8", "surrogateescape")

    def one(c: str) -> str:
        if "\udc80" <= c <= "\udcff":  # a byte surrogateescape could not decode
            return f"\\x{ord(c) - 0xdc00:02x}"
        if c in "\\'":
            return "\\" + c
        return c if c.isprintable() else repr(c)[1:-1]
    return "'" + "".join(map(one, text)) + "'"


def _print_rows(chosen, logprobs, tops) -> None:
    for mine, lp, top in zip(chosen, logprobs, tops):
        alts = ", ".join(f"{shown_token(r)} {r['logprob']:.3f}" for r in top)
        print(f"  {shown_token(mine[0]):>12} {lp:8.3f}" + (f"   top: {alts}" if alts else ""))


def main(argv: list[str]) -> int:
    from lmforge.cli.common import load_llm, parse_config

    cfg = parse_config(SampleConfig, normalize_argv(argv, SampleConfig, {"num_samples": "n"}), prog="lmforge sample",
                       description="Print samples from a checkpoint.")
    llm = load_llm(cfg)
    sp, prompt = cfg.sampling, "\n" if cfg.prompt is None else cfg.prompt
    with past_context_notice(llm, [len(llm.tokenizer.encode(prompt))], sp):
        out = llm.generate([prompt], sp)[0]
    if sp.prompt_logprobs is not None:
        print_prompt_logprobs(llm.tokenizer, out, sp)
    for i, o in enumerate(out.outputs):
        print(f"--- sample {i + 1}/{len(out.outputs)} ({len(o.token_ids)} tokens, {o.finish_reason}) ---")
        print(prompt + o.text)
        if sp.logprobs is not None:
            print_logprobs(llm.tokenizer, out, o, sp)
    return 0
