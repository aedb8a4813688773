"""Optimizer benchmark: python bench/optimizers.py [cpu|gpu] [--flag value ...]

'cpu' (default): depth-2 byte-level model, 200 steps x 512 tokens, 3 learning rates per optimizer
(~10 min on 2 shared cores). 'gpu': depth-6 model, 600 steps x 8192 tokens, bf16 autocast (one H100,
under 8 min; new runs stop after 300 s, every optimizer's centre learning rate first).
Prints a markdown table; writes results.json and loss_curves.png to --out.
The 'gpu' setting's 4.9M tokens are ~5 passes over tinyshakespeare, so its fastest optimizers overfit
(docs/benchmarks.md); give it a larger --data file for a data-unlimited comparison.
"""

from __future__ import annotations

import sys

from lmforge.cli.common import parse_config
from lmforge.optim.benchmark import OptimBenchConfig, main_run

SETTINGS = {
    "cpu": OptimBenchConfig(out="runs/bench_optimizers_cpu"),
    "gpu": OptimBenchConfig(depth=6, seq_len=256, batch_size=32, steps=600, warmup_steps=60, eval_every=50,
                            eval_batches=16, precondition_frequency=25, block_size=1536, time_budget_s=300,
                            out="runs/bench_optimizers_gpu"),
}

if __name__ == "__main__":
    argv = sys.argv[1:]
    setting = argv.pop(0) if argv and argv[0] in SETTINGS else "cpu"
    cfg = parse_config(OptimBenchConfig, argv, prog=f"bench/optimizers.py {setting}",
                       description=__doc__, default=SETTINGS[setting])
    main_run(cfg)
