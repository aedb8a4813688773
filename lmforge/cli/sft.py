"""`lmforge sft --config FILE.toml [--nproc N] [--data.packing false ...]`: supervised fine-tuning of a
checkpoint on chat or prompt/completion JSONL (lmforge.train.posttrain); `run_objective` also serves dpo, rm,
distill, kto and orpo, and an objective a script registered (lmforge.align.config.register_objective) there.
--nproc N re-runs the command on N local processes under torchrun, data parallel ([parallel] dp_shard = FSDP2 by
default, or dp_replicate = DDP), as `lmforge train --nproc N` does."""

from __future__ import annotations

from lmforge.cli.common import parse_config

HELP = {
    "sft": "Supervised fine-tuning on chat / prompt-completion JSONL (loss on assistant turns).",
    "dpo": "Direct preference optimisation (and IPO / SimPO via [dpo] loss_type) on preference-pair JSONL.",
    "rm": "Train a Bradley-Terry reward model (scalar head) on preference-pair JSONL.",
    "distill": "Token-level distillation from a teacher model (set teacher = 'DIR').",
    "kto": "Kahneman-Tversky optimisation on unpaired JSONL ({prompt, completion, label: true|false}).",
    "orpo": "Odds-ratio preference optimisation (SFT + odds-ratio term, no reference model) on pair JSONL.",
}


def run_objective(name: str, argv: list[str]) -> int:
    import os

    from lmforge.align.config import config_class  # (torch-free: --help and a bad flag answer at once)
    from lmforge.cli.train import relaunch
    from lmforge.errors import ConfigError

    def parse(args: list[str]):
        about = HELP.get(name, f"Post-training with the registered objective {name!r} (register_objective).")
        cfg = parse_config(config_class(name), args, prog=f"lmforge {name}", description=about +
                           " Resumable: run it again; --nproc N trains on N local processes (data parallel).")
        if cfg.objective != name:
            raise ConfigError(f"objective = {cfg.objective!r} in the config, but this is `lmforge {name}`; "
                              f"remove the key or run `lmforge {cfg.objective}`")
        return cfg

    def check(cfg) -> None:  # (before torchrun relaunches `lmforge NAME` on N processes)
        from lmforge.train.posttrain import check_posttrain  # (torch: after --help and a bad flag)

        if name not in HELP:  # each relaunched process would be a bare `lmforge`, which never registered it
            raise ConfigError(f"--nproc re-runs `lmforge {name}`, but {name!r} is an objective registered in this "
                              "script, which those processes do not run; start the script itself under torchrun "
                              "(torchrun --nproc-per-node N YOUR_SCRIPT.py) and drop --nproc")
        check_posttrain(cfg)

    rc, cfg = relaunch(name, argv, parse, check)
    if rc is not None:
        return rc
    from lmforge.train.posttrain import posttrain  # (torch, the model code and the objectives)

    result = posttrain(cfg)
    if os.environ.get("RANK", "0") != "0":
        return 0
    ev = ", ".join(f"{k} {v:.4f}" for k, v in result.final_eval.items()) or "no validation data"
    print(f"done: {result.steps} steps in {result.wall_time:.0f}s ({ev}); run directory {result.run_dir} "
          f"(checkpoint {result.checkpoint})")
    return 0


def main(argv: list[str]) -> int:
    return run_objective("sft", argv)
