"""FSDP2 on ONE GPU against the plain model: what the wrapper costs (issue 14, sec. 7).

One process, a process group of one. Every variant trains the 834M depth-24 model (seq 2048, bf16,
blocks compiled, AdamW) from the same initial weights on the same batches:
  plain               the model itself, bf16 autocast
  fsdp2               fully_shard per block + root, MixedPrecisionPolicy(bf16 params, fp32 reduce),
                      resharded after forward (the "gathers" are copies on one rank)
  fsdp2_keep          reshard_after_forward=False
  fsdp2_ac_selective  + selective activation checkpointing (matmul/attention outputs kept)
  fsdp2_ac_full       + every block recomputed
Each variant steps the one Trainer (train_step; the FSDP2 variants through its ParallelRunner).
Checked: each variant's first losses agree with the plain model's (bf16 tolerance 0.03). Reported:
s/step, tokens/s, MFU (H100/H200 dense bf16 peak 989.5 TFLOP/s), peak memory, overhead vs plain.

    python bench/parallel.py                 # one H200, about 3-4 minutes
    python bench/parallel.py --smoke         # CPU, toy size, gloo
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_common import join, mfu, random_batches, timed, trainer_step  # noqa: E402

from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.optim import build_optimizer  # noqa: E402
from lmforge.optim.config import OptimConfig  # noqa: E402
from lmforge.parallel.config import ParallelConfig  # noqa: E402
from lmforge.parallel.runner import ParallelRunner  # noqa: E402

VARIANTS = {
    "plain": None,
    "fsdp2": dict(dp_shard=1, param_dtype="bf16"),
    "fsdp2_keep": dict(dp_shard=1, param_dtype="bf16", reshard_after_forward=False),
    "fsdp2_ac_selective": dict(dp_shard=1, param_dtype="bf16", activation_checkpoint="selective"),
    "fsdp2_ac_full": dict(dp_shard=1, param_dtype="bf16", activation_checkpoint="full"),
}


def build(name: str, cfg: ModelConfig, device, compile_: bool):
    torch.manual_seed(0)
    with device:  # initialised on the GPU: seconds instead of a CPU init of 834M weights per variant
        model = Transformer(cfg)
    fpt, n_params = model.flops_per_token(cfg.max_seq_len), model.num_params()
    layout, runner = VARIANTS[name], None
    if layout is None:
        if compile_:
            for b in model.blocks:
                b.compile()
    else:  # FSDP's MixedPrecisionPolicy casts the gathered weights to bf16: no autocast
        runner = ParallelRunner(model, ParallelConfig(**layout, compile=compile_), device=device)
        model = runner.model
    optim = OptimConfig(name="adamw", lr=3e-4, warmup_steps=0)
    step = trainer_step(model, build_optimizer(model, optim), optim, device, runner=runner,
                        bf16_autocast=runner is None)
    return step, fpt, n_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU toy size")
    ap.add_argument("--out", default="bench/results/parallel.json")
    args = ap.parse_args()
    if args.smoke:
        args.depth, args.seq, args.batch, args.vocab = 2, 64, 2, 512
        args.warmup, args.steps, args.no_compile = 2, 3, True
    rank, world, device = join()
    torch._dynamo.config.cache_size_limit = 64  # five variants x per-block graphs: no silent fall-back to eager
    cfg = ModelConfig.from_depth(args.depth, vocab_size=args.vocab, max_seq_len=args.seq)
    batches = random_batches(args.warmup, args.batch, args.seq, args.vocab, device)
    rows = []
    for name in args.variants.split(","):
        try:  # one failing variant must not cost the others' numbers
            step, fpt, n_params = build(name, cfg, device, not args.no_compile)
            r = timed(step, batches, device, args.warmup, args.steps)
            tps = args.batch * args.seq / r["step_s"]
            rows.append({"variant": name, **r, "tok_s": tps, "mfu": mfu(fpt, tps, device), "params": n_params})
            # a line per variant as it finishes, in case the run is cut short before the table
            print(f"done {name}: {r['step_s']:.3f} s/step {tps:.0f} tok/s MFU {rows[-1]['mfu'] or 0:.1%} "
                  f"peak {r['peak_gib']:.1f} GiB losses {[round(x, 4) for x in r['losses']]}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported in the table
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
            print(f"FAILED {name}: {rows[-1]['error']}", flush=True)
        step = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ok_rows = [r for r in rows if "error" not in r]
    base = ok_rows[0] if ok_rows else None
    for r in ok_rows:
        r["loss_diff"] = max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
        r["ok"] = r["loss_diff"] < (0.03 if device.type == "cuda" else 1e-3)
        r["overhead"] = r["step_s"] / base["step_s"] - 1
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "depth": args.depth,
            "params": ok_rows[0]["params"] if ok_rows else None, "seq": args.seq, "batch": args.batch,
            "torch": torch.__version__}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(json.dumps(meta))
    print(f"{'variant':<20} {'s/step':>8} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9} {'vs ' + rows[0]['variant']:>9} "
          f"{'loss diff':>10} ok")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<20} {r['error']}")
            continue
        m = f"{r['mfu']:.1%}" if r["mfu"] else "-"
        print(f"{r['variant']:<20} {r['step_s']:>8.3f} {r['tok_s']:>9.0f} {m:>6} {r['peak_gib']:>9.1f} "
              f"{r['overhead']:>+9.1%} {r['loss_diff']:>10.4f} {r['ok']}")
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
