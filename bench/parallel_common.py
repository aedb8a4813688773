"""Shared pieces of the parallelism benchmarks (bench/parallel.py on one GPU, bench/scaling_gpus.py under
torchrun): joining the process group, one timed training step per layout, MFU and memory.

A layout's step is the one Trainer's train_step with its ParallelRunner (trainer_step): what `lmforge train`
runs is what is timed. Only the teaching data-parallel implementations (lmforge DDP, ZeRO, torch DDP) and
expert parallelism keep a loop of their own in scaling_gpus.py: they are not layouts of the runner."""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from lmforge.parallel.launch import NO_MULTICAST_ENV
from lmforge.train.metrics import peak_flops


def join() -> tuple[int, int, torch.device]:
    """Join torchrun's group, or make a group of one (file rendezvous) when run as a plain script."""
    for k, v in NO_MULTICAST_ENV.items():
        os.environ.setdefault(k, v)
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group("nccl" if cuda else "gloo")
        else:
            store = tempfile.mktemp(prefix="lmforge_bench_store_")
            atexit.register(lambda: os.path.exists(store) and os.remove(store))
            dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def random_batches(n: int, batch: int, seq: int, vocab: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append((w[:, :-1].to(device), w[:, 1:].to(device)))
    return out


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batches, device, warmup: int, steps: int) -> dict:
    """Run `warmup` then `steps` calls of step(x, y) -> loss; seconds per step (median of 3 blocks), the
    first losses (for the reference check) and the peak memory."""
    losses = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        losses.append(float(step(*batches[i % len(batches)])))
    sync(device)
    blocks = []
    per = max(1, steps // 3)
    for _ in range(3):
        t = time.perf_counter()
        for i in range(per):
            step(*batches[i % len(batches)])
        sync(device)
        blocks.append((time.perf_counter() - t) / per)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": float(np.median(blocks)), "losses": losses, "peak_gib": peak}


def mfu(model_flops_per_token: float, tokens_per_s: float, device) -> float | None:
    peak = peak_flops(device, "bf16")
    return tokens_per_s * model_flops_per_token / peak if peak else None


class Feed:
    """The DataSource of a timed Trainer: its next batch is the one the bench hands to step(x, y)."""

    def __init__(self):
        self.batch: dict[str, torch.Tensor] = {}

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def trainer_step(model, optimizer, optim_cfg, device, *, runner=None, bf16_autocast: bool, clip: float = 1.0):
    """One optimizer step of the one Trainer (lmforge.train.Trainer.train_step: forward + LM loss under
    autocast if asked, backward, global-norm clip, scheduled lr, step), through `runner` (a ParallelRunner)
    on N processes. Returns step(x, y) -> the step's (global) loss, for `timed`."""
    from lmforge.train.config import LoopConfig
    from lmforge.train.loss import LMObjective
    from lmforge.train.trainer import Trainer

    feed = Feed()
    run_dir = tempfile.mkdtemp(prefix="lmforge_bench_")  # the Trainer's (unused) run directory, removed at exit
    atexit.register(shutil.rmtree, run_dir, ignore_errors=True)
    cfg = LoopConfig(optim=dataclasses.replace(optim_cfg, grad_clip=clip), run_dir=run_dir,
                     max_steps=10**9, device=str(device), dtype="bf16" if bf16_autocast else "fp32",
                     resume=False, progress=False, plot=False)
    trainer = Trainer(model, optimizer, feed, LMObjective(), config=cfg, runner=runner)

    def step(x, y):
        feed.batch = {"input_ids": x, "targets": y}
        return trainer.train_step()["loss"]

    return step
