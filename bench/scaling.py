"""Scaling-law reproduction at CPU size: python bench/scaling.py [--flag value ...] (SweepConfig flags)

Trains the IsoFLOP grid of `lmforge scaling sweep` (byte-level tinyshakespeare, from_depth models), then
fits it like `lmforge scaling fit`: prints the run table, the IsoFLOP minima, the fitted exponents
(approaches 1-3) next to Chinchilla's (a = 0.46-0.50), and writes fit.json and the plots beside runs.csv.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lmforge.cli.common import parse_config
from lmforge.scaling.report import FitConfig, run_fits, write_report
from lmforge.scaling.sweep import SweepConfig, main_sweep


def main(argv: list[str]) -> None:
    cfg = parse_config(SweepConfig, argv, prog="bench/scaling.py", description=__doc__)
    rows = main_sweep(cfg)
    if cfg.dry_run:  # the plan is printed; there is no run table to fit
        return
    print("| budget C | depth | N | D (tokens) | steps | val loss | wall (s) |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget']:.0e} | {r['depth']} | {r['N']:,} | {r['D']:,} | {r['steps']} | {r['loss']:.4f} "
              f"| {r['wall_time']:.0f} |")
    fit_cfg = FitConfig(table=str(Path(cfg.out) / "runs.csv"), predict=(1e12, 1e13), bootstrap=100)
    report = run_fits(fit_cfg)
    print(f"\nfit.json: {write_report(fit_cfg, report)}")
    for name in ("approach1", "approach2", "approach3"):
        if name in report:
            print(f"{name}: N_opt ∝ C^{report[name]['a']:.3f}, D_opt ∝ C^{report[name]['b']:.3f}")
    for name, why in report.get("skipped", {}).items():
        print(f"{name}: skipped ({why})")
    print("Chinchilla (Hoffmann et al. 2022): a = 0.50 / 0.49 / 0.46 (approaches 1 / 2 / 3)")


if __name__ == "__main__":
    main(sys.argv[1:])
