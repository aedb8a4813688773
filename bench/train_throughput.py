"""Training throughput and MFU of the real Trainer step (forward, loss, backward, clip, AdamW).

Models from the depth dial (ModelConfig.from_depth): depth 16 (~304M params) and depth 24 (~834M)
or 26 (~1.03B) around the ~900M point (depth 25, ~929M, can only have 64-wide heads),
seq 2048, bf16 autocast, torch.compile, on a GPU; MFU = tokens/s · flops_per_token / peak, with the
PaLM/nanochat FLOP convention (6·matmul params + 12·layers·heads·head_dim·seq) and the H100's dense
bf16 peak 989.5 TFLOP/s. The full-stack peer nanochat reaches 44% (286M) and 49% (896M) on an H100.

    python bench/train_throughput.py --device cuda                    # the H100 table
    python bench/train_throughput.py --device cpu --depths 2,4 --seq 256 --batch 8 --no-compile
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.data.shards import write_tokens
from lmforge.model.config import ModelConfig
from lmforge.optim.config import OptimConfig
from lmforge.train.config import DataConfig, TrainConfig
from lmforge.train.trainer import Trainer

NANOCHAT_MFU = {16: "44% (286M)", 24: "49% (896M)", 25: "49% (896M)", 26: "49% (896M)"}


def run_one(depth: int, args, shard: Path, fused: bool = False, profile: bool = False) -> dict:
    model = ModelConfig.from_depth(depth, vocab_size=args.vocab, max_seq_len=args.seq, fused_proj=fused)
    # above ~500M params, two micro-batches of half size keep activations within 80 GB
    batch, accum = (args.batch, 1) if depth < 20 else (max(1, args.batch // 2), 2)
    if args.batch_large:  # one micro-batch per step where memory allows (fewer, larger launches)
        batch, accum = (2 * args.batch, 1) if depth < 20 else (args.batch, 1)
    cfg = TrainConfig(
        model=model, data=DataConfig(train=(str(shard),), seq_len=args.seq, batch_size=batch, val_fraction=0.01),
        optim=OptimConfig(name=args.optim, lr=3e-4, warmup_steps=0), run_dir=tempfile.mkdtemp(),
        max_steps=10_000, grad_accum=accum, device=args.device, compile=args.compile, progress=False,
        sdpa_backend=args.sdpa,
        plot=False, resume=False, eval_batches=1)
    tr = Trainer(cfg)
    n_params = tr.model.num_params()
    sync = torch.cuda.synchronize if tr.device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        tr.train_step()
    sync()
    times = []  # seconds per step of blocks of args.steps steps: the trainer never waits for the GPU
    for _ in range(args.repeats):  # between steps, so neither does this timing (one sync per block)
        t = time.perf_counter()
        for _ in range(args.steps):
            tr.train_step()
        sync()
        times.append((time.perf_counter() - t) / args.steps)
    step_s = float(np.median(times))
    if profile and tr.device.type == "cuda":
        from profiling import kernel_table

        print(f"\nkernels of one training step, depth {depth}, sdpa={args.sdpa}, fused={fused}:\n"
              + kernel_table(tr.train_step, calls=2, rows=30), flush=True)
    tps = cfg.tokens_per_step / step_s
    mfu = tps * tr.flops_per_token / tr.peak if tr.peak else float("nan")
    mem = torch.cuda.max_memory_allocated() / 2**30 if tr.device.type == "cuda" else float("nan")
    del tr
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return {"depth": depth, "params_M": n_params / 1e6, "seq": args.seq, "tokens_per_step": cfg.tokens_per_step,
            "step_ms": step_s * 1e3, "tok_per_s": tps, "mfu": mfu, "peak_mem_GiB": mem,
            "nanochat_mfu": NANOCHAT_MFU.get(depth, "")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--depths", default="16,24,26")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--optim", default="adamw")
    ap.add_argument("--steps", type=int, default=5, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=3, help="timed blocks (the median block counts)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--sdpa", default="auto", help="attention kernel: auto|flash|cudnn|efficient|math (comma list)")
    ap.add_argument("--batch-large", action="store_true", help="double the micro-batch, no accumulation")
    ap.add_argument("--fused", default="0", help="fused q/k/v projections (model.fused_proj): comma list of 0/1")
    ap.add_argument("--profile", action="store_true", help="print a kernel table of the first configuration")
    ap.add_argument("--out", default="bench/results/train_throughput.json")
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    shard = write_tokens(tmp / "rand.bin", rng.integers(0, args.vocab, 4_000_000), vocab_size=args.vocab,
                         tokenizer="byte")
    rows = []
    backends = args.sdpa.split(",")
    configs = [(d, b, f == "1") for d in [int(x) for x in args.depths.split(",")] for b in backends
               for f in args.fused.split(",")]
    for i, (d, backend, fused) in enumerate(configs):
        args.sdpa = backend
        try:
            rows.append({**run_one(d, args, shard, fused, profile=args.profile and i == 0), "sdpa": backend,
                         "fused": fused})
        except RuntimeError as e:  # e.g. a kernel that does not support these shapes
            print(f"depth {d} sdpa={backend}: failed: {str(e).splitlines()[0]}", flush=True)
            continue
        r = rows[-1]
        print(f"depth {d} sdpa={backend} fused={fused}: {r['params_M']:.0f}M params, {r['tok_per_s']:,.0f} tok/s, "
              f"MFU {r['mfu']:.1%}", flush=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\ndevice: {dev}; seq {args.seq}; compile={args.compile}; optimizer {args.optim}")
    print(f"{'depth':>5} {'sdpa':>6} {'fused':>5} {'params':>8} {'tok/step':>9} {'step ms':>9} {'tok/s':>10} {'MFU':>7} "
          f"{'mem GiB':>8}  nanochat")
    for r in rows:
        print(f"{r['depth']:>5} {r['sdpa']:>6} {str(r['fused']):>5} {r['params_M']:>7.0f}M {r['tokens_per_step']:>9} {r['step_ms']:>9.1f} "
              f"{r['tok_per_s']:>10,.0f} {r['mfu']:>7.1%} {r['peak_mem_GiB']:>8.1f}  {r['nanochat_mfu']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": dev, "rows": rows, "args": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
