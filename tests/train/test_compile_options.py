"""TrainConfig.compile_tune reaches torch.compile; on a GPU, Trainer.train_step never waits for the device
(the claim its MFU rests on: the host queues step t + 1 while the GPU runs step t)."""

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.train.trainer import Trainer

from .helpers import make_shard, tiny_config


@pytest.mark.parametrize("tune", [False, True])
def test_compile_tune_reaches_torch_compile(tmp_path, monkeypatch, tune):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    Trainer(tiny_config(make_shard(tmp_path / "t.bin"), tmp_path / "run", compile=True, compile_tune=tune))
    assert seen == [dict(options={"coordinate_descent_tuning": True} if tune else None)]


def test_compile_tune_without_compile_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="compile_tune = true .* set compile = true"):
        tiny_config(make_shard(tmp_path / "t.bin"), tmp_path / "run", compile_tune=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_train_step_never_waits_for_the_gpu(tmp_path, compile):
    tr = Trainer(tiny_config(make_shard(tmp_path / "t.bin"), tmp_path / "run", device="cuda", compile=compile))
    for _ in range(2):  # first steps: compile, allocator and pinned-memory warm-up
        tr.train_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        for _ in range(3):
            tr.train_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert tr.step == 5
