"""Shared pieces of the post-training benches (bench/align_compare.py, bench/align_distill.py): byte-level
rows from prompt/completion text, a minimal optimisation loop over an Objective, greedy task accuracy and
held-out losses.

The loop here is a stand-in until lmforge.train's Trainer(model, optimizer, data, objective) lands: AdamW,
constant learning rate after a short warm-up, gradient clipping at 1.0, `objective.loss(model, batch)`.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch

from lmforge.align.logprobs import masked_mean, token_logprobs
from lmforge.align.sampled import chat_prompt
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.load import load_tokenizer

TOK = load_tokenizer("byte")
RENDER = chat_prompt("plain")
STOP = ("\n",)


def model(d: int, layers: int, heads: int, seq: int, seed: int, device: str) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=TOK.vocab_size, d_model=d, n_layers=layers, n_heads=heads,
                                   max_seq_len=seq)).to(device)


def rows(prompts: list[str], completions: list[str], T: int, device: str, prefix: str = "") -> dict:
    """Byte rows: input_ids (B, T), targets = next token on the completion only (-100 elsewhere)."""
    B = len(prompts)
    ids = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), -100, dtype=torch.long)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        pi, ci = TOK.encode(p), TOK.encode(c)
        seq = (pi + ci)[:T + 1]
        ids[b, :len(seq) - 1] = torch.tensor(seq[:-1])
        tgt = torch.tensor(seq[1:])
        tgt[:len(pi) - 1] = -100
        targets[b, :len(seq) - 1] = tgt
    return {f"{prefix}input_ids": ids.to(device), f"{prefix}targets": targets.to(device),
            f"{prefix}loss_mask": (targets >= 0).to(device)}


class SFTLoss:
    """Token-mean cross-entropy on the completion (a stand-in for posttrain's SFT objective)."""

    def loss(self, model, batch):
        lp = token_logprobs(model(batch["input_ids"]), batch["targets"])
        ce = -masked_mean(lp, batch["loss_mask"])
        return ce, {"loss": ce.detach()}


def train(model, objective, batches, steps: int, lr: float, log_every: int = 0) -> list[dict]:
    """`steps` AdamW updates over the batch iterator; returns the logged metrics (floats)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warm = max(1, steps // 20)
    log = []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warm)
        loss, metrics = objective.loss(model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.append({"step": step, "loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}})
    return log


def cycle(make, records: list, batch: int, seed: int):
    """Endless shuffled batches: make(list_of_records) -> batch dict."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(records)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch + 1, batch):
            yield make([records[j] for j in order[i:i + batch]])


def accuracy(model, task, examples, max_tokens: int) -> float:
    """Greedy exact-match accuracy through the engine front door."""
    llm = LLM(model, TOK, cuda_graphs=False, max_batch_size=256)
    outs = llm.generate([RENDER(e) for e in examples],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, stop=STOP))
    model.train()
    return sum(task.verify(e, o.text) for e, o in zip(examples, outs)) / len(examples)


@torch.no_grad()
def completion_loss(model, examples, T: int, device: str, batch: int = 64) -> float:
    """Token-mean cross-entropy of the reference completions (held-out loss)."""
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, len(examples), batch):
        ex = examples[i:i + batch]
        b = rows([RENDER(e) for e in ex], [e.solution + "\n" for e in ex], T, device)
        lp = token_logprobs(model(b["input_ids"]), b["targets"])
        tot += float(-(lp * b["loss_mask"]).sum())
        n += int(b["loss_mask"].sum())
    model.train()
    return tot / n


def write_json(name: str, payload: dict) -> Path:
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    return out


class Clock:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return round(time.perf_counter() - self.t0, 1)
