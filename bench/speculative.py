"""Speculative decoding with a trained draft model: the speed-up at batch 1 on text where drafts agree.

bench/decode.py's speculative rows measure nothing useful: its models have random weights, so a draft
almost never matches the target (acceptance ~0). Here a target and a small draft are first trained on the
same byte stream - the source of Python's standard library (lmforge.demo.stdlib_corpus), one token per
byte (lmforge's ByteTokenizer) - each through lmforge's Trainer for a fixed wall-clock budget (a hook
ends the run and decays the learning rate over elapsed time), and then greedy decoding of held-out
prompts is timed:

  * baseline: `speculative_generate` with no drafts (k=0): one eager target forward per token, the same
    loop bench/decode.py uses as its speculative baseline, so every row differs only in its drafter
    (it still pays the loop's per-token host work: a verify step, and NGramDrafter's context scan, whose
    result k=0 discards - tens of microseconds per token);
  * plain: the engine's greedy decode with no drafter (LLM.generate, batch 1) - how much the
    speculative strategy's bookkeeping costs, for reference;
  * ModelDrafter(draft) for several k, and prompt lookup (NGramDrafter, Saxena 2023);
  * the engine (LLM.generate, batch 1) with the same draft as a chain (its paged draft cache, k drafts)
    and as token trees (lmforge.infer.token_tree.TreeDrafter: widths per depth, the draft recomputing its
    context each round; the tree step runs the eager path), against the engine's own plain decode.

Per row: tokens/s, acceptance rate (accepted / drafted), tokens per target forward, speed-up over the
baseline, and whether the tokens equal the baseline's. Greedy speculative decoding is exact in exact
arithmetic (Leviathan et al. 2023), but in bf16 the target scores k+1 tokens per forward instead of 1, so
different kernels round differently and a near-tie between two bytes can flip, after which the outputs
diverge legitimately. So each row also gives the common-prefix fraction, and for a prompt that diverges,
the fp32 target's logit margin between the two candidates at the first differing token ("tie margin"):
a margin near bf16 resolution (~0.1 at these logit scales) is a rounding flip, a large one a bug.
`--dtype fp32` decodes in fp32, where such flips should be rare enough for outputs to match exactly.

Batch-1 eager decode of models this small should be bound by kernel launches and host syncs, not by
weight bytes (the 85M target's 170 MB of bf16 weights take ~0.06 ms to read on an H100), so a draft's
cost should grow with its depth far more than with its width.

    PYTHONPATH=$PWD python3 bench/speculative.py                # one GPU: 165 s training, ~4 minutes
    PYTHONPATH=$PWD python3 bench/speculative.py --quick        # tiny models on CPU: checks the script

Diagnosis (the speculative rows were 8-40x slower than plain decoding on an H200, 2026-12-04, not
understood): `--profile` then runs one prompt of each engine-level variant (plain, chain, tree) and the
ModelDrafter loop under torch.profiler and prints, per variant, the time per generated token, kernel
launches per token and the ops taking the most device (CPU: self CPU) time; chrome traces go beside the
JSON. `--sdpa no-cudnn` runs every row with SDPA restricted to its flash / efficient / math backends (the
ModelDrafter's contiguous cache hands SDPA a bool mask and a new key length per call, which on cuDNN can
mean a new execution plan per shape).

Prints a markdown table and writes JSON (bench/results/speculative.json, or $OUT/speculative.json when OUT
is set; --quick writes speculative_quick.json), rewritten after every row so a failure keeps the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.demo import stdlib_corpus  # noqa: E402
from lmforge.infer.engine import EngineConfig  # noqa: E402
from lmforge.infer.llm import LLM  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.infer.speculative import ModelDrafter, NGramDrafter, speculative_generate  # noqa: E402
from lmforge.infer.token_tree import TreeDrafter, tree_size  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.optim import build_optimizer  # noqa: E402
from lmforge.optim.config import OptimConfig  # noqa: E402
from lmforge.tokenizer.byte import ByteTokenizer  # noqa: E402
from lmforge.train.config import LoopConfig  # noqa: E402
from lmforge.train.harness import scratch_trainer  # noqa: E402
from lmforge.train.loss import LMObjective, lm_loss  # noqa: E402

QUICK = dict(corpus_mb=0.5, target_dim=64, target_layers=2, draft_dim=32, draft_layers=1, max_seq_len=128,
             seq_len=64, batch_size=8, target_seconds=8.0, draft_seconds=4.0, max_steps=300, warmup=20,
             target_lr=3e-3, draft_lr=3e-3,
             prompts=2, prompt_len=32, new_tokens=48, ks="2,4", eval_batches=2)


# ---------------------------------------------------------------------------------------------- data
def byte_corpus(max_bytes: int, holdout_every: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]], dict]:
    """Standard-library files as one byte stream with <|endoftext|> before each file. Every
    holdout_every-th file (sorted by path) is held out: validation loss and prompts come from those.
    Returns train ids, validation ids (int16, CPU), the held-out files' ids, and corpus stats."""
    tok = ByteTokenizer()
    docs = [tok.encode(d) for d in stdlib_corpus(max_bytes)]
    held = docs[::holdout_every]
    train = [d for i, d in enumerate(docs) if i % holdout_every]

    def stream(ds: list[list[int]]) -> torch.Tensor:
        return torch.tensor([t for d in ds for t in [tok.eot_id, *d]], dtype=torch.int16)

    stats = {"files": len(docs), "held_out_files": len(held), "train_bytes": sum(map(len, train)),
             "val_bytes": sum(map(len, held))}
    return stream(train), stream(held), held, stats


def prompts_from(held: list[list[int]], n: int, length: int) -> list[list[int]]:
    """n prompts of `length` bytes from different held-out files (spread over the list), each starting at
    the first line break after a third of its file: mid-file code, not license headers."""
    ok = [d for d in held if len(d) >= 3 * length]
    if len(ok) < n:
        raise SystemExit(f"only {len(ok)} held-out files have {3 * length} bytes; lower --prompts/--prompt-len "
                         "or raise --corpus-mb")
    out = []
    for j in range(n):
        d = ok[j * len(ok) // n]
        start = d.index(10, len(d) // 3) + 1 if 10 in d[len(d) // 3:-length] else len(d) // 3
        out.append(d[start:start + length])
    return out


def windows(data: torch.Tensor, starts: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) start offsets -> inputs and next-token targets, each (B, T), int64."""
    x = data[starts[:, None] + torch.arange(T + 1, device=data.device)].long()
    return x[:, :-1], x[:, 1:]


# ---------------------------------------------------------------------------------------------- models
def llama_config(d_model: int, n_layers: int, vocab: int, max_seq_len: int) -> ModelConfig:
    """Llama-style block (RoPE, RMSNorm, SwiGLU, untied head); heads 128 wide when the width allows
    (faster flash attention on Hopper), else 64, else 32 (the --quick widths)."""
    hd = next(h for h in (128, 64, 32, 16) if d_model % h == 0)
    return ModelConfig(vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=d_model // hd, head_dim=hd,
                       max_seq_len=max_seq_len, pos_emb="rope", norm="rmsnorm", activation="swiglu",
                       tie_embeddings=False)


def autocast(dev: torch.device):
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def val_loss(model: Transformer, val: torch.Tensor, args, dev: torch.device) -> float:
    """Mean loss over eval_batches fixed batches of evenly spaced windows (the same for every model)."""
    model.eval()
    n = args.eval_batches * args.batch_size
    starts = torch.linspace(0, len(val) - args.seq_len - 2, n, device=dev).long()
    losses = []
    for s in starts.split(args.batch_size):
        x, y = windows(val, s, args.seq_len)
        with autocast(dev):
            losses.append(float(lm_loss(model(x), y)[1]))
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def argmax_agreement(target: Transformer, draft: Transformer, val: torch.Tensor, args, dev: torch.device) -> float:
    """Fraction of held-out positions where the draft's argmax equals the target's, given the true
    context: roughly the greedy acceptance rate to expect (the context while decoding is the target's
    own output instead)."""
    starts = torch.linspace(0, len(val) - args.seq_len - 2, args.batch_size, device=dev).long()
    x, _ = windows(val, starts, args.seq_len)
    with autocast(dev):
        return float((target(x).argmax(-1) == draft(x).argmax(-1)).float().mean())


class RandomWindows:
    """DataSource (lmforge.train.objective): batch_size windows at uniformly random offsets of an
    in-memory token stream, drawn with a seeded CPU generator (its state is the source's state)."""

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self) -> dict[str, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        x, y = windows(self.data, starts, self.seq_len)
        return {"input_ids": x, "targets": y}

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])


class WallClock:
    """Trainer hook: a training budget in seconds of wall clock instead of steps. The clock starts after
    the first step (CUDA start-up, torch.compile). The step count is not known in advance, so the
    learning rate decays linearly to 10% over elapsed time: after every step the hook scales the
    optimizer's base rates, to which the Trainer's constant schedule applies the warm-up (in steps).
    When the budget is spent it asks the Trainer to stop (Trainer.request_stop). It prints a
    progress line at a logged step about every eighth of the budget."""

    def __init__(self, name: str, seconds: float):
        self.name, self.seconds = name, seconds
        self.t0: float | None = None
        self.base: list[float] = []
        self.tokens0, self.last_print = 0, 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0 if self.t0 is not None else 0.0

    def on_step_end(self, trainer, stats: dict) -> None:
        groups = trainer.optimizer.param_groups
        if self.t0 is None:
            float(stats["loss"])  # wait for the first step before starting the clock
            self.t0, self.base, self.tokens0 = time.perf_counter(), [g["base_lr"] for g in groups], trainer.tokens
            return
        elapsed = self.elapsed()
        if elapsed >= self.seconds:
            trainer.request_stop(f"{self.seconds:.0f} s training budget spent")
            return
        for g, base in zip(groups, self.base):
            g["base_lr"] = base * (1 - 0.9 * min(1.0, elapsed / self.seconds))

    def on_log(self, trainer, row: dict) -> None:
        elapsed = self.elapsed()
        if elapsed - self.last_print >= self.seconds / 8:
            self.last_print = elapsed
            print(f"  [{self.name}] step {row['step']}, {elapsed:.0f}s, loss {row['loss']:.3f}, "
                  f"{(row['tokens'] - self.tokens0) / max(elapsed, 1e-9):,.0f} tok/s", flush=True)


def train_for(name: str, model: Transformer, train: torch.Tensor, val: torch.Tensor, seconds: float, lr: float,
              args, dev: torch.device) -> dict:
    """The Trainer (pretraining's LMObjective, AdamW with weight decay 0.1, clipping at 1.0) on random
    windows for `seconds` of wall clock (WallClock) or args.max_steps steps, whichever ends first."""
    optim = OptimConfig(lr=lr, betas=(0.9, 0.95), weight_decay=0.1, grad_clip=1.0, schedule="constant",
                        warmup_steps=args.warmup)
    steps = args.max_steps or 10**12  # 10**12: the clock ends the run
    loop = LoopConfig(optim=optim, max_steps=steps, log_every=20, eval_every=steps, ckpt_every=steps, keep_last=1,
                      seed=args.seed, device=str(dev), compile=args.compile)
    clock = WallClock(name, seconds)
    data = RandomWindows(train, args.batch_size, args.seq_len, args.seed)
    with scratch_trainer(model, build_optimizer(model, optim), data, LMObjective(), loop, hooks=[clock]) as trainer:
        trainer.fit()
    step, secs = trainer.step, clock.elapsed()
    res = {"steps": step, "train_tokens": step * args.batch_size * args.seq_len, "train_seconds": secs,
           "lr": lr, "val_loss": val_loss(model, val, args, dev)}
    print(f"  [{name}] {step} steps in {secs:.0f}s; val loss {res['val_loss']:.3f} nats/byte "
          f"({res['val_loss'] / math.log(2):.3f} bits/byte)", flush=True)
    return res


def build_and_train(name: str, d_model: int, n_layers: int, seconds: float, lr: float, data, args, dev) -> tuple:
    cfg = llama_config(d_model, n_layers, args.vocab, args.max_seq_len)
    with torch.device(dev):
        model = Transformer(cfg)
    print(f"[{name}] {n_layers} layers, d_model {d_model}, {cfg.n_heads}x{cfg.hd} heads, "
          f"{model.num_params() / 1e6:.1f}M params; training {seconds:.0f}s", flush=True)
    res = train_for(name, model, *data, seconds, lr, args, dev)
    info = {"d_model": d_model, "n_layers": n_layers, "n_heads": cfg.n_heads, "head_dim": cfg.hd,
            "params": model.num_params(), **res}
    return model.eval(), info


# ---------------------------------------------------------------------------------------------- decoding
def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev: torch.device):
    sync(dev)
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    return out, time.perf_counter() - t0


def plain_llm(model: Transformer, prompts: list[list[int]], new: int) -> LLM:
    """The engine with no drafter, one sequence at a time, its pool sized to the longest prompt (built once,
    outside the timed calls: construction sizes the pool, captures graphs and builds the kernel view)."""
    return LLM(model, ByteTokenizer(), config=EngineConfig(max_num_seqs=1,
                                                           num_kv_tokens=max(map(len, prompts)) + new + 16))


def engine_run(llm: LLM, prompts: list[list[int]], args, dev: torch.device) -> tuple[list[list[int]], dict]:
    """One warm-up on the first prompt, then every prompt timed through LLM.generate (batch 1); the
    speculative counters from each output's metrics."""
    greedy = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    with torch.inference_mode():
        # (within the pool sized for --new-tokens: 32 tokens overflowed it below --new-tokens 16)
        llm.generate(prompts[0], SamplingParams(temperature=0, max_tokens=min(32, args.new_tokens), ignore_eos=True))
        outs, tot = [], {"seconds": 0.0, "tokens": 0, "drafted": 0, "accepted": 0, "target_forwards": 0}
        for p in prompts:
            out, dt = timed(lambda: llm.generate(p, greedy)[0], dev)
            outs.append(out.token_ids)
            tot["seconds"] += dt
            tot["tokens"] += len(out.token_ids)
            for f in ("drafted", "accepted", "target_forwards"):
                tot[f] += out.metrics.get(f, 0)
    return outs, tot


@torch.inference_mode()
def plain_greedy(llm: LLM, prompt: list[int], new: int) -> list[int]:
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))[0].token_ids


@torch.inference_mode()
def tie_margin(target32: Transformer, prompt: list[int], ref: list[int], toks: list[int]) -> tuple[int, float] | None:
    """Where toks first differs from ref: (index, |logit difference| of the two candidates under the fp32
    target given the common prefix). None when one is a prefix of the other."""
    i = next((i for i, (a, b) in enumerate(zip(ref, toks)) if a != b), None)
    if i is None:
        return None
    dev = next(target32.parameters()).device
    logits = target32(torch.tensor([prompt + ref[:i]], device=dev))[0, -1].float()
    return i, float((logits[ref[i]] - logits[toks[i]]).abs())


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_variant(make_drafter, k: int, target: Transformer, prompts: list[list[int]], args,
                dev: torch.device) -> tuple[list[list[int]], dict]:
    """One warm-up on the first prompt, then every prompt timed (a fresh drafter per prompt: a
    ModelDrafter's KV cache holds one sequence). k=0 with NGramDrafter is the no-draft baseline."""
    L = target.cfg.max_seq_len
    greedy = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    speculative_generate(target, make_drafter(len(prompts[0]) + 32 + k + 1), prompts[0],
                         SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), k, set(), L)
    outs, tot = [], {"seconds": 0.0, "tokens": 0, "drafted": 0, "accepted": 0, "target_forwards": 0}
    for p in prompts:
        drafter = make_drafter(len(p) + args.new_tokens + k + 1)
        (toks, st), dt = timed(lambda: speculative_generate(target, drafter, p, greedy, k, set(), L), dev)
        outs.append(toks)
        tot["seconds"] += dt
        tot["tokens"] += len(toks)
        tot.setdefault("per_prompt_tok_s", []).append(len(toks) / dt)
        for f in ("drafted", "accepted", "target_forwards"):
            tot[f] += getattr(st, f)
    return outs, tot


def compare(outs: list[list[int]], refs: list[list[int]], prompts, target32) -> dict:
    """Exactness against the baseline's tokens: prompts equal, mean common-prefix fraction, and for each
    diverging prompt (first differing index, fp32 tie margin there)."""
    diverged = [tie_margin(target32, p, r, o) for p, r, o in zip(prompts, refs, outs) if o != r]
    return {"equal": f"{sum(o == r for o, r in zip(outs, refs))}/{len(refs)}",
            "agree": sum(common_prefix(o, r) / len(r) for o, r in zip(outs, refs)) / len(refs),
            "divergences": [d for d in diverged if d is not None]}


# ---------------------------------------------------------------------------------------------- report
class Report:
    """Result rows; the JSON file is rewritten after each row so a later failure loses nothing."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta, self.rows = path, meta, []
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({**self.meta, "rows": self.rows}, indent=2))

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        self.save()

    def table(self) -> str:
        cols = ("variant", "k", "tok/s", "speed-up", "acceptance", "tok/forward", "equal", "agree", "tie margins")
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in self.rows:
            if "error" in r:
                lines.append(f"| {r['variant']} | {r.get('k', '')} | failed: {r['error']} |" + " |" * 6)
                continue
            margins = ", ".join(f"@{i}: {m:.3f}" for i, m in r.get("divergences", [])) or "-"
            lines.append(f"| {r['variant']} | {fmt(r['k'], '')} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | "
                         f"{fmt(r.get('acceptance'), '.2f')} | {fmt(r.get('tok_per_forward'), '.2f')} | "
                         f"{r['equal']} | {r['agree']:.3f} | {margins} |")
        return "\n".join(lines)


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def row(variant: str, k: int | None, tot: dict, base: dict, cmp: dict) -> dict:
    tok_s = tot["tokens"] / tot["seconds"]
    return {"variant": variant, "k": k, "tok_s": tok_s, "speedup": tok_s / (base["tokens"] / base["seconds"]),
            "acceptance": tot["accepted"] / tot["drafted"] if tot.get("drafted") else None,
            "tok_per_forward": tot["tokens"] / tot["target_forwards"] if tot.get("target_forwards") else None,
            **tot, **cmp}


def measure(rep: Report, target, draft, target32, prompts: list[list[int]], args, dev: torch.device) -> None:
    """The baseline first (its tokens are the reference), then each drafter; a failing variant becomes
    an error row and the others still run."""
    V = target.cfg.vocab_size
    no_draft = lambda n: NGramDrafter(vocab_size=V)  # noqa: E731  (k=0: the drafter is never asked)
    refs, base = run_variant(no_draft, 0, target, prompts, args, dev)
    rep.meta["baseline_outputs"] = [ByteTokenizer().decode(t) for t in refs]  # are drafts agreeing on loops?
    rep.add(row("no draft (1 target forward/token)", 0, base, base, compare(refs, refs, prompts, target32)))

    def plain() -> tuple[list[list[int]], dict]:
        llm = plain_llm(target, prompts, args.new_tokens)
        plain_greedy(llm, prompts[0], min(32, args.new_tokens))  # warm-up, within the pool sized for --new-tokens
        outs, secs = [], 0.0
        for p in prompts:
            toks, dt = timed(lambda: plain_greedy(llm, p, args.new_tokens), dev)
            outs.append(toks)
            secs += dt
        return outs, {"seconds": secs, "tokens": sum(map(len, outs))}

    variants = [("engine, no drafter (LLM.generate)", None, plain)]
    variants += [(f"draft model ({args.draft_layers}L, d{args.draft_dim})", k,
                  lambda k=k: run_variant(lambda n: ModelDrafter(draft, n), k, target, prompts, args, dev))
                 for k in args.k_list]
    variants.append(("prompt lookup (n-gram)", args.ngram_k,
                     lambda: run_variant(no_draft, args.ngram_k, target, prompts, args, dev)))
    pool = EngineConfig(max_num_seqs=1, num_kv_tokens=max(map(len, prompts)) + args.new_tokens + 64)
    variants += [(f"engine + draft model, chain (k={k})", k,
                  lambda k=k: engine_run(LLM(target, ByteTokenizer(), draft=draft, num_draft_tokens=k, config=pool),
                                         prompts, args, dev)) for k in args.k_list]
    if dev.type == "cuda":  # the drafted steps' CUDA graphs (session 27) against the same engine without them
        eager = dataclasses.replace(pool, cuda_graphs=False)
        k = args.k_list[-1]
        variants.append((f"engine + draft model, chain (k={k}), no CUDA graphs", k,
                         lambda: engine_run(LLM(target, ByteTokenizer(), draft=draft, num_draft_tokens=k, config=eager),
                                            prompts, args, dev)))
    variants += [(f"engine + draft model, token tree {w}", tree_size(w),
                  lambda w=w: engine_run(LLM(target, ByteTokenizer(), draft=TreeDrafter(draft, w), config=pool),
                                         prompts, args, dev)) for w in args.tree_widths]
    for name, k, fn in variants:
        try:
            outs, tot = fn()
            rep.add(row(name, k, tot, base, compare(outs, refs, prompts, target32)))
        except Exception as e:  # keep the other variants' results
            rep.add({"variant": name, "k": k, "error": f"{type(e).__name__}: {e}"})


# ---------------------------------------------------------------------------------------------- profile
def sdpa_backends(choice: str):
    """A context restricting SDPA's backends for every row ('any': no restriction)."""
    if choice == "any":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def device_time(e) -> float:
    """An averaged profiler event's self device time in us (older torch names it self_cuda_time_total)."""
    return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)


RUNTIME_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaGraphLaunch", "cudaStreamSynchronize",
                 "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync", "cudaStreamWaitEvent")


def profile_variants(target, draft, prompts: list[list[int]], args, dev: torch.device, out_dir: Path) -> list[dict]:
    """One prompt per variant under torch.profiler (after a warm-up of the same call): wall time per token,
    device kernels per token, and the top ops by self device time (self CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    p, new, k = prompts[0], args.profile_tokens, args.k_list[-1]
    pool = EngineConfig(max_num_seqs=1, num_kv_tokens=len(p) + new + 64)
    greedy = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    L = target.cfg.max_seq_len
    llms = {"engine plain": plain_llm(target, [p], new),
            f"engine chain k={k}": LLM(target, ByteTokenizer(), draft=draft, num_draft_tokens=k, config=pool)}
    if args.tree_widths:
        w = args.tree_widths[0]
        llms[f"engine tree {w}"] = LLM(target, ByteTokenizer(), draft=TreeDrafter(draft, w), config=pool)
    runs = {name: (lambda llm=llm: len(llm.generate(p, greedy)[0].token_ids)) for name, llm in llms.items()}
    runs[f"ModelDrafter loop k={k}"] = lambda: len(speculative_generate(
        target, ModelDrafter(draft, len(p) + new + k + 1), p, greedy, k, set(), L)[0])
    rows = []
    for name, fn in runs.items():
        with torch.inference_mode():
            fn()
            sync(dev)
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                n = fn()
                sync(dev)
                wall = time.perf_counter() - t0
        prof.export_chrome_trace(str(out_dir / f"speculative_trace_{name.replace(' ', '_').replace('=', '')}.json"))
        events = prof.key_averages()
        timing = device_time if cuda else (lambda e: float(e.self_cpu_time_total))
        kernels = [e for e in events if str(e.device_type).endswith("CUDA")] if cuda else []  # kernels, memcpys
        top = sorted(kernels if cuda else events, key=timing, reverse=True)[:args.profile_top]
        runtime = {e.key: e.count / n for e in events if e.key in RUNTIME_CALLS}
        rows.append({"variant": name, "tokens": n, "ms_per_token": 1e3 * wall / n,
                     "kernels_per_token": sum(e.count for e in kernels) / n if cuda else None,
                     "device_ms_per_token": sum(map(device_time, kernels)) / 1e3 / n if cuda else None,
                     "runtime_calls_per_token": runtime, "top": [(e.key, e.count, timing(e) / n) for e in top]})
        r = rows[-1]
        extra = (f", {r['kernels_per_token']:.0f} kernels and {r['device_ms_per_token']:.3f} ms device time per "
                 "token" if cuda else "")
        print(f"\n{name}: {n} tokens, {r['ms_per_token']:.3f} ms per token{extra}", flush=True)
        if runtime:
            print("  per token: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(runtime.items())))
        print(f"  {'op':60s} {'calls':>7s} {'us/token':>9s}  ({'device' if cuda else 'self CPU'})")
        for key, count, us in r["top"]:
            print(f"  {key[:60]:60s} {count:7d} {us:9.1f}")
        if args.host_profile:
            r["host_top"] = host_profile(fn, dev, args.profile_top)
    return rows


def host_profile(fn, dev: torch.device, top: int) -> list:
    """The Python functions of one more call of `fn` by their own time (cProfile): where host time goes."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    with torch.inference_mode():
        prof.enable()
        n = fn()
        sync(dev)
        prof.disable()
    st = pstats.Stats(prof)
    rows = sorted(((f"{Path(f).name}:{line}:{name}", calls, tt, ct) for (f, line, name), (_, calls, tt, ct, _)
                   in st.stats.items()), key=lambda r: r[2], reverse=True)[:top]
    print(f"  {'python function (cProfile)':60s} {'calls':>7s} {'own us/tok':>10s} {'cum us/tok':>10s}")
    for name, calls, tt, ct in rows:
        print(f"  {name[-60:]:60s} {calls:7d} {1e6 * tt / n:10.1f} {1e6 * ct / n:10.1f}")
    return [(name, calls, 1e6 * tt / n, 1e6 * ct / n) for name, calls, tt, ct in rows]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, a few steps, CPU (script check)")
    ap.add_argument("--corpus-mb", type=float, default=64.0, help="standard-library bytes to read (all: ~13 MB)")
    ap.add_argument("--holdout-every", type=int, default=10, help="every n-th file is held out")
    ap.add_argument("--target-dim", type=int, default=768)
    ap.add_argument("--target-layers", type=int, default=12)
    ap.add_argument("--draft-dim", type=int, default=384)
    ap.add_argument("--draft-layers", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--target-seconds", type=float, default=120.0)
    ap.add_argument("--draft-seconds", type=float, default=45.0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop training after this many steps (0: time only)")
    ap.add_argument("--target-lr", type=float, default=1e-3)
    ap.add_argument("--draft-lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100, help="warmup steps")
    ap.add_argument("--seq-len", type=int, default=1024, help="training window")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="torch.compile for training (compile time is not "
                    "counted in the budget)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=384)
    ap.add_argument("--ks", default="2,4,6", help="draft lengths for the draft model")
    ap.add_argument("--ngram-k", type=int, default=4)
    ap.add_argument("--trees", nargs="*", default=["2,2,1", "3,2,1", "2,2,2,1"],
                    help="token-tree widths per depth, one tree shape per entry (k column: its nodes)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="decode weights and KV cache (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sdpa", default="any", choices=["any", "no-cudnn"],
                    help="no-cudnn: SDPA restricted to its flash / efficient / math backends for every row")
    ap.add_argument("--profile", action="store_true", help="after the table, profile one prompt per variant")
    ap.add_argument("--profile-tokens", type=int, default=64, help="new tokens per profiled generation")
    ap.add_argument("--profile-top", type=int, default=15, help="ops listed per profiled variant")
    ap.add_argument("--host-profile", action="store_true",
                    help="with --profile: also run each variant under cProfile (Python functions by own time)")
    ap.add_argument("--skip-table", action="store_true", help="with --profile: profile only (no timed table)")
    args = ap.parse_args(argv)
    if args.quick:
        ap.set_defaults(**QUICK, device="cpu")
        args = ap.parse_args(argv)
    args.k_list = [int(k) for k in args.ks.split(",") if k]
    args.tree_widths = [tuple(int(w) for w in t.split(",")) for t in args.trees]
    args.vocab = -(-ByteTokenizer().vocab_size // 64) * 64  # 257 ids padded for aligned head matmuls
    if args.prompt_len + args.new_tokens > args.max_seq_len:
        ap.error(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} exceeds --max-seq-len "
                 f"{args.max_seq_len}")
    if args.seq_len > args.max_seq_len:
        ap.error(f"--seq-len {args.seq_len} exceeds --max-seq-len {args.max_seq_len}")
    return args


def meta(args, argv, dev: torch.device, dtype: torch.dtype, stats: dict, t_info: dict, d_info: dict,
         agreement: float) -> dict:
    train_keys = ("seq_len", "batch_size", "warmup", "compile", "target_seconds", "draft_seconds", "max_steps")
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "command": "python bench/speculative.py " + " ".join(argv or sys.argv[1:]),
            "corpus": stats, "vocab_size": args.vocab, "target": t_info, "draft": d_info,
            "train": {k: getattr(args, k) for k in train_keys}, "argmax_agreement": agreement,
            "decode_dtype": str(dtype).removeprefix("torch."), "prompts": args.prompts,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "sdpa": args.sdpa}


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or (
        torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if args.quick:  # tiny models gain nothing from intra-op threads, and on a busy machine they stall
        torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    train, val, held, stats = byte_corpus(int(args.corpus_mb * 1e6), args.holdout_every)
    print(f"corpus: {stats['files']} files, {stats['train_bytes'] / 1e6:.1f} MB train, "
          f"{stats['val_bytes'] / 1e6:.2f} MB held out ({time.perf_counter() - t0:.0f}s)", flush=True)
    prompts = prompts_from(held, args.prompts, args.prompt_len)
    data = (train, val.to(dev))  # the Trainer moves each training batch to the device
    target, t_info = build_and_train("target", args.target_dim, args.target_layers, args.target_seconds,
                                     args.target_lr, data, args, dev)
    draft, d_info = build_and_train("draft", args.draft_dim, args.draft_layers, args.draft_seconds,
                                    args.draft_lr, data, args, dev)
    agreement = argmax_agreement(target, draft, data[1], args, dev)
    print(f"draft argmax = target argmax on {agreement:.1%} of held-out positions", flush=True)
    del data
    as_decode = (lambda m: m) if dtype == torch.float32 else (lambda m: copy.deepcopy(m).to(dtype))
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    rep = Report(out_dir / ("speculative_quick.json" if args.quick else "speculative.json"),
                 meta(args, argv, dev, dtype, stats, t_info, d_info, agreement))
    print(f"decoding {len(prompts)} held-out prompts of {args.prompt_len} bytes, {args.new_tokens} new tokens, "
          f"greedy, batch 1, {rep.meta['decode_dtype']}", flush=True)
    with sdpa_backends(args.sdpa):
        if not args.skip_table:
            measure(rep, as_decode(target), as_decode(draft), target, prompts, args, dev)
            print("\n" + rep.table())
        if args.profile:
            rep.meta["profile"] = profile_variants(as_decode(target), as_decode(draft), prompts, args, dev, out_dir)
            rep.save()
    print(f"\ntarget val loss {t_info['val_loss']:.3f}, draft val loss {d_info['val_loss']:.3f} (nats/byte); "
          f"total {time.perf_counter() - t0:.0f}s; JSON: {rep.path}")


if __name__ == "__main__":
    main()
