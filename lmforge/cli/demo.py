"""`lmforge demo`: the main job on an embedded corpus (Python's own sources); no downloads."""

from __future__ import annotations

from lmforge.cli.common import parse_config


def main(argv: list[str]) -> int:
    from lmforge.demo import DemoConfig, run_demo

    cfg = parse_config(DemoConfig, argv, prog="lmforge demo", config_file=False,
                       description="Train a BPE tokenizer and a small LM on Python's standard-library "
                                   "sources, show validation loss and bits-per-byte falling, and sample.")
    run_demo(cfg)
    return 0
