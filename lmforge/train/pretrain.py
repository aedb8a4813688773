"""Pretraining as pieces of the one Trainer: a model from ModelConfig, windows of token shards as the data
source, LMObjective as the objective, and validation loss / perplexity / bits-per-byte over fixed windows
as the evaluator. `pretraining_parts(cfg)` builds them in the order the golden loss curve depends on
(seed, model init, data, optimizer)."""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import torch

from lmforge.errors import ConfigError
from lmforge.optim import build_optimizer
from lmforge.train.config import TrainConfig, uses_bf16
from lmforge.train.data import (BatchSampler, check_one_tokenizer, check_run_tokenizer, eval_windows,
                                open_splits, tokenizer_spec)
from lmforge.train.loss import LMObjective, summed_nats, token_losses
from lmforge.train.distributed import distribute, join, sum_over_ranks, train_device


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor | None:
    """UTF-8 bytes of the text each token id stands for (infer.detok.token_text_bytes), for bits-per-byte."""
    from lmforge.infer.detok import token_text_bytes

    if tokenizer is None:
        return None
    return torch.tensor(token_text_bytes(tokenizer, vocab_size), dtype=torch.float64)


def prefix_bytes(tokenizer, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(lead (V,) float64, opens (V,) bool) of tokenizer.sentencepiece.put_prefix_bytes: the "▁" a SentencePiece-style
    tokenizer put before a document, which bits per byte does not count; None for tokenizers that put none."""
    from lmforge.tokenizer.sentencepiece import put_prefix_bytes

    tables = put_prefix_bytes(tokenizer, vocab_size)
    if tables is None:
        return None
    return torch.tensor(tables[0], dtype=torch.float64), torch.tensor(tables[1], dtype=torch.bool)


class LMEvaluator:
    """Validation loss, perplexity and bits-per-byte of a model over fixed (x, y[, opens]) batches (eval_windows).
    Called by the Trainer under no_grad, eval mode and its autocast. Bits per byte: the nats of the tokens that stand
    for bytes over those bytes (id_bytes; a special token, the end-of-text separator, counts in neither, as in
    nanochat's evaluate_bpb); val_loss and val_ppl average over every token. bytes_per_token > 0 (data.
    bytes_per_token) gives the bytes as that ratio times the number of those tokens (every token's where there
    is no tokenizer to tell the special ones: id_bytes None), so a ratio measured over the text's own tokens
    gives the same bits per byte as measuring each token. prefix (prefix_bytes): the "▁" a SentencePiece-style
    tokenizer put before each document is no byte of it, and is taken off the measured bytes: after the separator,
    or (shards without one) at the targets `opens` marks, the documents' starts the shards record.

    With a ParallelRunner (N processes), each rank evaluates only its share of every batch's rows
    (runner.eval_nats) and the sums of nats and tokens are all-reduced (the bytes, the same on every rank, are
    counted over the whole batches): the same metrics as one process, computed once, not once per rank."""

    def __init__(self, batches: list[tuple[torch.Tensor, ...]], id_bytes: torch.Tensor | None,
                 bytes_per_token: float = 0.0, runner=None,
                 prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.batches, self.id_bytes, self.bytes_per_token = batches, id_bytes, bytes_per_token
        self.runner, self.prefix = runner, prefix
        self.counted = id_bytes > 0 if id_bytes is not None else None

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.batches:
            return {}
        device = next(model.parameters()).device
        sums = torch.zeros(3, dtype=torch.float64)  # nats, tokens, nats of the tokens with bytes: this rank's rows
        n_bytes = 0.0  # of all rows (every rank holds the whole batches)
        for x, y, *opens in self.batches:
            n_bytes += self._bytes(x, y, opens[0] if opens else None)
            x, y = x.to(device), y.to(device)
            if self.runner is None:
                nats = summed_nats(token_losses(model(x), y), y, self.counted)
            else:  # this rank's rows; y = the targets it reports (none on ranks that share another's rows)
                nats, y = self.runner.eval_nats(x, y, self.counted)
            sums += torch.tensor([float(nats[0]), y.numel(), float(nats[1])], dtype=torch.float64)
        nats, n_tok, byte_nats = sum_over_ranks(sums, self.runner).tolist()
        out = {"val_loss": nats / n_tok, "val_ppl": math.exp(min(nats / n_tok, 50.0))}
        if n_bytes > 0:
            out["val_bpb"] = byte_nats / (math.log(2) * n_bytes)
        return out

    def _bytes(self, x: torch.Tensor, y: torch.Tensor, opens: torch.Tensor | None = None) -> float:
        """The UTF-8 bytes targets y (after inputs x) stand for: the counted tokens' own, less a "▁" put before a
        document (prefix; `opens`: the targets that open one in shards without a separator, eval_windows), or
        bytes_per_token for each (0: unknown)."""
        x, y = x.cpu(), y.cpu()  # (where the tables are)
        if self.bytes_per_token > 0:
            return self.bytes_per_token * (y.numel() if self.counted is None else int(self.counted[y].sum()))
        if self.id_bytes is None:
            return 0.0
        n = float(self.id_bytes[y].sum())
        if self.prefix is not None:  # (y[t] opens a document, or a stretch after an added token, when x[t] says so)
            lead, after = self.prefix
            put = after[x] if opens is None else after[x] | opens.cpu()
            n -= float(torch.where(put, lead[y], 0).sum())
        return n


def _mixture(cfg: TrainConfig):
    """The MixtureSource of data.sources/phases, and the training and validation splits of all sources
    together."""
    from lmforge.train.mixture import MixtureSource

    d = cfg.data
    samplers, train, val = {}, [], []
    for i, src in enumerate(d.sources):
        tr, va = open_splits(src.train, src.val, d.val_fraction, d.seq_len, cfg.model.vocab_size, f"data.sources[{i}]")
        samplers[src.name] = BatchSampler(tr, 1, d.seq_len, d.sampling, cfg.seed + 1 + i, f"data.sources[{i}]")
        train += tr
        val += va
    phases = [(round(p.start * cfg.max_steps), list(p.weights)) for p in d.phases]
    starts = [s for s, _ in phases] + [cfg.max_steps]
    empty = [i for i in range(len(phases)) if starts[i] >= starts[i + 1]]
    if empty:  # rounded to whole steps, a phase may cover none (or start at the end)
        from lmforge.errors import warn_caller

        warn_caller(f"data.phases[{empty[0]}] (start {d.phases[empty[0]].start}) covers no step of max_steps="
                    f"{cfg.max_steps} (phases start at steps {starts[:-1]}): its weights are never used")
    mix = MixtureSource(samplers, phases, batch_size=d.batch_size, grad_accum=cfg.grad_accum, seed=cfg.seed)
    return mix, train, val


class Parts(NamedTuple):
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data: Any
    objective: LMObjective
    config: TrainConfig
    evaluator: LMEvaluator
    tokenizer: Any
    runner: Any  # lmforge.parallel.runner.ParallelRunner on N processes, else None


class Data(NamedTuple):
    sampler: Any
    train: list
    val: list
    tokenizer: Any


def pretraining_data(cfg: TrainConfig, tokenizer=None) -> Data:
    """The run's shards opened (headers only) and checked against each other, the tokenizer and the model's
    vocabulary: what a bad data.train, a shard of another tokenizer or a too-small vocab_size fails on. `lmforge
    train --nproc N` calls it before any process starts, so such a run answers in one line, not once per rank."""
    d = cfg.data
    if d.sources:
        sampler, train_splits, val_splits = _mixture(cfg)
    else:
        train_splits, val_splits = open_splits(d.train, d.val, d.val_fraction, d.seq_len, cfg.model.vocab_size)
        sampler = BatchSampler(train_splits, d.batch_size, d.seq_len, d.sampling, cfg.seed)
    first = check_one_tokenizer(s.file for s in train_splits + val_splits)
    if tokenizer is None and (cfg.tokenizer or first.tokenizer):
        from lmforge.tokenizer.load import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_spec(cfg.tokenizer or first.tokenizer, first))
        if cfg.tokenizer:
            check_run_tokenizer(tokenizer, cfg.tokenizer, first)
    n_tok = getattr(tokenizer, "vocab_size", None)  # the engine refuses a smaller model: refused before training
    if n_tok is not None and n_tok > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {n_tok} tokens "
                          f"({cfg.tokenizer or first.tokenizer}): its ids {cfg.model.vocab_size}..{n_tok - 1} have no "
                          f"embedding, and no checkpoint could be sampled with it; set model.vocab_size >= {n_tok}")
    if n_tok is not None and cfg.model.vocab_size >= 2 * n_tok and cfg.model.vocab_size - n_tok >= 1024:
        # (a padded vocabulary, 50304 for GPT-2's 50257, is fine; the default 32,000 rows for a byte tokenizer is not)
        from lmforge.errors import warn_caller

        warn_caller(f"model.vocab_size={cfg.model.vocab_size} is {cfg.model.vocab_size / n_tok:.0f}x the tokenizer's "
                    f"{n_tok} tokens: rows {n_tok}..{cfg.model.vocab_size - 1} of the embedding and head never see a "
                    f"token (parameters and FLOPs spent for nothing); set model.vocab_size = {n_tok} (or a multiple of "
                    "64 above it)")
    if cfg.bf16_residual and not uses_bf16(cfg, train_device(cfg.device)):
        raise ConfigError(f"bf16_residual = true needs bf16 autocast (dtype = '{cfg.dtype}' on "
                          f"{train_device(cfg.device).type} trains in fp32): set dtype = 'bf16' or drop it")
    return Data(sampler, train_splits, val_splits, tokenizer)


def pretraining_parts(cfg: TrainConfig, *, model: torch.nn.Module | None = None, tokenizer=None) -> Parts:
    from lmforge.model.registry import build_model  # the class model.arch names (lmforge's Transformer by default)

    par = join(cfg.parallel, cfg.device)
    torch.manual_seed(cfg.seed)  # the same on every rank: identical initial weights
    model = (model if model is not None else build_model(cfg.model)).to(train_device(cfg.device))
    d = cfg.data
    sampler, train_splits, val_splits, tokenizer = pretraining_data(cfg, tokenizer)
    if cfg.bf16_residual:
        if not hasattr(model, "residual_dtype"):
            raise ConfigError(f"bf16_residual applies to lmforge's Transformer, not {type(model).__name__}")
        model.residual_dtype = torch.bfloat16
    if cfg.fused_kernels:  # from outside the model: same parameters, so built before the optimizer or not
        from lmforge.kernels.training import apply_fused_kernels

        apply_fused_kernels(model)
    model, sampler, runner = distribute(model, sampler, par, device=train_device(cfg.device), seq_len=d.seq_len,
                                        batch_size=d.batch_size)
    if runner is None and cfg.parallel.activation_checkpoint != "none":
        from lmforge.errors import warn_caller

        warn_caller(f"parallel.activation_checkpoint={cfg.parallel.activation_checkpoint!r} is applied by the parallel "
                    "runner, which one process does not use: training without it (launch with --nproc N)")
    if runner is None and cfg.parallel.compile:
        from lmforge.errors import warn_caller

        warn_caller("parallel.compile = true compiles each block in the parallel runner, which one process does not "
                    "use: training uncompiled; set compile = true to compile the model on one process (or launch "
                    "with --nproc N)")
    evaluator = LMEvaluator(eval_windows(val_splits, cfg.eval_batches, d.batch_size, d.seq_len),
                            token_byte_lengths(tokenizer, cfg.model.vocab_size), d.bytes_per_token, runner,
                            prefix_bytes(tokenizer, cfg.model.vocab_size))
    optimizer = build_optimizer(model, cfg.optim)
    objective = LMObjective(cfg.model.z_loss)
    if cfg.fused_loss:
        from lmforge.kernels.decode import unavailable

        why = unavailable(next(model.parameters()).device)
        if why is None:
            from lmforge.kernels.fused_ce import FusedLMObjective

            objective = FusedLMObjective(cfg.model.z_loss)
        else:  # as fused_kernels does: say so once, train with the plain loss
            print(f"fused_loss not applied: the Triton kernel {why}; the plain loss runs instead", file=sys.stderr)
    return Parts(model, optimizer, sampler, objective, cfg, evaluator, tokenizer, runner)
