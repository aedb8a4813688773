"""Shared pieces of the post-training benches (bench/align_compare.py, bench/align_distill.py): task
examples as lmforge.align.data records and DataSources, training through lmforge's one Trainer, greedy
task accuracy and held-out losses.

Training is `Trainer(model, optimizer, data, objective)` (lmforge.train.trainer) with lmforge's AdamW, a
constant learning rate after a linear warm-up over the first 5% of steps, no weight decay and global-norm
clipping at 1.0; the data are lmforge.align.data ExampleSources over records encoded as `lmforge sft|dpo|rm`
would encode them from JSONL (prompt/completion strings: only the completion and its end-of-text token
are trained), one example per row, unpacked, so a batch is `batch` examples (or pairs) for every method.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lmforge.align.data import (DataReport, Encoder, ExampleSource, encode_record, kto_batch, pad_batch,
                                pair_batch)
from lmforge.align.logprobs import token_logprobs
from lmforge.align.sampled import chat_prompt
from lmforge.align.sft import model_logits
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.optim import build_optimizer
from lmforge.optim.config import OptimConfig
from lmforge.tokenizer.load import load_tokenizer
from lmforge.train.config import LoopConfig
from lmforge.train.harness import scratch_fit

TOK = load_tokenizer("byte")
RENDER = chat_prompt("plain")
STOP = ("\n",)
ENCODER = Encoder(TOK, "plain")
COLLATE = {"sft": pad_batch, "preference": pair_batch, "kto": kto_batch}


SIZED = "(default: SIZES[smoke|cpu|cuda] by --smoke / --device)"


def parser(doc: str) -> argparse.ArgumentParser:
    """The flags both evidence benches share; each adds its own (size-dependent ones default to None)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes: checks the script on CPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--task", default="count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--T", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=12)
    return ap


def sized_args(args: argparse.Namespace, sizes: dict[str, dict]) -> argparse.Namespace:
    """Fill every flag left at None from the sizes of the run kind (smoke / cpu / cuda by --device)."""
    size = sizes["smoke" if args.smoke else "cuda" if args.device.startswith("cuda") else "cpu"]
    for k, v in size.items():  # flags given explicitly win
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def model(d: int, layers: int, heads: int, seq: int, seed: int, device: str) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=TOK.vocab_size, d_model=d, n_layers=layers, n_heads=heads,
                                   max_seq_len=seq)).to(device)


def sft_records(examples) -> list[dict]:
    """Task examples -> prompt/completion records (the reference solution, ended by the stop string)."""
    return [{"prompt": RENDER(e), "completion": e.solution + "\n"} for e in examples]


def encode(records: list[dict], kind: str, T: int) -> list:
    """Records -> lmforge.align.data items (sft examples, (chosen, rejected) pairs, (example, label)),
    truncated to T + 1 tokens; a bad record raises its one-line DataError."""
    report = DataReport()
    return [encode_record(ENCODER, r, kind, f"record {i}", T + 1, report) for i, r in enumerate(records)]


def source(records: list[dict], kind: str, T: int, batch: int, seed: int) -> ExampleSource:
    """A DataSource of `batch` records per batch, reshuffled each epoch (kind: sft | preference | kto)."""
    return ExampleSource(encode(records, kind, T), batch, COLLATE[kind], seed=seed)


def fixed_batches(records: list[dict], kind: str, T: int, batch: int = 64) -> list[dict]:
    """The records in order, as batches (held-out evaluation)."""
    items, collate = encode(records, kind, T), COLLATE[kind]
    return [collate(items[i:i + batch]) for i in range(0, len(items), batch)]


def loop_config(steps: int, lr: float, device: str, seed: int = 0) -> LoopConfig:
    optim = OptimConfig(lr=lr, betas=(0.9, 0.95), weight_decay=0.0, grad_clip=1.0, schedule="constant",
                        warmup_steps=max(1, steps // 20))
    return LoopConfig(optim=optim, max_steps=steps, log_every=max(1, steps // 10), eval_every=steps,
                      ckpt_every=steps, keep_last=1, seed=seed, device=device, dtype="fp32")


def fit(model, objective, data, steps: int, lr: float, device: str) -> list[dict]:
    """`steps` optimizer steps of lmforge's Trainer on `data` with `objective`, in a scratch run
    directory (lmforge.train.harness.scratch_fit); returns the Trainer's logged metrics rows."""
    cfg = loop_config(steps, lr, device)
    result = scratch_fit(model, build_optimizer(model, cfg.optim), data, objective, cfg)
    return [{k: v for k, v in r.items() if k not in ("tokens", "tok_per_s", "elapsed")}
            for r in result.history if "loss" in r]


class Engine:
    """LLM.generate on a fresh engine per call: the model trains between calls, so nothing an engine
    caches (prefix blocks) may outlive one call."""

    def __init__(self, model):
        self.model, self.tokenizer = model, TOK

    def _llm(self) -> LLM:
        return LLM(self.model, TOK, cuda_graphs=False, max_batch_size=256)

    def generate(self, prompts, params: SamplingParams):
        return self._llm().generate(prompts, params)

    def chat(self, conversations, params: SamplingParams, *, template: str = "plain"):
        return self._llm().chat(conversations, params, template=template)


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
    for b in fixed_batches(sft_records(examples), "sft", T, batch):
        b = {k: v.to(device) for k, v in b.items()}
        lp = token_logprobs(model_logits(model, b), b["targets"])
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
