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


def test_from_scratch_ddp_and_zero_run_on_nccl(tmp_path):
    """The teaching DDP and ZeRO on NCCL (a group of one GPU): every collective they issue takes GPU tensors
    (ZeroOptimizer.step all-reduced its gradient norm as a CPU tensor, which NCCL refuses), and each equals the
    plain model. Tolerance: the CPU tests' 5e-5."""
    from tests.parallel import workers as w

    def run(kind: str) -> dict[str, torch.Tensor]:
        m = w.model().cuda()
        wrapped, opt, zero = w.build_data_parallel(kind, m)
        for x, y in w.batches():
            w.loss_of(wrapped, x.cuda(), y.cuda()).backward()
            w.finish_step(wrapped, opt, zero)
        if zero is None:
            return {k: v.cpu() for k, v in w.params_of(m).items()}
        assert zero.full_state_dict()["state"]  # all_gather_object on NCCL
        return {k: v.cpu() for k, v in zero.full_parameters().items()}

    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        want = run("plain")
        got = {kind: run(kind) for kind in ("naive", "bucketed", "zero1", "zero2", "zero3")}
    finally:
        dist.destroy_process_group()
    for kind, params in got.items():
        for k in want:
            torch.testing.assert_close(params[k], want[k], atol=5e-5, rtol=0, msg=f"{kind} {k}")
