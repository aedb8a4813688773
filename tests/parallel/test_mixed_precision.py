"""param_dtype / reduce_dtype are FSDP2's mixed-precision policy: replicas of tensor-parallel shards (FSDP2's
replicate) take it, one unit per block as fully_shard's (they ran in fp32 with a single all-reduce at the end of
the backward); layouts without FSDP2 units refuse a non-default dtype instead of ignoring it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lmforge.errors import ConfigError
from lmforge.parallel.config import ParallelConfig
from lmforge.parallel.launch import run_local
from lmforge.parallel.parallelize import replicate_fsdp
from tests.parallel.workers import batches, local, model


def _replicate_worker(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    m = model()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_replicate",))
    replicate_fsdp(m, mesh, ParallelConfig(dp_replicate=world, tp=2, param_dtype="bf16"))
    seen = []
    m.blocks[0].attn.register_forward_pre_hook(lambda mod, a: seen.append(next(mod.parameters()).dtype))
    x, y = batches(1)[0]
    logits = m(local(x, rank, world))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), local(y, rank, world).flatten()).backward()
    grad = torch.cat([p.grad.to_local().flatten() for p in m.parameters()])  # (replicated DTensors)
    both = [torch.empty_like(grad) for _ in range(world)]
    dist.all_gather(both, grad)
    return {"units": [isinstance(b, FSDPModule) for b in [*m.blocks, m]], "compute": seen[0],
            "grad_dtype": grad.dtype, "same_grads": bool(torch.equal(*both)), "grad_norm": float(grad.norm())}


def test_replicas_of_tp_shards_take_the_mixed_precision_policy_per_block():
    got = run_local(_replicate_worker, 2, timeout=120, start_method="fork")[0]
    assert got["units"] == [True, True, True]  # each block and the root: their own all-reduce
    assert got["compute"] == torch.bfloat16  # weights cast for the forward
    assert got["grad_dtype"] == torch.float32 and got["same_grads"] and got["grad_norm"] > 0


@pytest.mark.parametrize("layout", [dict(pp=2, dp_replicate=2), dict(dp_replicate=2), dict(tp=2), dict(pp=2)])
@pytest.mark.parametrize("dtype", ["param_dtype", "reduce_dtype"])
def test_layouts_without_fsdp_refuse_a_mixed_precision_dtype(layout, dtype):
    cfg = ParallelConfig(**layout, **{dtype: "bf16"})
    with pytest.raises(ConfigError, match=f"parallel.{dtype}='bf16' is FSDP2's mixed precision"):
        cfg.validate(cfg.world_size)
    ParallelConfig(**layout).validate(cfg.world_size)  # fp32: fine


@pytest.mark.parametrize("layout", [dict(dp_shard=2), dict(cp=2), dict(dp_replicate=2, tp=2), dict(pp=2, dp_shard=2),
                                    dict()])
def test_layouts_with_fsdp_take_a_mixed_precision_dtype(layout):
    cfg = ParallelConfig(**layout, param_dtype="bf16", reduce_dtype="bf16")
    cfg.validate(cfg.world_size)
