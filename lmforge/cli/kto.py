"""`lmforge kto --config FILE.toml`: see lmforge.cli.sft.HELP["kto"] and lmforge.train.posttrain."""

from __future__ import annotations

from lmforge.cli.sft import run_objective


def main(argv: list[str]) -> int:
    return run_objective("kto", argv)
