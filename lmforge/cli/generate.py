"""`lmforge generate`: batch generation, prompts from arguments or a file, one JSON line per prompt.

    lmforge generate --checkpoint runs/demo --prompts "Once" "Twice" --max_tokens 32
    lmforge generate --checkpoint runs/demo --prompts_file prompts.txt --output out.jsonl --n 4 --seed 0

A prompts file is plain text (one prompt per line; \\n escapes allowed) or JSONL with a "prompt" field.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.cli.sample import hyphens_to_fields
from lmforge.errors import DataError, LmforgeError


@dataclass(frozen=True, kw_only=True)
class GenerateConfig:
    checkpoint: str
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None
    output: str | None = None
    """JSONL file to write (default: standard output)"""
    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    beam_width: int = 1
    truncate_prompt: bool = False
    batch_size: int = 64
    tokenizer: str | None = None
    device: str = "cpu"


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise DataError(f"prompts file not found: {path}")
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    prompts.append(json.loads(line)["prompt"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{path}:{i + 1}: expected a JSON object with a 'prompt' field ({e})") from e
            else:
                prompts.append(line.replace("\\n", "\n"))
    if not prompts:
        raise LmforgeError("no prompts: give --prompts TEXT ... or --prompts_file FILE")
    return prompts


def main(argv: list[str]) -> int:
    from lmforge.cli.common import parse_config
    from lmforge.infer.llm import LLM
    from lmforge.infer.sampling import SamplingParams

    cfg = parse_config(GenerateConfig, hyphens_to_fields(argv, GenerateConfig), prog="lmforge generate",
                       description="Generate from many prompts; write one JSON line per prompt.")
    prompts = read_prompts(cfg)
    llm = LLM.load(cfg.checkpoint, device=cfg.device, tokenizer=cfg.tokenizer, max_batch_size=cfg.batch_size)
    sp = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                        min_p=cfg.min_p, repetition_penalty=cfg.repetition_penalty, n=cfg.n, seed=cfg.seed,
                        stop=cfg.stop, logprobs=cfg.logprobs, beam_width=cfg.beam_width,
                        truncate_prompt=cfg.truncate_prompt)
    out = open(cfg.output, "w", encoding="utf-8") if cfg.output else sys.stdout
    try:
        for r in llm.generate(prompts, sp):
            row = {"prompt": r.prompt, "text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason}
            if cfg.logprobs is not None:
                row["logprobs"] = r.logprobs
            if cfg.n > 1:
                row["samples"] = [{"text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
                                  for o in r.outputs]
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0
