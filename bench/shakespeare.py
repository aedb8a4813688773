"""Quality per wall-clock on real text: character-level tinyshakespeare with nanoGPT's CPU example
configuration (4 layers, 4 heads, d=128, context 64, batch 12, 2,000 iterations, no dropout; lr 1e-3
cosine to 1e-4, warmup 100, beta2 0.99), which nanoGPT reports reaching validation loss ~1.88 in
about 3 minutes. Runs the nanoGPT-shaped model (GPT-2 layout) and a Llama-style variant side by side,
each in the precisions asked for: fp32; bf16 (autocast, fp32 residual stream); bf16res (autocast with
TrainConfig.bf16_residual) - what a bf16 residual stream costs in validation loss.

    python bench/shakespeare.py [--steps 2000] [--device cpu] [--precisions fp32,bf16,bf16res]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lmforge.data.shards import write_tokens
from lmforge.model.config import ModelConfig
from lmforge.optim.config import OptimConfig
from lmforge.train.config import DataConfig, TrainConfig
from lmforge.train.trainer import train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def char_shards(out: Path) -> tuple[Path, Path, int]:
    text = DATA.read_text()
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((lut[c] for c in text), dtype=np.int64, count=len(text))
    n = int(0.9 * len(ids))  # nanoGPT's split: first 90% train, last 10% validation
    tr = write_tokens(out / "train.bin", ids[:n], vocab_size=len(chars), tokenizer="")
    va = write_tokens(out / "val.bin", ids[n:], vocab_size=len(chars), tokenizer="")
    return tr, va, len(chars)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--variants", default="nanogpt,llama")
    ap.add_argument("--precisions", default="fp32", help="comma list of fp32, bf16, bf16res")
    ap.add_argument("--out", default="bench/results/shakespeare.json")
    args = ap.parse_args()
    if not DATA.exists():
        raise SystemExit(f"needs {DATA}")
    tmp = Path(tempfile.mkdtemp())
    tr, va, vocab = char_shards(tmp)
    nanogpt = ModelConfig(vocab_size=vocab, d_model=128, n_layers=4, n_heads=4, max_seq_len=64, pos_emb="learned",
                          norm="layernorm", activation="gelu", bias=False, tie_embeddings=True)
    variants = {"nanogpt": nanogpt,
                "llama": dataclasses.replace(nanogpt, pos_emb="rope", norm="rmsnorm", activation="swiglu",
                                             tie_embeddings=False)}
    rows = []
    for name in args.variants.split(","):
        for precision in args.precisions.split(","):
            cfg = TrainConfig(
                model=variants[name],
                data=DataConfig(train=(str(tr),), val=(str(va),), seq_len=64, batch_size=12, bytes_per_token=1.0),
                optim=OptimConfig(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, warmup_steps=100, min_lr_ratio=0.1),
                run_dir=str(tmp / f"{name}-{precision}"), max_steps=args.steps, eval_every=max(1, args.steps // 4),
                eval_batches=20, log_every=50, ckpt_every=args.steps, device=args.device, progress=False,
                plot=False, seed=1337, dtype="fp32" if precision == "fp32" else "bf16",
                bf16_residual=precision == "bf16res")
            t = time.perf_counter()
            res = train(cfg)
            wall = time.perf_counter() - t
            rows.append({"variant": name, "precision": precision, "steps": res.steps,
                         "val_loss": res.final_val_loss, "wall_s": wall})
    print(f"\n{'variant':<10} {'precision':<9} {'steps':>6} {'val loss':>9} {'wall s':>8}"
          "   (nanoGPT reference: 1.88 in ~180 s)")
    for r in rows:
        print(f"{r['variant']:<10} {r['precision']:<9} {r['steps']:>6} {r['val_loss']:>9.4f} {r['wall_s']:>8.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "device": args.device,
                                          "threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
