"""The optimizer benchmark behind `lmforge bench optimizers` and bench/optimizers.py.

Every optimizer trains the same model (ModelConfig.from_depth) on the same byte-level text, in the same
batch order, for the same number of tokens, at a few learning rates around a per-optimizer default; the
best rate (by final validation loss) represents it. Reported per optimizer: best final validation loss,
steps and training wall time to reach a target loss (by default the best AdamW final loss, so the ratio
of steps is the "speed-up over tuned AdamW" that modded-nanogpt and Vyas et al. quote), optimizer state
bytes per parameter, and the validation-loss curves (plot). Every run trains through the one Trainer
(lmforge.train.trainer: the schedule, global-norm clipping at 1.0 and bf16 autocast on CUDA of `lmforge
train`) in a scratch run directory, with the same settings for all, so only the optimizer differs between
runs; training time is the sum of the device-synchronised step times (lmforge.train.harness.StepTimer),
evaluations excluded.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmforge.config import check, coerce_fields, names_field
from lmforge.errors import DataError
from lmforge.utils import write_json_atomic

if TYPE_CHECKING:  # torch is imported where a benchmark runs: `lmforge bench optimizers --help` needs the config only
    import torch

SHAKESPEARE = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"
DEFAULT_LR = {"adamw": 3e-3, "torch_adamw": 3e-3, "lion": 1e-3, "adafactor": 3e-3, "shampoo": 3e-3,
              "soap": 3e-3, "muon": 0.02, "dion": 0.02}
"""centre of each optimizer's learning-rate sweep (Lion 3x below Adam; Muon/Dion at Jordan et al.'s 0.02)"""

@dataclass(frozen=True, kw_only=True)
class OptimBenchConfig:
    optimizers: tuple[str, ...] = names_field(("adamw", "lion", "adafactor", "shampoo", "soap", "muon", "dion"))
    """optimizers to compare (keys of lmforge.optim.OPTIMIZERS; apart or comma-separated)"""
    depth: int = 2
    """model = ModelConfig.from_depth(depth) with a byte vocabulary (257)"""
    seq_len: int = 64
    """bytes per training sequence"""
    batch_size: int = 8
    """sequences per step"""
    steps: int = 200
    """training steps of every run"""
    warmup_steps: int = 20
    """linear warmup steps of every run"""
    schedule: str = "cosine"
    """learning-rate schedule of every run (a key of lmforge.optim.SCHEDULES)"""
    weight_decay: float = 0.0
    """decoupled weight decay of every run"""
    adam_lr: float = 3e-3
    """Muon/Dion: AdamW rate of embeddings, head and vectors"""
    precondition_frequency: int = 10
    """Shampoo/SOAP: steps between preconditioner (inverse root / eigenbasis) refreshes"""
    block_size: int = 256
    """Shampoo: block side; SOAP: sides longer than this are left unrotated"""
    lr_points: int = 3
    """learning rates per optimizer: centre * lr_factor^k, k = -(lr_points // 2) ..."""
    lr_factor: float = 3.0
    """ratio between neighbouring learning rates of the grid (> 1)"""
    lrs: tuple[float, ...] = ()
    """explicit learning rates for every optimizer (replaces the centre·factor^k grid)"""
    merge: str = ""
    """results.json of an earlier run on the same data and seed whose runs join this one's summary
    (e.g. to extend one optimizer's sweep past the edge of its grid)"""
    eval_every: int = 20
    """evaluate the validation loss every N steps"""
    eval_batches: int = 8
    """validation batches per evaluation"""
    target_loss: float = 0.0
    """loss to time; 0 = the best final validation loss of AdamW (or of the first optimizer)"""
    data: str = ""
    """text file; '' = Python's own sources (tinyshakespeare when the developers' data folder is present)"""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda', 'cuda:1', ..."""
    threads: int = 1
    """CPU threads for torch (1 is fastest on a shared machine); 0 = torch's default"""
    seed: int = 0
    """seed of the models and the data order (the same for every optimizer)"""
    time_budget_s: float = 0.0
    """stop starting new runs after this many seconds (0 = no limit); every optimizer's centre learning
    rate runs first, so a cut-off sweep still compares all optimizers"""
    out: str = "runs/bench_optimizers"
    """directory for results.json and loss_curves.png"""

    def __post_init__(self) -> None:
        coerce_fields(self, "bench")  # each field's type, named when wrong
        from lmforge.optim import OPTIMIZERS

        check(bool(self.optimizers), f"optimizers is empty: name at least one of {sorted(OPTIMIZERS)}")
        for name in self.optimizers:
            check(name in OPTIMIZERS, f"optimizers: {name!r} is unknown; choose from {sorted(OPTIMIZERS)}")
        for f in ("depth", "seq_len", "batch_size", "steps", "lr_points", "eval_every", "eval_batches"):
            check(getattr(self, f) >= 1, f"{f} must be >= 1, got {getattr(self, f)}")
        check(self.lr_factor > 1, f"lr_factor must be > 1, got {self.lr_factor}")
        check(self.threads >= 0, f"threads must be >= 0 (0 = torch's default), got {self.threads}")  # torch raised
        check(math.isfinite(self.target_loss) and self.target_loss >= 0,
              f"target_loss must be a finite loss >= 0 (0 = the best final loss of AdamW), got {self.target_loss}")

def corpus_path(path: str = "") -> Path | None:
    """The benchmark text's file: `path`, refused when it is no file (training on the fallback text in silence
    would answer another question), else the bundled Shakespeare, else None (Python's own sources stand in)."""
    if path:
        if not Path(path).is_file():
            what = "a directory, not a file" if Path(path).is_dir() else "no such file"
            raise DataError(f"--data {path}: {what}; give a text file, or leave --data out to train on the "
                            "default text")
        return Path(path)
    return SHAKESPEARE if SHAKESPEARE.is_file() else None


def corpus_bytes(path: str = "") -> np.ndarray:
    """Byte-level token ids (ByteTokenizer ids 0..255) of the benchmark text (`corpus_path`)."""
    p = corpus_path(path)
    if p is not None:
        return np.frombuffer(p.read_bytes(), dtype=np.uint8).astype(np.int64)
    import sysconfig

    lib = Path(sysconfig.get_paths()["stdlib"])
    text = b"".join(f.read_bytes() for f in sorted(lib.glob("*.py"))[:200])
    return np.frombuffer(text, dtype=np.uint8).astype(np.int64)

def split_corpus(ids: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """The benchmark text's first 90% to train on and its last 10% held out (this benchmark's and `lmforge scaling
    sweep`'s), refused naming their flags when a split cannot hold one window of seq_len + 1 tokens to draw."""
    split = int(0.9 * len(ids))
    if len(ids) - split < seq_len + 2:
        raise DataError(f"the text (--data) has {len(ids):,} bytes, too few for a training and a validation window "
                        f"of --seq-len {seq_len} (its last 10% is held out): give a text of at least "
                        f"{10 * (seq_len + 2):,} bytes, or a shorter --seq-len")
    return ids[:split], ids[split:]

def _device(spec: str) -> torch.device:
    import torch

    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if spec == "auto" else spec)

def _batches(ids: np.ndarray, n: int, cfg: OptimBenchConfig, seed: int) -> list[dict[str, torch.Tensor]]:
    """n batches of batch_size random windows, as {"input_ids", "targets"} CPU tensors."""
    import torch

    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - cfg.seq_len - 1, size=(n, cfg.batch_size))
    out = []
    for row in starts:
        t = torch.from_numpy(np.stack([ids[s : s + cfg.seq_len + 1] for s in row]))
        out.append({"input_ids": t[:, :-1], "targets": t[:, 1:]})
    return out

class _Curve:
    """Trainer hook: the validation-loss curve, each point with the training time spent until then."""

    def __init__(self, timer):
        self.timer, self.points = timer, []

    def on_eval(self, trainer, metrics: dict) -> None:
        self.points.append({"step": trainer.step, "val_loss": metrics["val_loss"], "time": self.timer.total})

def optim_config(cfg: OptimBenchConfig, name: str, lr: float):
    """The OptimConfig of one run: `name` at rate `lr`, with the benchmark's other settings."""
    from lmforge.optim.config import OptimConfig

    return OptimConfig(name=name, lr=lr, weight_decay=cfg.weight_decay, schedule=cfg.schedule,
                       warmup_steps=cfg.warmup_steps, adam_lr=cfg.adam_lr, min_lr_ratio=0.1,
                       precondition_frequency=cfg.precondition_frequency, block_size=cfg.block_size)


def loop_config(cfg: OptimBenchConfig, ocfg, dev):
    """The LoopConfig of one run; built once before the runs (run_benchmark) for what its settings warn of."""
    from lmforge.train.config import LoopConfig

    return LoopConfig(optim=ocfg, max_steps=cfg.steps, eval_every=cfg.eval_every, log_every=cfg.eval_every,
                      ckpt_every=cfg.steps, keep_last=1, seed=cfg.seed, device=str(dev))


def run_one(cfg: OptimBenchConfig, name: str, lr: float, train, val) -> dict:
    """Train one (optimizer, lr) with the Trainer; returns its curve, final loss, time and state memory.

    A run that diverges (non-finite loss; the Trainer stops at the next evaluation) keeps its curve up to
    its last good evaluation and gets final loss inf."""
    import torch

    from lmforge.errors import ConfigWarning, TrainingDiverged
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.optim import build_optimizer, optimizer_state_bytes
    from lmforge.train.harness import FixedBatches, StepTimer, scratch_fit
    from lmforge.train.loss import LMObjective

    dev = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = Transformer(ModelConfig.from_depth(cfg.depth, vocab_size=257, max_seq_len=cfg.seq_len))
    ocfg = optim_config(cfg, name, lr)
    opt = build_optimizer(model, ocfg)
    # metrics are read (and a NaN loss caught) at evaluations only: no extra host sync between them
    with warnings.catch_warnings():  # (run_benchmark's loop_config said what its settings warn of, once)
        warnings.simplefilter("ignore", ConfigWarning)
        loop = loop_config(cfg, ocfg, dev)
    timer = StepTimer()
    curve = _Curve(timer)

    def evaluate(model) -> dict[str, float]:  # the Trainer runs it under no_grad, eval mode and its autocast
        losses = [torch.nn.functional.cross_entropy(model(b["input_ids"].to(dev)).flatten(0, 1).float(),
                                                    b["targets"].to(dev).flatten()).item() for b in val]
        return {"val_loss": float(np.mean(losses))}

    try:
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer's evaluation lines: progress, not results
            scratch_fit(model, opt, FixedBatches(train[: cfg.steps]), LMObjective(), loop, hooks=[timer, curve],
                        evaluator=evaluate)
    except TrainingDiverged:
        pass
    n_params = sum(p.numel() for p in model.parameters())
    points = curve.points
    final = points[-1]["val_loss"] if points[-1]["step"] == cfg.steps else float("inf")
    return {"optimizer": name, "lr": lr, "final_val_loss": final, "curve": points, "wall_time": timer.total,
            "state_bytes_per_param": optimizer_state_bytes(opt) / n_params, "n_params": n_params}

def to_target(curve: list[dict], target: float) -> tuple[float, float]:
    """(steps, seconds) at which the validation loss first reaches `target`, interpolated linearly
    between evaluations; (inf, inf) if it never does, or the target is none (inf: every run diverged)."""
    if not math.isfinite(target):
        return float("inf"), float("inf")
    if curve and curve[0]["val_loss"] <= target:  # reached before training (interpolating back gave a step < 0)
        return float(curve[0]["step"]), float(curve[0]["time"])
    for prev, cur in zip(curve, curve[1:]):
        if cur["val_loss"] <= target:
            f = (prev["val_loss"] - target) / max(prev["val_loss"] - cur["val_loss"], 1e-12)
            return (prev["step"] + f * (cur["step"] - prev["step"]), prev["time"] + f * (cur["time"] - prev["time"]))
    return float("inf"), float("inf")

def merged_runs(path: str) -> list[dict]:
    """The runs of an earlier benchmark's results.json (or partial.json), refused in one line when unreadable."""
    try:
        return json.loads(Path(path).read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"--merge {path}: not a readable results.json of `lmforge bench optimizers` ({e}); give "
                        "the results.json or partial.json an earlier run wrote") from None


def run_benchmark(cfg: OptimBenchConfig, log=print) -> dict:
    import torch

    dev = _device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # the merged runs are read before hours of training, so a mistyped --merge fails now, not at the end
    merged = merged_runs(cfg.merge) if cfg.merge else []
    train_ids, val_ids = split_corpus(corpus_bytes(cfg.data), cfg.seq_len)
    train = _batches(train_ids, cfg.steps, cfg, cfg.seed)
    val = _batches(val_ids, cfg.eval_batches, cfg, cfg.seed + 1)
    first = cfg.optimizers[0]  # what the runs' settings warn of (a warmup longer than the runs, ...), said once
    loop_config(cfg, optim_config(cfg, first, cfg.lrs[0] if cfg.lrs else DEFAULT_LR[first]), dev)
    if dev.type == "cuda":  # TF32 matmuls, and one short discarded run so CUDA start-up is not timed
        torch.set_float32_matmul_precision("high")
        warm = replace(cfg, steps=3, eval_every=3, warmup_steps=1)
        run_one(warm, cfg.optimizers[0], DEFAULT_LR[cfg.optimizers[0]], train, val)
    runs, t_start = [], time.perf_counter()
    offsets = sorted(range(-(cfg.lr_points // 2), cfg.lr_points - cfg.lr_points // 2), key=abs)
    for k in range(len(cfg.lrs)) if cfg.lrs else offsets:  # centre rates first, then the neighbours
        for name in cfg.optimizers:
            if cfg.time_budget_s and time.perf_counter() - t_start > cfg.time_budget_s:
                log(f"time budget reached; skipping {name} at offset {k}")
                continue
            lr = cfg.lrs[k] if cfg.lrs else DEFAULT_LR[name] * cfg.lr_factor**k
            r = run_one(cfg, name, lr, train, val)
            log(f"{name:>10} lr={lr:.3g}: final val {r['final_val_loss']:.4f} ({r['wall_time']:.1f}s)")
            runs.append(r)
            write_json_atomic(Path(cfg.out) / "partial.json", {"runs": runs})  # survives a killed sweep (atomic)
    runs = merged + runs
    result = summarize(runs, cfg.target_loss)
    return {"config": asdict(cfg), "device": str(dev), "tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
            **result}


def summarize(runs: list[dict], target_loss: float = 0.0) -> dict:
    """Best run per optimizer, steps/time to the target (0 = best AdamW final loss; the best finished optimizer's
    where AdamW diverged at every rate) and speed-ups.
    Also used to merge the runs of several benchmark invocations on the same data and seed."""
    best: dict[str, dict] = {}
    for r in runs:
        if r["optimizer"] not in best or r["final_val_loss"] < best[r["optimizer"]]["final_val_loss"]:
            best[r["optimizer"]] = r
    ref = best.get("adamw", next(iter(best.values())))
    if not target_loss and not math.isfinite(ref["final_val_loss"]):
        # the reference diverged at every rate (final loss inf): the best optimizer that finished sets the target
        ref = min(best.values(), key=lambda r: r["final_val_loss"])
    target = target_loss or ref["final_val_loss"]
    ref_steps = to_target(ref["curve"], target)[0]
    summary = []
    for name, r in best.items():
        steps, secs = to_target(r["curve"], target)
        low = min(r["curve"], key=lambda p: p["val_loss"])  # differs from the final loss once it overfits
        summary.append({"optimizer": name, "best_lr": r["lr"], "final_val_loss": r["final_val_loss"],
                        "min_val_loss": low["val_loss"], "min_val_step": low["step"],
                        "steps_to_target": steps, "time_to_target": secs, "wall_time": r["wall_time"],
                        "state_bytes_per_param": r["state_bytes_per_param"],
                        "speedup_vs_ref": ref_steps / steps if math.isfinite(steps) else 0.0})
    return {"target_loss": target, "reference": ref["optimizer"], "n_params": ref["n_params"],
            "summary": summary, "runs": runs}


def format_table(result: dict) -> str:
    lines = [f"target val loss {result['target_loss']:.4f} (best final of {result['reference']}); "
             f"{result['tokens']:,} tokens; {result['n_params']:,} params; device {result['device']}",
             "| optimizer | best lr | final val loss | min val loss (step) | steps to target | speed-up vs ref "
             "| time to target (s) | wall (s) | state bytes/param |", "|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(result["summary"], key=lambda s: s["final_val_loss"]):
        reached = math.isfinite(s["steps_to_target"])  # an optimizer that never reached the target shows so
        steps, speedup, secs = ((f"{s['steps_to_target']:.0f}", f"{s['speedup_vs_ref']:.2f}x",
                                 f"{s['time_to_target']:.1f}") if reached else ("not reached",) * 3)
        lines.append(f"| {s['optimizer']} | {s['best_lr']:.3g} | {s['final_val_loss']:.4f} | "
                     f"{s['min_val_loss']:.4f} ({s['min_val_step']}) | {steps} | {speedup} | {secs} | "
                     f"{s['wall_time']:.1f} | {s['state_bytes_per_param']:.2f} |")
    return "\n".join(lines)


def plot_curves(result: dict, path: str | Path) -> Path:
    from lmforge.errors import require

    mpl = require("matplotlib", "plot")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    best = {s["optimizer"]: s["best_lr"] for s in result["summary"]}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["runs"]:
        if best.get(r["optimizer"]) == r["lr"]:
            c = r["curve"]
            ax.plot([p["step"] for p in c], [p["val_loss"] for p in c], label=f"{r['optimizer']} (lr {r['lr']:.3g})")
    if math.isfinite(result["target_loss"]):
        ax.axhline(result["target_loss"], color="gray", ls=":", lw=1, label="target")
    ax.set(xlabel="step", ylabel="validation loss (nats/byte)", title="optimizers at their best learning rate")
    finals = [s["final_val_loss"] for s in result["summary"] if math.isfinite(s["final_val_loss"])]
    if finals:  # a diverged run's final loss is inf: the axis spans the finished ones
        ax.set_ylim(min(finals) - 0.1, min(finals) + 1.2)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

def main_run(cfg: OptimBenchConfig) -> dict:
    """Run, print the table, write results.json and loss_curves.png under cfg.out."""
    result = run_benchmark(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(cfg.out)
    write_json_atomic(out / "results.json", result)
    plot_curves(result, out / "loss_curves.png")
    print(format_table(result))
    return result

