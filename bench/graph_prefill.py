"""Steps holding prefill chunks on CUDA graphs (EngineConfig.graph_prefill_tokens) vs eager, side by side in one run.

    python bench/graph_prefill.py                 # a GPU: the Qwen3-0.6B shape, random init, bf16
    python bench/graph_prefill.py --smoke         # toy fp32 model on CPU: checks every section runs

A step holding a prefill chunk runs eagerly (one kernel launch per op of every layer, from Python) unless it holds at
most graph_prefill_tokens tokens: then it replays the graph of its token bucket, attention through the Triton varlen
kernel from device metadata (lmforge.infer.graphs). Sections:
  check   graphs on and off give the same greedy tokens (fp32 toy model on the device) and the same sampled
          log-probs within 1e-4
  ttft    time to first token of one request alone (prompt lengths --lengths, prefix caching off): median
          of --reps, after two warm-up requests per length (captures and compiles happen there)
  mixed   the same, with --background requests decoding beside it: the step that holds the prompt
  served  --requests requests arriving one every --every engine steps (prompts uniform in [--lo, --hi], 32-256
          new tokens): wall time, output tokens/s, mean / p50 / p90 time to first token
  context one request decoding at each of --contexts keys and a 256-token prompt arriving: time to first token,
          eager vs graphs with MIXED_MAX_CONTEXT lifted (its calibration)
  offline --offline-requests at once (nano-vllm's workload, bench/engine.py): eager prefill steps of 8192 and
          2048 tokens vs 2048-token steps on graphs
Each row runs graph_prefill_tokens=0 (eager prefill steps), 512 and 2048 on one model in the same process.
--smoke shrinks what sizes the graphs' static buffers (max_seq_len 1024, a 16k-token KV pool, 8 sequences) and the
workloads. Prints a table; writes JSON to $OUT (or bench/results)/graph_prefill.json after every section.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.infer.detok import IdTokenizer  # noqa: E402
from lmforge.infer.engine import Engine, EngineConfig  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import COMMON, SHAPES, SMOKE, run_engine, sync, workload  # noqa: E402

from bench.common import parse_sections  # noqa: E402

MODES = {"eager prefill steps": 0, "graphs up to 512 tokens": 512, "graphs up to 2048 tokens": 2048}
SECTIONS = ("check", "ttft", "mixed", "served", "context", "offline")
SMOKE_ENGINE = dict(max_seq_len=1024, num_kv_tokens=16384, max_num_seqs=8)
"""--smoke: a graph's static buffers hold max_num_seqs rows x max_seq_len keys of block table (at the Qwen3
shape's 4,096 and 64 the CPU smoke took > 300 s)"""


def build(args, dev, dtype, **extra) -> Transformer:
    small = dict(SMOKE, max_seq_len=SMOKE_ENGINE["max_seq_len"]) if args.smoke else {}
    kw = {**COMMON, **SHAPES[args.shape], **small, **extra}
    torch.manual_seed(0)
    with torch.device(dev):
        return Transformer(ModelConfig(**kw)).to(dtype).eval()


def free(dev) -> None:
    """Release the previous engines' KV pools and graphs (an engine's pool takes most of the free memory)."""
    gc.collect()
    if torch.device(dev).type == "cuda":
        torch.cuda.empty_cache()


def engine_for(model, tokens: int, args, **kw) -> Engine:
    free(next(model.parameters()).device)
    config = EngineConfig(graph_prefill_tokens=tokens, cuda_graphs=True, prefix_caching=False,
                          max_num_seqs=args.max_num_seqs, num_kv_tokens=args.num_kv_tokens, **kw)
    return Engine(model, IdTokenizer(model.cfg.vocab_size), config)


def prompt(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def first_token_time(engine: Engine, dev, ids: list[int], max_tokens: int = 2) -> float:
    """Seconds from add_request to the step that returns the request's first token (other requests keep
    decoding meanwhile)."""
    sync(dev)
    t0 = time.perf_counter()
    rid = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while True:
        outs = {o.request_id: o for o in engine.step()}
        if rid in outs and outs[rid].outputs[0].token_ids:
            sync(dev)
            return time.perf_counter() - t0


def drain(engine: Engine) -> None:
    while engine.has_unfinished():
        engine.step()


def check(args, dev) -> dict:
    model = build(args, dev, torch.float32, **SMOKE)
    rng = random.Random(1)
    prompts = [prompt(rng, n, model.cfg.vocab_size) for n in (5, 40, 200, 7, 600, 90)]
    got = {}
    for name, tokens in MODES.items():
        engine = engine_for(model, tokens, args)
        sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
        ids = []
        for p in prompts:  # arriving two steps apart: each prompt's step holds the others' decodes
            ids.append(engine.add_request(p, sp))
            engine.step()
            engine.step()
        done = {}
        while engine.has_unfinished():
            done.update({o.request_id: o for o in engine.step() if o.finished})
        got[tokens] = [done[i].outputs[0] for i in ids]
    eager, graphed = got[0], [v for k, v in got.items() if k]
    same = all(a.token_ids == b.token_ids for outs in graphed for a, b in zip(eager, outs))
    gap = max(abs(x - y) for outs in graphed for a, b in zip(eager, outs) for x, y in zip(a.logprobs, b.logprobs))
    return dict(same_tokens=same, max_logprob_gap=gap, ok=same and gap < 1e-4)


def ttft(model, args, dev, background: int) -> dict:
    rng, out = random.Random(2), {}
    for name, tokens in MODES.items():
        engine = engine_for(model, tokens, args)
        for _ in range(background):  # long-running decodes beside the timed prompts
            engine.add_request(prompt(rng, 64, model.cfg.vocab_size),  # (--smoke: within its 1,024 positions)
                               SamplingParams(temperature=0, max_tokens=min(3000, model.cfg.max_seq_len - 64),
                                              ignore_eos=True))
        for _ in range(3):
            engine.step()
        row = {}
        for n in args.lengths:
            times = [first_token_time(engine, dev, prompt(rng, n, model.cfg.vocab_size))
                     for _ in range(args.reps + 2)][2:]
            row[n] = statistics.median(times) * 1e3
        out[name] = row
        for rid in list(engine.requests):
            engine.abort(rid)
        del engine
    return out


def served(model, args, dev) -> dict:
    rng = random.Random(3)
    reqs = [(prompt(rng, rng.randint(args.lo, args.hi), model.cfg.vocab_size), rng.randint(*args.new))
            for _ in range(args.requests)]
    out = {}
    for name, tokens in MODES.items():
        engine = engine_for(model, tokens, args)
        engine.add_request(reqs[0][0][:8], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        drain(engine)  # the first capture and compiles, outside the timing
        sync(dev)
        t0 = time.perf_counter()
        added, first, steps, tokens, pending = {}, {}, 0, 0, list(reqs)
        while pending or engine.has_unfinished():
            if pending and steps % args.every == 0:
                p, new = pending.pop(0)
                added[engine.add_request(p, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))] = \
                    time.perf_counter()
            for o in engine.step():
                if o.request_id in added and o.request_id not in first and o.outputs[0].token_ids:
                    first[o.request_id] = time.perf_counter() - added[o.request_id]
                if o.finished:
                    tokens += len(o.outputs[0].token_ids)
            steps += 1
        sync(dev)
        wall = time.perf_counter() - t0
        t = sorted(first.values())
        out[name] = dict(wall_s=wall, tok_s=tokens / wall, steps=steps, ttft_mean_ms=1e3 * statistics.mean(t),
                         ttft_p50_ms=1e3 * statistics.median(t), ttft_p90_ms=1e3 * t[int(len(t) * 0.9)],
                         graph_failed=engine.runner.graphs.failed or engine.runner.graphs.failed_mixed)
    return out


def long_context(args, dev, dtype) -> dict:
    """Calibrates MIXED_MAX_CONTEXT: time to first token of a 256-token prompt beside one request decoding at a long
    context, eager vs graphs forced past the bound (the varlen kernel reads that decode's keys in one program per
    kv head, with no split over keys)."""
    model = build(args, dev, dtype, max_seq_len=max(args.contexts) + (512 if args.smoke else 1024))
    rng, out = random.Random(4), {}
    for ctx in args.contexts:
        row = {}
        for name, tokens in (("eager", 0), ("graphs, bound lifted", 512)):
            engine = engine_for(model, tokens, args)
            engine.runner.graphs.mixed_context = 1 << 30
            engine.add_request(prompt(rng, ctx, model.cfg.vocab_size),
                               SamplingParams(temperature=0, max_tokens=500, ignore_eos=True))
            for _ in range(3):
                engine.step()
            times = [first_token_time(engine, dev, prompt(rng, 256, model.cfg.vocab_size)) for _ in range(args.reps + 2)]
            row[name] = statistics.median(times[2:]) * 1e3
            del engine
        out[ctx] = row
    return out


def offline(model, args, dev) -> dict:
    """nano-vllm's workload (all requests at t=0, prompts and outputs uniform in [100, 1024]) with eager prefill steps
    of 8192 and 2048 tokens and with 2048-token steps on graphs; the second of two passes timed (bench/engine.py)."""
    reqs = workload(args.offline_requests, 100, 1024, model.cfg.vocab_size)
    rows = {"eager prefill steps, 8192-token budget": (0, 8192), "eager prefill steps, 2048-token budget": (0, 2048),
            "graphs up to 2048 tokens, 2048-token budget": (2048, 2048)}
    out = {}
    for name, (tokens, budget) in rows.items():
        config = EngineConfig(graph_prefill_tokens=tokens, max_num_batched_tokens=budget,
                              max_num_seqs=SMOKE_ENGINE["max_num_seqs"] if args.smoke else 256,
                              num_kv_tokens=args.num_kv_tokens)
        free(dev)
        res = run_engine(model, reqs, config, dev, passes=2)
        out[name] = dict(tok_s=res["tok_s"], cold_tok_s=res["cold_tok_s"])
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of: " + ", ".join(SECTIONS))
    ap.add_argument("--offline-requests", type=int, default=128)
    ap.add_argument("--contexts", default="2048,8192,32768", help="the long-context section's decode contexts")
    ap.add_argument("--lengths", default="16,64,128,256,512")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--background", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--lo", type=int, default=32)
    ap.add_argument("--hi", type=int, default=480)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    args = ap.parse_args(argv)
    sections = set(parse_sections(ap, args.sections, SECTIONS))
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.new, args.num_kv_tokens = (32, 256), None  # served: new tokens per request; the engine's own pool size
    if args.smoke:
        args.lengths, args.reps, args.requests, args.background, args.offline_requests = [16, 64], 2, 8, 2, 4
        args.contexts, args.hi, args.new = [300], 128, (4, 16)
        args.max_num_seqs, args.num_kv_tokens = SMOKE_ENGINE["max_num_seqs"], SMOKE_ENGINE["num_kv_tokens"]
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    res = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results") / "graph_prefill.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section: a run cut short keeps what it measured
        out.write_text(json.dumps(res, indent=1, default=str))

    if "check" in sections:
        res["check"] = check(args, dev)
        print("check:", res["check"], flush=True)
        save()
    model = build(args, dev, dtype)
    if "ttft" in sections:
        res["ttft_ms"] = ttft(model, args, dev, 0)
        print("time to first token, alone (ms, median):", flush=True)
        for name, row in res["ttft_ms"].items():
            print(f"  {name:40s} " + "  ".join(f"{n}: {v:7.2f}" for n, v in row.items()), flush=True)
        save()
    if "mixed" in sections:
        res["mixed_ms"] = ttft(model, args, dev, args.background)
        print(f"time to first token beside {args.background} decoding requests (ms, median):", flush=True)
        for name, row in res["mixed_ms"].items():
            print(f"  {name:40s} " + "  ".join(f"{n}: {v:7.2f}" for n, v in row.items()), flush=True)
        save()
    if "served" in sections:
        res["served"] = served(model, args, dev)
        print(f"served: {args.requests} requests, one every {args.every} steps, prompts {args.lo}-{args.hi}:")
        print(f"  {'mode':40s} {'wall s':>8s} {'tok/s':>8s} {'TTFT mean':>10s} {'p50':>8s} {'p90':>8s}")
        for name, r in res["served"].items():
            print(f"  {name:40s} {r['wall_s']:8.2f} {r['tok_s']:8.0f} {r['ttft_mean_ms']:10.2f} "
                  f"{r['ttft_p50_ms']:8.2f} {r['ttft_p90_ms']:8.2f}" + (f"  ({r['graph_failed']})" if r["graph_failed"] else ""))
        save()
    if "context" in sections:
        res["context_ms"] = long_context(args, dev, dtype)
        print("time to first token of a 256-token prompt beside one decode at a long context (ms, median):")
        for ctx, row in res["context_ms"].items():
            print(f"  context {ctx:6d}: " + "  ".join(f"{k} {v:7.2f}" for k, v in row.items()), flush=True)
        save()
    if "offline" in sections:
        res["offline"] = offline(model, args, dev)
        print(f"offline: {args.offline_requests} requests at once, prompts and outputs 100-1024 (second pass):")
        for name, r in res["offline"].items():
            print(f"  {name:45s} {r['tok_s']:8.0f} tok/s  (first pass {r['cold_tok_s']:.0f})")
        save()
    print(f"JSON: {out}")
    return res


if __name__ == "__main__":
    main()
