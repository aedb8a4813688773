"""Host and GPU time of the eager Trainer step, dense vs MoE (TritonMoE) at equal active FLOPs - the shape of
bench/moe_kernels.py's train section (d 1024, 8 layers, 8 experts x 2048, top-2, 16 x 1024 tokens, bf16 autocast).

The eager MoE step launches ~1,500 kernels against the dense step's ~1,100, so its host time (seconds for one
step to return when started on an idle GPU) comes close to its GPU time and varies with the machine's CPU:
this prints both, the wall time per step (median of blocks) and, with --profile, a cProfile of one step and
whether any call synchronises with the GPU. To compare two versions of lmforge in one GPU call, run it twice
with PYTHONPATH pointing at each (e.g. a `git archive <commit> lmforge` snapshot), alternating:

    python bench/moe_step_host.py --tag new [--profile]
    PYTHONPATH=/path/to/snapshot python bench/moe_step_host.py --tag base
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import pstats
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_kernels import random_shard  # noqa: E402

from lmforge.kernels.training import apply_fused_kernels  # noqa: E402
from lmforge.model.config import ModelConfig, MoEConfig  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.optim.config import OptimConfig  # noqa: E402
from lmforge.train.config import DataConfig, TrainConfig  # noqa: E402
from lmforge.train.harness import scratch_trainer  # noqa: E402
from lmforge.train.pretrain import pretraining_parts  # noqa: E402


def measure(name: str, mcfg: ModelConfig, shard: Path, args) -> dict:
    data = DataConfig(train=(str(shard),), seq_len=1024, batch_size=args.batch, val_fraction=0.01)
    cfg = TrainConfig(model=mcfg, data=data, optim=OptimConfig(name="adamw", lr=3e-4, warmup_steps=0),
                      max_steps=10_000, device="cuda", compile=False, sdpa_backend="cudnn", eval_batches=1)
    torch.manual_seed(0)
    model = Transformer(mcfg).cuda()
    if mcfg.mlp == "moe":
        apply_fused_kernels(model, kinds=("moe",))
    parts = pretraining_parts(cfg, model=model)
    with scratch_trainer(parts.model, parts.optimizer, parts.data, parts.objective, cfg) as tr:
        for _ in range(4):
            tr.train_step()
        hosts = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tr.train_step()
            hosts.append(time.perf_counter() - t0)
        walls = []
        for _ in range(args.blocks):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                tr.train_step()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - t0) / args.steps)
        walls.sort()
        mid = len(walls) // 2
        median = walls[mid] if len(walls) % 2 else (walls[mid - 1] + walls[mid]) / 2
        print(f"{args.tag} | {name} | host {min(hosts) * 1e3:.2f} ms | wall median {median * 1e3:.2f} ms "
              f"(blocks {', '.join(f'{w * 1e3:.1f}' for w in walls)})", flush=True)
        row = dict(tag=args.tag, model=name, host_ms=min(hosts) * 1e3, step_ms=median * 1e3,
                   blocks_ms=[w * 1e3 for w in walls])
        if not args.profile:
            return row
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        tr.train_step()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
        print(out.getvalue(), flush=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            tr.train_step()
            print(f"{args.tag} | {name} | no call synchronised with the GPU", flush=True)
            row["syncs"] = False
        except RuntimeError:
            print(f"{args.tag} | {name} | synchronised at:\n" + "".join(traceback.format_exc().splitlines(True)[-24:]))
            row["syncs"] = True
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="lmforge", help="label of the printed rows (the version measured)")
    ap.add_argument("--batch", type=int, default=16, help="rows of 1,024 tokens per step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--profile", action="store_true", help="cProfile one step; check it for GPU syncs")
    ap.add_argument("--out", default="bench/results/moe_step_host.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/moe_step_host.py measures GPU steps: run it on a CUDA machine")
    base = ModelConfig(vocab_size=8192, d_model=1024, n_layers=8, n_heads=16, max_seq_len=1024)
    shard = random_shard(8192)
    rows = [measure(name, mcfg, shard, args) for name, mcfg in (
        ("dense", dataclasses.replace(base, d_ff=4096)),
        ("moe", dataclasses.replace(base, mlp="moe", moe=MoEConfig(n_experts=8, top_k=2, d_expert=2048, aux_loss=0.01))))]
    rows[1]["moe_over_dense"] = rows[0]["step_ms"] / rows[1]["step_ms"]
    print(f"{args.tag} | MoE / dense tokens/s: {rows[1]['moe_over_dense']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(date=datetime.now(timezone.utc).isoformat(timespec="minutes"),
                                   hardware=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
