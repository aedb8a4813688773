"""Training metrics: model FLOPs utilisation, the metrics.jsonl log (+ TensorBoard / W&B when asked),
and the loss-curve plot.

MFU = achieved model FLOPs/s ÷ peak FLOPs/s (PaLM, Chowdhery et al. 2022, appendix B), where model
FLOPs come from `Transformer.flops_per_token`. GPU peaks are the datasheet dense bf16 rates. A CPU has
no datasheet number, and a peak measured at start-up on a shared machine depends on what else runs
(a 1024² matmul timed once gave MFUs of 124-171%), so on CPU only tokens/s is reported.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from lmforge.utils import atomic_path, naming_file

# dense bf16 tensor-core peaks (FLOP/s) from NVIDIA datasheets
GPU_PEAK_BF16 = {"H100": 989.5e12, "H200": 989.5e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
                 "4090": 165.2e12, "3090": 71e12}


def peak_flops(device: torch.device | str, dtype: str = "bf16") -> float | None:
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak if dtype == "bf16" else peak / 2  # tf32 dense is half the bf16 rate
        return None
    return None  # CPU and others: no trustworthy peak, so no MFU (tokens/s only)


class MetricsLog:
    """Append-only JSONL log of dict rows, mirrored to TensorBoard / W&B if enabled."""

    def __init__(self, run_dir: Path, *, tensorboard: bool = False, wandb: bool = False, config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tb = self.wb = None
        if tensorboard:
            from lmforge.errors import require

            require("tensorboard", "tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if wandb:
            from lmforge.errors import require

            self.wb = require("wandb", "wandb")
            self.wb.init(project="lmforge", dir=str(run_dir), config=config or {})

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint's step (they will be produced again)."""
        if not self.path.exists():
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        with atomic_path(self.path) as tmp:  # a crash here must not cost the run its history
            tmp.write_text("".join(_json_row(r) for r in rows))

    def log(self, row: dict[str, Any]) -> None:
        with naming_file(self.path), open(self.path, "a") as f:  # (a full disk's error names no file otherwise)
            f.write(_json_row(row))
        step = row.get("step", 0)
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wb is not None:
            self.wb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wb is not None:
            self.wb.finish()


def _json_row(row: dict[str, Any]) -> str:
    """A metrics.jsonl line, strict JSON: an undefined metric (NaN, inf) is written as null (read_metrics reads it
    back as NaN)."""
    return json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}) + "\n"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
        rows.append({k: float("nan") if v is None else v for k, v in row.items()})  # null: an undefined metric
    return rows


def plot_losses(run_dir: str | Path, out: str | Path | None = None, ylabel: str = "cross-entropy (nats/token)"
                ) -> Path | None:
    """loss.png: training loss and validation loss against step (`ylabel`: what the loss is; the Trainer names a
    post-training objective's). Without matplotlib, says so on stderr and returns None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no loss.png was written (pip install 'lmforge[plot]'); "
              "the losses are in metrics.jsonl", file=sys.stderr)
        return None
    rows = read_metrics(run_dir)
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if tr:
        ax.plot(*zip(*tr), label="train loss", alpha=0.7)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "loss.png"
    try:
        with atomic_path(out) as tmp:  # a full disk leaves the last plot, not half a PNG (and names loss.png)
            fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out
