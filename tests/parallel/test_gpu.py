"""What the CPU tests cannot cover: torch.compile (inductor) on a parallelised model, and NCCL. One GPU,
a process group of one: FSDP2 + selective activation checkpointing + compiled blocks, through
ParallelRunner, gives the plain model's loss curve and gradient norms (fp32; tolerance 1e-4 for
inductor's reordered reductions). Multi-GPU layouts run in bench/scaling_gpus.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lmforge.optim import build_optimizer
from lmforge.parallel.config import ParallelConfig
from lmforge.parallel.runner import ParallelRunner
from tests.parallel import layouts as L

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _curve(runner_or_model, opt, use_runner: bool) -> list[tuple[float, float]]:
    out = []
    for x, y in L.batches(L.STEPS):
        x, y = x.cuda(), y.cuda()
        if use_runner:
            loss = runner_or_model.forward_backward(x, y)
            norm = runner_or_model.clip_grad_norm_(L.CLIP)
        else:
            loss = L.loss_of(runner_or_model, x, y)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(runner_or_model.parameters(), L.CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((float(loss), float(norm)))
    return out


def test_compiled_fsdp2_with_selective_ac_matches_plain_model_on_one_gpu(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        plain = L.model().cuda()
        want = _curve(plain, build_optimizer(plain, L.OPT), use_runner=False)
        cfg = ParallelConfig(dp_shard=1, activation_checkpoint="selective", compile=True)
        runner = ParallelRunner(L.model().cuda(), cfg, device="cuda")
        got = _curve(runner, build_optimizer(runner.model, L.OPT), use_runner=True)
    finally:
        dist.destroy_process_group()
    assert [l for l, _ in got] == pytest.approx([l for l, _ in want], abs=1e-4)
    assert [n for _, n in got] == pytest.approx([n for _, n in want], rel=1e-4)
