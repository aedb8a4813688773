"""`lmforge train --config run.toml [--nproc N] [--optim.lr 1e-3 ...]`: pretrain a model (see TrainConfig);
--nproc N re-runs the command on N local processes under torchrun (the [parallel] layout, FSDP2 by default)."""

from __future__ import annotations

from typing import Any, Callable

from lmforge.cli.common import _split_config_flag, parse_config


def _description() -> str:
    from lmforge.optim import OPTIMIZERS, SCHEDULES

    return ("Pretrain a language model on token shards (lmforge tokenizer encode).\n\n"
            f"--optim.name: {', '.join(sorted(OPTIMIZERS))}\n"
            f"--optim.schedule: {', '.join(sorted(SCHEDULES))}\n"
            "--nproc N: train on N local processes (torchrun; [parallel] dp_shard, dp_replicate, tp, pp, cp)")


def model_summary(cfg) -> str:
    """One line: parameters, shape and token budget, printed before training starts."""
    from lmforge.scaling.flops import num_params

    m, n = cfg.model, num_params(cfg.model)
    # the first step compiles with no line or bar moving (about a minute at toy size on a CPU; compile_tune adds
    # 20-130 s on a GPU): said before it, not left to look like a hang
    slow = ("; compile = true: the first step compiles the model first (a minute or more, the bar still)"
            if cfg.compile else "")
    return (f"model: {n / 1e6:,.2f}M parameters ({num_params(m, exclude_embeddings=True) / 1e6:,.2f}M without "
            f"embeddings), {m.n_layers} layers, d_model {m.d_model}, vocab {m.vocab_size}; "
            f"{cfg.max_steps} steps x {cfg.tokens_per_step:,} tokens = {cfg.max_steps * cfg.tokens_per_step:,} tokens"
            + slow)


def pop_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """`--nproc N` / `--nproc=N` out of argv: (N or None, the other arguments)."""
    from lmforge.errors import ConfigError

    nproc, rest = _split_config_flag(argv, "--nproc", "a number of processes")
    if nproc is not None and (not nproc.isdigit() or int(nproc) < 1):
        raise ConfigError(f"--nproc must be a whole number of processes >= 1, got {nproc!r}")
    return (int(nproc) if nproc is not None else None), rest


def relaunch(command: str, argv: list[str], parse: Callable[[list[str]], Any],
             check: Callable[[Any], None] | None = None) -> tuple[int | None, Any]:
    """`lmforge COMMAND --nproc N ...`: the arguments without --nproc are parsed here first (`parse`), so
    that --help and a bad config answer once, before any process starts; then with N > 1, outside torchrun,
    `check(config)` runs the checks the run makes before training (its data files, tokenizer, vocabulary), so a
    bad input is one line, not N, and the command re-runs under torchrun on N local processes: (its exit code,
    None); what they print alike (an error, a warning) is printed once (lmforge.parallel.reports). Otherwise
    (None, the parsed config) to run here, where the run checks its inputs itself."""
    import contextlib
    import os

    from lmforge.parallel.reports import shared_reports

    nproc, argv = pop_nproc(argv)
    launching = nproc is not None and nproc > 1 and "RANK" not in os.environ
    with shared_reports() if launching else contextlib.nullcontext():  # (the config's warnings too: said once)
        cfg = parse(argv)
        if "RANK" not in os.environ:
            check_launch(cfg, nproc or 1)
        if not launching:
            return None, cfg
        from lmforge.parallel.launch import backend_for, check_local_gpus, run_passing_signals, torchrun_argv

        if backend_for(cfg.device) == "nccl":
            check_local_gpus(nproc)
        if check is not None:
            check(cfg)
        # a Ctrl-C or SIGTERM to this launcher reaches the processes that train (they checkpoint and stop)
        return run_passing_signals(torchrun_argv(nproc, [command, *argv])), None


def check_launch(cfg, nproc: int) -> None:
    """Before any process starts: the [parallel] layout's size is the process count, and the optimizer can
    step on the parameters as that layout holds them."""
    from lmforge.errors import ConfigError
    from lmforge.optim import check_sharding

    par = getattr(cfg, "parallel", None)
    if par is None:
        return
    if par.world_size > 1 and par.world_size != nproc:
        raise ConfigError(f"the [parallel] layout ({par.sizes}) needs {par.world_size} processes: launch with "
                          f"--nproc {par.world_size}" + (f", not {nproc}" if nproc > 1 else ""))
    if nproc > 1:  # all sizes 1: FSDP over the processes
        sharded = par.dp_shard > 1 or par.tp > 1 or par.cp > 1 or par.world_size == 1
        check_sharding(cfg.optim.name, sharded, tensor_parallel=par.tp > 1)
        # the layout the processes will run against the model and batch: a batch the ranks cannot split failed in
        # every process, under torchrun's report of failed children
        from lmforge.model.config import ModelConfig

        model, data = getattr(cfg, "model", None), getattr(cfg, "data", None)
        par.for_world(nproc).validate(nproc, model if isinstance(model, ModelConfig) else None,
                                      seq_len=getattr(data, "seq_len", None),
                                      batch_size=getattr(data, "batch_size", None))
        if getattr(cfg, "fused_loss", False):
            from lmforge.train.config import check_fused_loss

            check_fused_loss(par.for_world(nproc))


def check_sections(cfg) -> None:
    """Refuse settings of a model section the model does not use (a command line that sets one meant the switch)."""
    ignored = cfg.model.ignored_sections()
    if ignored:  # (Python may keep a dense twin's section)
        from lmforge.errors import ConfigError

        raise ConfigError(f"{ignored[0]}, or remove those settings")


def check_run(cfg) -> None:
    """What `lmforge train` checks before it trains, for the --nproc launcher to check once before N processes do:
    the model's sections, and the shards against each other, their tokenizer and the model's vocabulary."""
    from lmforge.train.pretrain import pretraining_data

    check_sections(cfg)
    pretraining_data(cfg)


def main(argv: list[str]) -> int:
    import os

    from lmforge.train.config import TrainConfig

    rc, cfg = relaunch("train", argv, lambda a: parse_config(TrainConfig, a, prog="lmforge train",
                                                            description=_description()), check_run)
    if rc is not None:
        return rc
    check_sections(cfg)
    rank0 = os.environ.get("RANK", "0") == "0"
    if rank0:
        print(model_summary(cfg), flush=True)
    from lmforge.train.trainer import train  # (torch and the model code: not needed for --help or a bad flag)

    result = train(cfg)
    if not rank0:
        return 0
    val = f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "n/a"
    print(f"done: {result.steps} steps in {result.wall_time:.0f}s, val loss {val}; "
          f"run directory {result.run_dir} (checkpoint {result.checkpoint})")
    return 0
