"""`lmforge orpo --config FILE.toml`: see lmforge.cli.sft.HELP["orpo"] and lmforge.train.posttrain."""

from __future__ import annotations

from lmforge.cli.sft import run_objective


def main(argv: list[str]) -> int:
    return run_objective("orpo", argv)
