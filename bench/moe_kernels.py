"""Dropless MoE training (lmforge/model/layers/moe.py, lmforge/kernels/moe.py): every dispatch and grouped
matmul side by side against a dense MLP of the same active FLOPs, in one run:

1. layer    one layer's forward+backward: a dense SwiGLU MLP with d_ff = top_k · d_expert (plain, and with
            the Triton SwiGLU), then the MoE variants below (each one's output and gradients are first compared
            with the per-expert loop's: max |x - loop| / max |loop| <= 1e-4 fp32, 3e-2 bf16, else FAIL and not
            timed); tokens/s and vs_best_dense, the ratio to the faster dense MLP
2. train    the real Trainer step (forward, CE + aux loss, backward, fused AdamW; bf16 autocast, eager as
            bench/architectures.py measured it) of a dense model and of the MoE variants at equal active
            FLOPs per token (dense d_ff = top_k · d_expert): tokens/s and the MoE/dense ratios (goal >= 0.85x):
            vs_dense to the plain dense model (the baseline of the earlier 0.64-0.73x), vs_best_dense to
            the faster of it and the dense model with the Triton SwiGLU; then (CUDA) the dense model and three
            MoE variants under torch.compile (TrainConfig.compile; the last with Inductor's fusion of the
            SwiGLU expression instead of the Triton kernel, TritonMoE.kernel_under_compile off), each against
            the compiled dense model
            (--profile-step [eager|compiled] prints the kernel tables of that mode's first dense and MoE steps)
3. profile  (CUDA) kernel tables of the dense MLP and of the TritonMoE layer (gemm auto) at the train
            section's layer shape: where the MoE's extra time goes

MoE variants: the dispatch ("torch": MoE's sorted gather/combine in PyTorch; "triton": TritonMoE, i.e.
apply_fused_kernels, whose gather backward, combine and fused SwiGLU are Triton kernels) times the grouped
matmul (model.moe.gemm: "torch" = torch._grouped_mm, "triton" = the Triton grouped GEMM, "loop" = one matmul
per expert; "auto" names what it picked), and the per-expert loop dispatch (the reference).

A failing variant prints its error and the run goes on; a time budget skips what would not fit. Tables last;
JSON in bench/results/moe_kernels.json.

    python bench/moe_kernels.py                                   # one H200: ~3-4 minutes
    TRITON_INTERPRET=1 python bench/moe_kernels.py --smoke        # CPU, toy sizes (~3 minutes on 2 busy
                                                                  # cores; without the interpreter the
                                                                  # Triton rows print their error)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from lmforge.kernels.moe import TritonMoE
from lmforge.kernels.swiglu import FusedSwiGLUMLP
from lmforge.kernels.training import apply_fused_kernels
from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.model.layers.mlp import MLP
from lmforge.model.layers.moe import MoE

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import TOLERANCE, compare, output_and_grads, parse_sections, verdict  # noqa: E402
from train_kernels import guarded, random_shard, run_sections, timeit, trainer_throughput  # noqa: E402

SIZES = {
    "gpu": dict(layers=[dict(d=2048, E=8, k=2, de=5632, tokens=16384), dict(d=2048, E=64, k=8, de=1024, tokens=16384),
                        dict(d=1024, E=8, k=2, de=2048, tokens=16384)],
                train=dict(d=1024, layers=8, H=16, E=8, k=2, de=2048, seq=1024, batch=16), reps=5),
    "smoke": dict(layers=[dict(d=32, E=4, k=2, de=32, tokens=64)],
                  train=dict(d=32, layers=2, H=2, E=4, k=2, de=32, seq=16, batch=2), reps=1),
}
SECTIONS = ("layer", "train", "profile")
# name -> (dispatch, gemm); dispatch "loop" is MoE.experts_loop, "torch" MoE's sorted dispatch, "triton" TritonMoE's
VARIANTS = {"loop dispatch (reference)": ("loop", "auto"),
            "torch dispatch, gemm loop": ("torch", "loop"), "torch dispatch, gemm torch": ("torch", "torch"),
            "torch dispatch, gemm triton": ("torch", "triton"),
            "triton dispatch, gemm torch": ("triton", "torch"), "triton dispatch, gemm triton": ("triton", "triton"),
            "triton dispatch, gemm auto": ("triton", "auto")}


def _moe_layer(cfg: ModelConfig, dispatch: str, gemm: str) -> MoE:
    layer = (TritonMoE if dispatch == "triton" else MoE)(cfg, 0)
    layer.dispatch, layer.gemm = ("loop" if dispatch == "loop" else "grouped"), gemm
    return layer


def _init(layer: MoE) -> MoE:
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    return layer


def _auto_name(layer: MoE, x: torch.Tensor) -> str:
    """Which grouped matmul gemm 'auto' resolves to for these operands."""
    names = {"grouped_mm_torch": "torch", "grouped_mm": "triton", "grouped_mm_loop": "loop"}
    return names[layer._gemm(x.reshape(-1, x.shape[-1])).__name__]


def bench_layer(s: dict, dev: str, dtype, args) -> list[dict]:
    """Per shape: the dense MLPs, then each MoE variant (the loop reference's weights), whose output and gradients
    (x's and every parameter's, of mean(y²)) are compared with the loop's first (bench.common.TOLERANCE); a
    variant that disagrees is marked FAIL and not timed."""
    rows = []
    for sz in s["layers"]:
        cfg = ModelConfig(d_model=sz["d"], n_heads=4, n_layers=1, mlp="moe",
                          moe=MoEConfig(n_experts=sz["E"], top_k=sz["k"], d_expert=sz["de"]))
        ref = _init(_moe_layer(cfg, "loop", "auto").to(dev, dtype))
        x = torch.randn(1, sz["tokens"], sz["d"], device=dev, dtype=dtype, requires_grad=True)
        want = output_and_grads(ref, x)
        shape = dict(experts=sz["E"], top_k=sz["k"], d_model=sz["d"], d_expert=sz["de"], tokens=sz["tokens"])

        def measure(layer, check: bool):
            row = {}
            if check:
                errs = compare(output_and_grads(layer, x), want)
                grads = [v for k, v in errs.items() if k != "forward"]
                row = dict(rel_diff_vs_loop=errs["forward"], grad_rel_diff_vs_loop=max(grads),
                           check=verdict(errs, TOLERANCE[dtype]))
                if row["check"] != "ok":
                    return row  # a wrong layer's speed means nothing: not timed
            ms = timeit(lambda: layer(x).float().square().mean().backward(), s["reps"], dev)
            return dict(row, ms=ms, tokens_per_s=sz["tokens"] / ms * 1e3)

        for name, cls in (("dense MLP", MLP), ("dense MLP, Triton SwiGLU", FusedSwiGLUMLP)):
            rows.append(guarded(dict(shape, variant=name), args, lambda: measure(
                cls(sz["d"], sz["k"] * sz["de"], "swiglu").to(dev, dtype), check=False)))
        dense = max((r["tokens_per_s"] for r in rows[-2:] if "tokens_per_s" in r), default=None)
        for name, (dispatch, gemm) in VARIANTS.items():
            def run(dispatch=dispatch, gemm=gemm):
                layer = _moe_layer(cfg, dispatch, gemm).to(dev, dtype)
                layer.load_state_dict(ref.state_dict())
                picked = dict(auto_picks=_auto_name(layer, x)) if gemm == "auto" and dispatch != "loop" else {}
                return dict(measure(layer, check=True), **picked)
            row = guarded(dict(shape, variant=name), args, run)
            if dense and "tokens_per_s" in row:
                row["vs_best_dense"] = row["tokens_per_s"] / dense
            rows.append(row)
    return rows


def _swap(kind: str):
    """A Trainer `prepare` putting one kind of fused kernel into the model; an error where none runs."""
    def prepare(model):
        if not apply_fused_kernels(model, kinds=(kind,)):
            raise RuntimeError(f"no {kind} kernel applied on this device (CPU: TRITON_INTERPRET=1)")
    return prepare


def _inductor_swiglu(model) -> None:
    """_swap("moe"), then Inductor's fusion of the plain SwiGLU expression under torch.compile instead of the
    Triton kernel (TritonMoE.kernel_under_compile off)."""
    from lmforge.kernels.moe import TritonMoE

    _swap("moe")(model)
    for m in model.modules():
        if isinstance(m, TritonMoE):
            m.kernel_under_compile = False


def bench_train(s: dict, dev: str, args) -> list[dict]:
    """The real Trainer step (fused AdamW, bf16 autocast): eager, as the earlier MoE/dense ratios were
    measured, then (CUDA, --compiled) under torch.compile, as the GPU MFU benchmarks train."""
    t = dict(s["train"], **({"batch": args.train_batch} if args.train_batch else {}))
    base = ModelConfig(vocab_size=8192, d_model=t["d"], n_layers=t["layers"], n_heads=t["H"], max_seq_len=t["seq"])
    shard = random_shard(8192)
    dense = dataclasses.replace(base, d_ff=t["k"] * t["de"])
    label = f"MoE {t['E']}x{t['de']} top-{t['k']}"

    def moe(gemm: str) -> ModelConfig:
        return dataclasses.replace(base, mlp="moe", moe=MoEConfig(n_experts=t["E"], top_k=t["k"],
                                                                   d_expert=t["de"], aux_loss=0.01, gemm=gemm))
    # (name, config, prepare, compile); the Trainer's MoE rows all use the grouped dispatch (the loop is the
    # layer section's reference)
    runs = [("dense", dense, None, False), ("dense, Triton SwiGLU", dense, _swap("swiglu"), False)]
    runs += [(f"{label}, {name}", moe(gemm), _swap("moe") if dispatch == "triton" else None, False)
             for name, (dispatch, gemm) in VARIANTS.items() if dispatch != "loop"]
    if dev == "cuda" and args.compiled:
        runs += [("dense, compiled", dense, None, True),
                 (f"{label}, torch dispatch, gemm torch, compiled", moe("torch"), None, True),
                 (f"{label}, triton dispatch, gemm auto, compiled", moe("auto"), _swap("moe"), True),
                 (f"{label}, triton dispatch, gemm auto, Inductor SwiGLU, compiled", moe("auto"), _inductor_swiglu,
                  True)]
    if args.train_rows:  # only the rows whose names hold one of these (the dense rows are always kept)
        keep = args.train_rows.split("|")
        runs = [r for r in runs if r[1] is dense or any(k in r[0] for k in keep)]
    # --profile-step eager|compiled: the first dense row and the first MoE row of that mode
    same_mode = [(name, cfg) for name, cfg, _, comp in runs if comp == (args.profile_step == "compiled")]
    profiled = {next((n for n, c in same_mode if c is dense), None),
                next((n for n, c in same_mode if c is not dense), None)}
    rows = [guarded(dict(model=name), args, lambda: trainer_throughput(
        cfg, shard, t["batch"], t["seq"], dev, args, prepare=prep, compile=comp,
        profile=args.profile_step is not None and name in profiled)) for name, cfg, prep, comp in runs]
    for mode in (False, True):  # each MoE row against the dense rows of its own mode (eager or compiled)
        group = [(r, run) for r, run in zip(rows, runs) if run[3] == mode]
        dense_tps = [r.get("tok_per_s") for r, run in group if run[1] is dense]
        best = max((v for v in dense_tps if v), default=None)
        for r, run in group:
            if run[1] is not dense and "tok_per_s" in r and dense_tps and dense_tps[0]:
                r.update(vs_dense=r["tok_per_s"] / dense_tps[0], vs_best_dense=r["tok_per_s"] / best)
    return rows


def profile_layer(s: dict, dev: str, dtype, args) -> list[dict]:
    """Kernel tables (bench/profiling.py) of one forward+backward at the train section's layer shape."""
    if dev != "cuda":
        return [dict(note="profile needs CUDA (torch.profiler's kernel times)")]
    from profiling import kernel_table

    t = s["train"]
    cfg = ModelConfig(d_model=t["d"], n_heads=4, n_layers=1, mlp="moe",
                      moe=MoEConfig(n_experts=t["E"], top_k=t["k"], d_expert=t["de"]))
    x = torch.randn(1, t["batch"] * t["seq"], t["d"], device=dev, dtype=dtype, requires_grad=True)
    rows = []
    for name, layer in (("dense MLP, Triton SwiGLU", FusedSwiGLUMLP(t["d"], t["k"] * t["de"], "swiglu")),
                        ("TritonMoE, gemm auto", _init(_moe_layer(cfg, "triton", "auto")))):
        layer = layer.to(dev, dtype)
        table = kernel_table(lambda: layer(x).float().square().mean().backward(), calls=5)
        print(f"\n### {name}: forward+backward, {x.shape[1]} tokens\n{table}", flush=True)
        rows.append(dict(layer=name, table=table.splitlines()[-1]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU (TRITON_INTERPRET=1 for the Triton rows)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of: " + ", ".join(SECTIONS))
    ap.add_argument("--warmup", type=int, default=3)
    # the eager MoE step is close to host-bound (its host time varies by machine): more, shorter blocks than
    # bench/train_kernels.py's default, and the median of them
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                    help="also time dense and MoE Trainer steps under torch.compile (CUDA)")
    ap.add_argument("--profile-step", nargs="?", const="compiled", choices=["eager", "compiled"], default=None,
                    help="kernel tables of the first dense and MoE Trainer steps of that mode (train section, CUDA)")
    ap.add_argument("--train-batch", type=int, default=None, help="rows of seq tokens per train step (default 16)")
    ap.add_argument("--train-rows", default=None,
                    help="'|'-separated: only the train rows whose names hold one of these (and the dense rows)")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds; later variants are skipped past it")
    ap.add_argument("--out", default="bench/results/moe_kernels.json")
    args = ap.parse_args()
    keys = parse_sections(ap, args.sections, SECTIONS)
    dev = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    s = SIZES["smoke" if args.smoke else "gpu"]
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    result = dict(date=datetime.now(timezone.utc).isoformat(timespec="minutes"), dtype=str(dtype),
                  hardware=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                  grouped_mm=hasattr(torch, "_grouped_mm"))
    sections = {"layer": ("MoE layer forward+backward vs a dense MLP of equal active FLOPs",
                          lambda: bench_layer(s, dev, dtype, args)),
                "train": ("MoE vs dense Trainer step at equal active FLOPs (eager, then compiled; bf16 autocast on CUDA)",
                          lambda: bench_train(s, dev, args)),
                "profile": ("Kernel profiles (tables printed above)", lambda: profile_layer(s, dev, dtype, args))}
    run_sections(sections, keys, result, Path(args.out))


if __name__ == "__main__":
    main()
