"""fused_kernels with tensor parallelism: the Triton RMSNorm would receive DTensors (sequence parallelism shards
the norms' inputs; QK-norm's weights are DTensors under tp) and fail on the GPU mid-run. TrainConfig refuses the
combination in one line naming the fix; tp without sequence parallelism or QK-norm keeps plain-tensor norms."""

import dataclasses

import pytest

from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig
from lmforge.parallel.config import ParallelConfig
from lmforge.train.config import DataConfig, TrainConfig

MODEL = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, pos_emb="rope")


def _cfg(model: ModelConfig = MODEL, **parallel) -> TrainConfig:
    return TrainConfig(model=model, data=DataConfig(seq_len=16, batch_size=4), fused_kernels=True,
                       parallel=ParallelConfig(tp=2, **parallel), device="cpu")


def test_sequence_parallel_is_refused():
    with pytest.raises(ConfigError, match="^fused_kernels with parallel.tp=2: .*sequence parallelism.*"
                                          "set fused_kernels = false or parallel.sequence_parallel = false$"):
        _cfg()


def test_qk_norm_is_refused_without_sequence_parallel():
    with pytest.raises(ConfigError, match="QK-norm hands it; set fused_kernels = false$"):
        _cfg(dataclasses.replace(MODEL, qk_norm=True), sequence_parallel=False)


def test_plain_tensor_norms_are_accepted():
    assert _cfg(sequence_parallel=False).fused_kernels
    assert _cfg(dataclasses.replace(MODEL, norm="layernorm")).fused_kernels  # (no RMSNorm to swap)
    assert TrainConfig(model=MODEL, data=DataConfig(seq_len=16, batch_size=4), fused_kernels=True).fused_kernels
