"""Serving throughput of the engine (issue 11 §7), side by side in one run on one GPU.

    python bench/engine.py [--baseline-src DIR]     # H200: Qwen3-0.6B and 1.1B Llama shapes, random init, bf16
    python bench/engine.py --smoke                  # toy fp32 models on CPU: checks every section runs

Sections (--sections, comma-separated; default all):
  profile     where a steady decode step's time goes (schedule, inputs, attention, other forward, sampling)
              and its kernels (bench/profiling.py), eager; last shape only, after its throughput rows (the
              profiler's CUPTI makes later CUDA-graph captures fail)
  check       the engine's greedy tokens on a few prompts vs the full-recompute reference (agreement: bf16
              near-ties of random weights may flip late tokens; fp32 --smoke must agree exactly)
  offline     nano-vllm's workload: --requests prompts, prompt and output lengths uniform in [100, 1024],
              ignore EOS; output tokens/s, the workload's roofline and the fraction reached, KV memory
              utilisation at peak (Engine.stats(): tokens stored in the distinct blocks in use / their
              slots, shared blocks once) and the pool's occupancy then (tokens stored / the pool's slots)
  unfused     the offline workload with EngineConfig(fused_kernels=False): the model's plain layers (the
              default on a GPU runs Triton RMSNorm / RoPE / SwiGLU on a view of the model)
  sync        the offline workload with EngineConfig(async_scheduling=False): the host reads each step's
              tokens before building the next (the default on a GPU overlaps them)
  fixed       the same prompts with 512 new tokens each (the issue's 2026-12-01 measurements: old path
              4,991 tok/s at batch 64, roofline ~38,000)
  hf          HF generate(), padded static batches of --hf-batch sorted by prompt length (first shape only)
  hf_batch    HF's continuous batching generate_batch (transformers >= 5) on --hf-batch-requests (one
              max_new_tokens for all; the time includes its cache allocation and CUDA-graph warm-up)
  baseline    lmforge's previous static-batch LLM in a subprocess, fixed 512 new tokens, batch 64 (first
              shape only). --baseline-src DIR: a folder holding an older lmforge package, e.g. the last
              commit before the engine: `mkdir DIR && git archive e9e944e^ lmforge | tar -x -C DIR`
  batch1      one request (128-token prompt, 256 new): the one-sequence path (the Triton kernel step
              when lmforge.infer.kernel_step supports the model; issue: 1,206 tok/s at 1.1B)
  prefix      --requests requests sharing a 2,048-token prefix (+ 16-64 own tokens, 32 new): throughput and
              mean time-to-first-token with prefix caching on vs off, both on one KV pool of
              --prefix-kv-tokens (first shape only)
Rows that cannot run say why in one line (skipped: ...) and the run goes on. The offline, unfused, sync,
fixed and batch1 rows run their workload twice on one Engine (prefix cache emptied in between) and time
the second pass, as nano-vllm's benchmark times a warmed-up LLM; the first pass is `cold_tok_s` (a fresh
Engine captures a decode CUDA graph per new batch bucket, Triton compiles a kernel variant per new shape
class). Every row reports the first-use work inside its timed pass (`first_use`: compiles, captures and
their seconds; bench/profiling.one_time_costs). The prefix rows time one pass on a fresh engine.
Roofline per decode step: max(bytes / copy bandwidth, FLOPs / matmul peak) with bytes = weights (one row
of an untied token embedding) + the KV of every live sequence, FLOPs = 2 x Linear weights x live sequences
(+ attention); prefill adds its FLOPs (before 2026-12-05 both counted the whole untied embedding table). Copy
bandwidth and the bf16 matmul peak are measured here. Prints a table; writes JSON to $OUT (or bench/results)
/engine_<shapes>.json. Rows print as they finish, so a run cut short still reports what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import decode_weight_bytes, parse_sections  # noqa: E402
from lmforge.infer.detok import IdTokenizer  # noqa: E402
from lmforge.infer.engine import Engine, EngineConfig  # noqa: E402
from lmforge.infer.kv.paged import decode_kernel  # noqa: E402
from lmforge.infer.runner import sample_rows as sample_rows_original  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402

SHAPES = {
    "qwen3-0.6b": dict(vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                       d_ff=3072, qk_norm=True, tie_embeddings=True, rope_theta=1e6),
    "llama-1.1b": dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632,
                       tie_embeddings=False),
}
COMMON = dict(pos_emb="rope", norm="rmsnorm", activation="swiglu", max_seq_len=4096)
SECTIONS = ("check", "profile", "offline", "unfused", "sync", "fixed", "batch1", "prefix", "baseline", "hf", "hf_batch")
SMOKE = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, init_std=0.2)


def sync(dev) -> None:
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()


def build(shape: str, args, dev, dtype) -> Transformer:
    kw = {**COMMON, **SHAPES[shape], **(SMOKE if args.smoke else {})}
    torch.manual_seed(0)
    with torch.device(dev):
        return Transformer(ModelConfig(**kw)).to(dtype).eval()


def workload(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi)) for _ in range(n)]


def run_engine(model, reqs, config: EngineConfig, dev, passes: int = 1) -> dict:
    """All requests at t=0 on one Engine, `passes` times (the prefix cache emptied in between): the last
    pass's wall time, output tokens, mean TTFT, KV utilisation at peak and per-step trace; with passes > 1
    also the first ("cold": its first-use work included) pass's tok/s."""
    engine = Engine(model, IdTokenizer(model.cfg.vocab_size), config)
    cold = None
    for i in range(passes):
        if i:
            engine.reset_prefix_cache()
        res = _one_pass(engine, model, reqs, dev)
        cold = res["tok_s"] if i == 0 else cold
    if passes > 1:
        res["cold_tok_s"] = cold
    return res


def _one_pass(engine: Engine, model, reqs, dev) -> dict:
    preempted = engine.scheduler.num_preemptions
    sync(dev)
    t0 = time.perf_counter()
    ttft: list[float] = []
    for prompt, new in reqs:
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    out_tokens, steps = 0, 0
    trace: list[tuple[int, int, float]] = []  # per step: (decode rows, prefill tokens, seconds)
    schedule = engine.scheduler.schedule

    def traced_schedule():
        batch = schedule()
        trace.append((batch.num_decodes, batch.num_tokens - batch.num_decodes, time.perf_counter()))
        return batch

    engine.scheduler.schedule = traced_schedule
    from profiling import one_time_costs

    try:
        with one_time_costs(engine) as once:  # first-use work inside the timed run: say how much
            while engine.has_unfinished():
                outs = engine.step(finished_only=True)
                steps += 1
                for o in outs:
                    out_tokens += len(o.token_ids)
                    ttft.append(o.metrics["time_to_first_token_s"])
            sync(dev)
    finally:
        del engine.scheduler.schedule  # the class's method again
    wall = time.perf_counter() - t0
    st = engine.stats()
    ends = [t for _, _, t in trace[1:]] + [t0 + wall]  # a step's time: until the next schedule (each syncs)
    phases = {"mixed": [0, 0.0], "decode": [0, 0.0]}
    by_batch: dict[int, list[float]] = {}
    for (dec, pre, start), end in zip(trace, ends):
        ph = phases["mixed" if pre else "decode"]
        ph[0] += 1
        ph[1] += end - start
        if not pre:
            by_batch.setdefault(dec // 64 * 64, []).append(end - start)
    graphs = getattr(engine.runner, "graphs", None)
    return {"graphs": "off" if graphs is None else (graphs.failed or f"{len(graphs.entries)} captured"),
            "kernel_step": getattr(engine.runner, "kernel_step", None) is not None,
            "fused_kernels": getattr(engine.runner, "model", model) is not model,
            "async": engine.async_scheduling,
            "decode": "triton kernel" if decode_kernel(torch.device(dev)) else "gather reference",
            "seconds": wall, "output_tokens": out_tokens, "tok_s": out_tokens / wall, "steps": steps,
            "ttft_mean_s": sum(ttft) / max(len(ttft), 1), "kv_util_at_peak": st["kv_utilization_at_peak"],
            "pool_occupancy_at_peak": st["kv_utilization_at_peak"] * st["peak_used_blocks"] / st["num_blocks"],
            "peak_blocks": st["peak_used_blocks"], "pool_blocks": st["num_blocks"],
            "prefix_hit_rate": st["prefix_hit_rate"], "preemptions": st["preemptions"] - preempted,
            "steps_with_prefill": phases["mixed"][0], "prefill_phase_s": phases["mixed"][1],
            "decode_steps": phases["decode"][0], "decode_phase_s": phases["decode"][1],
            "decode_ms_by_batch": {f"{b}-{b + 63}": round(1e3 * statistics.median(v), 2)
                                   for b, v in sorted(by_batch.items())},
            "first_use": (f"{once['triton_compiles']} Triton compiles {once['triton_compile_s']:.2f} s "
                          f"{dict(sorted(once['compiled'].items(), key=lambda kv: -kv[1])[:3])}, "
                          f"{once['graph_captures']} graph captures {once['graph_capture_s']:.2f} s")}


def profile(model, dev, config: EngineConfig, batch: int, prompt: int) -> dict:
    """Where a steady decode step's time goes (ms), at `batch` sequences of ~`prompt` tokens: scheduling,
    input building, the forward (its attention calls apart), sampling and the engine's bookkeeping.
    Each part is timed between device syncs, so the parts add up to more than a free-running step."""
    # eager, synchronous steps (each part is timed between syncs, which a graph capture cannot contain),
    # on a pool for this batch only
    config = dataclasses.replace(config, num_kv_tokens=(batch + 32) * (prompt + 600), cuda_graphs=False,
                                 async_scheduling=False)
    engine = Engine(model, IdTokenizer(model.cfg.vocab_size), config)
    for p, _ in workload(batch, prompt, prompt, model.cfg.vocab_size, seed=4):
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=512, ignore_eos=True))
    sync(dev)
    t0 = time.perf_counter()
    engine.step(finished_only=True)  # a prefill step: max_num_batched_tokens of prompts
    sync(dev)
    prefill_ms = 1e3 * (time.perf_counter() - t0)
    while any(s.num_computed < len(s.tokens) - 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step(finished_only=True)  # until every prompt is in the cache
    spent: dict[str, float] = {}

    def timed(name, fn):
        def run(*a, **kw):
            sync(dev)
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync(dev)
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
            return out
        return run

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.runner.prepare = timed("inputs", engine.runner.prepare)
    cache = engine.runner.cache
    attend = "attend_latent" if hasattr(cache, "attend_latent") else "attend"
    setattr(cache, attend, timed("attention", getattr(cache, attend)))
    import lmforge.infer.runner as runner_mod
    runner_mod.sample_rows = timed("sampling", runner_mod.sample_rows)
    step = timed("step", engine.step)
    n = 8
    try:
        for _ in range(n):
            step(finished_only=True)
    finally:
        runner_mod.sample_rows = sample_rows_original
    if torch.device(dev).type == "cuda":  # last (CUDA-graph capture fails once CUPTI is attached, for any later engine)
        from profiling import kernel_table

        print(f"  kernels of a decode step at batch {len(engine.scheduler.running)}:", flush=True)
        print(kernel_table(lambda: engine.step(finished_only=True), calls=3, rows=18), flush=True)
    out = {k: 1e3 * v / n for k, v in spent.items()}
    out["forward_other"] = out["step"] - sum(out.get(k, 0) for k in ("schedule", "inputs", "attention", "sampling"))
    out["first_prefill_step"] = prefill_ms
    return {"ms_per_step": {k: round(v, 2) for k, v in out.items()}, "batch": len(engine.scheduler.running)}


def check(model, dev) -> dict:
    """Greedy agreement of the engine with full recompute on 4 prompts x 16 tokens."""
    V = model.cfg.vocab_size
    reqs = workload(4, 8, 40, V, seed=1)
    engine = Engine(model, IdTokenizer(V), EngineConfig(block_size=16, num_kv_tokens=4096))
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)) for p, _ in reqs]
    got = {}
    while engine.has_unfinished():
        got.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    agree = []
    with torch.no_grad():
        for rid, (prompt, _) in zip(ids, reqs):
            seq = torch.tensor([prompt + got[rid]], device=dev)
            want = model(seq)[0, len(prompt) - 1:-1].argmax(-1).tolist()  # teacher-forced reference argmax
            agree.append(sum(a == b for a, b in zip(want, got[rid])) / len(want))
    return {"greedy_agreement": sum(agree) / len(agree)}


def roofline(model, reqs, dev, bw: float, peak: float) -> dict:
    """Tokens/s bound of the whole workload, all requests decoding together (they fit on the device). A step
    reads every weight once but only its rows of an untied token embedding (bench.common.decode_weight_bytes;
    before 2026-12-05 the whole table was counted, 131 MB of the 1.1B Llama shape's 2.2 GB), and its matmul
    FLOPs are the Linear layers' (Transformer.flops_per_token: the head, not the embedding lookup)."""
    wbytes = decode_weight_bytes(model)
    linear = model.flops_per_token(0, training=False)  # 2 x the Linear weights: FLOPs per token, no attention
    kv_tok = model.cache_spec().bytes_per_token()
    cfg = model.cfg
    attn_flops_per_key = 4 * cfg.n_heads * cfg.hd * cfg.n_layers
    prefill = sum(linear * len(p) + attn_flops_per_key * len(p) ** 2 / 2 for p, _ in reqs) / peak
    total, out = prefill, sum(n for _, n in reqs)
    for t in range(max(n for _, n in reqs)):
        live = [(len(p) + t) for p, n in reqs if n > t]
        bytes_ = wbytes + kv_tok * sum(live)
        flops = linear * len(live) + attn_flops_per_key * sum(live)
        total += max(bytes_ / bw, flops / peak)
    return {"roofline_tok_s": out / total, "weights_GB": wbytes / 1e9, "kv_bytes_per_token": kv_tok}


def measure_device(dev) -> tuple[float, float]:
    """(copy bandwidth bytes/s counting read + write, bf16 matmul FLOP/s), medians."""
    n, m = (1 << 28, 8192) if dev.type == "cuda" else (1 << 22, 512)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a, b = torch.empty(n, device=dev), torch.empty(n, device=dev)
    x, y = torch.randn(m, m, device=dev, dtype=dt), torch.randn(m, m, device=dev, dtype=dt)

    def median(fn) -> float:
        ts = []
        for i in range(8):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts[2:])

    return 8 * n / median(lambda: b.copy_(a)), 2 * m ** 3 / median(lambda: x @ y)


def hf_model(shape: str, args, dev, dtype):
    try:
        import transformers
    except ImportError:
        return {"error": "skipped: transformers is not installed (pip install 'lmforge[hf]')"}
    s = {**COMMON, **SHAPES[shape], **(SMOKE if args.smoke else {})}
    kw = dict(vocab_size=s["vocab_size"], hidden_size=s["d_model"], intermediate_size=s["d_ff"],
              num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"], num_key_value_heads=s["n_kv_heads"],
              max_position_embeddings=s["max_seq_len"], tie_word_embeddings=s["tie_embeddings"])
    if shape.startswith("qwen3"):
        cfg = transformers.Qwen3Config(**kw, head_dim=s.get("head_dim", s["d_model"] // s["n_heads"]))
        cls = transformers.Qwen3ForCausalLM
    else:
        cfg, cls = transformers.LlamaConfig(**kw), transformers.LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(dev):
        return cls(cfg).to(dtype).eval()


@torch.no_grad()
def run_hf_generate(hf, reqs, batch: int, dev) -> dict:
    order = sorted(reqs, key=lambda r: len(r[0]))
    sync(dev)
    t0, useful = time.perf_counter(), 0
    for i in range(0, len(order), batch):
        chunk = order[i:i + batch]
        T = max(len(p) for p, _ in chunk)
        ids = torch.tensor([[0] * (T - len(p)) + p for p, _ in chunk], device=dev)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p, _ in chunk], device=dev)
        new = max(n for _, n in chunk)
        hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    pad_token_id=0, eos_token_id=None)
        useful += sum(n for _, n in chunk)  # tokens past a request's own length are padding work
    sync(dev)
    wall = time.perf_counter() - t0
    return {"seconds": wall, "output_tokens": useful, "tok_s": useful / wall}


@torch.no_grad()
def run_hf_batch(hf, reqs, dev, smoke: bool) -> dict:
    import transformers

    if not hasattr(hf, "generate_batch"):
        return {"error": f"skipped: transformers {transformers.__version__} has no generate_batch (needs >= 5)"}
    new = max(n for _, n in reqs)
    cfg = transformers.GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)
    # on a CPU it sizes its cache from the machine's memory (30 s of fill_ for a toy model): a small one
    cb = transformers.ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64) if smoke else None
    sync(dev)
    t0 = time.perf_counter()
    out = hf.generate_batch(inputs=[p for p, _ in reqs], generation_config=cfg, continuous_batching_config=cb)
    sync(dev)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {"seconds": wall, "output_tokens": tokens, "tok_s": tokens / wall, "note": f"all requests {new} new"}


BASELINE = """
import json, sys, time
sys.path.insert(0, sys.argv[2])  # the older package first (python -c also puts the working folder on the path)
import torch
import lmforge
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
kw, prompts, new, batch, dev, dtype = json.loads(open(sys.argv[1]).read())
torch.manual_seed(0)
with torch.device(dev):
    model = Transformer(ModelConfig(**kw)).to(getattr(torch, dtype)).eval()
class Tok:
    vocab_size, eot_id = kw["vocab_size"], None
    def encode(self, t): return [0]
    def decode(self, ids): return ""
    def token_bytes(self, i): return b""
llm = LLM(model, Tok(), max_batch_size=batch)
sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
if dev == "cuda": torch.cuda.synchronize()
t0 = time.perf_counter()
outs = llm.generate(prompts, sp)
if dev == "cuda": torch.cuda.synchronize()
wall = time.perf_counter() - t0
n = sum(len(o.token_ids) for o in outs)
print("RESULT " + json.dumps({"seconds": wall, "output_tokens": n, "tok_s": n / wall, "package": lmforge.__file__}))
"""


def run_baseline(shape: str, args, reqs, dev, dtype) -> dict:
    if args.baseline_src is None:
        return {"error": "skipped: no --baseline-src DIR (a folder holding an older lmforge package)"}
    src = Path(args.baseline_src).resolve()
    if not (src / "lmforge" / "__init__.py").is_file():
        return {"error": f"skipped: --baseline-src {src} holds no lmforge/__init__.py (give the folder above the package)"}
    kw = {**COMMON, **SHAPES[shape], **(SMOKE if args.smoke else {})}
    env = dict(os.environ, PYTHONPATH=str(src))
    payload = json.dumps([kw, [p for p, _ in reqs], args.fixed_new, 64, dev.type, str(dtype).split(".")[-1]])
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:  # prompts passed by file (argv has a size limit)
        f.write(payload)
        f.flush()
        proc = subprocess.run([sys.executable, "-c", BASELINE, f.name, str(src)], env=env, capture_output=True,
                              text=True, timeout=args.baseline_timeout)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        return {"error": "baseline failed: " + (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    res = json.loads(line[7:])
    if not Path(res.pop("package")).resolve().is_relative_to(src):
        return {"error": f"baseline imported lmforge from outside {src}: its numbers would be this version's"}
    return res


def prefix_workload(n: int, prefix_len: int, vocab: int, lo: int, hi: int) -> list[tuple[list[int], int]]:
    rng = random.Random(2)
    shared = [rng.randrange(vocab) for _ in range(prefix_len)]
    return [(shared + [rng.randrange(vocab) for _ in range(rng.randint(lo, hi))], 32) for _ in range(n)]


NOTES = ("ms_per_step", "batch", "greedy_agreement", "ttft_mean_s", "kv_util_at_peak", "pool_occupancy_at_peak", "prefix_hit_rate", "preemptions", "seconds", "note",
         "graphs", "decode", "kernel_step", "fused_kernels", "async", "steps_with_prefill", "prefill_phase_s", "decode_steps",
         "decode_phase_s", "decode_ms_by_batch", "first_use", "cold_tok_s")


def print_row(row) -> None:
    shape, name, res, frac = row
    tok = f"{res['tok_s']:.0f}" if "tok_s" in res else "-"
    roof = f"{res['roofline_tok_s']:.0f}" if "roofline_tok_s" in res else "-"
    notes = res.get("error") or ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in res.items() if k in NOTES)
    print(f"{shape:<12} {name:<58} {tok:>9} {roof:>9} {f'{frac:.1%}' if frac else '-':>6}  {notes}", flush=True)


def guarded(fn, *a, **kw) -> dict:
    """A failing variant is reported in the table instead of ending the run; cached device memory is
    released after each (the next variant sizes its KV pool from free memory)."""
    try:
        return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - the benchmark reports every failure and goes on
        return {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"}
    finally:
        gc.collect()  # an engine's KV pool and captured graphs sit in reference cycles
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy fp32 models on CPU")
    ap.add_argument("--shapes", default="qwen3-0.6b,llama-1.1b")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--hf-requests", type=int, default=32, help="HF generate() runs on the first N requests")
    ap.add_argument("--hf-batch", type=int, default=32)
    ap.add_argument("--hf-batch-requests", type=int, default=16, help="generate_batch runs on the first N requests")
    ap.add_argument("--fixed-new", type=int, default=512)
    ap.add_argument("--baseline-src", default=None, help="folder holding the pre-engine lmforge package")
    ap.add_argument("--baseline-timeout", type=int, default=240)
    ap.add_argument("--prefix-kv-tokens", type=int, default=1 << 18,
                    help="prefix section: the KV pool (tokens) of both runs; without prefix caching --requests "
                         "x ~2.1k tokens do not all fit, with it they do")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests, args.hf_requests, args.hf_batch, args.fixed_new = 12, 6, 3, 16
        args.hf_batch_requests, args.max_num_batched_tokens, args.prefix_kv_tokens = 3, 64, 1024
    args.sections = set(parse_sections(ap, args.sections, SECTIONS))
    parse_sections(ap, args.shapes, SHAPES, "--shapes")
    return args


def run_shape(shape: str, first: bool, last: bool, args, dev, dtype, bw: float, peak: float, add) -> None:
    """Every section for one model shape; add(name, result, roofline) records a row."""
    lo, hi, prefix_len = (4, 24, 48) if args.smoke else (100, 1024, 2048)
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          num_kv_tokens=4096 if args.smoke else None)
    model, sections = build(shape, args, dev, dtype), args.sections
    V = model.cfg.vocab_size
    reqs = workload(args.requests, lo, hi, V)
    fixed = [(p, args.fixed_new) for p, _ in reqs]
    guarded(run_engine, model, reqs[:4], config, dev)  # warm-up (kernels, allocator)
    if "check" in sections:
        add("check: engine greedy vs full recompute", guarded(check, model, dev))
    unfused = dataclasses.replace(config, fused_kernels=False)
    sync = dataclasses.replace(config, async_scheduling=False)
    for name, work, cfg in (("offline", reqs, config), ("unfused", reqs, unfused), ("sync", reqs, sync),
                            ("fixed", fixed, config)):
        if name in sections:
            bound = roofline(model, work, dev, bw, peak)
            label = {"offline": "engine, offline workload", "fixed": f"engine, {args.fixed_new} new each",
                     "unfused": "engine, offline workload, plain layers (no fused)",
                     "sync": "engine, offline workload, no async scheduling"}[name]
            # the workload twice on one engine, the second pass timed: serving after start-up (Triton compiles
            # a kernel variant per new shape class, the engine captures a graph per new batch bucket); the
            # first pass is reported as cold_tok_s
            add(label, {**guarded(run_engine, model, work, cfg, dev, passes=2), **bound}, bound["roofline_tok_s"])
    if "batch1" in sections:
        one = [(workload(1, 128, 128, V, seed=3)[0][0], 16 if args.smoke else 256)]
        add(f"engine, batch 1 (128 prompt, {one[0][1]} new)", guarded(run_engine, model, one, config, dev, passes=2))
    if first and "prefix" in sections:
        pre = prefix_workload(args.requests, prefix_len, V, 16, 64)
        pool = dataclasses.replace(config, num_kv_tokens=args.prefix_kv_tokens)  # equal memory for both
        for on in (False, True):
            add(f"shared {prefix_len}-token prefix, prefix caching {'on' if on else 'off'}, "
                f"{args.prefix_kv_tokens} KV tokens",
                guarded(run_engine, model, pre, dataclasses.replace(pool, prefix_caching=on), dev))
    if first and "baseline" in sections:
        add(f"previous static-batch LLM, batch 64, {args.fixed_new} new",
            guarded(run_baseline, shape, args, fixed[:64], dev, dtype))
    if last and "profile" in sections:  # its kernel table attaches CUPTI: no graph capture after it
        n, p = (8, 20) if args.smoke else (args.max_num_seqs, 1024)
        add(f"profile: decode step at batch {n}, ~{p} context", guarded(profile, model, dev, config, n, p))
    if first and sections & {"hf", "hf_batch"}:
        del model
        hf = guarded(hf_model, shape, args, dev, dtype)
        if "hf" in sections:
            sub = reqs[: args.hf_requests]
            add(f"HF generate(), batches of {args.hf_batch}, {len(sub)} requests",
                hf if isinstance(hf, dict) else guarded(run_hf_generate, hf, sub, args.hf_batch, dev))
        if "hf_batch" in sections:
            sub = reqs[: args.hf_batch_requests]
            add(f"HF generate_batch, {len(sub)} requests",
                hf if isinstance(hf, dict) else guarded(run_hf_batch, hf, sub, dev, args.smoke))


def main(argv=None) -> dict:
    args = parse(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    bw, peak = measure_device(dev)
    rows, results = [], {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                         "copy_bandwidth_GBs": bw / 1e9, "matmul_TFLOPs": peak / 1e12, "variants": {}}
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / (("engine_smoke" if args.smoke else "engine_" + args.shapes.replace(",", "_")) + ".json")
    print(f"device {results['device']}: copy {bw / 1e9:.0f} GB/s, matmul {peak / 1e12:.0f} TFLOP/s", flush=True)
    shapes = args.shapes.split(",")
    for si, shape in enumerate(shapes):
        def add(name, res, bound=None, shape=shape):
            results["variants"][f"{shape}/{name}"] = res
            frac = res.get("tok_s", 0) / bound if bound and "tok_s" in res else None
            rows.append((shape, name, res, frac))
            print_row(rows[-1])
            path.write_text(json.dumps(results, indent=1))  # a run cut short keeps what it measured

        run_shape(shape, si == 0, si == len(shapes) - 1, args, dev, dtype, bw, peak, add)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{'shape':<12} {'variant':<58} {'tok/s':>9} {'roofline':>9} {'frac':>6}  notes")
    for row in rows:
        print_row(row)
    return results


if __name__ == "__main__":
    main()
