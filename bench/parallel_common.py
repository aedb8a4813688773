"""Shared pieces of the parallelism benchmarks (bench/parallel.py on one GPU, bench/scaling_gpus.py under
torchrun): joining the process group, one timed training step per layout, MFU and memory."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from lmforge.parallel.launch import NO_MULTICAST_ENV
from lmforge.train.loss import lm_loss
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


def autocast(device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def make_step(model, optimizer, device, *, bf16_autocast: bool, clip: float = 1.0, loss_ctx=None):
    """One optimizer step: forward + loss (under autocast if asked), backward, clip, step."""
    def step(x, y):
        with autocast(device, bf16_autocast), (loss_ctx() if loss_ctx else contextlib.nullcontext()):
            loss = lm_loss(model(x), y)[0]
            loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step

