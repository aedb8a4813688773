"""Fused training kernels (lmforge/kernels: rmsnorm, rope, swiglu, fused_ce) on one GPU, in one run:

1. kernels   each Triton kernel vs the plain reference in eager PyTorch and under torch.compile:
             forward and forward+backward ms, and GB/s of the bytes a fused kernel must move
2. memory    peak memory of the LM head + loss, forward and backward, at vocab 32k and 128k:
             h @ W^T then lm_loss (eager and compiled) vs the chunked fused linear + cross-entropy
3. mfu       the real Trainer step (as bench/train_throughput.py: bf16 autocast, torch.compile, seq 2048,
             cuDNN attention, one micro-batch) at depth 16 (304M) and 24 (834M), plain vs
             apply_fused_kernels(model) and/or the fused loss (kernels.fused_ce.FusedLMObjective); a variant
             may add Inductor's coordinate-descent tuning (+cdt: TrainConfig.compile_tune); each row
             reports its first step's seconds (the compile) and Dynamo's graphs and graph breaks; --profile
             prints the first variant's kernel table

Checks (column `check`: ok, or FAIL naming what disagreed): a kernel variant's forward output and its inputs'
gradients, and a loss variant's loss and its gradients (h and W), are compared with the eager reference's first
(max |x - ref| / max |ref| <= 1e-4 in fp32, 3e-2 in bf16: bench.common.TOLERANCE) and timed only if they agree;
an mfu variant's first-step loss (same seed, same weights and batch) is compared with the first variant's of its
depth (relative difference <= 1e-4 fp32, 1e-2 under bf16 autocast; the step is timed either way, since the loss
comes from the timed run). A variant that raises prints its error and the run goes on. A time budget (--budget)
skips what would not fit. Table last; JSON in bench/results/train_kernels.json.

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TOLERANCE, parse_sections, rel_err, verdict  # noqa: E402
from lmforge.kernels import fused_ce, rmsnorm, rope, swiglu  # noqa: E402

SIZES = {
    "gpu": dict(tokens=32768, d=2048, B=16, H=16, T=2048, hd=128, ff=5632, vocabs=(32768, 131072), reps=10,
                depths=(16, 24), seq=2048, batch=32),
    "smoke": dict(tokens=64, d=48, B=2, H=3, T=8, hd=16, ff=40, vocabs=(96, 200), reps=1, depths=(2,), seq=32,
                  batch=2),
}
SECTIONS = ("kernels", "memory", "mfu")
LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
"""relative difference of a first-step loss from the reference variant's (bf16: different kernels round
differently, ~1e-3 at init)"""
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
    """Every variant's output and input gradients against the eager reference's, then (if they agree) its forward
    and forward+backward times."""
    rows = []
    for name, make, fused, ref, fwd_bytes, bwd_bytes in kernel_cases(s, dev, dtype):
        inputs = make()
        wrt = [x for x in inputs if x.requires_grad]
        want = ref(*inputs)
        dy = torch.randn_like(want)
        want_grads = torch.autograd.grad(want, wrt, dy)

        def measure(fn):
            got = fn(*inputs)
            grads = torch.autograd.grad(got, wrt, dy)
            errs = dict(max_rel_err=rel_err(got, want), grad_rel_err=max(map(rel_err, grads, want_grads)))
            check = verdict(dict(forward=errs["max_rel_err"], gradient=errs["grad_rel_err"]), TOLERANCE[dtype])
            if check != "ok":
                return dict(errs, check=check)  # a wrong kernel's speed means nothing: not timed
            with torch.no_grad():
                f_ms = timeit(lambda: fn(*inputs), s["reps"], dev)
            fb_ms = timeit(lambda: torch.autograd.backward(fn(*inputs), dy), s["reps"], dev)
            return dict(fwd_ms=f_ms, fwd_GBps=fwd_bytes / f_ms / 1e6, fwd_bwd_ms=fb_ms,
                        fwd_bwd_GBps=(fwd_bytes + bwd_bytes) / fb_ms / 1e6, **errs, check=check)

        for variant, fn in {"triton": fused, "eager": ref, "torch.compile": torch.compile(ref)}.items():
            rows.append(guarded(dict(kernel=name, variant=variant), args, lambda: measure(fn)))
    return rows


# 2. LM head + loss memory --------------------------------------------------------------------------------
def bench_memory(s: dict, dev: str, dtype, args) -> list[dict]:
    """Each variant's loss and gradients (h, W) against the eager h @ W^T + lm_loss, then (if they agree) its
    forward+backward time and peak memory."""
    rows = []
    for V in s["vocabs"]:
        h0 = torch.randn(s["tokens"], s["d"], device=dev)
        w = (torch.randn(V, s["d"], device=dev) / s["d"] ** 0.5).requires_grad_()
        y = torch.randint(0, V, (s["tokens"],), device=dev)
        plain = lambda h: fused_ce.linear_cross_entropy_ref(h, w, y, 1e-4)  # noqa: E731
        variants = {"fused (chunked)": lambda h: fused_ce.fused_linear_cross_entropy(h, w, y, 1e-4),
                    "eager h@W^T + lm_loss": plain, "torch.compile(h@W^T + lm_loss)": torch.compile(plain)}

        def step(fn, h) -> float:
            w.grad = h.grad = None
            with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                loss = fn(h)[0]
            loss.backward()
            return loss.item()

        h_ref = h0.clone().requires_grad_()
        want = (step(plain, h_ref), h_ref.grad.clone(), w.grad.clone())
        del h_ref

        def measure(fn):
            h = h0.clone().requires_grad_()
            loss = step(fn, h)
            errs = dict(loss=loss, loss_diff=abs(loss - want[0]),
                        grad_rel_err=max(rel_err(h.grad, want[1]), rel_err(w.grad, want[2])))
            check = verdict(dict(loss=errs["loss_diff"] / abs(want[0]), gradient=errs["grad_rel_err"]),
                            TOLERANCE[dtype])
            if check != "ok":
                return dict(tokens=s["tokens"], d=s["d"], **errs, check=check)  # not timed
            ms = timeit(lambda: step(fn, h), max(1, s["reps"] // 2), dev)
            peak = float("nan")
            w.grad = h.grad = None
            if dev == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            step(fn, h)
            if dev == "cuda":
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            return dict(tokens=s["tokens"], d=s["d"], **errs, fwd_bwd_ms=ms, peak_extra_GiB=peak, check=check)

        for variant, fn in variants.items():
            rows.append(guarded(dict(vocab=V, variant=variant), args, lambda: measure(fn)))
            w.grad = None
    return rows


# 3. training-step MFU ------------------------------------------------------------------------------------
def random_shard(vocab: int) -> Path:
    import numpy as np

    from lmforge.data.shards import write_tokens

    return write_tokens(Path(tempfile.mkdtemp()) / "rand.bin", np.random.default_rng(0).integers(0, vocab, 2_000_000),
                        vocab_size=vocab, tokenizer="byte")


def bench_mfu(s: dict, dev: str, args) -> list[dict]:
    from lmforge.kernels.training import apply_fused_kernels
    from lmforge.model.config import ModelConfig

    shard = random_shard(50304)
    rows = []
    for depth in s["depths"]:
        mcfg = ModelConfig.from_depth(depth, vocab_size=50304, max_seq_len=s["seq"])
        batch = s["batch"] if depth < 20 else s["batch"] // 2  # bench/train_throughput.py --batch-large
        # plain | kernels | loss | kernels+loss, each optionally with "@eager" (no torch.compile: fast to
        # start) or "+cdt" (TrainConfig.compile_tune: Inductor's coordinate-descent tuning of its kernels)
        ref_loss = {}  # batch -> the first variant's first-step loss at it (same seed: same weights and data)
        for i, variant in enumerate(args.mfu_variants.split(",")):
            prepare = apply_fused_kernels if "kernels" in variant else None
            compile = dev == "cuda" and not variant.endswith("@eager")
            b = batch if compile else max(1, batch // 2)  # eager keeps every intermediate: half the batch fits
            row = guarded(dict(depth=depth, variant=variant), args, lambda: trainer_throughput(
                mcfg, shard, b, s["seq"], dev, args, prepare=prepare, fused_loss="loss" in variant,
                compile=compile, tune="+cdt" in variant, graphs="+cg" in variant,
                bf16_residual="+bf16res" in variant, profile=args.profile and i == 0))
            if "first_loss" in row:
                want = ref_loss.setdefault(b, row["first_loss"])
                tol = LOSS_TOLERANCE[torch.bfloat16 if dev == "cuda" else torch.float32]
                row["check"] = verdict(dict(first_loss=abs(row["first_loss"] - want) / abs(want)), tol)
                if row["check"] != "ok":
                    print(f"depth {depth}, {variant}: {row['check']} (first-step loss {row['first_loss']:.5f} vs "
                          f"{want:.5f})", flush=True)
            rows.append(row)
    return rows


def guarded(key: dict, args, fn) -> dict:
    """key + fn()'s results, or key + the error / the budget skip; printed at once (a later kill keeps it)."""
    if _over_budget(args):
        row = dict(key, error="skipped: time budget")
    else:
        try:
            row = dict(key, **fn())
        except Exception as ex:  # noqa: BLE001 - one variant failing must not stop the run
            row = dict(key, error=f"{type(ex).__name__}: {str(ex).splitlines()[0][:120] if str(ex) else ''}")
    print(row, flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def trainer_throughput(mcfg, shard: Path, batch: int, seq: int, dev: str, args, *, prepare=None,
                       fused_loss: bool = False, compile: bool = True, tune: bool = False, graphs: bool = False,
                       bf16_residual: bool = False, profile: bool = False, host: bool = False
                       ) -> dict:
    """tokens/s and MFU of the real Trainer.train_step, as bench/train_throughput.py measures them. `prepare`
    transforms the built model (e.g. apply_fused_kernels); fused_loss trains with kernels.fused_ce's
    FusedLMObjective instead of pretraining's LMObjective; tune is TrainConfig.compile_tune, graphs
    TrainConfig.compile_cudagraphs, bf16_residual TrainConfig.bf16_residual; profile prints
    a kernel table of one step; host (CUDA) adds host_ms, the seconds one step takes to return when started on
    an idle GPU (min of 3: its enqueue time unless it waits for the GPU), and syncs, whether any call in a step
    synchronises with the GPU (torch.cuda.set_sync_debug_mode)."""
    from lmforge.model.transformer import Transformer
    from lmforge.optim.config import OptimConfig
    from lmforge.train.config import DataConfig, TrainConfig
    from lmforge.train.harness import scratch_trainer
    from lmforge.train.pretrain import pretraining_parts

    data = DataConfig(train=(str(shard),), seq_len=seq, batch_size=batch, val_fraction=0.01)
    cfg = TrainConfig(model=mcfg, data=data, optim=OptimConfig(name="adamw", lr=3e-4, warmup_steps=0),
                      max_steps=10_000, device=dev, compile=compile, compile_tune=tune, compile_cudagraphs=graphs,
                      bf16_residual=bf16_residual,
                      sdpa_backend="cudnn" if dev == "cuda" else "auto", eval_batches=1)
    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg).to(dev)
    if prepare is not None:
        prepare(model)
    parts = pretraining_parts(cfg, model=model)
    objective = fused_ce.FusedLMObjective(mcfg.z_loss) if fused_loss else parts.objective
    times = []
    if compile:  # a fresh compile cache per variant: counts below are this variant's, no cache-limit fallbacks
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
    with scratch_trainer(parts.model, parts.optimizer, parts.data, objective, cfg) as tr:
        t0 = time.perf_counter()
        first_loss = float(tr.train_step()["loss"])  # compiles under torch.compile
        first_s = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            tr.train_step()
        _sync(dev)
        for _ in range(args.blocks):
            t = time.perf_counter()
            for _ in range(args.steps):
                tr.train_step()
            _sync(dev)
            times.append((time.perf_counter() - t) / args.steps)
        extra = _host_time(tr.train_step) if host and dev == "cuda" else {}
        if profile and dev == "cuda":
            from profiling import host_table, kernel_table

            print(f"\nkernels of one training step ({mcfg.n_layers} layers, {batch} x {seq}):\n"
                  + kernel_table(tr.train_step, calls=2, rows=45, width=110) + "\n" + host_table(tr.train_step),
                  flush=True)
    step_s = statistics.median(times)
    tps = cfg.tokens_per_step / step_s
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    graphs = dict(graphs=torch._dynamo.utils.counters["stats"]["unique_graphs"],
                  graph_breaks=sum(torch._dynamo.utils.counters["graph_break"].values())) if compile else {}
    return dict(params_M=tr.model.num_params() / 1e6, tokens_per_step=cfg.tokens_per_step, step_ms=step_s * 1e3,
                tok_per_s=tps, mfu=tps * tr.flops_per_token / tr.peak if tr.peak else float("nan"), peak_mem_GiB=mem,
                first_step_s=first_s, first_loss=first_loss, **graphs, **extra)


def _host_time(step) -> dict:
    """host_ms: min over 3 steps of the time one takes to return when started on an idle GPU; syncs: whether a
    step makes a call that synchronises with the GPU."""
    hosts = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        hosts.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        syncs = False
    except RuntimeError:
        syncs = True
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return dict(host_ms=min(hosts) * 1e3, syncs=syncs)


def _table(title: str, rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:,.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"\n## {title}", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows])


def run_sections(sections: dict, keys: list[str], result: dict, out: Path) -> None:
    """Run the chosen sections (title, fn) in order, saving JSON after each; then print every table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for key in keys:
        try:
            result[key] = sections[key][1]()
        except Exception as ex:  # noqa: BLE001
            print(f"section {key} failed: {type(ex).__name__}: {ex}", file=sys.stderr)
            result[key] = [dict(error=f"{type(ex).__name__}: {str(ex)[:200]}")]
        out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\n# {result['hardware']}, {result['dtype']}, torch {torch.__version__}, {result['date']}, "
          f"{time.perf_counter() - T0:.0f} s")
    for key in keys:
        print(_table(sections[key][0], result[key]))
    print(f"\nwrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of: " + ", ".join(SECTIONS))
    ap.add_argument("--mfu-variants", default="plain,kernels+loss,loss")
    ap.add_argument("--depths", default=None, help="comma list (default 16,24)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="kernel table of the first MFU variant's step")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds; later variants are skipped past it")
    ap.add_argument("--out", default="bench/results/train_kernels.json")
    args = ap.parse_args()
    keys = parse_sections(ap, args.sections, SECTIONS)
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
    sections = {"kernels": ("Fused kernels vs eager / torch.compile (fwd, fwd+bwd)",
                            lambda: bench_kernels(s, dev, dtype, args)),
                "memory": ("LM head + loss, forward+backward: peak memory beyond inputs",
                           lambda: bench_memory(s, dev, dtype, args)),
                "mfu": ("Trainer step MFU (bf16, compile, cuDNN attention, seq 2048)", lambda: bench_mfu(s, dev, args))}
    run_sections(sections, keys, result, Path(args.out))


if __name__ == "__main__":
    main()
