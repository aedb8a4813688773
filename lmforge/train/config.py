"""TrainConfig: one frozen dataclass holding model, data, optimizer and loop settings.

A TOML file with sections [model], [data], [optim] and top-level keys loads into it
(`lmforge train --config run.toml --optim.lr 1e-3`). The resolved config is stored in every run
directory, together with the lmforge version and git hash.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.config import check
from lmforge.model.config import ModelConfig
from lmforge.optim.config import OptimConfig


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train: tuple[str, ...] = ()
    """token shard files (lmforge.data.shards) to train on"""
    val: tuple[str, ...] = ()
    """validation shards; if empty, the last `val_fraction` of the training tokens is held out"""
    val_fraction: float = 0.1
    seq_len: int = 256
    batch_size: int = 16
    """sequences per micro-batch (tokens per optimizer step = batch_size·seq_len·grad_accum)"""
    sampling: Literal["random", "sequential"] = "random"
    """'random': windows at random offsets (nanoGPT); 'sequential': consecutive windows, epoch by epoch"""
    bytes_per_token: float = 0.0
    """UTF-8 bytes per token of the eval data, for bits-per-byte; 0 = measure it from the tokenizer"""

    def __post_init__(self) -> None:
        check(self.seq_len > 0, f"data.seq_len must be > 0, got {self.seq_len}")
        check(self.batch_size > 0, f"data.batch_size must be > 0, got {self.batch_size}")
        check(0 <= self.val_fraction < 1, f"data.val_fraction must lie in [0, 1), got {self.val_fraction}")
        check(self.bytes_per_token >= 0, f"data.bytes_per_token must be >= 0, got {self.bytes_per_token}")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Settings of the training loop itself, shared by every objective. TrainConfig (pretraining) and the
    post-training configs extend it, so their TOML files keep these keys at the top level; a field is
    declared once here rather than copied into each config."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    run_dir: str = "runs/default"
    max_steps: int = 1000
    grad_accum: int = 1
    eval_every: int = 100
    """evaluate (validation loss / perplexity / bits-per-byte, or the objective's metrics) every N steps and at the end"""
    eval_batches: int = 20
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 2
    """checkpoints kept (older ones are deleted)"""
    seed: int = 1337
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """'auto' = bf16 autocast on CUDA, fp32 on CPU"""
    compile: bool = False
    """torch.compile the model and loss"""
    sdpa_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    """attention kernel for scaled_dot_product_attention ('auto' lets torch choose; 'cudnn' is often
    fastest on Hopper GPUs)"""
    resume: bool = True
    """continue from the newest checkpoint in run_dir when there is one"""
    reset_optimizer: bool = False
    """on resume, start the optimizer's state fresh instead of refusing a checkpoint made with another
    optimizer (weights, data position and step are still restored)"""
    progress: bool = True
    plot: bool = True
    """write loss.png in the run directory at the end (needs matplotlib)"""
    tensorboard: bool = False
    wandb: bool = False

    def __post_init__(self) -> None:
        check(self.max_steps > 0, f"max_steps must be > 0, got {self.max_steps}")
        check(self.grad_accum > 0, f"grad_accum must be > 0, got {self.grad_accum}")
        for name in ("eval_every", "eval_batches", "log_every", "ckpt_every", "keep_last"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(LoopConfig):
    """Pretraining: a model built from [model], trained on the token shards of [data]."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("llama-tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: str = ""
    """tokenizer spec saved with checkpoints ('' = the one named in the training shard header)"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.data.seq_len <= self.model.max_seq_len or self.model.pos_emb in ("rope", "none"),
              f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len * self.grad_accum
