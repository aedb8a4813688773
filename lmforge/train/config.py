"""TrainConfig: one frozen dataclass holding model, data, optimizer and loop settings.

A TOML file with sections [model], [data], [optim] and top-level keys loads into it
(`lmforge train --config run.toml --optim.lr 1e-3`). The resolved config is stored in every run
directory, together with the lmforge version and git hash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from lmforge.config import check, coerce_fields
from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig
from lmforge.optim.config import OptimConfig
from lmforge.parallel.config import ParallelConfig

if TYPE_CHECKING:
    import torch


def _check_paths(cfg, key: str) -> None:
    """An empty path ('' on a command line) read as '.', the current folder: refused by name instead."""
    for split in ("train", "val"):
        paths = getattr(cfg, split)
        check(all(p.strip() for p in paths),
              f"{key}.{split} holds an empty path, {list(paths)}: give token shard files, directories or glob patterns"
              + ("" if split == "train" else f", or none to hold out the last data.val_fraction of {key}.train"
                 + (" (--data.val with no value on a command line)" if key == "data" else "")))


def check_seq_len(seq_len: int, model: ModelConfig, name: str = "model.max_seq_len",
                  fix: str = "set model.max_seq_len >= {seq_len}", refusal: str = "") -> None:
    """data.seq_len against the max_seq_len of the model it trains (`name` says which: pretraining's
    model.max_seq_len, or post-training's init model). Learned positions have no row past max_seq_len: refused
    (`refusal`: the end of its message). RoPE / NoPE train past it, but the engine serves no more: a warning whose
    last clause is `fix` (formatted with seq_len)."""
    if seq_len <= model.max_seq_len:
        return
    check(model.pos_emb in ("rope", "none"), f"data.seq_len={seq_len} exceeds {name}={model.max_seq_len}{refusal}")
    from lmforge.errors import ConfigWarning, warn_caller

    warn_caller(f"data.seq_len={seq_len} exceeds {name}={model.max_seq_len}: the model trains on {seq_len}-token "
                f"windows, but its checkpoints serve a {model.max_seq_len}-token context; "
                + fix.format(seq_len=seq_len), ConfigWarning)


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """One named data source of a mixture (mid-training)."""

    name: str = ""
    """what metrics.jsonl calls it (tokens/NAME); every source needs one"""
    train: tuple[str, ...] = ()
    """the source's token shard files; a directory gives its *.bin files and a glob pattern its matches, sorted
    by name, as data.train takes them"""
    val: tuple[str, ...] = ()
    """the source's validation token shard files, directories (their *.bin) or glob patterns, as data.val takes
    them; if empty, the last data.val_fraction of the source's training tokens"""

    def __post_init__(self) -> None:
        coerce_fields(self, "data.sources")  # each field's type, named when wrong
        _check_paths(self, f"data.sources ({self.name!r})")


@dataclass(frozen=True, kw_only=True)
class PhaseConfig:
    """From `start` (a fraction of max_steps) on, rows come from the sources in proportion to `weights`
    (one per data.sources entry, in order; normalised)."""

    start: float = 0.0
    weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        coerce_fields(self, "data.phases")  # each field's type, named when wrong


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train: tuple[str, ...] = ()
    """token shard files (lmforge.data.shards) to train on; a directory gives its *.bin files and a glob pattern
    (quoted on a command line) its matches, sorted by name (lmforge.train.data.shard_paths)"""
    val: tuple[str, ...] = ()
    """validation token shard files; a directory gives its *.bin files (refused where it holds train.bin) and a
    glob pattern (quoted) its matches, sorted by name, as for `train`; if empty, the last `val_fraction` of the
    training tokens is held out"""
    val_fraction: float = 0.1
    """share of the training tokens held out for validation when `val` is empty"""
    seq_len: int = 256
    """tokens per training sequence (context length while training)"""
    batch_size: int = 16
    """sequences per micro-batch (tokens per optimizer step = batch_size·seq_len·grad_accum)"""
    sampling: Literal["random", "sequential"] = "random"
    """'random': windows at random offsets (nanoGPT); 'sequential': consecutive windows, epoch by epoch"""
    bytes_per_token: float = 0.0
    """UTF-8 bytes per text token of the eval data (special tokens such as the end-of-text separator left out of
    both, as bits-per-byte leaves them), for bits-per-byte; 0 = measure each token's from the tokenizer"""
    sources: tuple[SourceConfig, ...] = ()
    """a data mixture instead of `train`: named sources ([[data.sources]] name, train, val)"""
    phases: tuple[PhaseConfig, ...] = ()
    """the mixture's schedule ([[data.phases]] start, weights), e.g. a high-quality mix from start = 0.8,
    the WSD decay when optim.decay_fraction = 0.2 (OLMo 2's mid-training)"""

    def __post_init__(self) -> None:
        coerce_fields(self, "data")  # each field's type, named when wrong
        _check_paths(self, "data")
        check(self.seq_len > 0, f"data.seq_len must be > 0, got {self.seq_len}")
        check(self.batch_size > 0, f"data.batch_size must be > 0, got {self.batch_size}")
        check(0 <= self.val_fraction < 1, f"data.val_fraction must lie in [0, 1), got {self.val_fraction}")
        check(0 <= self.bytes_per_token < math.inf,
              f"data.bytes_per_token must be a finite number >= 0, got {self.bytes_per_token}")
        if self.sources or self.phases:
            self._check_mixture()

    def _check_mixture(self) -> None:
        names = [s.name for s in self.sources]
        check(bool(self.sources) and not self.train and not self.val,
              "data.sources replaces data.train/data.val: give the shards inside each [[data.sources]]")
        for i, s in enumerate(self.sources):  # [[data.sources]] entries: the i-th such table in the file
            check(bool(s.name), f"data.sources[{i}] has no name: add name = \"...\" to [[data.sources]] entry {i + 1}")
            check(bool(s.train), f"data.sources[{i}] ({s.name!r}) has no training shards: add train = [\"...bin\"] "
                  f"to [[data.sources]] entry {i + 1}")
        check(len(set(names)) == len(names), f"data.sources names must be unique, got {names}")
        check(bool(self.phases), "data.sources needs at least one [[data.phases]] entry (start = 0, weights = [...])")
        starts = [p.start for p in self.phases]
        check(starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < 1,
              f"data.phases starts must begin at 0 and increase within [0, 1), got {starts}")
        for i, p in enumerate(self.phases):
            check(len(p.weights) == len(names) and all(w >= 0 for w in p.weights)
                  and 0 < sum(p.weights) < math.inf,
                  f"data.phases[{i}].weights must be {len(names)} non-negative finite numbers (one per source "
                  f"{names}) with a positive finite sum, got {list(p.weights)}")


@dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Settings of the training loop itself, shared by every objective. TrainConfig (pretraining) and the
    post-training configs extend it, so their TOML files keep these keys at the top level; a field is
    declared once here rather than copied into each config."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    run_dir: str = "runs/default"
    """directory for checkpoints, metrics.jsonl, the resolved config and loss.png"""
    max_steps: int = 1000
    """optimizer steps to train for"""
    grad_accum: int = 1
    """micro-batches whose gradients are summed into each optimizer step"""
    eval_every: int = 100
    """evaluate (validation loss / perplexity / bits-per-byte, or the objective's metrics) every N steps and
    at the end"""
    eval_batches: int = 20
    """validation batches per evaluation"""
    log_every: int = 10
    """write a metrics row (loss, learning rate, throughput) every N steps"""
    ckpt_every: int = 500
    """save a checkpoint every N steps (and at the end)"""
    keep_last: int = 2
    """checkpoints kept (older ones are deleted)"""
    seed: int = 1337
    """seed of the model's initialisation, the data sampling and dropout"""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """'auto' = bf16 autocast on CUDA, fp32 on CPU"""
    compile: bool = False
    """torch.compile the model and loss"""
    compile_tune: bool = False
    """with compile: Inductor's coordinate-descent tuning of the block sizes of the kernels it generates
    (norms, RoPE, activations, loss); +2-3% MFU at 304M on an H200, paid once as 20-130 s more compile"""
    compile_cudagraphs: bool = False
    """with compile: replay the compiled forward and backward as CUDA graphs (Inductor's cudagraph trees):
    one launch per graph instead of one per kernel, no host gaps between kernels; CUDA only, costs the graphs'
    static memory pool, and shapes that vary (packed variable-length rows) each capture a graph"""
    sdpa_backend: Literal["auto", "flash", "cudnn", "efficient", "math"] = "auto"
    """attention kernel for scaled_dot_product_attention ('auto' lets torch choose; 'cudnn' is often
    fastest on Hopper GPUs)"""
    resume: bool = True
    """continue from the newest checkpoint in run_dir when there is one"""
    reset_optimizer: bool = False
    """on resume, start the optimizer's state fresh instead of refusing a checkpoint made with another
    optimizer (weights, data position and step are still restored)"""
    progress: bool = True
    """a live progress bar where stderr is a terminal; false, or output to a file or pipe (batch jobs, logs):
    one plain line per log step and per evaluation instead"""
    plot: bool = True
    """write loss.png in the run directory at the end (needs matplotlib)"""
    tensorboard: bool = False
    """also log metrics to TensorBoard in run_dir/tensorboard (needs tensorboard)"""
    wandb: bool = False
    """also log metrics and the config to Weights & Biases, project 'lmforge' (needs wandb)"""

    def __post_init__(self) -> None:
        coerce_fields(self)  # plain dicts for model/data/optim; wrong types name the key
        check(self.max_steps > 0, f"max_steps must be > 0, got {self.max_steps}")
        check(bool(self.run_dir.strip()), f"run_dir={self.run_dir!r} would write the run into the current folder; "
              "name its directory (run_dir = \"runs/NAME\", or \".\" to mean this folder)")
        check(self.grad_accum > 0, f"grad_accum must be > 0, got {self.grad_accum}")
        # seeds derived from it (seed + 1 + source, align.data's seed * 1_000_003 + epoch) stay within torch's 64 bits
        check(0 <= self.seed < 2**32, f"seed must lie in [0, 2**32), got {self.seed}")
        check(self.compile or not self.compile_tune,
              "compile_tune = true tunes the kernels torch.compile generates: set compile = true as well")
        check(self.compile or not self.compile_cudagraphs,
              "compile_cudagraphs = true replays the graphs torch.compile builds: set compile = true as well")
        for name in ("eval_every", "eval_batches", "log_every", "ckpt_every", "keep_last"):
            check(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        model = getattr(self, "model", None)
        if self.optim.head_lr and getattr(model, "tie_embeddings", False):
            from lmforge.errors import ConfigWarning, warn_caller

            warn_caller("optim.head_lr has no effect with model.tie_embeddings: the head is the embedding matrix, "
                        "which optim.embed_lr sets", ConfigWarning)
        if self.optim.warmup_steps > self.max_steps:
            from lmforge.errors import ConfigWarning, warn_caller

            warn_caller(f"optim.warmup_steps={self.optim.warmup_steps} > max_steps={self.max_steps}: the learning "
                        "rate never reaches optim.lr", ConfigWarning)
        elif self.optim.schedule == "wsd":
            from lmforge.optim.schedules import wsd_decay_start

            start = wsd_decay_start(self.max_steps, self.optim.decay_fraction)
            if self.optim.warmup_steps > start:
                from lmforge.errors import ConfigWarning, warn_caller

                warn_caller(f"optim.warmup_steps={self.optim.warmup_steps} runs into the WSD decay, which starts at "
                            f"step {start} of max_steps={self.max_steps} (optim.decay_fraction="
                            f"{self.optim.decay_fraction}): the rate jumps from its peak into the decay; lower "
                            "warmup_steps or decay_fraction", ConfigWarning)
        elif self.optim.schedule == "inverse_sqrt" and self.optim.warmup_steps == 0 and self.max_steps > 1:
            from lmforge.errors import ConfigWarning, warn_caller

            # sqrt(warmup / (step + 1)): the warmup sets the scale (Vaswani et al.: 4000 steps); without one the rate
            # halves by step 3 and sits at the min_lr_ratio floor from step 1/ratio^2 - 1 on
            end = max(self.optim.min_lr_ratio, (1 / self.max_steps) ** 0.5)
            warn_caller(f"optim.schedule='inverse_sqrt' with optim.warmup_steps=0 decays from the first step as "
                        f"1/sqrt(step + 1): half of optim.lr by step 3, {end:.2g} of it for the last of max_steps="
                        f"{self.max_steps}; set optim.warmup_steps, the step the decay starts from", ConfigWarning)


@dataclass(frozen=True, kw_only=True)
class TrainConfig(LoopConfig):
    """Pretraining: a model built from [model], trained on the token shards of [data]."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig.preset("llama-tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: str = ""
    """tokenizer spec saved with checkpoints ('' = the one named in the training shard header)"""
    fused_kernels: bool = False
    """swap in lmforge.kernels' Triton RMSNorm / SwiGLU / RoPE / dropless-MoE modules (same parameters and
    checkpoint names; a one-line notice and no change where Triton cannot run)"""
    fused_loss: bool = False
    """fused linear + cross-entropy chunked over tokens (lmforge.kernels.fused_ce): never materialises the
    (tokens x vocab) logits; not with logit soft-capping or MTP heads, and on one process only (check_fused_loss)"""
    bf16_residual: bool = False
    """under bf16 autocast, carry the residual stream in bf16 (the embedding's output cast once; nanochat's
    model trains so) instead of fp32: half the bytes through every norm, residual add and their backward
    (+3.6% MFU at 304M on an H200); weights and optimizer state stay fp32. Needs dtype bf16 (or auto on CUDA)"""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """[parallel] layout over the processes (`lmforge train --nproc N`): dp_shard (FSDP2), dp_replicate (DDP),
    tp, pp (the plain LM loss), cp and their products; data.batch_size is then the global micro-batch, split
    over the data-parallel ranks"""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_seq_len(self.data.seq_len, self.model)
        moe = any(self.model.is_moe_layer(i) for i in range(self.model.n_layers))
        if moe and self.model.moe_cfg.top_k == 1 and self.model.moe_cfg.norm_topk:  # (HF Mixtral at top_k=1 too)
            from lmforge.errors import ConfigWarning, warn_caller

            warn_caller("model.moe.top_k=1 with norm_topk=true gates each token's expert by exactly 1, so training "
                        "gives the router no gradient from the LM loss (only from aux_loss/z_loss/seq_aux_loss); "
                        "set model.moe.norm_topk=false to gate by the router's score (Switch Transformer)",
                        ConfigWarning)
        check(self.parallel.pp == 1 or not (moe or self.model.mtp is not None),
              f"parallel.pp={self.parallel.pp} runs the plain LM loss through the pipeline schedule, which would "
              f"drop this model's {'MoE balancing' if moe else 'MTP'} loss; set parallel.pp=1 (use dp_shard/tp)")
        check(self.parallel.pp == 1 or not self.compile,
              f"compile = true compiles the model and loss as one, which the pipeline's stages (parallel.pp="
              f"{self.parallel.pp}) never run: it compiled nothing; set compile = false and [parallel] compile = true "
              "to compile each stage's blocks")
        # (fused_lm_loss refuses them too, but only at the first step, after the data and model were built)
        check(not self.fused_loss or self.model.logit_softcap == 0,
              f"fused_loss with model.logit_softcap={self.model.logit_softcap}: the fused linear + cross-entropy has "
              "no logit soft-capping; set fused_loss = false or model.logit_softcap = 0")
        check(not self.fused_loss or self.model.mtp is None,
              "fused_loss with model.mtp: the fused linear + cross-entropy has no multi-token prediction heads; set "
              "fused_loss = false or remove [model.mtp]")
        par = self.parallel  # sequence parallelism and QK-norm under tp hand RMSNorm DTensors, which Triton cannot read
        dtensor_norms = par.tp > 1 and ((par.sequence_parallel and self.model.norm == "rmsnorm") or self.model.qk_norm)
        check(not (self.fused_kernels and dtensor_norms),
              f"fused_kernels with parallel.tp={par.tp}: the Triton RMSNorm cannot take the DTensors that "
              + ("QK-norm" if self.model.qk_norm else "sequence parallelism") + " hands it; set fused_kernels = false"
              + ("" if self.model.qk_norm else " or parallel.sequence_parallel = false"))
        if self.parallel.world_size > 1:  # the layout's fit to the model and batch, before any process starts
            self.parallel.validate(self.parallel.world_size, self.model, seq_len=self.data.seq_len,
                                   batch_size=self.data.batch_size)

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.seq_len * self.grad_accum


def check_fused_loss(par: ParallelConfig) -> None:
    """fused_loss on the layout the processes run (`par`): one process only. The fused head (fused_ce.fused_lm_loss)
    calls the model's trunk and reads lm_head's weight itself, bypassing model.forward, where FSDP2 gathers the root's
    weights and DDP arms its gradient all-reduce (dp_replicate's replicas trained apart, silently); tp shards the
    head's weight, and the pipeline schedule trains the plain loss."""
    if par.world_size > 1:
        raise ConfigError(f"fused_loss cannot run on the [parallel] layout ({par.sizes}): the fused linear + "
                          "cross-entropy reads lm_head's weight and calls the trunk itself, outside the forward where "
                          "FSDP2 and DDP gather weights and average gradients; set fused_loss = false on several "
                          "processes")


def uses_bf16(cfg: LoopConfig, device: torch.device) -> bool:
    """Whether the run trains under bf16 autocast: dtype 'bf16', or 'auto' on a CUDA device."""
    return cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
