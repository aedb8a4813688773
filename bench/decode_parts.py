"""Where the batch-1 kernel step's time goes (issue 14's decode goal): the step captured in a CUDA graph with
each kind of kernel left out in turn, and with each kind alone, next to what its weight bytes would take at
the measured bandwidth.

    python bench/decode_parts.py                   # H200: the 1.1B Llama shape, bf16, 384 cached positions
    TRITON_INTERPRET=1 python bench/decode_parts.py --tiny --reps 1     # CPU: checks the script

Kinds: embed, qkv (norm + q/k/v + RoPE + cache write), attn (paged attention), o (o-projection + residual),
gu (norm + gate/up + SwiGLU), down (down projection + residual), head (final norm + lm_head). A kind is left
out by replacing its launcher with a no-op while the step is captured (lmforge.infer.kernel_step itself is
not changed); with PDL the kernels overlap, so "step without it" says what a kind really costs
(marginal = full step - step without it), and "alone" what it costs with only its own kind's boundaries. "Null
there" puts a one-program kernel that only waits for its predecessor (PDL) in the kind's place: what a kernel
boundary alone costs at that point of the step; marginal - that = what the kind's own work adds beyond it.
Bounds: a read-only stream (torch's sum over 2 GB of bf16) and one gemv over all the layers' weights stacked
into one matrix (the step's weight stream with no kernel boundaries at all).

    python bench/decode_parts.py --attend 8x32x2x1,4x128x4x1   # + the full step with each attention config
                                                               # (slices x keys per tile x warps[x per head]),
                                                               # in alternating rounds
    python bench/decode_parts.py --compare SET.json            # + the shipped set against another, likewise
    python bench/decode_parts.py --tune --save-tuned SET.json  # + tune now at --context and 2,048 keys
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

from bench.common import decode_weight_bytes  # noqa: E402
from lmforge.errors import LmforgeError  # noqa: E402
from lmforge.infer import kernel_step as kstep  # noqa: E402
from lmforge.kernels import decode as kd  # noqa: E402
from lmforge.kernels import paged_attention as pa  # noqa: E402
from lmforge.kernels.tuning import CACHE_ENV, SHIPPED_DIR  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402

KINDS = ("embed", "qkv", "attn", "o", "gu", "down", "head")

if kd.triton is not None:
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @kd.triton.jit
    def _null_kernel(x_ptr, PDL: tl.constexpr):
        """A kernel boundary and nothing else: let the next kernel launch, wait for the previous one, touch
        one element."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        tl.store(x_ptr, tl.load(x_ptr))


def null_launch(step: kstep.KernelStep) -> None:
    _null_kernel[(1,)](step.x, num_warps=1, **kd._launch_opts(step.pdl))


def build(tiny: bool, context: int, dev: str):
    from decode import LLAMA_1B, TINY

    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(ModelConfig(**(TINY if tiny else LLAMA_1B))).to(dtype).eval()
    c, bs = model.cfg, 16
    blocks = -(-((context if tiny else max(context, kstep.TUNE_CONTEXTS[-1])) + 1) // bs)  # room for --tune's longest
    new = lambda: torch.randn(blocks, bs, c.kv_heads, c.hd, device=dev).to(dtype)  # noqa: E731
    kv = kstep.PagedKV(k=[new() for _ in model.blocks], v=[new() for _ in model.blocks],
                       block_table=torch.randperm(blocks, device=dev).to(torch.int32)[None])
    return model, kv


class Filter:
    """Launchers of the kernel step replaced by ones that skip the kinds in `skip` and launch the null kernel
    instead of the kinds in `null`."""

    def __init__(self, step: kstep.KernelStep):
        self.step, self.skip, self.null = step, set(), set()
        self.orig = dict(gemv=kd.gemv, qkv_rope=kd.qkv_rope, embed=kd.embed, attn=pa.paged_decode_attention)

    def kind(self, x, glu=False, residual=None, **_) -> str:
        if glu:
            return "gu"
        if residual is None:
            return "head"
        return "o" if x.data_ptr() == self.step.o.data_ptr() else "down"

    def launch(self, kind: str, fn, *a, **kw):
        if kind in self.skip:
            return None
        if kind in self.null:
            return null_launch(self.step)
        return fn(*a, **kw)

    def __enter__(self):
        o = self.orig
        kd.gemv = lambda x, w, **kw: self.launch(self.kind(x, **kw), o["gemv"], x, w, **kw)
        kd.qkv_rope = lambda *a, **kw: self.launch("qkv", o["qkv_rope"], *a, **kw)
        kd.embed = lambda *a, **kw: self.launch("embed", o["embed"], *a, **kw)
        pa.paged_decode_attention = lambda *a, **kw: self.launch("attn", o["attn"], *a, **kw)
        return self

    def __exit__(self, *exc):
        kd.gemv, kd.qkv_rope, kd.embed = self.orig["gemv"], self.orig["qkv_rope"], self.orig["embed"]
        pa.paged_decode_attention = self.orig["attn"]


def weight_bytes(model) -> dict[str, int]:
    """Bytes of weight matrices each kind reads per token (the small norm gains left out; with them the kinds sum
    to bench.common.decode_weight_bytes, the roofline's bytes in bench/decode.py). embed reads one row."""
    n = lambda p: p.numel() * p.element_size()  # noqa: E731
    b = model.blocks
    emb = model.tok_emb.weight
    return dict(embed=n(emb[0]), qkv=sum(n(p) for x in b for p in x.attn.parameters()) - sum(n(x.attn.wo.weight) for x in b),
                attn=0, o=sum(n(x.attn.wo.weight) for x in b), gu=sum(n(x.mlp.gate.weight) + n(x.mlp.up.weight) for x in b),
                down=sum(n(x.mlp.down.weight) for x in b), head=n(model.lm_head.weight))


def timer(reps: int):
    if torch.cuda.is_available():
        from decode_layer import timed

        return lambda fn: timed(fn, reps=reps)
    import time

    def cpu(fn):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps
    return cpu


def bounds(model, timed, dev) -> list[tuple[str, float, int]]:
    """(name, seconds, bytes): a read-only stream and one gemv over every layer weight stacked."""
    if dev != "cuda":
        return []
    n = 1 << 30
    a = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    rows = [("read-only stream (torch sum, 2.1 GB bf16)", timed(lambda: a.sum()), 2 * n)]
    del a
    D = model.cfg.d_model
    w = torch.cat([p.detach().reshape(-1, D) for name, p in model.named_parameters()
                   if p.dim() == 2 and p.shape[-1] == D and not name.startswith("tok_emb")])
    x = torch.randn(D, device=dev, dtype=w.dtype)
    for c in kd.GEMV_CONFIGS:
        rows.append((f"one gemv over all weights with {D} columns {c}", timed(lambda: kd.gemv(x, w, config=c)),
                     w.numel() * 2))
    return rows


def configs_ab(step: kstep.KernelStep, tok, pos, timed, attend: str, compare: str | None, rounds: int) -> None:
    """The full step with each attention config in `attend` (the step's other configs as they are) and with
    the whole set in the json `compare` (beside the shipped set), in `rounds` alternating rounds; prints each
    variant's median and per-round times."""
    import statistics

    from lmforge.kernels.tuning import KernelConfigs

    key = next(k for k in step.keys() if k[0] == "attend")
    shipped = step.configs
    variants = {}
    try:
        for c in filter(None, attend.split(",")):
            config = tuple(int(x) for x in c.split("x"))
            if not 3 <= len(config) <= 5:
                raise ValueError(c)
            variants[f"attend {c}"] = shipped.with_config(key, config)
    except ValueError:
        raise SystemExit(f"--attend wants configs of 3-5 non-negative ints like 8x32x2x1,4x128x4,1x512x8x0x1; got {attend!r}") from None
    if compare:
        variants["shipped set"] = shipped
        try:
            variants[f"set {Path(compare).name[:40]}"] = KernelConfigs.load(Path(compare))
        except LmforgeError as e:
            raise SystemExit(f"--compare: {e}") from None
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, configs in variants.items():
            step.configs = configs
            times[name].append(timed(lambda: step.step(tok, pos)))
    step.configs = shipped
    print(f"\nconfig variants in the full step ({rounds} rounds; shipped attention {shipped.get(key)}):")
    for name in variants:
        med = statistics.median(times[name])
        print(f"{name:<48} {med * 1e6:>9.1f} us {1 / med:>7.0f} tok/s  per round "
              + " ".join(f"{t * 1e6:.1f}" for t in times[name]), flush=True)


def parts_table(step, model, tok, pos, timed, dev) -> tuple[int, float | None]:
    """Each kind left out, alone and nulled; the bounds. Prints the table; returns (weight bytes, read-stream B/s)."""
    f = Filter(step)
    with f:
        full = timed(lambda: step.step(tok, pos))
        without, alone, nulled = {}, {}, {}
        for k in KINDS:
            f.skip = {k}
            without[k] = timed(lambda: step.step(tok, pos))
            f.skip = set(KINDS) - {k}
            alone[k] = timed(lambda: step.step(tok, pos))
            f.skip, f.null = set(), {k}
            nulled[k] = timed(lambda: step.step(tok, pos))
            f.null = set()
    wb = weight_bytes(model)
    total = decode_weight_bytes(model)  # the kinds plus the norm gains: the bytes bench/decode.py divides by
    bw = None
    rows = bounds(model, timed, dev)
    if rows:
        bw = rows[0][2] / rows[0][1]
    print(f"\nfull step {full * 1e6:.1f} us = {1 / full:.0f} tok/s; weights {total / 1e9:.3f} GB"
          + (f"; read stream {bw / 1e12:.2f} TB/s -> {total / bw * 1e6:.1f} us ({bw / total:.0f} tok/s)" if bw else ""))
    print(f"{'kind':<6} {'MB':>8} {'alone us':>9} {'GB/s':>7} {'marginal us':>12} {'GB/s':>7} {'ideal us':>9}"
          f" {'null there':>11} {'work':>8}")
    for k in KINDS:
        m = full - without[k]
        gbs = lambda t: f"{wb[k] / t / 1e9:>7.0f}" if wb[k] and t > 0 else f"{'-':>7}"  # noqa: E731
        ideal = f"{wb[k] / bw * 1e6:>9.1f}" if bw else f"{'-':>9}"
        print(f"{k:<6} {wb[k] / 1e6:>8.1f} {alone[k] * 1e6:>9.1f} {gbs(alone[k])} {m * 1e6:>12.1f} {gbs(m)} {ideal}"
              f" {(nulled[k] - without[k]) * 1e6:>11.1f} {(full - nulled[k]) * 1e6:>8.1f}")
    print(f"sum of marginals {sum(full - without[k] for k in KINDS) * 1e6:.1f} us of {full * 1e6:.1f}")
    for name, t, nbytes in rows:
        print(f"{name:<60} {t * 1e6:>9.1f} us {nbytes / t / 1e9:>7.0f} GB/s")
    return total, bw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the tiny fp32 model (CPU check)")
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--tune", action="store_true", help="then tune the step's configs now (not saved) and time it")
    ap.add_argument("--attend", default="", help="comma-separated attention configs SxKxW[xP] to A/B in the full step")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the --attend / --compare A/B")
    ap.add_argument("--no-parts", action="store_true", help="skip the parts table and bounds (A/B or tune only)")
    ap.add_argument("--compare", default=None, help="a KernelConfigs json to A/B against the shipped set")
    ap.add_argument("--save-tuned", default=None, help="with --tune: write the tuned set to this json")
    args = ap.parse_args()
    if args.context < 0 or args.reps < 1 or args.rounds < 1:
        ap.error(f"--context must be >= 0, --reps and --rounds >= 1; got {args.context}, {args.reps}, {args.rounds}")
    if args.save_tuned and not args.tune:
        ap.error("--save-tuned writes the set --tune chooses: add --tune")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not kd.available(dev):
        raise SystemExit("needs Triton on a GPU, or TRITON_INTERPRET=1 on CPU")
    model, kv = build(args.tiny, args.context, dev)
    if dev == "cuda":  # the shipped config sets, not a user's cache (read only: --tune does not save)
        os.environ.setdefault(CACHE_ENV, str(SHIPPED_DIR))
    step = kstep.KernelStep(model, kv, persistent=False)  # the five kernels per layer the filter knows
    print(f"configs: {'disk cache' if step.configs.gpu else 'defaults'} {step.configs.to_json()['configs']}")
    tok = torch.zeros(1, dtype=torch.long, device=dev)
    pos = torch.full((1,), args.context, dtype=torch.long, device=dev)
    timed = timer(args.reps)
    total, bw = decode_weight_bytes(model), None
    if not args.no_parts:
        total, bw = parts_table(step, model, tok, pos, timed, dev)
    if args.attend or args.compare:
        configs_ab(step, tok, pos, timed, args.attend, args.compare, args.rounds)
    if args.tune and dev == "cuda":
        step.tune(contexts=(args.context, kstep.TUNE_CONTEXTS[-1]), save=False)
        if args.save_tuned:
            step.configs.save(Path(args.save_tuned))
        t = timed(lambda: step.step(tok, pos))
        print(f"\nconfigs tuned now: {t * 1e6:.1f} us, {1 / t:.0f} tok/s" + (f", {total / bw / t:.1%} of the read stream"
              if bw else "") + f"; {json.dumps(step.configs.to_json()['configs'])}", flush=True)
    if dev == "cuda" and not args.no_parts:
        from profiling import kernel_table

        step.capture()
        print("\n" + kernel_table(lambda: step.replay(tok, pos), calls=10))


if __name__ == "__main__":
    main()
