"""Attention kernels (issue 14 §1): lmforge's Triton FlashAttention-2 against torch SDPA's flash and cuDNN
backends, forward and forward+backward, causal, in one run on one GPU.

    python bench/attention.py            # H100/H200: bf16, seq 1k-16k, head dims 64 and 128
    python bench/attention.py --smoke    # CPU, Triton interpreter, toy sizes: checks the script
    python bench/attention.py --packed   # packed SFT rows: document mask (SDPA) vs varlen (Triton)

Shapes follow the FlashAttention papers: batch · seq = 16k tokens and heads · head_dim = 2048, so every
point fills the GPU. Each variant's output and q/k/v gradients are first compared with SDPA's (the math
path on CPU): max |error| relative to the reference's largest value, "ok" below 2e-2 (bf16). FLOPs count
the matmuls only: forward 4·B·H·N²·hd, halved for causal; backward 2.5× forward (5 matmuls to the
forward's 2; the Triton backward actually does 7, see the kernel module). Timing: triton.testing.do_bench
(median). Prints a table last and writes JSON (bench/results/attention.json, or $OUT/attention.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if "--smoke" in sys.argv:  # read when lmforge.kernels defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lmforge.kernels import flash_attention as fa  # noqa: E402


def sdpa_variant(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def run(q, k, v):
        with sdpa_kernel(which):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return run


def triton_variant(dq_mode: str, tma: bool | None = None):
    def run(q, k, v):
        return fa.flash_attention(q, k, v, causal=True, dq_mode=dq_mode, tma=tma)
    return run


def bench_ms(fn, dev, grad_to_none=None) -> float:
    """Median milliseconds of fn (do_bench's default is the mean); grad_to_none: tensors whose .grad is reset
    before each call, so a forward+backward does not time accumulating into the previous call's gradients."""
    if dev.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")
    fn()  # CPU smoke: one warm run, one timed
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def errors(run, q, k, v, do, ref) -> tuple[float, float]:
    """(output error, worst gradient error), each max |x - ref| / max |ref|."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = run(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), do)
    rel = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item() for a, b in zip((out, *grads), ref)]
    return rel[0], max(rel[1:])


def reference(q, k, v, do, dev):
    run = sdpa_variant("flash" if dev.type == "cuda" else "math")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = run(q, k, v)
    return (out.detach(), *torch.autograd.grad(out, (q, k, v), do))


def measure(rows, name, run, B, H, N, hd, dev, dtype):
    row = dict(variant=name, hd=hd, seq=N, batch=B, heads=H)
    q = k = v = do = ref = None
    try:
        if run is None:
            raise KeyError(f"unknown variant {name!r}")
        g = torch.Generator(device=dev).manual_seed(N + hd)
        q, k, v, do = (torch.randn(B, H, N, hd, device=dev, dtype=dtype, generator=g) for _ in range(4))
        ref = reference(q, k, v, do, dev)
        row["err_out"], row["err_grad"] = errors(run, q, k, v, do, ref)
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        fwd_flops = 4 * B * H * N * N * hd / 2
        row["fwd_ms"] = bench_ms(lambda: run(q, k, v), dev)
        row["fwdbwd_ms"] = bench_ms(lambda: run(q, k, v).backward(do), dev, grad_to_none=[q, k, v])
        row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
        row["fwdbwd_tflops"] = 3.5 * fwd_flops / row["fwdbwd_ms"] / 1e9
        row["ok"] = row["err_out"] < 2e-2 and row["err_grad"] < 2e-2
        if name.startswith("triton"):
            row["configs"] = {kind: str(getattr(fa._kernel(kind, q), "best_config", "")) for kind in ("fwd", "kv", "q")}
    except Exception as e:  # one backend missing (cuDNN on CPU, an old GPU) must not end the run
        row["note"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
    rows.append(row)
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    del q, k, v, do, ref
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def table(rows) -> str:
    """Rows by head dim, then sequence length (in measuring order within a shape)."""
    base = {(r["hd"], r["seq"]): r for r in rows if r["variant"] == "sdpa-flash" and "fwd_tflops" in r}
    rows = sorted(rows, key=lambda r: (r["hd"], r["seq"]))
    lines = ["| variant | hd | seq | batch×heads | fwd TFLOP/s | ×flash | fwd+bwd TFLOP/s | ×flash | err out / grad |"]
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        b = base.get((r["hd"], r["seq"]))
        if "fwd_tflops" not in r:
            lines.append(f"| {r['variant']} | {r['hd']} | {r['seq']} | {r['batch']}×{r['heads']} | - | - | - | - | "
                         f"{r.get('note', '')} |")
            continue
        x1 = f"{r['fwd_tflops'] / b['fwd_tflops']:.2f}" if b else "-"
        x2 = f"{r['fwdbwd_tflops'] / b['fwdbwd_tflops']:.2f}" if b else "-"
        shape = f"| {r['variant']} | {r['hd']} | {r['seq']} | {r['batch']}×{r['heads']} |"
        lines.append(f"{shape} {r['fwd_tflops']:.4g} | {x1} | {r['fwdbwd_tflops']:.4g} | {x2} |"
                     f" {r['err_out']:.1e} / {r['err_grad']:.1e}"
                     f"{'' if r['ok'] else ' FAIL'} |")
    return "\n".join(lines)


def precompile(names, head_dims, seq):
    """Compile every Triton candidate in parallel processes, one per variant and head dim: the autotuner
    compiles serially, and Triton's disk cache hands the binaries to this process."""
    t = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--warm-only", "--variants", name, "--head-dims", str(hd),
                               "--seqs", str(seq)]) for name in names if name.startswith("triton") for hd in head_dims]
    print(f"precompiled in {len(procs)} processes: exit codes {[p.wait() for p in procs]}, {time.time() - t:.0f} s",
          flush=True)


# packed SFT rows ----------------------------------------------------------------------------------------
# Examples packed back to back into rows (lmforge.align.data), each a document of AttnMetadata.doc_ids:
# attn_impl="sdpa" gives SDPA the (B, 1, T, T) document mask (no fused causal kernel, T² mask reads),
# attn_impl="triton" runs the FlashAttention-2 kernel on cu_seqlens (tiles across documents skipped).
def failure(e: Exception) -> str:
    """A row's note when its variant failed (one missing backend must not end a run)."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"


def show(row: dict) -> None:
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def packed_doc_ids(B: int, N: int, mean_len: int, dev) -> torch.Tensor:
    """(B, N) document ids: log-normal example lengths (median mean_len, 16..N tokens) packed row by row."""
    g = torch.Generator().manual_seed(N)
    rows = []
    for _ in range(B):
        ids, doc = [], 0
        while len(ids) < N:
            n = int(torch.empty(1).log_normal_(0.0, 0.8, generator=g).item() * mean_len)
            ids += [doc] * min(max(n, 16), N - len(ids))
            doc += 1
        rows.append(ids)
    return torch.tensor(rows, device=dev)


def packed_model(impl: str, smoke: bool, N: int, dev, dtype):
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    size = dict(d_model=128, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=256) if smoke else \
        dict(d_model=2048, n_layers=8, n_heads=16, n_kv_heads=4, vocab_size=32000)  # hd 128, GQA 4:1
    torch.manual_seed(0)
    return Transformer(ModelConfig(**size, max_seq_len=N, attn_impl=impl)).to(dev, dtype)


def measure_packed(rows, N: int, B: int, mean_len: int, smoke: bool, dev, dtype):
    """One row per variant: attention alone (one layer's q, k, v) and the model's fwd+bwd step."""
    from lmforge.model.layers.attention import attention
    from lmforge.model.meta import AttnMetadata, packed_positions

    doc = packed_doc_ids(B, N, mean_len, dev)
    meta = AttnMetadata.packed(doc)
    docs = int(meta.documents()[0].numel() - 1)
    H, KV, hd = (2, 1, 64) if smoke else (16, 4, 128)
    g = torch.Generator(device=dev).manual_seed(N)
    q, do = (torch.randn(B, H, N, hd, device=dev, dtype=dtype, generator=g) for _ in range(2))
    k, v = (torch.randn(B, KV, N, hd, device=dev, dtype=dtype, generator=g) for _ in range(2))
    attn = {"mask-sdpa": lambda q, k, v: attention(q, k, v, AttnMetadata.packed(doc).doc_mask(), scale=hd ** -0.5),
            "varlen-triton": lambda q, k, v: fa.flash_attention(q, k, v, cu_seqlens=AttnMetadata.packed(doc)
                                                                .documents()[0])}
    ref = None
    for name, run in attn.items():
        row = dict(level="attention", variant=name, seq=N, batch=B, docs=docs)
        try:
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            out = run(qq, kk, vv)
            ref = out.detach().float() if ref is None else ref
            row["err_out"] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
            row["fwdbwd_ms"] = bench_ms(lambda: run(qq, kk, vv).backward(do), dev, grad_to_none=[qq, kk, vv])
        except Exception as e:  # noqa: BLE001 - one variant failing must not end the run
            row["note"] = failure(e)
        rows.append(row)
    ids = torch.randint(0, 256, (B, N), device=dev)
    pos = packed_positions(doc)
    for impl, name in (("sdpa", "mask-sdpa"), ("triton", "varlen-triton")):
        row = dict(level="model", variant=name, seq=N, batch=B, docs=docs)
        try:
            model = packed_model(impl, smoke, N, dev, dtype)

            def step():  # a new AttnMetadata per step, as the SFT data source builds one per batch
                logits = model(ids, positions=pos, meta=AttnMetadata.packed(doc))
                F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()
            row["fwdbwd_ms"] = bench_ms(step, dev, grad_to_none=list(model.parameters()))
        except Exception as e:  # noqa: BLE001
            row["note"] = failure(e)
        rows.append(row)
    for r in rows[-4:]:
        if "fwdbwd_ms" in r:
            r["tokens_per_s"] = B * N / r["fwdbwd_ms"] * 1e3
        show(r)
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def packed_table(rows) -> str:
    base = {(r["level"], r["seq"]): r for r in rows if r["variant"] == "mask-sdpa" and "fwdbwd_ms" in r}
    lines = ["| level | variant | seq | rows | documents | fwd+bwd ms | tokens/s | ×mask | err out |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        head = f"| {r['level']} | {r['variant']} | {r['seq']} | {r['batch']} | {r['docs']} |"
        if "fwdbwd_ms" not in r:
            lines.append(f"{head} - | - | - | {r.get('note', '')} |")
            continue
        b = base.get((r["level"], r["seq"]))
        x = f"{b['fwdbwd_ms'] / r['fwdbwd_ms']:.2f}" if b else "-"
        err = f"{r['err_out']:.1e}" if "err_out" in r else "-"
        lines.append(f"{head} {r['fwdbwd_ms']:.4g} | {r['tokens_per_s']:.4g} | {x} | {err} |")
    return "\n".join(lines)


def main_packed(args, dev, dtype, meta, start) -> None:
    seqs = [96] if args.smoke else [int(s) for s in args.seqs.split(",")]
    tokens = 192 if args.smoke else args.tokens
    name = "attention_packed_smoke.json" if args.smoke else "attention_packed.json"
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results") / name
    rows = []
    try:
        for N in seqs:
            if time.time() - start > args.max_seconds:
                print(f"time budget spent: skipping seq={N}", flush=True)
                continue
            measure_packed(rows, N, max(tokens // N, 1), 24 if args.smoke else args.mean_doc, args.smoke, dev, dtype)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    finally:
        print(f"\n{time.time() - start:.0f} s; {out}\n")
        print(packed_table(rows), flush=True)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, toy sizes")
    ap.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--tokens", type=int, default=16384, help="batch · seq")
    ap.add_argument("--width", type=int, default=2048, help="heads · head dim")
    ap.add_argument("--variants", default="triton,sdpa-flash,sdpa-cudnn",
                    help="comma list of: triton (the defaults: dQ by its own kernel, TMA per TMA_DEFAULT), "
                         "triton-atomic (dQ by atomic adds), triton-tma / triton-ptr (TMA or pointer tile loads), "
                         "sdpa-flash, sdpa-cudnn")
    ap.add_argument("--late-variants", default="", help="variants measured after the rest, at the longest seq only")
    ap.add_argument("--max-seconds", type=float, default=270,
                    help="start no new shape after this many seconds from the start (compilation included)")
    ap.add_argument("--precompile", action="store_true", help="compile the Triton candidates in parallel first")
    ap.add_argument("--packed", action="store_true",
                    help="packed SFT rows instead: document mask (SDPA) vs varlen (Triton), attention and model")
    ap.add_argument("--mean-doc", type=int, default=400, help="--packed: median example length in tokens")
    ap.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    start, args = time.time(), parse(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # an outer `timeout`: still print the table
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    seqs = [96] if args.smoke else [int(s) for s in args.seqs.split(",")]
    tokens, width = (256, 128) if args.smoke else (args.tokens, args.width)
    variants = {"triton": triton_variant("kernel"), "triton-atomic": triton_variant("atomic"),
                "triton-tma": triton_variant("kernel", tma=True), "triton-ptr": triton_variant("kernel", tma=False),
                "sdpa-flash": sdpa_variant("flash"), "sdpa-cudnn": sdpa_variant("cudnn")}
    head_dims, names = [int(h) for h in args.head_dims.split(",")], args.variants.split(",")
    late = [n for n in args.late_variants.split(",") if n]
    if args.warm_only:  # a --precompile worker: one forward and backward per variant compiles its candidates
        for hd in head_dims:
            for name in names:
                q, k, v = (torch.randn(2, width // hd, seqs[0], hd, device=dev, dtype=dtype, requires_grad=True)
                           for _ in range(3))
                variants[name](q, k, v).sum().backward()
        return
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": getattr(fa.triton, "__version__", None),
            "command": "python bench/attention.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}", flush=True)
    if args.packed:
        return main_packed(args, dev, dtype, meta, start)
    if args.precompile and dev.type == "cuda":
        precompile(names + late, head_dims, seqs[0])
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results") / ("attention_smoke.json" if args.smoke
                                                                               else "attention.json")
    # sequences in the order given (a time-budget cut loses the last), then the late variants
    plan = [(N, hd, names) for N in seqs for hd in head_dims] + [(max(seqs), hd, late) for hd in head_dims if late]
    rows = []
    try:
        for N, hd, which in plan:
            if time.time() - start > args.max_seconds:
                print(f"time budget spent: skipping hd={hd} seq={N} {which}", flush=True)
                continue
            for name in which:
                measure(rows, name, variants.get(name), max(tokens // N, 1), width // hd, N, hd, dev, dtype)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    finally:  # the table even when a run is cut short
        print(f"\n{time.time() - start:.0f} s; {out}\n")
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
