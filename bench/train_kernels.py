"""Fused training kernels (lmforge/kernels: rmsnorm, rope, swiglu, fused_ce) on one GPU, in one run:

1. kernels   each Triton kernel vs the plain reference in eager PyTorch and under torch.compile:
             forward and forward+backward ms, and GB/s of the bytes a fused kernel must move
2. memory    peak memory of the LM head + loss, forward and backward, at vocab 32k and 128k:
             h @ W^T then lm_loss (eager and compiled) vs the chunked fused linear + cross-entropy
3. mfu       the real Trainer step (as bench/train_throughput.py: bf16 autocast, torch.compile, seq 2048,
             cuDNN attention, one micro-batch) at depth 16 (304M) and 24 (834M), plain vs
             apply_fused_kernels(model) and/or the fused loss (Trainer.forward_loss replaced in this script)

Every variant is checked against its reference first and timed only if it agrees; a variant that fails
prints its error and the run goes on. A time budget (--budget) skips what would not fit. Table last;
JSON in bench/results/train_kernels.json.

    python bench/train_kernels.py                     # H200, ~3 minutes
    TRITON_INTERPRET=1 python bench/train_kernels.py --smoke    # CPU, toy sizes, checks the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from lmforge.kernels import fused_ce, rmsnorm, rope, swiglu

SIZES = {
    "gpu": dict(tokens=32768, d=2048, B=16, H=16, T=2048, hd=128, ff=5632, vocabs=(32768, 131072), reps=10,
                depths=(16, 24), seq=2048, batch=32),
    "smoke": dict(tokens=64, d=48, B=2, H=3, T=8, hd=16, ff=40, vocabs=(96, 200), reps=1, depths=(2,), seq=32,
                  batch=2),
}
T0 = time.perf_counter()


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def timeit(fn, reps: int, dev: str) -> float:
    """Median ms over reps calls after one warm-up call."""
    fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _over_budget(args) -> bool:
    return time.perf_counter() - T0 > args.budget


# 1. kernels ----------------------------------------------------------------------------------------------
def kernel_cases(s: dict, dev: str, dtype) -> list[tuple]:
    """(name, make inputs, fused fn, reference fn, bytes moved forward, bytes moved backward)."""
    e = torch.tensor([], dtype=dtype).element_size()
    N, d, qk = s["tokens"] * s["d"], s["d"], s["B"] * s["H"] * s["T"] * s["hd"]

    def norm_in():
        return [torch.randn(s["tokens"], d, device=dev, dtype=dtype, requires_grad=True),
                torch.ones(d, device=dev, requires_grad=True)]

    def rope_in():
        rot = rope_tables(s, dev)
        x = torch.randn(s["B"], s["T"], s["H"], s["hd"], device=dev, dtype=dtype).transpose(1, 2)
        return [x.requires_grad_(), *rot]

    def glu_in():
        return list(torch.randn(s["tokens"], 2 * s["ff"], device=dev, dtype=dtype, requires_grad=True).chunk(2, -1))

    M = s["tokens"] * s["ff"]
    return [("rmsnorm", norm_in, lambda x, w: rmsnorm.rms_norm(x, w, 1e-5),
             lambda x, w: rmsnorm.rms_norm_ref(x, w, 1e-5), 2 * N * e, 3 * N * e),
            ("rope (half)", rope_in, lambda x, c, sn: rope.rope(x, c, sn, "half"),
             lambda x, c, sn: rope.rope_ref(x, c, sn, "half"), 2 * qk * e, 2 * qk * e),
            ("rope (interleaved)", rope_in, lambda x, c, sn: rope.rope(x, c, sn, "interleaved"),
             lambda x, c, sn: rope.rope_ref(x, c, sn, "interleaved"), 2 * qk * e, 2 * qk * e),
            ("swiglu", glu_in, swiglu.swiglu, swiglu.swiglu_ref, 3 * M * e, 5 * M * e)]


def rope_tables(s: dict, dev: str):
    from lmforge.model.layers.rope import RotaryEmbedding

    pos = torch.arange(s["T"], device=dev).expand(s["B"], s["T"])
    return RotaryEmbedding(s["hd"], 10000.0, max_seq_len=s["T"]).to(dev).cos_sin(pos, s["T"])


def bench_kernels(s: dict, dev: str, dtype, args) -> list[dict]:
    rows = []
    for name, make, fused, ref, fwd_bytes, bwd_bytes in kernel_cases(s, dev, dtype):
        inputs = make()
        dy = torch.randn_like(ref(*inputs))
        want = ref(*inputs).float()
        variants = {"triton": fused, "eager": ref, "torch.compile": torch.compile(ref)}
        for variant, fn in variants.items():
            if _over_budget(args):
                rows.append(dict(kernel=name, variant=variant, error="skipped: time budget"))
                continue
            try:
                got = fn(*inputs).float()
                err = ((got - want).abs().max() / want.abs().max()).item()

                def fwd_bwd():
                    torch.autograd.backward(fn(*inputs), dy)

                with torch.no_grad():
                    f_ms = timeit(lambda: fn(*inputs), s["reps"], dev)
                fb_ms = timeit(fwd_bwd, s["reps"], dev)
                rows.append(dict(kernel=name, variant=variant, fwd_ms=f_ms, fwd_GBps=fwd_bytes / f_ms / 1e6,
                                 fwd_bwd_ms=fb_ms, fwd_bwd_GBps=(fwd_bytes + bwd_bytes) / fb_ms / 1e6,
                                 max_rel_err=err))
            except Exception as ex:  # noqa: BLE001 - one variant failing must not stop the run
                rows.append(dict(kernel=name, variant=variant, error=f"{type(ex).__name__}: {str(ex).splitlines()[0][:120]}"))
            print(rows[-1], flush=True)
    return rows


# 2. LM head + loss memory --------------------------------------------------------------------------------
def bench_memory(s: dict, dev: str, dtype, args) -> list[dict]:
    rows = []
    for V in s["vocabs"]:
        h0 = torch.randn(s["tokens"], s["d"], device=dev)
        w = (torch.randn(V, s["d"], device=dev) / s["d"] ** 0.5).requires_grad_()
        y = torch.randint(0, V, (s["tokens"],), device=dev)
        plain = lambda h: fused_ce.linear_cross_entropy_ref(h, w, y, 1e-4)  # noqa: E731
        variants = {"fused (chunked)": lambda h: fused_ce.fused_linear_cross_entropy(h, w, y, 1e-4),
                    "eager h@W^T + lm_loss": plain, "torch.compile(h@W^T + lm_loss)": torch.compile(plain)}
        want = None
        for variant, fn in variants.items():
            if _over_budget(args):
                rows.append(dict(vocab=V, variant=variant, error="skipped: time budget"))
                continue
            try:
                h = h0.clone().requires_grad_()

                def step():
                    w.grad = h.grad = None
                    with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                        loss = fn(h)[0]
                    loss.backward()
                    return loss

                loss = step()
                want = loss.item() if want is None else want
                ms = timeit(step, max(1, s["reps"] // 2), dev)
                if dev == "cuda":
                    w.grad = h.grad = None
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    step()
                    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                else:
                    peak = float("nan")
                rows.append(dict(vocab=V, tokens=s["tokens"], d=s["d"], variant=variant, loss=loss.item(),
                                 loss_diff=abs(loss.item() - want), fwd_bwd_ms=ms, peak_extra_GiB=peak))
            except Exception as ex:  # noqa: BLE001
                rows.append(dict(vocab=V, variant=variant, error=f"{type(ex).__name__}: {str(ex).splitlines()[0][:120]}"))
            print(rows[-1], flush=True)
            w.grad = None
            if dev == "cuda":
                torch.cuda.empty_cache()
    return rows


# 3. training-step MFU ------------------------------------------------------------------------------------
def bench_mfu(s: dict, dev: str, args) -> list[dict]:
    import numpy as np

    from lmforge.data.shards import write_tokens

    shard = write_tokens(Path(tempfile.mkdtemp()) / "rand.bin", np.random.default_rng(0).integers(0, 50304, 2_000_000),
                         vocab_size=50304, tokenizer="byte")
    rows = []
    for depth in s["depths"]:
        for variant in args.mfu_variants.split(","):
            if _over_budget(args):
                rows.append(dict(depth=depth, variant=variant, error="skipped: time budget"))
                continue
            try:
                rows.append(dict(depth=depth, variant=variant, **mfu_one(depth, variant, shard, s, dev, args)))
            except Exception as ex:  # noqa: BLE001
                rows.append(dict(depth=depth, variant=variant, error=f"{type(ex).__name__}: {str(ex).splitlines()[0][:120]}"))
            print(rows[-1], flush=True)
            if dev == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    return rows


def mfu_one(depth: int, variant: str, shard: Path, s: dict, dev: str, args) -> dict:
    """variant: 'plain', 'kernels' (apply_fused_kernels), 'loss' (fused loss), 'kernels+loss'."""
    from lmforge.kernels.training import apply_fused_kernels
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.optim.config import OptimConfig
    from lmforge.train.config import DataConfig, TrainConfig
    from lmforge.train.trainer import Trainer

    mcfg = ModelConfig.from_depth(depth, vocab_size=50304, max_seq_len=s["seq"])
    batch = s["batch"] if depth < 20 else s["batch"] // 2  # bench/train_throughput.py --batch-large
    cfg = TrainConfig(model=mcfg, data=DataConfig(train=(str(shard),), seq_len=s["seq"], batch_size=batch,
                                                  val_fraction=0.01),
                      optim=OptimConfig(name="adamw", lr=3e-4, warmup_steps=0), run_dir=tempfile.mkdtemp(),
                      max_steps=10_000, device=dev, compile=dev == "cuda", progress=False,
                      sdpa_backend="cudnn" if dev == "cuda" else "auto", plot=False, resume=False, eval_batches=1)
    model = Transformer(mcfg)
    if "kernels" in variant:
        model = model.to(dev)
        apply_fused_kernels(model)
    tr = Trainer(cfg, model=model)
    if "loss" in variant:  # the objective through the fused head; the trunk compiled as the trainer would
        trunk = lambda x: tr.model.final_norm(tr.model.hidden(x)[0])  # noqa: E731
        trunk = torch.compile(trunk) if cfg.compile else trunk

        def forward_loss(x, y):
            loss, ce = fused_ce.fused_linear_cross_entropy(trunk(x), tr.model.lm_head.weight, y, mcfg.z_loss)
            return loss, ce

        tr.forward_loss = forward_loss
    for _ in range(args.warmup):
        tr.train_step()
    _sync(dev)
    times = []
    for _ in range(args.blocks):
        t = time.perf_counter()
        for _ in range(args.steps):
            tr.train_step()
        _sync(dev)
        times.append((time.perf_counter() - t) / args.steps)
    step_s = statistics.median(times)
    tps = cfg.tokens_per_step / step_s
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    return dict(params_M=tr.model.num_params() / 1e6, tokens_per_step=cfg.tokens_per_step, step_ms=step_s * 1e3,
                tok_per_s=tps, mfu=tps * tr.flops_per_token / tr.peak if tr.peak else float("nan"), peak_mem_GiB=mem)


def _table(title: str, rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:,.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"\n## {title}", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--sections", default="kernels,memory,mfu")
    ap.add_argument("--mfu-variants", default="plain,kernels+loss,loss")
    ap.add_argument("--depths", default=None, help="comma list (default 16,24)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--budget", type=float, default=170.0, help="seconds; later variants are skipped past it")
    ap.add_argument("--out", default="bench/results/train_kernels.json")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    s = dict(SIZES["smoke" if args.smoke else "gpu"])
    if args.depths:
        s["depths"] = tuple(int(d) for d in args.depths.split(","))
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    hw = torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)"
    result = dict(date=datetime.now(timezone.utc).isoformat(timespec="minutes"), hardware=hw, torch=torch.__version__,
                  dtype=str(dtype), sizes=s)
    sections = {"kernels": ("Fused kernels vs eager / torch.compile (fwd, fwd+bwd)", lambda: bench_kernels(s, dev, dtype, args)),
                "memory": ("LM head + loss, forward+backward: peak memory beyond inputs", lambda: bench_memory(s, dev, dtype, args)),
                "mfu": ("Trainer step MFU (bf16, compile, cuDNN attention, seq 2048)", lambda: bench_mfu(s, dev, args))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for key in args.sections.split(","):
        title, fn = sections[key]
        try:
            result[key] = fn()
        except Exception as ex:  # noqa: BLE001
            print(f"section {key} failed: {type(ex).__name__}: {ex}", file=sys.stderr)
            result[key] = [dict(error=f"{type(ex).__name__}: {str(ex)[:200]}")]
        out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\n# {hw}, {dtype}, torch {torch.__version__}, {result['date']}, {time.perf_counter() - T0:.0f} s")
    for key in args.sections.split(","):
        print(_table(sections[key][0], result[key]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
