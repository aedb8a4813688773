"""Architecture benchmarks (issue 4): MoE dispatch, MLA vs GQA vs MHA decode, MoE vs dense training.

1. MoE layer tokens/s, forward + backward: grouped dispatch (tokens sorted by expert, model.moe.gemm='auto':
   torch._grouped_mm where it applies, else one matmul per expert over the sorted rows) vs the per-expert
   loop reference. bench/moe_kernels.py compares every gemm (torch, Triton, loop) side by side.
2. KV-cache bytes per token and decode step time at equal width (same d_model, heads, layers):
   MHA, GQA (n_kv = H/4), MLA (latent r + shared rope key, absorbed inference path), and MLA with the latents
   expanded each step (the same weights: its first decode logits are compared with the absorbed path's).
A fast path's output (and, for the MoE layer, gradients) must match its reference's (max |x - ref| / max |ref| <=
1e-4 fp32, 3e-2 bf16: bench.common.TOLERANCE) or its row says FAIL and it is not timed.
3. Training throughput (the Trainer's step: forward, loss + aux loss, backward, AdamW) of an MoE model vs a
   dense model with the same active parameters per token (dense d_ff = top_k · d_expert).

    python bench/architectures.py --device cpu --threads 1
    python bench/architectures.py --device cuda          # bf16, larger sizes
Writes bench/results/architectures_<device>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import TOLERANCE, compare, output_and_grads, parse_sections, rel_err, verdict  # noqa: E402
from lmforge.model.cache import KVCache  # noqa: E402
from lmforge.model.config import MLAConfig, ModelConfig, MoEConfig  # noqa: E402
from lmforge.model.layers.mla import MLACache  # noqa: E402
from lmforge.model.layers.moe import MoE  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.optim.config import OptimConfig  # noqa: E402
from lmforge.train.config import LoopConfig  # noqa: E402
from lmforge.train.harness import FixedBatches, StepTimer, scratch_trainer  # noqa: E402
from lmforge.train.loss import LMObjective  # noqa: E402

SECTIONS = ("moe", "decode", "train")

SIZES = {  # device -> sizes of each section
    "cpu": dict(moe=dict(d=256, E=8, k=2, de=512, tokens=2048), moe_fine=dict(d=256, E=32, k=4, de=128, tokens=2048),
                dec=dict(d=512, H=8, layers=4, r=128, rope=32, batch=4, prefix=256, steps=16),
                train=dict(d=256, layers=4, H=4, E=8, k=2, de=256, seq=256, batch=8, steps=4)),
    "cuda": dict(moe=dict(d=2048, E=8, k=2, de=5632, tokens=16384), moe_fine=dict(d=2048, E=64, k=8, de=1024, tokens=16384),
                 dec=dict(d=2048, H=16, layers=8, r=512, rope=64, batch=16, prefix=2048, steps=32),
                 train=dict(d=1024, layers=8, H=16, E=8, k=2, de=2048, seq=1024, batch=16, steps=8)),
}


def _timeit(fn, reps: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_moe(device: str, dtype, s: dict, reps: int) -> list[dict]:
    cfg = ModelConfig(d_model=s["d"], n_heads=4, n_layers=1, mlp="moe",
                      moe=MoEConfig(n_experts=s["E"], top_k=s["k"], d_expert=s["de"]))
    layer = MoE(cfg, 0).to(device, dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(1, s["tokens"], s["d"], device=device, dtype=dtype, requires_grad=True)
    kernel = _grouped_kernel(layer, x)
    # the fast path must agree with its reference on this device and dtype (output and gradients), or it is not timed
    layer.dispatch = "loop"
    want = output_and_grads(layer, x)
    layer.dispatch = "grouped"
    errs = compare(output_and_grads(layer, x), want)
    rows = []
    for dispatch in ("grouped", "loop"):
        layer.dispatch = dispatch
        row = dict(experts=s["E"], top_k=s["k"], d_model=s["d"], d_expert=s["de"], tokens=s["tokens"],
                   dispatch=dispatch if dispatch == "loop" else f"grouped ({kernel})",
                   tokens_per_s=float("nan"), ms=float("nan"),
                   rel_diff_vs_loop=errs["forward"] if dispatch == "grouped" else 0.0,
                   check=verdict(errs, TOLERANCE[dtype]) if dispatch == "grouped" else "reference")
        if row["check"] in ("ok", "reference"):
            sec = _timeit(lambda: layer(x).float().square().mean().backward(), reps, device)
            row.update(tokens_per_s=s["tokens"] / sec, ms=sec * 1e3)
        rows.append(row)
    return rows


def _grouped_kernel(layer: MoE, x: torch.Tensor) -> str:
    """Which grouped matmul gemm='auto' picks here (lmforge.model.layers.moe.pick_gemm)."""
    from lmforge.model.layers.moe import grouped_mm_applies

    return "_grouped_mm" if grouped_mm_applies(x, (layer.experts.w_up.shape[1], layer.experts.w_up.shape[2])) else "loop over experts"


def _dec_configs(s: dict) -> dict[str, ModelConfig]:
    hd = s["d"] // s["H"]
    base = ModelConfig(vocab_size=8192, d_model=s["d"], n_layers=s["layers"], n_heads=s["H"],
                       max_seq_len=s["prefix"] + s["steps"] + 8)
    return {"MHA": base, f"GQA (kv={s['H'] // 4})": dataclasses.replace(base, n_kv_heads=s["H"] // 4),
            f"MLA (r={s['r']})": dataclasses.replace(base, attention="mla", mla=MLAConfig(
                kv_lora_rank=s["r"], q_lora_rank=0, qk_nope_head_dim=hd, qk_rope_head_dim=s["rope"], v_head_dim=hd))}


@torch.no_grad()
def bench_decode(device: str, dtype, s: dict, reps: int) -> list[dict]:
    """Decode step time per attention kind. The MLA rows share weights and prompt (reseeded), and the expanded
    path's first decode logits are compared with the absorbed path's before it is timed."""
    rows = []
    configs = list(_dec_configs(s).items())
    configs.append((configs[-1][0] + ", latents expanded each step", configs[-1][1]))
    absorbed = None
    for name, cfg in configs:
        torch.manual_seed(0)  # the same weights and prompt wherever the config is the same (MLA absorbed / expanded)
        model = Transformer(cfg).to(device, dtype).eval()
        mla = cfg.attention == "mla"
        if "expanded" in name:  # no absorption: rebuild every head's keys/values from all latents each step
            for block in model.blocks:
                block.attn.absorb_max_tokens = 0
        per_tok = MLACache.bytes_per_token(cfg, 2) if mla else cfg.n_layers * 2 * cfg.kv_heads * cfg.hd * 2
        ids = torch.randint(0, cfg.vocab_size, (s["batch"], s["prefix"]), device=device)
        step_ids = ids[:, :1]
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def prefilled():
            cache = (MLACache if mla else KVCache).for_model(model, s["batch"], cfg.max_seq_len, dtype=dtype)
            model(ids, cache=cache)
            return cache

        def decode():
            cache = prefilled()
            sync()
            t = time.perf_counter()
            for _ in range(s["steps"]):
                model(step_ids, cache=cache)
            sync()
            return (time.perf_counter() - t) / s["steps"]

        row = dict(attention=name, cache_bytes_per_token_bf16=per_tok, params=model.num_params(),
                   batch=s["batch"], context=s["prefix"], decode_step_ms=float("nan"),
                   rel_diff_vs_absorbed=float("nan"), check="-")
        if mla:  # the first decode step's logits: the expanded path must give the absorbed path's
            logits = model(step_ids, cache=prefilled()).float()
            if absorbed is None:
                absorbed, row["check"] = logits, "reference"
            else:
                row["rel_diff_vs_absorbed"] = rel_err(logits, absorbed)
                row["check"] = verdict({"logits": row["rel_diff_vs_absorbed"]}, TOLERANCE[dtype])
        if row["check"] in ("-", "reference", "ok"):
            row["decode_step_ms"] = statistics.median(decode() for _ in range(reps)) * 1e3
        rows.append(row)
        del model
    mha = rows[0]["cache_bytes_per_token_bf16"]
    for r in rows:
        r["cache_vs_mha"] = r["cache_bytes_per_token_bf16"] / mha
    return rows


def bench_train(device: str, dtype, s: dict, reps: int) -> list[dict]:
    """Steps of the Trainer (pretraining's LMObjective: cross-entropy + the MoE aux loss; torch AdamW at
    lr 1e-4, no clipping) on one fixed batch: the median of `reps` steps after one warm-up step."""
    base = ModelConfig(vocab_size=8192, d_model=s["d"], n_layers=s["layers"], n_heads=s["H"], max_seq_len=s["seq"])
    cfgs = {"dense": dataclasses.replace(base, d_ff=s["k"] * s["de"]),
            f"MoE {s['E']}x{s['de']} top-{s['k']}": dataclasses.replace(
                base, mlp="moe", moe=MoEConfig(n_experts=s["E"], top_k=s["k"], d_expert=s["de"], aux_loss=0.01))}
    loop = LoopConfig(optim=OptimConfig(lr=1e-4, schedule="constant", grad_clip=0.0), max_steps=reps + 1,
                      device=device, dtype="fp32" if dtype == torch.float32 else "bf16")
    rows = []
    for name, cfg in cfgs.items():
        model = Transformer(cfg).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, cfg.vocab_size, (s["batch"], s["seq"] + 1))
        timer = StepTimer()
        with scratch_trainer(model, opt, FixedBatches([{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}]),
                             LMObjective(), loop, hooks=[timer]) as trainer:
            for _ in range(loop.max_steps):
                trainer.train_step()
        sec = statistics.median(timer.times)
        rows.append(dict(model=name, params=model.num_params(), active_flops_per_token=model.flops_per_token(s["seq"]),
                         tokens_per_s=s["batch"] * s["seq"] / sec, step_ms=sec * 1e3))
        del model, opt, trainer
    return rows


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:,.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of: " + ", ".join(SECTIONS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default); on a shared "
                    "machine 1 avoids OpenMP threads spinning while descheduled")
    args = ap.parse_args()
    sections = parse_sections(ap, args.sections, SECTIONS)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    s = SIZES["cuda" if dev == "cuda" else "cpu"]
    torch.manual_seed(0)
    hw = torch.cuda.get_device_name() if dev == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    result = dict(date=datetime.now(timezone.utc).isoformat(timespec="minutes"), hardware=hw, dtype=str(dtype),
                  torch=torch.__version__, grouped_mm=hasattr(torch, "_grouped_mm"))
    print(f"# {hw}, {dtype}, torch {torch.__version__}, {result['date']}")
    out = Path(args.out or Path(__file__).parent / "results" / f"architectures_{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = [("moe", "moe_layer", "MoE layer, forward+backward",
             lambda: bench_moe(dev, dtype, s["moe"], args.reps) + bench_moe(dev, dtype, s["moe_fine"], args.reps)),
            ("decode", "decode", "KV cache and decode step at equal width",
             lambda: bench_decode(dev, dtype, s["dec"], args.reps)),
            ("train", "train", "Training step, MoE vs dense with equal active parameters",
             lambda: bench_train(dev, dtype, s["train"], args.reps))]
    for key, field, title, fn in runs:
        if key not in sections:
            continue
        result[field] = fn()
        print(f"\n## {title}\n" + _table(result[field]))
        out.write_text(json.dumps(result, indent=2))  # after every section: a later failure keeps these
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
