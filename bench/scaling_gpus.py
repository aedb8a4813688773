"""Multi-GPU scaling runs of issue 15, one configuration per invocation under torchrun:

    torchrun --nproc-per-node N bench/scaling_gpus.py dp --impl fsdp2          # 834M data-parallel scaling
    torchrun --nproc-per-node N bench/scaling_gpus.py big --tp 1|2             # Llama-3-8B shape, FSDP2 (+TP), SAC
    torchrun --nproc-per-node N bench/scaling_gpus.py pp --schedule gpipe|1f1b --microbatches 8
    torchrun --nproc-per-node N bench/scaling_gpus.py cp                       # longest sequence on N GPUs (cp=N)
    torchrun --nproc-per-node N bench/scaling_gpus.py optim --optim adamw|muon|muon_owner|dion
    torchrun --nproc-per-node N bench/scaling_gpus.py moe [--ep] --depth 12
    ... add --smoke for a CPU/gloo toy run (torchrun --nproc-per-node 2 ... --smoke)

dp --impl: lmforge_ddp (per-parameter all-reduce), lmforge_bucketed, zero1, zero2, zero3 (lmforge.parallel,
teaching versions), torch_ddp, fsdp2. Reported per GPU: tokens/s, MFU, peak memory, and the ZeRO
formula's model-state bytes (fp32 weights and grads, AdamW m and v: 4 + 4 + 8 bytes/param) for comparison.
Scaling efficiency = tokens/s per GPU at N / at 1, computed from the JSON files of the 1..N runs.
pp: bubble = 1 - m·t_stage / t_step, t_stage one stage's forward+backward of one micro-batch timed alone;
against (p-1)/(m+p-1). moe: a depth-12 MoE (16 experts, top-2) with experts split over the GPUs
(--ep, all-to-all dispatch) or replicated; both average the other gradients with the same all-reduce.
NVLink multicast stays off (NCCL_NVLS_ENABLE=0 ...).
Rank 0 prints one JSON line and writes <config>_<variant>_n<N>.json to $OUT, else bench/results/scaling_gpus/.

big, pp, cp and optim time the one Trainer's train_step through its ParallelRunner (what `lmforge train`
runs; parallel_common.trainer_step). dp and moe keep their own loop: the teaching DDP/ZeRO versions, torch
DDP and expert parallelism are not layouts of the runner, and every dp variant is timed by the same loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_common import join, mfu, random_batches, sync, timed, trainer_step  # noqa: E402

from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.optim import build_optimizer  # noqa: E402
from lmforge.optim.config import OptimConfig  # noqa: E402
from lmforge.parallel.config import ParallelConfig, build_mesh  # noqa: E402
from lmforge.parallel.parallelize import parallelize  # noqa: E402
from lmforge.parallel.runner import ParallelRunner  # noqa: E402
from lmforge.parallel.zero import zero_memory  # noqa: E402
from lmforge.train.loss import lm_loss  # noqa: E402

ADAMW = OptimConfig(name="adamw", lr=3e-4, warmup_steps=0)
LLAMA3_8B = dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=128256,
                 activation="swiglu", norm="rmsnorm", pos_emb="rope", rope_theta=500000.0, tie_embeddings=False)


def depth_model(args) -> ModelConfig:
    return ModelConfig.from_depth(args.depth, vocab_size=args.vocab, max_seq_len=args.seq)


def on_device(cfg: ModelConfig, device, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).to(device)


# -- data parallel scaling ------------------------------------------------------------------------------
def run_dp(args, rank, world, device) -> dict:
    from lmforge.parallel.ddp import BucketedDDP, NaiveDDP
    from lmforge.parallel.zero import ZeroOptimizer

    cfg = depth_model(args)
    model = on_device(cfg, device)
    n = model.num_params()
    fpt = model.flops_per_token(args.seq)
    if args.compile and args.impl != "zero3":  # zero3 swaps parameter storage in hooks: eager only
        for b in model.blocks:
            b.compile()
    batches = random_batches(args.warmup, args.batch * world, args.seq, args.vocab, device)
    local = [(x[rank * args.batch:(rank + 1) * args.batch], y[rank * args.batch:(rank + 1) * args.batch])
             for x, y in batches]
    stage = {"zero1": 1, "zero2": 2, "zero3": 3}.get(args.impl, 0)
    if args.impl == "fsdp2":
        pc = ParallelConfig(dp_shard=world)
        parallelize(model, pc, build_mesh(pc, device.type))
    if args.impl in ("lmforge_ddp", "lmforge_bucketed", "torch_ddp", "fsdp2"):
        wrapped = {"lmforge_ddp": lambda: NaiveDDP(model), "lmforge_bucketed": lambda: BucketedDDP(model),
                   "torch_ddp": lambda: torch.nn.parallel.DistributedDataParallel(model),
                   "fsdp2": lambda: model}[args.impl]()
        opt = build_optimizer(model, ADAMW)
        sync_fn = {"lmforge_ddp": getattr(wrapped, "sync_gradients", None),
                   "lmforge_bucketed": getattr(wrapped, "finish_gradient_sync", None)}.get(args.impl)

        def step(x, y):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = lm_loss(wrapped(x), y)[0]
            loss.backward()
            if sync_fn is not None:
                sync_fn()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

    else:
        zero = ZeroOptimizer(model, build_optimizer(model, ADAMW), stage)

        def step(x, y):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = lm_loss(model(x), y)[0]
            loss.backward()
            zero.step()
            return loss.detach()

    r = timed(step, local, device, args.warmup, args.steps)
    tps = args.batch * args.seq / r["step_s"]
    formula = zero_memory(n, world, stage if args.impl != "fsdp2" else 3, param=4, grad=4, optim=8)
    return {**r, "params": n, "tok_s_per_gpu": tps, "mfu": mfu(fpt, tps, device),
            "zero_formula_gib": formula["total"] / 2**30}


# -- an 8B model: FSDP2 (+ TP) with selective activation checkpointing -------------------------------------
def build_big(cfg: ModelConfig, pc: ParallelConfig, device) -> ParallelRunner:
    """Build on the meta device, parallelise, then allocate only this rank's shards and initialise them."""
    from lmforge.model.layers.rope import RotaryEmbedding

    with torch.device("meta"):
        runner = ParallelRunner(Transformer(cfg), pc, device=device)
    model = runner.model
    model.to_empty(device=device)
    fresh = RotaryEmbedding(cfg.rope_dim, cfg.rope_theta, cfg.rope_layout, cfg.rope_scaling, cfg.max_seq_len)
    for name, buf in fresh.named_buffers():  # buffers are not parameters: to_empty left them uninitialised
        model.rope.get_buffer(name).copy_(buf)
    torch.manual_seed(0)
    model.reset_parameters()
    return runner


def run_big(args, rank, world, device) -> dict:
    cfg = (ModelConfig(**{**LLAMA3_8B, "max_seq_len": args.seq}) if not args.smoke else
           ModelConfig(**{**LLAMA3_8B, "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
                          "vocab_size": 512, "max_seq_len": args.seq}))
    fsdp = world // args.tp > 1  # FSDP2 computes in bf16 (param_dtype); tp alone has no FSDP units: autocast there
    pc = ParallelConfig(dp_shard=world // args.tp, tp=args.tp, param_dtype="bf16" if fsdp else "fp32",
                        activation_checkpoint=args.ac, compile=args.compile)
    pc.validate(world, cfg, seq_len=args.seq, batch_size=args.batch * pc.dp_shard)
    runner = build_big(cfg, pc, device)
    model = runner.model
    fpt = Transformer.flops_per_token(model, args.seq)
    step = trainer_step(model, build_optimizer(model, ADAMW), ADAMW, device, runner=runner, bf16_autocast=not fsdp)
    # host batches, as the Trainer reads them; the tp ranks of one data-parallel rank share theirs
    batches = random_batches(args.warmup, args.batch, args.seq, cfg.vocab_size, "cpu", seed=rank // args.tp)
    r = timed(step, batches, device, args.warmup, args.steps)
    tps = args.batch * args.seq / r["step_s"] * pc.dp_shard / world  # tokens per GPU: tp ranks share a batch
    return {**r, "params": sum(p.numel() for p in model.parameters()), "tok_s_per_gpu": tps,
            "mfu": mfu(fpt, tps, device), "layout": f"dp_shard={pc.dp_shard} tp={pc.tp} ac={args.ac}"}


# -- pipeline bubble ------------------------------------------------------------------------------------
def run_pp(args, rank, world, device) -> dict:
    from lmforge.parallel.pp import bubble_fraction

    cfg = depth_model(args)
    pc = ParallelConfig(pp=world, pp_schedule=args.schedule, microbatches=args.microbatches, compile=args.compile)
    runner = ParallelRunner(on_device(cfg, device), pc, device=device, seq_len=args.seq,
                            batch_size=args.batch * args.microbatches)
    stage_mod, first, last = runner.model, runner.first, runner.last
    opt = build_optimizer(stage_mod, ADAMW)
    # no clipping: a step is the schedule and the optimizer, so that all but m stage passes are bubble
    step = trainer_step(stage_mod, opt, ADAMW, device, runner=runner, bf16_autocast=False, clip=0)
    batches = random_batches(args.warmup, args.batch * args.microbatches, args.seq, args.vocab, "cpu")
    r = timed(step, batches, device, args.warmup, args.steps)
    # one stage's forward + backward on one micro-batch, alone (inputs of the right shape for this stage)
    mb = args.batch
    x = (batches[0][0][:mb].to(device) if first
         else torch.randn(mb, args.seq, cfg.d_model, device=device, requires_grad=True))
    t_stage = timed(lambda x_, y_: _stage_fb(stage_mod, x_, y_, last), [(x, batches[0][1][:mb].to(device))], device,
                    2, max(3, args.steps))["step_s"]
    opt.zero_grad(set_to_none=True)
    t = torch.tensor([t_stage], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    bubble = max(0.0, 1 - args.microbatches * float(t) / r["step_s"])
    return {**r, "t_stage_mb_s": float(t), "bubble_measured": bubble,
            "bubble_formula": bubble_fraction(world, args.microbatches)}


def _stage_fb(stage_mod, x, y, last: bool):
    out = stage_mod(x)
    (lm_loss(out, y)[0] if last else out.float().square().mean()).backward()
    return torch.zeros(())


# -- context parallel: the longest sequence ------------------------------------------------------------
def run_cp(args, rank, world, device) -> dict:
    results, seq = [], args.seq
    cfg0 = depth_model(args)
    while seq <= args.max_seq:
        cfg = ModelConfig(**{**cfg0.__dict__, "max_seq_len": seq})
        pc = ParallelConfig(cp=world, sequence_parallel=False, param_dtype="bf16", activation_checkpoint="full")
        ok = torch.ones((), device=device)
        try:
            model = on_device(cfg, device)
            fpt = model.flops_per_token(seq)
            runner = ParallelRunner(model, pc, device=device, seq_len=seq)
            opt = build_optimizer(runner.model, ADAMW)
            step = trainer_step(runner.model, opt, ADAMW, device, runner=runner, bf16_autocast=False)
            r = timed(step, random_batches(2, 1, seq, args.vocab, "cpu"), device, 2, 3)
        except torch.cuda.OutOfMemoryError:
            ok.zero_()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        model = runner = opt = step = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not bool(ok):
            break
        tps = seq / r["step_s"] / world
        results.append({"seq": seq, "step_s": r["step_s"], "tok_s_per_gpu": tps, "mfu": mfu(fpt, tps, device),
                        "peak_gib": r["peak_gib"]})
        seq *= 2
    return {"longest_seq": results[-1]["seq"] if results else 0, "by_seq": results}


# -- Muon / Dion on FSDP2 shards ----------------------------------------------------------------------
def run_optim(args, rank, world, device) -> dict:
    from lmforge.parallel.matrix_optim import ShardedDion, ShardedMuon

    cfg = depth_model(args)
    model = on_device(cfg, device)
    matrices = [p for n, p in model.named_parameters() if p.dim() >= 2 and model.param_roles()[n] == "matrix"]
    rank_r = 64
    # bytes each rank receives per step, on average: an all-gather brings (N-1)/N of every fp32 momentum
    # matrix to every rank; gather-to-owner + scatter moves each matrix twice, once in total: 2 (N-1)/N^2
    full = sum(p.numel() * 4 for p in matrices)
    extra = {"adamw": 0, "muon": full * (world - 1) / world, "muon_owner": 2 * full * (world - 1) / world**2,
             "dion": sum((p.shape[0] + p[0].numel()) * min(rank_r, *p.shape) * 4 for p in matrices)
             * (world - 1) / world}[args.optim]
    pcfg = ParallelConfig(dp_shard=world, param_dtype="bf16")
    # all-gathers of the parameters for the forward and again for the backward in param_dtype, one reduce-scatter
    # of the gradients in reduce_dtype (fp32 unless set: 2 + 2 + 4 bytes per parameter here, not 3 x 2)
    size = {"bf16": 2, "fp32": 4}
    fsdp_bytes = model.num_params() * (2 * size[pcfg.param_dtype] + size[pcfg.reduce_dtype])
    runner = ParallelRunner(model, pcfg, device=device)
    ocfg = OptimConfig(name=args.optim.removesuffix("_owner"), lr=0.02 if args.optim != "adamw" else 3e-4,
                       adam_lr=3e-4, rank=rank_r, warmup_steps=0)
    opt = build_optimizer(model, ocfg)
    opt = {"muon": ShardedMuon.from_optimizer, "dion": ShardedDion.from_optimizer,
           "muon_owner": lambda o: ShardedMuon.from_optimizer(o, owner_compute=True)}.get(args.optim, lambda o: o)(opt)
    batches = random_batches(args.warmup, args.batch * world, args.seq, args.vocab, "cpu")
    local = [(x[rank * args.batch:(rank + 1) * args.batch], y[rank * args.batch:(rank + 1) * args.batch])
             for x, y in batches]
    step = trainer_step(model, opt, ocfg, device, runner=runner, bf16_autocast=False, clip=0)
    r = timed(step, local, device, args.warmup, args.steps)
    return {**r, "optimizer_comm_gib_per_step": extra / 2**30,
            "fsdp_comm_gib_per_step": fsdp_bytes / 2**30 * (world - 1) / world}


# -- MoE: experts split over the GPUs (all-to-all) vs replicated on every GPU -------------------------------
def run_moe(args, rank, world, device) -> dict:
    from lmforge.model.config import MoEConfig
    from lmforge.parallel.ddp import broadcast_module_
    from lmforge.parallel.ep import apply_ep, sync_gradients

    d = 64 * args.depth
    cfg = ModelConfig.from_depth(args.depth, vocab_size=args.vocab, max_seq_len=args.seq, mlp="moe",
                                 activation="swiglu", moe=MoEConfig(n_experts=args.experts, top_k=2, d_expert=d))
    model = on_device(cfg, device)
    fpt = model.flops_per_token(args.seq)
    broadcast_module_(model)
    if args.ep:
        apply_ep(model)
    opt = build_optimizer(model, ADAMW)
    batches = random_batches(args.warmup, args.batch * world, args.seq, args.vocab, device)
    local = [(x[rank * args.batch:(rank + 1) * args.batch], y[rank * args.batch:(rank + 1) * args.batch])
             for x, y in batches]

    def step(x, y):  # the same gradient all-reduce code for both layouts; EP skips the experts' grads
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = lm_loss(model(x), y)[0]
        loss.backward()
        sync_gradients(model)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    r = timed(step, local, device, args.warmup, args.steps)
    tps = args.batch * args.seq / r["step_s"]
    return {**r, "params_per_gpu": sum(p.numel() for p in model.parameters()), "tok_s_per_gpu": tps,
            "mfu_active": mfu(fpt, tps, device), "experts": args.experts}


RUNS = {"dp": run_dp, "big": run_big, "pp": run_pp, "cp": run_cp, "optim": run_optim, "moe": run_moe}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", choices=list(RUNS))
    ap.add_argument("--ep", action="store_true", help="moe: experts split over the GPUs (else replicated)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--impl", default="fsdp2",
                    choices=["lmforge_ddp", "lmforge_bucketed", "zero1", "zero2", "zero3", "torch_ddp", "fsdp2"])
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ac", default="selective", choices=["none", "full", "selective"])
    ap.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"])
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--optim", default="adamw", choices=["adamw", "muon", "muon_owner", "dion"])
    ap.add_argument("--depth", type=int, default=24)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--max-seq", type=int, default=262144)
    ap.add_argument("--batch", type=int, default=8, help="sequences per data-parallel rank (per micro-batch for pp)")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.depth, args.seq, args.batch, args.vocab, args.warmup, args.steps = 2, 32, 2, 256, 2, 3
        args.compile, args.max_seq, args.microbatches = False, 128, min(args.microbatches, 4)
    rank, world, device = join()
    torch._dynamo.config.cache_size_limit = 64
    out = RUNS[args.config](args, rank, world, device)
    sync(device)
    variant = {"dp": args.impl, "big": f"tp{args.tp}_{args.ac}", "pp": f"{args.schedule}_m{args.microbatches}",
               "cp": "cp", "optim": args.optim,
               "moe": "ep" if args.ep else "replicated"}[args.config]
    if rank == 0:
        meta = {"config": args.config, "variant": variant, "world": world, "seq": args.seq, "batch": args.batch,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                "torch": torch.__version__, "smoke": args.smoke}
        row = {**meta, **out}
        name = f"{args.config}_{variant}_n{world}{'_smoke' if args.smoke else ''}.json"
        path = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results" / "scaling_gpus") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(row, indent=2))
        print(json.dumps({k: v for k, v in row.items() if k not in ("by_seq",)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
