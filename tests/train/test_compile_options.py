"""TrainConfig.compile_tune reaches torch.compile; on a GPU, Trainer.train_step never waits for the device
(the claim its MFU rests on: the host queues step t + 1 while the GPU runs step t)."""

import dataclasses

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.train.trainer import Trainer

from .helpers import make_shard, tiny_config


def _moe_model():
    return dataclasses.replace(ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32),
                               mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, d_expert=32, aux_loss=0.01))


@pytest.mark.parametrize("tune,graphs,options", [
    (False, False, None),
    (True, False, {"coordinate_descent_tuning": True}),
    (False, True, {"triton.cudagraphs": True}),
    (True, True, {"coordinate_descent_tuning": True, "triton.cudagraphs": True})])
def test_compile_options_reach_torch_compile(tmp_path, monkeypatch, tune, graphs, options):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    Trainer(tiny_config(make_shard(tmp_path / "t.bin"), tmp_path / "run", compile=True, compile_tune=tune,
                        compile_cudagraphs=graphs))
    assert seen == [dict(options=options)]


@pytest.mark.parametrize("key", ["compile_tune", "compile_cudagraphs"])
def test_compile_options_without_compile_are_refused(tmp_path, key):
    with pytest.raises(ConfigError, match=f"{key} = true .* set compile = true"):
        tiny_config(make_shard(tmp_path / "t.bin"), tmp_path / "run", **{key: True})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile,graphs,bf16_residual,moe", [
    (False, False, False, False), (True, False, False, False), (True, True, False, False),
    (True, False, True, False), (False, False, False, True), (True, True, False, True)])
def test_train_step_never_waits_for_the_gpu(tmp_path, compile, graphs, bf16_residual, moe):
    extra = dict(model=_moe_model()) if moe else {}
    tr = Trainer(tiny_config(make_shard(tmp_path / "t.bin"), tmp_path / "run", device="cuda", compile=compile,
                             compile_cudagraphs=graphs, bf16_residual=bf16_residual, **extra))
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("moe", [False, True])
def test_cudagraph_replay_trains_as_the_compiled_step(tmp_path, moe):
    """compile_cudagraphs changes how kernels are launched, not what they compute: the same seeds give the
    same losses step for step (fp32 on the GPU, so no bf16 rounding differences between the two); also for
    an MoE model (its dropless dispatch keeps counts on the device, so the whole step is one graph)."""
    losses = {}
    extra = dict(model=_moe_model()) if moe else {}
    for graphs in (False, True):
        torch.manual_seed(0)
        tr = Trainer(tiny_config(make_shard(tmp_path / "t.bin"), tmp_path / f"run{graphs}", device="cuda",
                                 dtype="fp32", compile=True, compile_cudagraphs=graphs, **extra))
        losses[graphs] = [float(tr.train_step()["loss"]) for _ in range(6)]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][-1] < losses[True][0]
