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
from lmforge.infer.outputs import CompletionOutput, RequestOutput
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


class Engine:
    """LLM.generate, or - if the engine raises (its internals are being rewritten) - a cache-free decoder
    with the same front door (rows of equal prompt length batched, the whole prefix re-run per token), so
    a bench run still yields its numbers; the switch is printed."""

    def __init__(self, model):
        self.model, self.tokenizer, self.failed = model, TOK, None

    def generate(self, prompts, params: SamplingParams):
        if self.failed is None:
            try:
                return LLM(self.model, TOK, cuda_graphs=False, max_batch_size=256).generate(prompts, params)
            except Exception as e:  # noqa: BLE001
                self.failed = f"{type(e).__name__}: {e}"
                print(f"LLM.generate failed ({self.failed[:200]}); using the cache-free decoder", flush=True)
        return self._plain(prompts, params)

    @torch.no_grad()
    def _plain(self, prompts, params: SamplingParams) -> list[RequestOutput]:
        self.model.eval()
        dev = next(self.model.parameters()).device
        g = torch.Generator(device=dev).manual_seed(params.seed or 0)
        rows = [(i, j, TOK.encode(p)) for i, p in enumerate(prompts) for j in range(params.n)]
        texts: dict[tuple[int, int], str] = {}
        for L in sorted({len(r[2]) for r in rows}):
            group = [r for r in rows if len(r[2]) == L]
            ids = torch.tensor([r[2] for r in group], device=dev)
            for _ in range(params.max_tokens):
                logits = self.model(ids)[:, -1].float()
                nxt = (logits.argmax(-1) if params.temperature == 0 else
                       torch.multinomial((logits / params.temperature).softmax(-1), 1, generator=g)[:, 0])
                ids = torch.cat([ids, nxt[:, None]], 1)
            for (i, j, p), out in zip(group, ids[:, L:].tolist()):
                text = TOK.decode([t for t in out if t < 256])
                texts[i, j] = min((text.split(s)[0] for s in params.stop), key=len) if params.stop else text
        return [RequestOutput(p, [], [CompletionOutput(j, texts[i, j], [], "stop") for j in range(params.n)])
                for i, p in enumerate(prompts)]


def accuracy(model, task, examples, max_tokens: int) -> float:
    """Greedy exact-match accuracy through the engine front door."""
    llm = Engine(model)
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
