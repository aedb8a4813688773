"""The training loop: `Trainer(cfg).fit()` or `train(cfg)`, the same as `lmforge train`.

One optimizer step = grad_accum micro-batches of (batch_size, seq_len) tokens, mean loss backward,
global-norm clipping, the scheduled learning rate, optimizer step. Every eval_every steps the fixed
validation windows give loss, perplexity and bits-per-byte. Checkpoints hold everything needed to
resume bit-exactly (weights, optimizer, sampler and RNG state); Ctrl-C writes one before exiting;
a NaN/inf loss stops the run and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmforge.config import to_dict
from lmforge.errors import ConfigError, DataError, TrainingDiverged
from lmforge.optim import build_optimizer, lr_multiplier
from lmforge.train import checkpoint as ckpt
from lmforge.train.config import TrainConfig
from lmforge.train.data import BatchSampler, eval_windows, open_splits
from lmforge.train.loss import lm_loss, token_losses
from lmforge.train.metrics import MetricsLog, peak_flops, plot_losses, read_metrics
from lmforge.utils import pick_device, run_metadata, write_json_atomic


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_val_loss: float | None
    final_val_bpb: float | None
    wall_time: float
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor | None:
    """UTF-8 bytes each token id stands for (special tokens count 0), for bits-per-byte."""
    if tokenizer is None:
        return None
    out = torch.zeros(vocab_size, dtype=torch.float64)
    vocab = getattr(tokenizer, "vocab", None)
    specials = getattr(tokenizer, "special_tokens", None) or []
    special_bytes = {s.encode() if isinstance(s, str) else s for s in specials}
    if isinstance(vocab, dict):
        for i, b in vocab.items():
            if i < vocab_size and b not in special_bytes:
                out[i] = len(b)
    else:  # byte-level: ids < 256 are one byte each
        out[: min(256, vocab_size)] = 1
    return out


def sdpa_context(backend: str):
    """A context that restricts scaled_dot_product_attention to one kernel ('auto': no restriction)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([names[backend]])


def _resolve_tokenizer(spec: str | None, shard_dir: Path):
    from lmforge.tokenizer.load import load_tokenizer

    if not spec:
        return None
    if spec != "byte" and not Path(spec).exists() and (shard_dir / spec).exists():
        spec = str(shard_dir / spec)
    return load_tokenizer(spec)


class Trainer:
    def __init__(self, cfg: TrainConfig, *, model: torch.nn.Module | None = None, tokenizer=None):
        from lmforge.model.transformer import Transformer

        self.cfg = cfg
        self.device = torch.device(pick_device(cfg.device))
        self.run_dir = Path(cfg.run_dir)
        torch.manual_seed(cfg.seed)
        self.model = (model if model is not None else Transformer(cfg.model)).to(self.device)
        d = cfg.data
        self.train_splits, val_splits = open_splits(d.train, d.val, d.val_fraction, d.seq_len, cfg.model.vocab_size)
        first = self.train_splits[0].file
        self.tokenizer = tokenizer or _resolve_tokenizer(cfg.tokenizer or first.tokenizer, first.path.parent)
        self.sampler = BatchSampler(self.train_splits, d.batch_size, d.seq_len, d.sampling, cfg.seed)
        self.val_batches = eval_windows(val_splits, cfg.eval_batches, d.batch_size, d.seq_len)
        self.id_bytes = token_byte_lengths(self.tokenizer, cfg.model.vocab_size)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext())
        # model + loss compiled as one graph, so the fp32 logits never round-trip through memory
        self.forward_loss = torch.compile(self._forward_loss) if cfg.compile else self._forward_loss
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.flops_per_token = (self.model.flops_per_token(d.seq_len)
                                if hasattr(self.model, "flops_per_token") else None)
        self.peak = peak_flops(self.device, "bf16" if use_bf16 else "fp32")
        self.metrics = MetricsLog(self.run_dir, tensorboard=cfg.tensorboard, wandb=cfg.wandb, config=to_dict(cfg))
        self.last_checkpoint: Path | None = None
        if cfg.resume:
            self._maybe_resume()
        elif ckpt.checkpoint_dirs(self.run_dir):
            # a fresh run must not mix its metrics and checkpoints with an older run's
            raise ConfigError(f"run_dir {self.run_dir} already holds checkpoints of another run and resume=False; "
                              "use a new run_dir, set resume=true to continue it, or delete it")

    # state ---------------------------------------------------------------------------------------
    def _train_state(self) -> dict[str, Any]:
        state = {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
                 "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
                 "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def save(self) -> Path:
        self.last_checkpoint = ckpt.save_checkpoint(
            self.run_dir, self.step, self.model, train_state=self._train_state(), tokenizer=self.tokenizer,
            keep_last=self.cfg.keep_last, extra={"tokens": self.tokens})
        return self.last_checkpoint

    def _maybe_resume(self) -> None:
        found = ckpt.checkpoint_dirs(self.run_dir)
        if not found:
            return
        path = found[-1]
        _, meta = ckpt.model_config_of(path)
        ckpt.check_same_model(meta["model"], self.cfg.model)
        ckpt.load_weights(self.model, path)
        state = ckpt.load_train_state(path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.metrics.truncate_after(self.step)
        self.last_checkpoint = path
        tqdm.write(f"resumed from {path} at step {self.step}")

    # steps ---------------------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.sampler.next()
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        loss, ce = lm_loss(logits, y, self.cfg.model.z_loss)
        aux_fn = getattr(self.model, "aux_loss", None)  # MoE balancing losses, if the model has them
        aux = aux_fn() if callable(aux_fn) else None
        return (loss + aux if aux is not None else loss), ce

    def train_step(self) -> dict[str, Any]:
        """One optimizer step. Loss and grad norm stay on the device (no host sync); `flush()` reads
        them in one go at log time and stops the run on a NaN/inf loss."""
        cfg = self.cfg
        mult = lr_multiplier(cfg.optim, self.step, cfg.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * mult
        total = torch.zeros((), device=self.device)
        for _ in range(cfg.grad_accum):
            x, y = self._batch()
            with self.autocast, sdpa_context(cfg.sdpa_backend):
                loss, ce = self.forward_loss(x, y)
            (loss / cfg.grad_accum).backward()
            total += ce.detach()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if cfg.optim.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        else:
            gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += cfg.tokens_per_step
        stats = {"loss": total / cfg.grad_accum, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": gnorm}
        self._pending.append((self.step, stats["loss"], gnorm))
        return stats

    def flush(self) -> dict[str, float]:
        """Read the pending per-step losses (one host sync); raise TrainingDiverged on the first bad one."""
        if not self._pending:
            return {}
        steps = [s for s, _, _ in self._pending]
        values = torch.stack([torch.stack([l.float(), g.float()]) for _, l, g in self._pending]).tolist()
        self._pending.clear()
        for step, (loss, _) in zip(steps, values):
            if not math.isfinite(loss):
                where = self.last_checkpoint or "none was written"
                raise TrainingDiverged(f"loss became {loss} at step {step}; stopped. Last good checkpoint: "
                                       f"{where}. Lower optim.lr or raise optim.warmup_steps")
        return {"loss": values[-1][0], "grad_norm": values[-1][1]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss, perplexity and bits-per-byte over the fixed validation windows."""
        if not self.val_batches:
            return {}
        self.model.eval()
        nats, n_tok, n_bytes = 0.0, 0, 0.0
        for x, y in self.val_batches:
            with self.autocast, sdpa_context(self.cfg.sdpa_backend):
                logits = self.model(x.to(self.device))
            y = y.to(self.device)
            nats += float(token_losses(logits, y).double().sum())
            n_tok += y.numel()
            if self.id_bytes is not None:
                n_bytes += float(self.id_bytes[y.cpu()].sum())
        self.model.train()
        out = {"val_loss": nats / n_tok, "val_ppl": math.exp(min(nats / n_tok, 50.0))}
        if self.cfg.data.bytes_per_token > 0:
            out["val_bpb"] = nats / n_tok / math.log(2) / self.cfg.data.bytes_per_token
        elif n_bytes > 0:
            out["val_bpb"] = nats / (math.log(2) * n_bytes)
        return out

    # loop ----------------------------------------------------------------------------------------
    def _log_eval(self, bar) -> dict[str, float]:
        ev = self.evaluate()
        if ev:
            self.metrics.log({"step": self.step, "tokens": self.tokens, **ev})
            bpb = f" | bpb {ev['val_bpb']:.3f}" if "val_bpb" in ev else ""
            bar.write(f"step {self.step:>6} | val loss {ev['val_loss']:.4f} | ppl {ev['val_ppl']:.2f}{bpb}")
        return ev

    def fit(self) -> TrainResult:
        cfg = self.cfg
        if self.step == 0:  # a fresh run starts a fresh log
            self.metrics.path.unlink(missing_ok=True)
        write_json_atomic(self.run_dir / "config.json", {"config": to_dict(cfg), "seed": cfg.seed, **run_metadata()})
        self.model.train()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress, dynamic_ncols=True,
                   desc="train", unit="step")
        ev: dict[str, float] = {}
        t_last, tok_last = time.perf_counter(), self.tokens
        t_start = time.perf_counter() - self.elapsed
        try:
            if self.step == 0:
                ev = self._log_eval(bar)
            while self.step < cfg.max_steps:
                lr = self.train_step()["lr"]
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    stats = {**self.flush(), "lr": lr}
                    self.elapsed = time.perf_counter() - t_start
                    now = time.perf_counter()
                    tps = (self.tokens - tok_last) / max(now - t_last, 1e-9)
                    t_last, tok_last = now, self.tokens
                    row = {"step": self.step, "tokens": self.tokens, **stats, "tok_per_s": tps,
                           "elapsed": self.elapsed}
                    if self.flops_per_token and self.peak:
                        row["mfu"] = tps * self.flops_per_token / self.peak
                    self.metrics.log(row)
                    extra = {"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}", tok_s=f"{tps:,.0f}", **extra)
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    self.flush()
                    ev = self._log_eval(bar)
                if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                    self.flush()  # never checkpoint weights that a NaN step has already touched
                    self.elapsed = time.perf_counter() - t_start
                    self.save()
            if not ev:  # resumed at (or past) the last step: report the finished model's validation loss
                ev = self._log_eval(bar)
        except KeyboardInterrupt:
            bar.close()
            self.elapsed = time.perf_counter() - t_start
            self.flush()
            if self.step > 0 and (self.last_checkpoint is None or not self.last_checkpoint.name.endswith(f"{self.step:06d}")):
                self.save()
            tqdm.write(f"interrupted at step {self.step}; checkpoint {self.last_checkpoint}; "
                       "run the same command again to resume")
            raise
        finally:
            bar.close()
            self.metrics.close()
        if cfg.plot:
            plot_losses(self.run_dir)
        return TrainResult(self.run_dir, self.step, ev.get("val_loss"), ev.get("val_bpb"), self.elapsed,
                           self.last_checkpoint, read_metrics(self.run_dir))


def train(cfg: TrainConfig) -> TrainResult:
    """Train as `lmforge train` does: build model, data and optimizer from `cfg` and run to max_steps."""
    return Trainer(cfg).fit()


__all__ = ["Trainer", "TrainResult", "train", "DataError"]
