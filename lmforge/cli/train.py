"""`lmforge train --config run.toml [--optim.lr 1e-3 ...]`: pretrain a model (see TrainConfig)."""

from __future__ import annotations

from lmforge.cli.common import parse_config


def _description() -> str:
    from lmforge.optim import OPTIMIZERS, SCHEDULES

    return ("Pretrain a language model on token shards (lmforge tokenizer encode).\n\n"
            f"--optim.name: {', '.join(sorted(OPTIMIZERS))}\n"
            f"--optim.schedule: {', '.join(sorted(SCHEDULES))}")


def model_summary(cfg) -> str:
    """One line: parameters, shape and token budget, printed before training starts."""
    from lmforge.scaling.flops import num_params

    m, n = cfg.model, num_params(cfg.model)
    return (f"model: {n / 1e6:,.2f}M parameters ({num_params(m, exclude_embeddings=True) / 1e6:,.2f}M without "
            f"embeddings), {m.n_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}; "
            f"{cfg.max_steps} steps x {cfg.tokens_per_step:,} tokens = {cfg.max_steps * cfg.tokens_per_step:,} tokens")


def main(argv: list[str]) -> int:
    from lmforge.train.config import TrainConfig
    from lmforge.train.trainer import train

    cfg = parse_config(TrainConfig, argv, prog="lmforge train", description=_description())
    print(model_summary(cfg), flush=True)
    result = train(cfg)
    val = f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "n/a"
    print(f"done: {result.steps} steps in {result.wall_time:.0f}s, val loss {val}; "
          f"run directory {result.run_dir} (checkpoint {result.checkpoint})")
    return 0
