"""`lmforge sample`: print samples from a checkpoint.

    lmforge sample --checkpoint runs/demo --prompt "def " --temperature 0.8 --top-k 50 --max-tokens 200
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lmforge.config import check


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    checkpoint: str
    """run directory or checkpoint directory"""
    prompt: str = "\n"
    max_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    seed: int | None = None
    tokenizer: str | None = None
    """tokenizer spec when the checkpoint has none ('byte' or a path)"""
    device: str = "cpu"

    def __post_init__(self) -> None:
        check(self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}")


def hyphens_to_fields(argv: list[str], cls) -> list[str]:
    """Accept --top-k for the field top_k (the generated options keep field names as they are)."""
    names = {f.name for f in dataclasses.fields(cls)}
    out = []
    for a in argv:
        flag, eq, val = a.partition("=")
        if flag.startswith("--") and flag[2:].replace("-", "_") in names:
            a = "--" + flag[2:].replace("-", "_") + eq + val
        out.append(a)
    return out


def main(argv: list[str]) -> int:
    from lmforge.cli.common import parse_config
    from lmforge.infer.llm import LLM
    from lmforge.infer.sampling import SamplingParams

    cfg = parse_config(SampleConfig, hyphens_to_fields(argv, SampleConfig), prog="lmforge sample",
                       description="Print samples from a checkpoint.", config_file=False)
    llm = LLM.load(cfg.checkpoint, device=cfg.device, tokenizer=cfg.tokenizer)
    sp = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                        n=cfg.num_samples, seed=cfg.seed)
    out = llm.generate([cfg.prompt], sp)[0]
    for i, o in enumerate(out.outputs):
        print(f"--- sample {i + 1}/{len(out.outputs)} ({len(o.token_ids)} tokens, {o.finish_reason}) ---")
        print(cfg.prompt + o.text)
    return 0
