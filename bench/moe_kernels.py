"""Dropless MoE training kernels (lmforge/kernels/moe.py) on one GPU, in one run:

1. layer   an MoE layer's forward+backward: Triton grouped GEMM (TritonMoE) vs the existing grouped dispatch
           (torch._grouped_mm, or its padded-bmm fallback) vs the per-expert loop (the reference; every
           variant's output is compared with it first), at bench/architectures.py's two GPU shapes
2. train   the real Trainer step (forward, CE + aux loss, backward, fused AdamW; bf16 autocast, eager as
           bench/architectures.py measured it) of an MoE model vs a dense model with the same active FLOPs per token
           (dense d_ff = top_k · d_expert): tokens/s and the MoE/dense ratio (2026-11-23 H100: 0.60x)

Every variant is wrapped so a failure prints and the run goes on; table last; JSON in
bench/results/moe_kernels.json.

    python bench/moe_kernels.py                          # H200, ~1.5 minutes
    TRITON_INTERPRET=1 python bench/moe_kernels.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from lmforge.kernels.moe import TritonMoE
from lmforge.kernels.training import apply_fused_kernels
from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.model.layers.moe import MoE

sys.path.insert(0, str(Path(__file__).parent))
from train_kernels import guarded, random_shard, run_sections, timeit, trainer_throughput  # noqa: E402

SIZES = {
    "gpu": dict(layers=[dict(d=2048, E=8, k=2, de=5632, tokens=16384), dict(d=2048, E=64, k=8, de=1024, tokens=16384)],
                train=dict(d=1024, layers=8, H=16, E=8, k=2, de=2048, seq=1024, batch=16), reps=5),
    "smoke": dict(layers=[dict(d=32, E=4, k=2, de=32, tokens=64)],
                  train=dict(d=32, layers=2, H=2, E=4, k=2, de=32, seq=16, batch=2), reps=1),
}
# name -> (class, dispatch, TritonMoE.gemm); "gather dispatch + _grouped_mm" separates the dispatch's gain
# from the GEMM's
VARIANTS = {"triton": (TritonMoE, "grouped", "triton"),
            "gather dispatch + _grouped_mm": (TritonMoE, "grouped", "torch"),
            "grouped (torch)": (MoE, "grouped", None), "loop": (MoE, "loop", None)}


def bench_layer(s: dict, dev: str, dtype, args) -> list[dict]:
    rows = []
    for sz in s["layers"]:
        cfg = ModelConfig(d_model=sz["d"], n_heads=4, n_layers=1, mlp="moe",
                          moe=MoEConfig(n_experts=sz["E"], top_k=sz["k"], d_expert=sz["de"]))
        ref = MoE(cfg, 0).to(dev, dtype)
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_(0, 0.02)
        x = torch.randn(1, sz["tokens"], sz["d"], device=dev, dtype=dtype, requires_grad=True)
        ref.dispatch = "loop"
        with torch.no_grad():
            want = ref(x).float()

        def measure(cls, dispatch, gemm):
            layer = cls(cfg, 0).to(dev, dtype)
            layer.load_state_dict(ref.state_dict())
            layer.dispatch = dispatch
            if gemm:
                layer.gemm = gemm
            with torch.no_grad():
                diff = ((layer(x).float() - want).abs().max() / want.abs().max()).item()
            ms = timeit(lambda: layer(x).float().square().mean().backward(), s["reps"], dev)
            return dict(ms=ms, tokens_per_s=sz["tokens"] / ms * 1e3, rel_diff_vs_loop=diff)

        shape = dict(experts=sz["E"], top_k=sz["k"], d_model=sz["d"], d_expert=sz["de"], tokens=sz["tokens"])
        for name, variant in VARIANTS.items():
            rows.append(guarded(dict(shape, dispatch=name), args, lambda: measure(*variant)))
    return rows


def bench_train(s: dict, dev: str, args) -> list[dict]:
    """The real Trainer step (fused AdamW, bf16 autocast), eager as the 0.60x of docs/benchmarks.md."""
    t = s["train"]
    base = ModelConfig(vocab_size=8192, d_model=t["d"], n_layers=t["layers"], n_heads=t["H"], max_seq_len=t["seq"])
    moe = dataclasses.replace(base, mlp="moe", moe=MoEConfig(n_experts=t["E"], top_k=t["k"], d_expert=t["de"],
                                                              aux_loss=0.01))
    shard = random_shard(8192)

    def triton_moe(gemm: str):
        def prepare(model):
            for name in apply_fused_kernels(model, kinds=("moe",)):
                model.get_submodule(name).gemm = gemm
        return prepare

    label = f"MoE {t['E']}x{t['de']} top-{t['k']}"
    runs = [("dense", dataclasses.replace(base, d_ff=t["k"] * t["de"]), None),
            (f"{label}, grouped (torch)", moe, None), (f"{label}, triton", moe, triton_moe("triton")),
            (f"{label}, gather dispatch + _grouped_mm", moe, triton_moe("torch"))]
    rows = [guarded(dict(model=name), args, lambda: trainer_throughput(
        cfg, shard, t["batch"], t["seq"], dev, args, prepare=prep, compile=False)) for name, cfg, prep in runs]
    dense = rows[0].get("tok_per_s")
    for r in rows:
        if dense and "tok_per_s" in r:
            r["vs_dense"] = r["tok_per_s"] / dense
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--sections", default="layer,train")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--budget", type=float, default=110.0, help="seconds; later variants are skipped past it")
    ap.add_argument("--out", default="bench/results/moe_kernels.json")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    s = SIZES["smoke" if args.smoke else "gpu"]
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    result = dict(date=datetime.now(timezone.utc).isoformat(timespec="minutes"), dtype=str(dtype),
                  hardware=torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)",
                  grouped_mm=hasattr(torch, "_grouped_mm"))
    sections = {"layer": ("MoE layer forward+backward", lambda: bench_layer(s, dev, dtype, args)),
                "train": ("MoE vs dense Trainer step at equal active FLOPs (eager, bf16 autocast)",
                          lambda: bench_train(s, dev, args))}
    run_sections(sections, args.sections.split(","), result, Path(args.out))


if __name__ == "__main__":
    main()
