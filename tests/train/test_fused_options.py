"""TrainConfig.fused_loss / fused_kernels: the fused linear+cross-entropy objective trains on the same
loss curve as the plain LM objective (CPU: Triton's interpreter); fused_kernels without a GPU changes nothing."""

import pytest

from lmforge.optim.config import OptimConfig
from lmforge.train.config import DataConfig
from lmforge.train.trainer import train

from .helpers import make_shard, tiny_config

pytest.importorskip("triton")


def _losses(res):
    return [r["loss"] for r in res.history if "loss" in r]


def test_fused_loss_follows_the_plain_curve(tmp_path):
    shard = make_shard(tmp_path / "t.bin")
    # 4 steps of 2 rows of 16 tokens and one validation batch: Triton's interpreter runs each kernel program as
    # Python (RoPE and the loss launch one per position; at the helpers' 8 rows of 32 and 4 validation batches this
    # test took ~3 minutes, at 8 steps of 2 rows of 32 ~2.5); no warmup, so that each step's update moves the next
    # loss by the full learning rate and a wrong gradient shows
    small = dict(max_steps=4, eval_every=4, ckpt_every=4, eval_batches=1, optim=OptimConfig(lr=3e-3, warmup_steps=0),
                 data=DataConfig(train=(str(shard),), seq_len=16, batch_size=2))
    plain = _losses(train(tiny_config(shard, tmp_path / "a", **small)))
    fused = _losses(train(tiny_config(shard, tmp_path / "b", fused_loss=True, fused_kernels=True, **small)))
    assert len(plain) == len(fused) == 4
    assert fused == pytest.approx(plain, abs=2e-4)


def test_fused_loss_without_triton_device_falls_back_with_a_notice(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU without the interpreter: no Triton device
    shard = make_shard(tmp_path / "t.bin")
    plain = _losses(train(tiny_config(shard, tmp_path / "a", max_steps=4, eval_every=4, ckpt_every=4)))
    fused = _losses(train(tiny_config(shard, tmp_path / "b", max_steps=4, eval_every=4, ckpt_every=4, fused_loss=True)))
    assert fused == plain
    # why it is not applied: Triton is installed (or not) and the device is a CPU, not "install the kernels extra"
    from lmforge.kernels.decode import _NO_TRITON

    why = _NO_TRITON or "TRITON_INTERPRET=1 runs the kernels on CPU, for tests"
    assert (f"fused_loss not applied: the Triton kernel needs a CUDA GPU and Triton ({why}), got device cpu; the "
            "plain loss runs instead\n") in capsys.readouterr().err


def test_fused_loss_on_a_model_it_cannot_compute_is_refused_by_the_config():
    """A soft-capped or MTP model with fused_loss failed at the first step on a GPU (after the data and model were
    built) and trained on the plain loss on a CPU; the config now refuses it, naming the value."""
    from lmforge.errors import ConfigError
    import dataclasses

    from lmforge.model.config import ModelConfig, MTPConfig
    from lmforge.train.config import TrainConfig

    model = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, logit_softcap=30.0)
    with pytest.raises(ConfigError, match=r"^fused_loss with model.logit_softcap=30.0: .*set fused_loss = false"):
        TrainConfig(model=model, data=DataConfig(seq_len=16, batch_size=2), fused_loss=True)
    assert TrainConfig(model=model, data=DataConfig(seq_len=16, batch_size=2)).model.logit_softcap == 30.0
    mtp = dataclasses.replace(model, logit_softcap=0.0, mtp=MTPConfig())
    with pytest.raises(ConfigError, match=r"^fused_loss with model.mtp: .*set fused_loss = false or remove"):
        TrainConfig(model=mtp, data=DataConfig(seq_len=16, batch_size=2), fused_loss=True)


@pytest.mark.parametrize("layout", [dict(dp_shard=2), dict(tp=2), dict(cp=2), dict(pp=2), dict(dp_replicate=2),
                                    dict()], ids=["dp_shard", "tp", "cp", "pp", "dp_replicate", "nproc-default"])
def test_fused_loss_on_several_processes_is_refused_before_any_process(tmp_path, layout):
    """`lmforge train --nproc 2 --fused-loss true` (FSDP2 over the processes by default): the fused loss calls the
    trunk and reads lm_head's weight outside model.forward, where FSDP2 gathers the root's weights and DDP arms its
    gradient all-reduce. With dp_shard, cp or tp the ranks failed at the first step with "lm_head is a Linear: merge
    its adapter (merge_lora)..." (a GPU, or TRITON_INTERPRET=1); with dp_replicate the replicas trained apart, the
    loss 0.045 off one process's after 4 steps; pp trains the plain loss. Refused before any process starts."""
    from lmforge.cli.train import check_launch
    from lmforge.errors import ConfigError
    from lmforge.parallel.config import ParallelConfig

    shard = make_shard(tmp_path / "t.bin")
    cfg = tiny_config(shard, tmp_path / "r", fused_loss=True, parallel=ParallelConfig(**layout))
    sizes = " x ".join(f"{k}={v}" for k, v in layout.items()) or "dp_shard=2"
    with pytest.raises(ConfigError, match=rf"^fused_loss cannot run on the \[parallel\] layout \({sizes}\): "):
        check_launch(cfg, 2)


def test_a_trainer_refuses_the_fused_loss_on_several_processes():
    """Trainer(..., FusedLMObjective(), runner=ParallelRunner(...)) under torchrun, with no launcher to check it first:
    DDP's replicas trained apart (their gradients never averaged), FSDP2 failed naming a LoRA adapter."""
    import types

    from lmforge.errors import ConfigError
    from lmforge.kernels.fused_ce import FusedLMObjective
    from lmforge.parallel.config import ParallelConfig
    from lmforge.train.distributed import check_runner

    runner = types.SimpleNamespace(cfg=ParallelConfig(dp_replicate=2), pp_mesh=None)
    with pytest.raises(ConfigError, match=r"^fused_loss cannot run on the \[parallel\] layout \(dp_replicate=2\)"):
        check_runner(runner, 2, FusedLMObjective())
