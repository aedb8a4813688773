"""`lmforge bench ...`: benchmarks that are commands as well as scripts in bench/.

    lmforge bench optimizers [--steps 200 --depth 2 --optimizers adamw muon ...]
"""

from __future__ import annotations

from lmforge.cli.common import parse_config, run_group


def _optimizers(argv: list[str]) -> int:
    from lmforge.optim.benchmark import OptimBenchConfig, main_run

    cfg = parse_config(OptimBenchConfig, argv, prog="lmforge bench optimizers",
                       description="Same model, data and token budget for each optimizer, a small LR sweep each; "
                                   "prints best loss, steps/time to a target loss and state bytes per parameter.")
    main_run(cfg)
    return 0


COMMANDS = {"optimizers": (_optimizers, "compare optimizers at equal token budget (LR sweep each)")}


def main(argv: list[str]) -> int:
    return run_group("bench", argv, COMMANDS)
