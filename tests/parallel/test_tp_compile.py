"""Tensor parallelism with `[parallel] compile = true` (each block compiled after TP) gives one process's curve.
The embedding's row-parallel output was an AsyncCollectiveTensor; fed to the first compiled block, the compiled
backward returned no gradient for it: tp = 2 crashed in DTensor's backward, dp_shard = 2 x tp = 2 trained with a
frozen embedding and no error (found 2026-12-05). The blocks compile with the aot_eager backend here: the bug is
in what the compiled graph is given, and aot_eager traces forward and backward as Inductor does, without its
minutes of code generation on a CPU."""

from __future__ import annotations

import functools

import pytest

from lmforge.parallel.launch import run_local
from tests.parallel import forked  # noqa: F401  (the ranks' torch.distributed imports, once before forking)
from tests.parallel import layouts as L

TOL = 1e-5


def _suite(rank: int, world: int, layouts: dict) -> dict:
    import torch

    torch.nn.Module.compile = functools.partialmethod(torch.nn.Module.compile, backend="aot_eager")  # (this rank)
    return L.layout_suite(rank, world, layouts)


@pytest.mark.parametrize("world,layout", [(2, dict(tp=2)), (4, dict(dp_shard=2, tp=2))], ids=["tp", "fsdp_tp"])
def test_tensor_parallel_blocks_compiled_train_as_one_process(world, layout):
    got = run_local(_suite, world, {"run": dict(layout, compile=True)}, timeout=300, start_method="fork")[0]["run"]
    ref = L.reference()[0]
    assert len(got) == len(ref) == L.STEPS
    for (loss, norm), (rl, rn) in zip(got, ref):
        assert loss == pytest.approx(rl, abs=TOL) and norm == pytest.approx(rn, rel=TOL)
