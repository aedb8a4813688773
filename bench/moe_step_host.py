"""Host and GPU time of the eager Trainer step, dense vs MoE (TritonMoE) at equal active FLOPs - the shape of
bench/moe_kernels.py's train section (d 1024, 8 layers, 8 experts x 2048, top-2, 16 x 1024 tokens, bf16 autocast).

The eager MoE step launches ~1,500 kernels against the dense step's ~1,100, so its host time (seconds for one
step to return when started on an idle GPU) comes close to its GPU time and varies with the machine's CPU:
this prints both (bench/train_kernels.py's trainer_throughput with host=True), the step time (median of blocks),
whether any call synchronises with the GPU, and with --profile the kernel and CUDA-runtime tables of one step.
To compare two versions of lmforge in one GPU call, run it with PYTHONPATH pointing at each (e.g. a
`git archive <commit> lmforge` snapshot), alternating:

    python bench/moe_step_host.py --tag new [--profile]
    PYTHONPATH=/path/to/snapshot python bench/moe_step_host.py --tag base
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from moe_kernels import _swap  # noqa: E402
from train_kernels import random_shard, trainer_throughput  # noqa: E402

from lmforge.model.config import ModelConfig, MoEConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", default="lmforge", help="label of the printed rows (the version measured)")
    ap.add_argument("--batch", type=int, default=16, help="rows of 1,024 tokens per step")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--profile", action="store_true", help="kernel and CUDA-runtime tables of one step")
    ap.add_argument("--out", default="bench/results/moe_step_host.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/moe_step_host.py measures GPU steps: run it on a CUDA machine")
    base = ModelConfig(vocab_size=8192, d_model=1024, n_layers=8, n_heads=16, max_seq_len=1024)
    moe = MoEConfig(n_experts=8, top_k=2, d_expert=2048, aux_loss=0.01)
    shard = random_shard(8192)
    rows = []
    for name, mcfg, prepare in (("dense", dataclasses.replace(base, d_ff=4096), None),
                                ("moe", dataclasses.replace(base, mlp="moe", moe=moe), _swap("moe"))):
        row = trainer_throughput(mcfg, shard, args.batch, 1024, "cuda", args, prepare=prepare, compile=False,
                                 profile=args.profile, host=True)
        rows.append(dict(tag=args.tag, model=name, **row))
        print(f"{args.tag} | {name} | host {row['host_ms']:.2f} ms | step {row['step_ms']:.2f} ms | "
              f"syncs with the GPU: {row['syncs']}", flush=True)
    ratio = rows[0]["step_ms"] / rows[1]["step_ms"]
    print(f"{args.tag} | MoE / dense tokens/s: {ratio:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(date=datetime.now(timezone.utc).isoformat(timespec="minutes"),
                                   hardware=torch.cuda.get_device_name(), moe_over_dense=ratio, rows=rows), indent=1))


if __name__ == "__main__":
    main()
