"""Scaling sweeps: train a grid of models over several FLOP budgets and record their final losses.

For each budget C and each depth d (model = ModelConfig.from_depth(d), nanochat's single dial), the run
gets D = C / (6 N) tokens, i.e. steps = D / tokens_per_step; (C, d) pairs that would get fewer than
`min_steps` or more than `max_steps` steps are left out of the plan. Each run is an ordinary trainer run
(`lmforge.train.trainer.train`) in its own directory; the table (N, D, C, C_exact, budget, loss, ...) goes
to runs.csv and runs.json, and the evaluation curves to curves.json for Chinchilla's approach 1.
N is the model's total parameter count (embeddings and head included: `num_params`), in the plan and in 6ND.
A finished run leaves result.json in its directory (C<budget>_d<depth>, the budget in its shortest exact
form), so re-running a sweep only trains what is missing; a result.json recorded for another plan or other
settings (a changed width, seq_len, lr, data, ...: RUN_SETTINGS) is refused, naming its directory, as the
trainer refuses a checkpoint of another model.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.config import check
from lmforge.errors import ConfigError, DataError, TrainingDiverged
from lmforge.scaling.flops import DEPTH_WIDTH, depth_model, flops_per_token, num_params
from lmforge.scaling.table import read_json
from lmforge.utils import check_output_path, write_json_atomic


@dataclass(frozen=True, kw_only=True)
class SweepConfig:
    budgets: tuple[float, ...] = (3e10, 1e11, 3e11, 1e12)
    """training FLOP budgets C (6ND convention, N = all parameters, embeddings included)"""
    depths: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    """model depths to train at every budget (ModelConfig.from_depth: n_layers = depth)"""
    width: int = DEPTH_WIDTH
    """width per layer of depth: d_model = width·depth, heads of `width` (flops.depth_model; nanochat's dial uses 64,
    16 gives finer steps in N for CPU-sized grids; `lmforge scaling flops --depth` counts the same models)"""
    seq_len: int = 64
    """tokens (bytes) per training row, also the models' max_seq_len"""
    batch_size: int = 16
    """rows per step: a step trains seq_len x batch_size tokens"""
    min_steps: int = 20
    """a (budget, depth) point with fewer steps is left out (named on stderr): too few to train"""
    max_steps: int = 5000
    """a (budget, depth) point with more steps is left out (named on stderr): too long to run"""
    lr: float = 3e-3
    """peak learning rate of every run (cosine schedule down to 0.1 of it)"""
    optimizer: str = "adamw"
    """optimizer of every run (lmforge.optim: adamw, lion, muon, ...)"""
    warmup_frac: float = 0.05
    """warmup as a fraction of each run's steps"""
    evals: int = 5
    """evaluations per run (for approach 1's training curves)"""
    eval_batches: int = 8
    """validation batches per evaluation"""
    data: str = ""
    """text file (byte level); '' = Python's own sources (tinyshakespeare when the developers' data
    folder is present)"""
    out: str = "runs/scaling_sweep"
    """directory for the runs (one per point), runs.csv, runs.json and curves.json; a finished run in it is reused"""
    device: str = "auto"
    """'cpu', 'cuda', 'cuda:1', ... or 'auto' (CUDA when available)"""
    threads: int = 1
    """CPU threads for torch (0 = torch's default)"""
    seed: int = 0
    """seed of every run's model and data order"""
    dry_run: bool = False
    """print the plan (N, D, steps per run) and stop"""

    def __post_init__(self) -> None:
        check(len(self.budgets) >= 1 and all(math.isfinite(b) and b > 0 for b in self.budgets),
              f"budgets must be finite and > 0, got {self.budgets}")
        check(len(self.depths) >= 1 and all(d >= 1 for d in self.depths), f"depths must be >= 1, got {self.depths}")
        for name in ("budgets", "depths"):  # a repeated point trained (or resumed) once and was two rows of the table
            values = getattr(self, name)
            check(len(set(values)) == len(values), f"{name} repeats a value: {values}; give each once")
        check(0 < self.min_steps <= self.max_steps,
              f"need 0 < min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        check(self.width >= 2 and self.width % 2 == 0, f"width must be even and >= 2, got {self.width}")
        check(self.evals >= 1, f"evals must be >= 1, got {self.evals}")
        # checked here, not by the trainer's configs: a batch of 0 divided the plan's steps by zero, threads < 0 was
        # torch's RuntimeError, a negative warmup fraction trained with a warmup of 1 step in silence
        for name in ("seq_len", "batch_size", "eval_batches"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.threads >= 0, f"threads must be >= 0 (0 = torch's default), got {self.threads}")
        check(0 <= self.warmup_frac <= 1,
              f"warmup_frac must lie in [0, 1] (of each run's steps), got {self.warmup_frac}")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size


RUN_SETTINGS = ("width", "seq_len", "batch_size", "lr", "optimizer", "warmup_frac", "evals", "eval_batches", "data",
                "seed")
"""the SweepConfig fields that decide a run's result besides its row of the plan (budget, depth, N, steps, D);
result.json records them, and a finished run is reused only when they and its row match"""


def _model_cfg(cfg: SweepConfig, depth: int):
    return depth_model(depth, width=cfg.width, vocab_size=257, max_seq_len=cfg.seq_len)


def plan(cfg: SweepConfig) -> list[dict]:
    """The runs of the grid that fit [min_steps, max_steps]: budget, depth, N, steps, D."""
    return [r for r in grid(cfg) if "left_out" not in r]


def grid(cfg: SweepConfig) -> list[dict]:
    """Every (budget, depth) point; those outside [min_steps, max_steps] carry `left_out`, the reason."""
    rows = []
    for c in cfg.budgets:
        for d in cfg.depths:
            n = num_params(_model_cfg(cfg, d))
            steps = round(c / (6 * n) / cfg.tokens_per_step)
            row = {"budget": c, "depth": d, "N": n, "steps": steps, "D": steps * cfg.tokens_per_step}
            if steps < cfg.min_steps:
                row["left_out"] = f"{steps} steps < min_steps={cfg.min_steps} (budget too small for this model)"
            elif steps > cfg.max_steps:
                row["left_out"] = f"{steps} steps > max_steps={cfg.max_steps} (budget too large for this model)"
            rows.append(row)
    return rows


def _write_shards(cfg: SweepConfig) -> tuple[str, str]:
    from lmforge.data.shards import write_tokens
    from lmforge.optim.benchmark import corpus_bytes, split_corpus

    train_ids, val_ids = split_corpus(corpus_bytes(cfg.data), cfg.seq_len)  # too short: said with the flags here
    out = Path(cfg.out) / "data"
    train = write_tokens(out / "train.bin", train_ids, vocab_size=257, tokenizer="byte")
    val = write_tokens(out / "val.bin", val_ids, vocab_size=257, tokenizer="byte")
    return str(train), str(val)


def _train_cfg(cfg: SweepConfig, run: dict, shards: tuple[str, str], run_dir: Path):
    from lmforge.optim.config import OptimConfig
    from lmforge.train.config import DataConfig, TrainConfig

    steps = run["steps"]
    return TrainConfig(
        model=_model_cfg(cfg, run["depth"]),
        data=DataConfig(train=(shards[0],), val=(shards[1],), seq_len=cfg.seq_len, batch_size=cfg.batch_size),
        optim=OptimConfig(name=cfg.optimizer, lr=cfg.lr, warmup_steps=max(1, int(cfg.warmup_frac * steps)),
                          schedule="cosine", min_lr_ratio=0.1),
        run_dir=str(run_dir), max_steps=steps, eval_every=max(1, steps // cfg.evals), eval_batches=cfg.eval_batches,
        log_every=max(1, steps // 10), ckpt_every=steps, seed=cfg.seed, device=cfg.device, progress=False,
        plot=False, resume=True)  # a sweep killed mid-way continues its runs


def _run_dir(cfg: SweepConfig, run: dict) -> Path:
    """The budget's shortest exact form (2e+08, 2.4e+08): named to one digit, 2e8 and 2.4e8 shared a directory.
    A finished run of this budget under its old one-digit name (a sweep before 2026-12-05) is found there."""
    new = Path(cfg.out) / f"C{np.format_float_scientific(float(run['budget']), trim='-')}_d{run['depth']}"
    old = Path(cfg.out) / f"C{run['budget']:.0e}_d{run['depth']}"
    if old != new and not new.exists() and (old / "result.json").is_file():
        rec = read_json(old / "result.json", "a finished sweep run's record (an object)")
        if isinstance(rec, dict) and rec.get("budget") == run["budget"]:
            return old
    return new


def _finished(done: Path, run: dict, settings: dict) -> dict | None:
    """The record in result.json `done` when the run was trained, for this row of the plan with these settings
    (None when not trained yet); a record of another run is refused: reusing it would put that run in the table."""
    if not done.is_file():
        return None
    rec = read_json(done, "a finished sweep run's record (an object)")
    if not isinstance(rec, dict):
        raise DataError(f"{done} is not a sweep run's record (an object); remove {done.parent} to train it again")
    # a record written before settings were recorded (2026-12-05) is checked by its row of the plan alone
    settings = settings if "settings" in rec else {}
    was = {k: rec.get(k) for k in run} | {k: rec["settings"].get(k) for k in settings}
    diff = [f"{k} {was[k]!r} -> {v!r}" for k, v in (run | settings).items() if was[k] != v]
    if diff:
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise ConfigError(f"{done} records another run than this sweep plans ({', '.join(diff[:4])}{more}): sweep "
                          f"into a new --out, or remove {done.parent} to train it again")
    return rec


def check_inputs(cfg: SweepConfig) -> None:
    """A typo'd --data, or an --out that is a file, refused before any work: run_sweep checks them first, and a
    dry run before its plan is printed."""
    from lmforge.optim.benchmark import corpus_path

    corpus_path(cfg.data)
    check_output_path(cfg.out, "--out", want="a directory for the sweep's runs and runs.csv")


def run_sweep(cfg: SweepConfig, log=print) -> tuple[list[dict], list[dict]]:
    """Train every planned run (reusing finished ones); returns (table rows, curves). Everything it can refuse
    (check_inputs, the device, each run's trainer config, a finished record of another run) is refused before
    anything is written or trained."""
    check_inputs(cfg)  # before torch is imported: a typo'd --data is said at once
    import torch

    from lmforge.train.trainer import train
    from lmforge.utils import pick_device

    pick_device(cfg.device)
    settings = {k: getattr(cfg, k) for k in RUN_SETTINGS}
    runs = plan(cfg)
    for run in runs:  # the trainer's own checks (optimizer name, lr, ...) before any shard is written
        _train_cfg(cfg, run, ("train.bin", "val.bin"), _run_dir(cfg, run))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    found = [_finished(_run_dir(cfg, r) / "result.json", r, settings) for r in runs]  # refused before any work
    shards = _write_shards(cfg)
    rows, curves = [], []
    for run, rec in zip(runs, found):
        run_dir = _run_dir(cfg, run)
        if rec is None:
            try:
                res = train(_train_cfg(cfg, run, shards, run_dir))
            except TrainingDiverged as e:  # its fix names the trainer's keys (optim.lr), not this command's flags
                what = str(e).split("; stopped")[0]
                raise TrainingDiverged(f"the sweep's run C={run['budget']:.1e} depth={run['depth']} ({run_dir}) "
                                       f"diverged: {what}; lower --lr or raise --warmup-frac, with a new --out (the "
                                       "runs finished in this one keep their settings)") from None
            evals = [(h["tokens"], h["val_loss"]) for h in res.history if "val_loss" in h and h.get("tokens")]
            rec = {**run, "loss": res.final_val_loss, "wall_time": res.wall_time,
                   "C": 6.0 * run["N"] * run["D"],
                   "C_exact": flops_per_token(_model_cfg(cfg, run["depth"]), cfg.seq_len) * run["D"],
                   "curve": evals, "settings": settings}
            write_json_atomic(run_dir / "result.json", rec)  # a half-written record would stop the sweep's resume
        log(f"C={run['budget']:.1e} depth={run['depth']} N={run['N']:,} steps={run['steps']}: "
            f"val loss {rec['loss']:.4f} ({rec['wall_time']:.0f}s)")
        curves.append({"N": rec["N"], "curve": rec.pop("curve")})
        rec.pop("settings", None)  # the table holds one row of numbers per run
        rows.append(rec)
    return rows, curves


def main_sweep(cfg: SweepConfig) -> list[dict]:
    from lmforge.scaling.table import write_rows

    points = grid(cfg)
    for r in points:
        if "left_out" in r:
            print(f"left out: C={r['budget']:.1e} depth={r['depth']} N={r['N']:,}: {r['left_out']}", file=sys.stderr)
    if not any("left_out" not in r for r in points):
        raise ConfigError("no run of the grid fits [min_steps, max_steps] (each is named above): raise the budgets, "
                          "change the depths, or widen min_steps / max_steps")
    if cfg.dry_run:
        check_inputs(cfg)  # (run_sweep checks them itself, once)
        for r in plan(cfg):
            print(f"C={r['budget']:.1e} depth={r['depth']} N={r['N']:,} D={r['D']:,} steps={r['steps']}")
        return []
    rows, curves = run_sweep(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(cfg.out)
    write_rows(rows, out / "runs.csv")
    write_rows(rows, out / "runs.json")
    write_json_atomic(out / "curves.json", curves)
    print(f"{len(rows)} runs -> {out / 'runs.csv'}; fit with: lmforge scaling fit --table {out / 'runs.csv'}")
    return rows


__all__ = ["SweepConfig", "grid", "plan", "run_sweep", "main_sweep"]
