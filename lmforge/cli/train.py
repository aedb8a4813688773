"""`lmforge train --config run.toml [--optim.lr 1e-3 ...]`: pretrain a model (see TrainConfig)."""

from __future__ import annotations

from lmforge.cli.common import parse_config


def main(argv: list[str]) -> int:
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import train

    cfg = parse_config(TrainConfig, argv, prog="lmforge train",
                       description="Pretrain a language model on token shards (lmforge tokenizer encode).")
    result = train(cfg)
    val = f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "n/a"
    print(f"done: {result.steps} steps in {result.wall_time:.0f}s, val loss {val}; "
          f"run directory {result.run_dir} (checkpoint {result.checkpoint})")
    return 0
