"""Paged decode attention (lmforge/kernels/paged_attention.py) against its plain reference and against
torch SDPA over a contiguous cache, at serving batch sizes, in one run on one GPU.

    python bench/paged_attention.py                  # H200: batch 32-256, context 512-4096
    TRITON_INTERPRET=1 python bench/paged_attention.py --smoke   # toy sizes on CPU: checks the script

One decode query per row, every row at the full context, blocks of 16 handed out in shuffled order;
Qwen3-0.6B's attention shape (16 query heads, 8 kv heads, head dim 128), bf16. Reports rows/s (decode
tokens per second for one layer) and GB/s of K and V read (B · context · kv heads · head dim · 2 tensors ·
2 bytes, what any exact kernel must read), with the device copy bandwidth for scale, and the same kernel
over a head-major pool (each kv head's keys of a block contiguous; the engine's pool is slot-major). Every kernel
configuration's output is compared with the plain reference's first (on the rows the reference covers: it loops over
rows in Python) and timed only if it agrees (max |x - ref| / max |ref| <= 1e-4 fp32, 3e-2 bf16: bench.common); the
best configuration is the fastest that agrees. --smoke on a CPU runs the kernel in Triton's interpreter.
Prints a table and writes JSON ($OUT/paged_attention.json, else bench/results/); exits non-zero if no shape ran.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if "--smoke" in sys.argv and not torch.cuda.is_available():  # read when lmforge.kernels defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import TOLERANCE, rel_err  # noqa: E402
from lmforge.kernels.paged_attention import (  # noqa: E402
    default_config, paged_decode_attention, paged_decode_attention_ref)


def timed(fn, dev: torch.device, reps: int) -> float:
    """Median seconds per call (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(dev: torch.device) -> float:
    n = 1 << 28 if dev.type == "cuda" else 1 << 20
    a, b = torch.empty(n, device=dev), torch.empty(n, device=dev)
    return 2 * 4 * n / timed(lambda: b.copy_(a), dev, 10)


SWEEP = [(s, b, w) for s in (1, 2, 4, 8, 16) for b in (32, 64, 128) for w in (4, 8)] + \
        [(s, b, w, 0, st) for s in (1, 2) for b in (32, 64) for w in (4, 8) for st in (2, 3, 4)]
"""--sweep: every (slices, keys per tile, warps) here, not only the default's neighbours"""


def one_shape(B: int, ctx: int, H: int, KV: int, hd: int, bs: int, dev, dtype, reps: int, ref_limit: int,
              smoke: bool = False, sweep: bool = False) -> dict:
    g = torch.Generator(device=dev).manual_seed(B * ctx)
    nb = ctx // bs
    k_cache = torch.randn(B * nb, bs, KV, hd, device=dev, dtype=dtype, generator=g)
    v_cache = torch.randn(B * nb, bs, KV, hd, device=dev, dtype=dtype, generator=g)
    tables = torch.randperm(B * nb, device=dev, generator=g).to(torch.int32).view(B, nb)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(B, H, hd, device=dev, dtype=dtype, generator=g)
    scale = hd ** -0.5
    kv_bytes = 2 * B * ctx * KV * hd * k_cache.element_size()
    row = dict(batch=B, context=ctx, kv_GB=kv_bytes / 1e9)
    # the plain reference on the first rows it can afford (rows are independent): every configuration's output is
    # compared with it before that configuration is timed
    n_ref = max(1, min(B, ref_limit // ctx))
    want = paged_decode_attention_ref(q[:n_ref], k_cache, v_cache, tables[:n_ref], lens[:n_ref], scale=scale)
    tol = TOLERANCE[dtype]
    default = tuple(default_config(B, KV, ctx, dev, hd))
    run = lambda cfg=None: paged_decode_attention(q, k_cache, v_cache, tables, lens, scale=scale, config=cfg)  # noqa: E731
    out = run()
    errs = {default: rel_err(out[:n_ref], want)}
    row.update(checked_rows=n_ref, default_err=errs[default])
    if not errs[default] <= tol:
        raise RuntimeError(f"the kernel's default config {default} disagrees with the reference: max error "
                             f"{errs[default]:.2g} of the largest value > {tol:g}")
    t = timed(run, dev, reps)
    row.update(kernel_s=t, kernel_rows_s=B / t, kernel_GBs=kv_bytes / t / 1e9)
    splits, block, warps = default[:3]
    tried = {default: t}
    if not smoke:  # a few neighbours of the default configuration: is it the best?
        near = {(splits, 32, 8), (splits * 2, block, warps), (max(1, splits // 2), block, warps)}
        for cfg in (set(SWEEP) if sweep else near) - set(tried):
            errs[cfg] = rel_err(run(cfg)[:n_ref], want)
            if errs[cfg] <= tol:  # a config that gives wrong answers is not timed, nor a candidate for best
                tried[cfg] = timed(lambda: run(cfg), dev, reps)
    best = min(tried, key=tried.get)
    row.update(default_config=list(default), best_config=list(best), best_s=tried[best],
               best_GBs=kv_bytes / tried[best] / 1e9,
               tried_GBs={"/".join(map(str, c)): round(kv_bytes / t / 1e9) for c, t in sorted(tried.items())},
               failed_configs={"/".join(map(str, c)): e for c, e in sorted(errs.items()) if not e <= tol})
    # the same kernel on a head-major pool: (blocks, KV, block_size, hd) memory seen through a
    # (blocks, block_size, KV, hd) view (the kernel takes strides), so one kv head's keys of a block are one
    # contiguous 16 x hd run instead of block_size rows KV x hd apart: is the engine's slot-major layout
    # what holds the kernel below SDPA over a contiguous cache?
    kh = k_cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    vh = v_cache.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    head_major = lambda: paged_decode_attention(q, kh, vh, tables, lens, scale=scale)  # noqa: E731
    got = head_major()
    row["head_major_max_diff"] = float((got.float() - out.float()).abs().max())
    if rel_err(got[:n_ref], want) <= tol:
        t = timed(head_major, dev, reps)
        row.update(head_major_s=t, head_major_GBs=kv_bytes / t / 1e9)
    else:
        row["head_major_note"] = f"FAIL: max error {rel_err(got[:n_ref], want):.2g} of the largest value; not timed"
    del kh, vh, got
    if n_ref == B:  # the reference covered every row
        row["max_err"] = float((out.float() - want.float()).abs().max())
        t = timed(lambda: paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale=scale), dev, max(2, reps // 5))
        row.update(ref_s=t, ref_rows_s=B / t)
    # SDPA over the same keys laid out contiguously: (B, KV, ctx, hd), its best case (no gather)
    kc = k_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    vc = v_cache[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
    sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], kc, vc, scale=scale, enable_gqa=True)  # noqa: E731
    try:
        t = timed(sdpa, dev, reps)
        row.update(sdpa_s=t, sdpa_rows_s=B / t, sdpa_GBs=kv_bytes / t / 1e9)
        if "max_err" not in row:
            row["max_err_vs_sdpa"] = float((out.float() - sdpa()[:, :, 0].float()).abs().max())
    except RuntimeError as e:
        row["sdpa_note"] = f"{type(e).__name__}: {str(e)[:80]}"
    del k_cache, v_cache, kc, vc
    return row


def shape_args(doc: str, batches: str, contexts: str, argv: list[str] | None) -> argparse.Namespace:
    """The options of a decode-attention bench: --smoke, --batches, --contexts, --reps, --sweep."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes (CPU, Triton interpreter)")
    ap.add_argument("--batches", default=batches)
    ap.add_argument("--contexts", default=contexts)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="time every configuration of SWEEP at every shape")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = shape_args(__doc__, "32,64,128,256", "512,1024,2048,4096", argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        batches, contexts, H, KV, hd, dtype, reps = [2, 3], [32, 48], 4, 2, 16, torch.float32, 2
    else:
        batches, contexts = [int(b) for b in args.batches.split(",")], [int(c) for c in args.contexts.split(",")]
        H, KV, hd, dtype, reps = 16, 8, 128, torch.bfloat16, args.reps
    bw = copy_bandwidth(dev)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__,
                command="python bench/paged_attention.py " + " ".join(argv or sys.argv[1:]),
                heads=H, kv_heads=KV, head_dim=hd, block_size=16, dtype=str(dtype), copy_bandwidth_GBs=bw / 1e9)
    print(f"{meta['device']}: copy {bw / 1e9:.0f} GB/s; H={H} KV={KV} hd={hd} {dtype}", flush=True)
    rows = []
    path = Path(os.environ.get("OUT") or Path(__file__).parent / "results") / "paged_attention.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    for B in batches:
        for ctx in contexts:
            try:
                rows.append(one_shape(B, ctx, H, KV, hd, 16, dev, dtype, reps, ref_limit=64 * 4096, smoke=args.smoke,
                                     sweep=args.sweep))
            except Exception as e:  # noqa: BLE001  (report, keep the other shapes)
                failed += 1
                print(f"  batch={B}, context={ctx}: FAILED {type(e).__name__}: "
                      f"{(str(e).splitlines() or [''])[0][:200]}", flush=True)
                continue
            print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
                  flush=True)
            path.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    nan = float("nan")
    lines = ["| batch | context | KV GB | kernel rows/s | kernel GB/s | % copy BW | best config: GB/s | SDPA (contiguous) "
             "rows/s | SDPA GB/s | SDPA time / kernel time | head-major pool GB/s | reference rows/s | max err |",
             "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['context']} | {r['kv_GB']:.3f} | {r['kernel_rows_s']:,.0f} | "
                     f"{r['kernel_GBs']:,.0f} | {r['kernel_GBs'] * 1e9 / bw:.0%} | {tuple(r['best_config'])}: "
                     f"{r['best_GBs']:,.0f} | {r.get('sdpa_rows_s', nan):,.0f} | "
                     f"{r.get('sdpa_GBs', nan):,.0f} | {r.get('sdpa_s', nan) / r['kernel_s']:.2f}x | "
                     f"{r.get('head_major_GBs', nan):,.0f} | {r.get('ref_rows_s', nan):,.0f} | "
                     f"{r.get('max_err', r.get('max_err_vs_sdpa', nan)):.2e} |")
    print("\n" + "\n".join(lines) + f"\n\nJSON: {path}")
    if not rows:
        raise SystemExit(f"every shape failed ({failed}): see the errors above"
                         + ("; on a CPU the kernel needs TRITON_INTERPRET=1" if dev.type == "cpu" else ""))


if __name__ == "__main__":
    main()
