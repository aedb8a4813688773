"""The sampler's penalty history per step: rebuilt from every row's token list (`sampler._history`, the
reference) vs kept per sequence and advanced by the appended tokens (`sampler.token_history`), side by side
in one run, checked equal at every step, for rows of growing length; median ms per step.

    python bench/penalty_history.py                 # 8 rows, prompts of 1,000 tokens, V = 32,000
    python bench/penalty_history.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.infer import sampler
from lmforge.infer.sampler import Row, _history, token_history
from lmforge.infer.sampling import SamplingParams


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--outputs", default="100,500,2000,5000", help="output lengths at which to time, comma-separated")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=20, help="steps timed at each length")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.5, max_tokens=1)
    rows = [Row(params, None, torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist(), args.prompt)
            for _ in range(args.rows)]
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()} torch {torch.__version__} "
          f"device {args.device}, threads {torch.get_num_threads()}; {args.rows} rows, prompt {args.prompt}, "
          f"V = {args.vocab}")
    print("| output tokens per row | rebuild ms/step | incremental ms/step | speed-up |")
    print("|---:|---:|---:|---:|")
    for target in map(int, args.outputs.split(",")):
        while len(rows[0].tokens) - args.prompt < target - args.steps:  # grow untimed (states advance too)
            for r in rows:
                r.tokens.append(int(torch.randint(0, args.vocab, (1,), generator=g)))
            token_history(rows, args.vocab, args.device)
        ref_ms, inc_ms = [], []
        for _ in range(args.steps):
            for r in rows:
                r.tokens.append(int(torch.randint(0, args.vocab, (1,), generator=g)))
            _sync(args.device)
            t0 = time.perf_counter()
            inc = token_history(rows, args.vocab, args.device)
            _sync(args.device)
            t1 = time.perf_counter()
            ref = _history(rows, args.vocab, args.device)
            _sync(args.device)
            t2 = time.perf_counter()
            assert torch.equal(inc.counts, ref.counts) and torch.equal(inc.seen, ref.seen), "histories differ"
            inc_ms.append((t1 - t0) * 1e3)
            ref_ms.append((t2 - t1) * 1e3)
        a, b = statistics.median(ref_ms), statistics.median(inc_ms)
        print(f"| {len(rows[0].tokens) - args.prompt:,} | {a:.2f} | {b:.2f} | {a / b:.1f}x |")
    assert sampler.INCREMENTAL


if __name__ == "__main__":
    main()
