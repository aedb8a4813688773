"""Dropless MoE training kernels (lmforge/kernels/moe.py) on one GPU, in one run:

1. layer   an MoE layer's forward+backward: Triton grouped GEMM (TritonMoE) vs the existing grouped dispatch
           (torch._grouped_mm, or its padded-bmm fallback) vs the per-expert loop (the reference; every
           variant's output is compared with it first), at bench/architectures.py's two GPU shapes
2. train   a training step (forward, CE + aux loss, backward, AdamW; bf16 autocast, eager as in
           bench/architectures.py) of an MoE model vs a dense model with the same active FLOPs per token
           (dense d_ff = top_k · d_expert): tokens/s and the MoE/dense ratio (2026-11-23 H100: 0.60x)

Every variant is wrapped so a failure prints and the run goes on; table last; JSON in
bench/results/moe_kernels.json.

    python bench/moe_kernels.py                          # H200, ~1.5 minutes
    TRITON_INTERPRET=1 python bench/moe_kernels.py --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge.kernels.moe import TritonMoE
from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.model.layers.moe import MoE
from lmforge.model.transformer import Transformer

sys.path.insert(0, str(Path(__file__).parent))
from train_kernels import _table, timeit  # noqa: E402

SIZES = {
    "gpu": dict(layers=[dict(d=2048, E=8, k=2, de=5632, tokens=16384), dict(d=2048, E=64, k=8, de=1024, tokens=16384)],
                train=dict(d=1024, layers=8, H=16, E=8, k=2, de=2048, seq=1024, batch=16), reps=5),
    "smoke": dict(layers=[dict(d=32, E=4, k=2, de=32, tokens=64)],
                  train=dict(d=32, layers=2, H=2, E=4, k=2, de=32, seq=16, batch=2), reps=1),
}
VARIANTS = {"triton": (TritonMoE, "grouped"), "grouped (torch)": (MoE, "grouped"), "loop": (MoE, "loop")}


def _err(ex: Exception) -> str:
    return f"{type(ex).__name__}: {str(ex).splitlines()[0][:120]}" if str(ex) else type(ex).__name__


def bench_layer(s: dict, dev: str, dtype) -> list[dict]:
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
        shape = dict(experts=sz["E"], top_k=sz["k"], d_model=sz["d"], d_expert=sz["de"], tokens=sz["tokens"])
        for name, (cls, dispatch) in VARIANTS.items():
            try:
                layer = cls(cfg, 0).to(dev, dtype)
                layer.load_state_dict(ref.state_dict())
                layer.dispatch = dispatch
                with torch.no_grad():
                    diff = ((layer(x).float() - want).abs().max() / want.abs().max()).item()
                ms = timeit(lambda: layer(x).float().square().mean().backward(), s["reps"], dev)
                rows.append(dict(**shape, dispatch=name, ms=ms, tokens_per_s=sz["tokens"] / ms * 1e3, rel_diff_vs_loop=diff))
            except Exception as ex:  # noqa: BLE001 - one variant failing must not stop the run
                rows.append(dict(**shape, dispatch=name, error=_err(ex)))
            print(rows[-1], flush=True)
    return rows


def bench_train(s: dict, dev: str, dtype) -> list[dict]:
    t = s["train"]
    base = ModelConfig(vocab_size=8192, d_model=t["d"], n_layers=t["layers"], n_heads=t["H"], max_seq_len=t["seq"])
    moe = dataclasses.replace(base, mlp="moe", moe=MoEConfig(n_experts=t["E"], top_k=t["k"], d_expert=t["de"],
                                                              aux_loss=0.01))
    runs = [("dense", dataclasses.replace(base, d_ff=t["k"] * t["de"]), None)] + [
        (f"MoE {t['E']}x{t['de']} top-{t['k']}, {name}", moe, v) for name, v in VARIANTS.items() if name != "loop"]
    rows = []
    for name, cfg, variant in runs:
        try:
            torch.manual_seed(0)
            model = Transformer(cfg).to(dev).train()
            for m in model.modules():
                if isinstance(m, MoE) and variant is not None:
                    m.__class__, m.dispatch = variant  # as apply_fused_kernels does for "triton"
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
            ids = torch.randint(0, cfg.vocab_size, (t["batch"], t["seq"] + 1), device=dev)

            def step():
                with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
                    logits = model(ids[:, :-1])
                    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
                    aux = model.aux_loss()
                    loss = loss + aux if aux is not None else loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ms = timeit(step, s["reps"], dev)
            rows.append(dict(model=name, params_M=model.num_params() / 1e6,
                             active_flops_per_token=model.flops_per_token(t["seq"]),
                             tokens_per_s=t["batch"] * t["seq"] / ms * 1e3, step_ms=ms))
            del model, opt
        except Exception as ex:  # noqa: BLE001
            rows.append(dict(model=name, error=_err(ex)))
        print(rows[-1], flush=True)
    dense = rows[0].get("tokens_per_s")
    for r in rows:
        if dense and "tokens_per_s" in r:
            r["vs_dense"] = r["tokens_per_s"] / dense
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--sections", default="layer,train")
    ap.add_argument("--out", default="bench/results/moe_kernels.json")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    s = SIZES["smoke" if args.smoke else "gpu"]
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    t0 = time.perf_counter()
    hw = torch.cuda.get_device_name() if dev == "cuda" else "cpu (Triton interpreter)"
    result = dict(date=datetime.now(timezone.utc).isoformat(timespec="minutes"), hardware=hw, torch=torch.__version__,
                  dtype=str(dtype), grouped_mm=hasattr(torch, "_grouped_mm"))
    sections = {"layer": ("MoE layer forward+backward", lambda: bench_layer(s, dev, dtype)),
                "train": ("MoE vs dense training step at equal active FLOPs (eager, bf16 autocast)",
                          lambda: bench_train(s, dev, dtype))}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for key in args.sections.split(","):
        result[key] = sections[key][1]()
        out.write_text(json.dumps(result, indent=2))
    print(f"\n# {hw}, {dtype}, torch {torch.__version__}, {result['date']}, {time.perf_counter() - t0:.0f} s")
    for key in args.sections.split(","):
        print(_table(sections[key][0], result[key]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
