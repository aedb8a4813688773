"""The one training loop: `Trainer(model, optimizer, data, objective, config=..., hooks=...)`.

Pretraining, SFT, reward models, DPO and its family, distillation and RL differ only in their DataSource
and Objective (lmforge.train.objective); `Trainer(cfg)` with a TrainConfig builds pretraining's pieces
(lmforge.train.pretrain), and `train(cfg)` is `lmforge train`. By hand, e.g. SFT:

    src, val, report = build_sources(PostDataConfig(train=("chat.jsonl",)), tok, "sft", seed=0)  # align.data
    Trainer(model, build_optimizer(model, OptimConfig(lr=1e-4)), src, SFTObjective(),
            config=LoopConfig(run_dir="runs/sft", max_steps=500)).fit()

One optimizer step = grad_accum micro-batches, mean loss backward, global-norm clipping, the scheduled
learning rate, optimizer step. Every eval_every steps the evaluator runs (validation loss / perplexity /
bits-per-byte for pretraining). Checkpoints hold everything needed to resume bit-exactly: weights,
optimizer (refused if it was another optimizer), data-source, objective and RNG state (written and read back
by lmforge.train.resume). Beside the loop: lmforge.train.rundir refuses an unusable run_dir and locks it
against a second process; lmforge.train.param_groups checks that the optimizer holds exactly the model's
trainable parameters and keeps a resumed run's optimizer settings.

N processes (torchrun, `lmforge train --nproc N`): a lmforge.parallel.runner.ParallelRunner is the step
strategy (`Trainer(..., runner=runner)`; pretraining builds it from [parallel]). Each micro-batch is this
rank's share through the runner (objective_step; a pipeline runs the LM loss through its schedule and
refuses other objectives), clipping is the runner's global norm over DTensor shards and stages, logged
metrics are its global mean, and checkpoints gather the full weights and optimizer state onto rank 0 as an
ordinary checkpoint that resumes on any layout (lmforge.train.distributed). Only rank 0 writes metrics,
plots and checkpoints.

Interrupts (lmforge.train.interrupts, an object the Trainer owns): SIGINT/SIGTERM only set a flag; the
loop stops at the next step boundary (agreed over the ranks), writes a checkpoint of that state and raises
KeyboardInterrupt, so resuming is bit-exact; a KeyboardInterrupt inside a step rolls it back to its start
(or forward to its end). A hook ends the run early with `request_stop`, a finite data source by raising
StopIteration (lmforge.train.objective.DataSource). A NaN/inf loss stops the run and leaves the last good
checkpoint in place.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from lmforge.config import to_dict
from lmforge.errors import ConfigError, DataError, TrainingDiverged
from lmforge.model.layers.moe import MoE, load_uncounted, update_expert_biases
from lmforge.optim import lr_multiplier
from lmforge.train import distributed as ddp
from lmforge.train.config import LoopConfig, TrainConfig, uses_bf16
from lmforge.train.interrupts import Interrupts
from lmforge.train.metrics import MetricsLog, peak_flops, plot_losses, read_metrics
from lmforge.train.objective import (Batch, DataSource, Objective, checked_loss, checked_metrics, combined_metrics,
                                     metric_terms)
from lmforge.train.param_groups import GROUP_START, check_optimizer_params, group_start
from lmforge.train.resume import resume_or_start, save_trainer
from lmforge.train.rundir import RunDirLock, check_run_dir
from lmforge.utils import run_metadata, write_json_atomic

if TYPE_CHECKING:
    from lmforge.parallel.runner import ParallelRunner


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_val_loss: float | None
    final_val_bpb: float | None
    wall_time: float
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None
    """why fit ended before max_steps: a hook called Trainer.request_stop, or the data source ended (it raised
    StopIteration); None = it ran to max_steps"""


class DataEnded(Exception):
    """The data source's next_batch raised StopIteration (a finite source at its end) inside a step."""

    def __init__(self, drawn: int):
        super().__init__(drawn)
        self.drawn = drawn  # micro-batches of the unfinished step drawn before it


def sdpa_context(backend: str):
    """A context that restricts scaled_dot_product_attention to one kernel ('auto': no restriction)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([names[backend]])


def batch_tokens(batch: Batch) -> int:
    """Tokens a batch feeds the model: every `*input_ids` tensor (both sides of a preference pair)."""
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))


def loss_label(objective: Objective) -> str:
    """What loss.png's y axis shows: pretraining's next-token cross-entropy, else the objective's own loss (a DPO,
    KTO or reward-model loss is no cross-entropy per token)."""
    from lmforge.train.loss import LMObjective

    return "cross-entropy (nats/token)" if isinstance(objective, LMObjective) else f"loss ({type(objective).__name__})"


def batch_rows(batch: Batch) -> int:
    return len(next(iter(batch.values())))


class Trainer:
    """hooks: objects with any of on_step_end(trainer, stats), on_log(trainer, row), on_eval(trainer,
    metrics), on_save(trainer, path). evaluator: model -> dict of floats (run under no_grad and eval
    mode; the model is on the trainer's device, so its inputs go there). extra_meta: JSON-able facts stored in
    every checkpoint's config.json (e.g. the chat template).
    base: lmforge.checkpoint.base_record of the checkpoint the model's frozen weights were loaded from: the
    checkpoints are then adapter-only (the frozen parameters left out, the base recorded; a LoRA run's), and
    a resume checks that the model was built on the same base."""

    def __init__(self, model: torch.nn.Module | TrainConfig, optimizer: torch.optim.Optimizer | None = None,
                 data: DataSource | None = None, objective: Objective | None = None, *,
                 config: LoopConfig | None = None, hooks: Iterable[Any] = (),
                 evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None, tokenizer=None,
                 extra_meta: dict[str, Any] | None = None, runner: ParallelRunner | None = None,
                 base: dict[str, Any] | None = None):
        if isinstance(model, TrainConfig):  # Trainer(cfg): pretraining built from its config
            from lmforge.train.pretrain import pretraining_parts

            check_run_dir(model.run_dir)  # before the model and the data are built
            model, optimizer, data, objective, config, evaluator, tokenizer, runner = pretraining_parts(model)
        if optimizer is None or data is None or objective is None or config is None:
            raise ConfigError("Trainer needs model, optimizer, data, objective and config (or one TrainConfig)")
        self.cfg = cfg = config
        check_run_dir(cfg.run_dir)
        self._live = False  # a live progress bar: set by fit
        self.device = ddp.train_device(cfg.device)
        self.rank, self.world = ddp.rank_and_world()  # only rank 0 writes metrics, plots and checkpoints
        self._logged_stats: tuple[int, dict[str, float]] | None = None  # a log row's stats, flushed, not yet written
        self._lock = RunDirLock(Path(cfg.run_dir))
        self.runner = runner
        ddp.check_runner(runner, self.world, objective)
        if runner is not None and runner.pp_mesh is not None and cfg.grad_accum > 1:
            from lmforge.parallel.pp import schedule_scales_grads

            if not schedule_scales_grads():
                raise ConfigError("parallel.pp with grad_accum > 1 needs torch >= 2.6 (its pipeline schedules divide "
                                  "the accumulated gradients again each step otherwise); raise "
                                  "parallel.n_microbatches instead of grad_accum")
        self.run_dir = Path(cfg.run_dir)
        self.model = model.to(self.device)
        # MoE layers with aux-loss-free balancing: their bias moves after each update (not walked for others).
        # Decided by the config where there is one, so every rank takes part in the update's collectives (a
        # pipeline stage may hold no MoE layer)
        mcfg = getattr(self.model, "cfg", None)
        self._moves_expert_bias = (getattr(mcfg, "mlp", None) == "moe" and mcfg.moe_cfg.bias_update_rate > 0) or any(
            isinstance(m, MoE) and m.m.bias_update_rate > 0 for m in self.model.modules())
        self.optimizer, self.data, self.objective = optimizer, data, objective
        self.hooks, self.evaluator, self.tokenizer = list(hooks), evaluator, tokenizer
        self.extra_meta = dict(extra_meta or {})
        self.base = base
        check_optimizer_params(self.model, self.optimizer)
        from lmforge.adapt.qlora import check_base_layers

        check_base_layers(self.model)  # what its checkpoints record of quantized layers: refused now, not at a save
        for g in self.optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])
            g.setdefault(GROUP_START, group_start(g))  # a resume tells the counters the run moves by it
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.evaluated_step = -1  # the last step whose evaluation metrics.jsonl holds (a checkpoint keeps it)
        use_bf16 = uses_bf16(cfg, self.device)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext())
        # model + loss compiled as one graph, so the fp32 logits never round-trip through memory
        options = {k: True for k, on in (("coordinate_descent_tuning", cfg.compile_tune),
                                         ("triton.cudagraphs", cfg.compile_cudagraphs)) if on}
        self.loss_fn = checked_loss(torch.compile(objective.loss, options=options or None) if cfg.compile
                                    else objective.loss, type(objective).__name__)
        self._pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self._empty_steps: set[int] = set()  # steps with nothing to train (no update; their loss is undefined)
        self._told_empty = False
        self.flops_per_token: float | None = None  # known at the first batch (it depends on seq_len)
        self.peak = peak_flops(self.device, "bf16" if use_bf16 else "fp32")
        self.metrics = (MetricsLog(self.run_dir, tensorboard=cfg.tensorboard, wandb=cfg.wandb, config=to_dict(cfg))
                        if self.rank == 0 else ddp.NullLog())
        self.last_checkpoint: Path | None = None
        self._in_flight: tuple[int, dict[str, torch.Tensor]] = (0, {})  # the step's tokens and metrics
        self._begin_s = 0.0  # seconds in begin_step hooks since the last log row (not training time)
        self._paused_s = 0.0  # seconds evaluating and checkpointing since the last log row (not training either)
        self.qk_clip = self._qk_clip()
        # signals, stop requests, the step's phase (its update ends after the bias move and the QK-clip)
        self.interrupts = Interrupts(optimizer, post_update=self._moves_expert_bias or self.qk_clip is not None)
        if self.rank == 0:  # held from before the resume reads the run_dir until fit ends (or close())
            self._lock.acquire()
        try:
            resume_or_start(self)
        except BaseException:
            self._lock.release()
            raise

    def close(self) -> None:
        """Release the run_dir for another process (fit does this when it ends; a later fit takes it again)."""
        self._lock.release()

    def __del__(self):
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    def save(self) -> Path:
        """Write a checkpoint of the current step (lmforge.train.resume.save_trainer) and return its path."""
        return save_trainer(self)

    # steps ---------------------------------------------------------------------------------------
    def _call(self, name: str, *args) -> None:
        for h in self.hooks:
            fn = getattr(h, name, None)
            if fn is not None:
                fn(self, *args)

    def _to_device(self, batch: Batch) -> Batch:
        if self.flops_per_token is None and hasattr(self.model, "flops_per_token") and "input_ids" in batch:
            self.flops_per_token = self.model.flops_per_token(batch["input_ids"].shape[-1])
        if self.device.type == "cuda":  # host rows pinned for an asynchronous copy; device tensors (e.g.
            # rollouts sampled on the GPU) are used where they are
            move = lambda v: v.pin_memory().to(self.device, non_blocking=True) if v.device.type == "cpu" \
                else v.to(self.device)  # noqa: E731
        else:
            move = lambda v: v.to(self.device)  # noqa: E731
        # other values (RL metadata: the prompts' texts, a list of rewards) reach the objective as they are
        return {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _micro_batches(self) -> tuple[list[tuple[Batch, float | None]], int, bool]:
        """The step's grad_accum micro-batches on the device, each with its share of the step's loss:
        None = 1/grad_accum, or, for objectives with `batch_weight(batch)` (the items their loss averages
        over, e.g. SFT's trained tokens), the micro-batch's share of the step's items, so accumulated
        micro-batches give the loss of one big batch (as HF/TRL normalise); a micro-batch of weight 0 (nothing
        to train) gets share 0 and adds nothing to the step. Weights are read on the host
        before the transfer, so no device sync (a batch a data source made on the device, e.g. GPU rollouts,
        costs one per micro-batch). On N ranks the total is the ranks' mean (one host all-reduce):
        the ranks' gradients are averaged, so each share is then its part of the global batch's items x N
        (rows for objectives without batch_weight). Also returns the step's tokens over every data-parallel
        rank (the same all-reduce; a rank's Repeated rows are not the step's), and whether the whole step has
        nothing to train (every weight 0, on every rank). Raises DataEnded when the data source's next_batch
        raised StopIteration (on any rank: the flag travels in the same all-reduce)."""
        raw = []
        try:
            for _ in range(self.cfg.grad_accum):
                raw.append(self.data.next_batch())
        except StopIteration:
            ended = True
        else:
            ended = False
        if ended and self.runner is None:
            raise DataEnded(len(raw))
        raw_ok = [] if ended else raw
        n_tokens = sum(batch_tokens(b) for b in raw_ok if not isinstance(b, ddp.Repeated))
        weigh = getattr(self.objective, "batch_weight", None)
        if weigh is None and self.runner is not None:  # ranks' shares of a short batch differ: weigh by rows
            weigh = batch_rows
        weights = [0.0 if isinstance(b, ddp.Repeated) else float(weigh(b)) for b in raw_ok] if weigh is not None \
            else []
        total = sum(weights)
        if self.runner is not None:  # (weigh is set): ranks outside data parallelism (tp, pp, cp) hold the same
            # rows as their replica's, so each global sum counts world / dp_size times
            sums = ddp.sum_over_ranks(torch.tensor([total, n_tokens, ended], dtype=torch.float64), self.runner)
            total, n_tokens = float(sums[0]) / self.world, round(float(sums[1]) * self.runner.dp_size / self.world)
            if sums[2] > 0:
                raise DataEnded(len(raw))
        empty = weigh is not None and total == 0  # (batch_weight 0 everywhere: shares 0, the update is skipped)
        shares = [w / total for w in weights] if total > 0 else [0.0 if empty else None] * len(raw)
        # a rank's repeated rows (a batch shorter than the ranks: RankRows) join the step at no weight; they stay
        # Repeated on the device, so train_step leaves their tokens out of the MoE load too
        shares = [0.0 if isinstance(b, ddp.Repeated) else s for b, s in zip(raw, shares)]
        moved = [self._to_device(b) for b in raw]
        return [(ddp.Repeated(m) if isinstance(b, ddp.Repeated) else m, share)
                for b, m, share in zip(raw, moved, shares)], n_tokens, empty

    def train_step(self) -> dict[str, Any]:
        """One optimizer step. Metrics and grad norm stay on the device (no host sync); `flush()` reads
        them in one go at log time and stops the run on a NaN/inf loss."""
        cfg = self.cfg
        self.interrupts.begin_step(self.data, self.objective)
        mult = lr_multiplier(cfg.optim, self.step, cfg.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * mult
        sums: tuple[torch.Tensor, ...] = ()
        if self.qk_clip is not None:
            self.qk_clip.reset()  # the max logits of this step's forward passes only (not of evaluations)
        hooks = [h for h in (getattr(self.data, "begin_step", None), getattr(self.objective, "begin_step", None)) if h]
        if hooks:  # e.g. an RL source samples this step's rollouts here: timed apart from the training throughput
            _sync(self.device)  # (the last step's queued work is not the hooks')
            t0 = time.perf_counter()
            for begin in hooks:
                begin(self)
            _sync(self.device)
            self._begin_s += time.perf_counter() - t0
        micro, n_tokens, empty_step = self._micro_batches()
        keys: list[str] = []
        subsets = getattr(self.objective, "subset_means", None)  # (KTO's per-label means: from sums and counts)
        for i, (batch, share) in enumerate(micro):
            # repeated rows are not the step's tokens: they must not move the aux-loss-free MoE bias, nor count;
            # neither do the rows of a micro-batch with nothing to train (batch_weight 0)
            repeated = isinstance(batch, ddp.Repeated)
            uncounted = load_uncounted(self.model) if share == 0.0 else contextlib.nullcontext()
            with self.forward_context(), uncounted:
                loss, metrics = self._forward_backward(batch, 1 / cfg.grad_accum if share is None else share,
                                                       sync=i == len(micro) - 1, empty=share == 0.0 and not repeated)
            metrics = {"loss": loss, **metrics}
            if keys and list(metrics) != keys:
                raise ConfigError(f"the objective's metrics changed between micro-batches: {keys} then "
                                  f"{list(metrics)}; return the same metrics for every batch")
            keys = list(metrics)
            # counts (num_*) add up over the micro-batches, means are weighted by their shares; a share-0 micro-batch
            # (one with nothing to train; a Repeated batch, whose counts are the rank's that trains on its rows)
            # adds nothing to the means, and no metric adds what a micro-batch cannot define (NaN: KTO's mean over a
            # label it lacks); an objective's subset means (KTO's per-label ones) are weighed by their subset's count
            terms = metric_terms(metrics, 1 / cfg.grad_accum if share is None else share, counted=not repeated,
                                 subsets=subsets)
            sums = terms if not sums else (sums[0] + terms[0], sums[1] + terms[1])
        totals, weights = sums
        if self.runner is None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            if not params:  # no micro-batch had anything to train
                gnorm = torch.zeros((), device=self.device)
            elif cfg.optim.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            else:
                gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        else:  # the norm over every shard, stage and replica; the ranks' sums (means over ranks of equal shares)
            gnorm = self.runner.clip_grad_norm_(cfg.optim.grad_clip)
            both = self.runner.global_loss(torch.cat([totals, weights]))
            totals, weights = both[:len(keys)], both[len(keys):]
            if self.runner.pp_mesh is not None:  # every stage holds the weights, only the last the totals
                weights = weights / self.runner.cfg.pp
            totals = torch.stack([t * self.runner.dp_size if k.startswith("num_") else t
                                  for k, t in zip(keys, totals.unbind())])
        stats: dict[str, torch.Tensor] = combined_metrics(keys, totals, weights, subsets)
        stats["grad_norm"] = gnorm
        self._in_flight = (n_tokens, stats)
        self.interrupts.begin_update()
        if empty_step:  # nothing to train in any micro-batch: no update (weights and optimizer state unchanged)
            self._empty_steps.add(self.step + 1)
            if not self._told_empty and self.rank == 0:
                tqdm.write(f"step {self.step + 1}: every micro-batch has batch_weight 0 (nothing to train), so the "
                           "step makes no update; it counts as a step and logs loss null (said once per run)")
            self._told_empty = True
            if self.qk_clip is not None:
                stats.update({"qk/max_logit": torch.full((), float("nan"), device=self.device),
                              "qk/clipped_heads": torch.zeros((), device=self.device)})
        else:
            self.optimizer.step()  # a torch optimizer's step hooks also mark the update's start and end
            if self._moves_expert_bias:  # aux-loss-free MoE balancing, once per step
                update_expert_biases(self.model, world=self.runner is not None)
            if self.qk_clip is not None:
                stats.update(self._clip_qk())
        self.interrupts.end_update()
        self._finish_step()
        stats = {**stats, "lr": self.optimizer.param_groups[0]["lr"]}
        self._call("on_step_end", stats)
        return stats

    def _qk_clip(self):
        """MuonClip's QK-clip (optim.qk_clip_tau > 0): a MaxLogitRecorder of every attention layer's per-head
        max logit over the step's forward passes (lmforge.parallel.qk_logits); after each update the heads
        above tau get W_q, W_k shrunk. One process, DDP or FSDP (the max is all-reduced over the ranks)."""
        tau = getattr(self.optimizer, "qk_clip_tau", 0.0)
        if not tau:
            return None
        from lmforge.parallel.qk_logits import MaxLogitRecorder

        if self.runner is not None and (self.runner.cfg.tp > 1 or self.runner.cfg.pp > 1 or self.runner.cfg.cp > 1):
            raise ConfigError("optim.qk_clip_tau runs on one process, dp_replicate or dp_shard; set parallel.tp, pp "
                              "and cp to 1 (each would see only part of a head's logits)")
        recorder = MaxLogitRecorder(self.model)  # (refuses a model without lmforge MHA/GQA attention)
        recorder.layers()  # refuses fused q/k/v weights now, not after the first update
        return recorder

    def _clip_qk(self) -> dict[str, torch.Tensor]:
        """Clip after the update; the step's largest logit and the number of heads clipped, as metrics."""
        from lmforge.parallel.qk_logits import clip_qk_

        if self.runner is not None:
            self.qk_clip.all_reduce_()
        layers = self.qk_clip.layers()
        gammas = clip_qk_(layers, self.optimizer.qk_clip_tau)
        return {"qk/max_logit": torch.stack([m.max() for _, _, m, _ in layers]).max(),
                "qk/clipped_heads": sum((g < 1).sum() for g in gammas).float()}

    @contextlib.contextmanager
    def forward_context(self):
        """The precision and attention backend the Trainer runs the model's forwards in (autocast to bf16 where
        configured, the SDPA backend): a data source or objective recomputing log-probs without gradients (old
        log-probs of rollouts) uses it, so they equal the training forward's."""
        with self.autocast, sdpa_context(self.cfg.sdpa_backend):
            yield

    def _forward_backward(self, batch: Batch, scale: float, sync: bool, empty: bool = False
                          ) -> tuple[torch.Tensor, dict]:
        """One micro-batch's forward and backward, its gradients scaled by `scale`: in this process, or this
        rank's share through the ParallelRunner (a pipeline runs the LM loss through its schedule; sync=False
        lets FSDP skip the reduce-scatter until the step's last micro-batch). empty: a micro-batch with nothing
        to train (batch_weight 0, whose loss may well be NaN, a mean over nothing): its loss and metrics without
        a backward in one process; under a runner (whose ranks all join the backward's collectives) with the
        gradient reaching the model's outputs zeroed, so it adds exactly nothing (a pipeline's LM loss sums over
        the trained tokens at scale 0, which adds nothing as well: ParallelRunner._pipeline_loss)."""
        runner = self.runner
        if runner is None:
            if empty:
                with torch.no_grad():
                    return self.loss_fn(self.model, batch)
            loss, metrics = self._loss_to_train(self.model, batch)
            (loss * scale).backward()
            return loss, metrics
        if runner.pp_mesh is not None:
            return runner.forward_backward(batch["input_ids"], batch["targets"], scale, sync), {}
        return runner.objective_step(batch, self._empty_loss if empty else self._loss_to_train, scale, sync,
                                     weight=getattr(self.objective, "batch_weight", None))

    def _loss_to_train(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        loss, metrics = self.loss_fn(model, batch)
        if not loss.requires_grad:
            raise ConfigError(f"{type(self.objective).__name__}.loss returned a loss that does not depend on the "
                              "trained parameters (no grad_fn), so there is nothing to backpropagate; to skip a batch "
                              "with nothing to train, return 0 from the objective's batch_weight(batch) (the Trainer "
                              "then leaves it out of the step)")
        return loss, metrics

    def _empty_loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The objective's loss with the gradient that reaches the model's outputs replaced by zeros."""
        from torch.utils._pytree import tree_leaves

        def zero_grads(module, args, out):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(torch.zeros_like)

        handle = model.register_forward_hook(zero_grads)
        try:
            loss, metrics = self.loss_fn(model, batch)
        finally:
            handle.remove()
        if not loss.requires_grad:  # (one process runs no backward for it; here every rank must)
            raise ConfigError(f"{type(self.objective).__name__}.loss returned a constant for a batch with nothing to "
                              "train (batch_weight 0); under [parallel] every rank joins the step's forward and "
                              "backward collectives, so compute it from the model's forward as for any batch (a NaN "
                              "mean over nothing is fine: the Trainer zeroes its gradient)")
        return loss, metrics

    def _finish_step(self) -> None:
        n_tokens, stats = self._in_flight
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += n_tokens
        self._pending.append((self.step, stats))
        self.interrupts.phase = None

    def flush(self) -> dict[str, float]:
        """Read the pending per-step metrics (one host sync); raise TrainingDiverged on the first bad loss."""
        if not self._pending:
            return {}
        keys = list(self._pending[-1][1])
        for step, m in self._pending:
            if set(m) != set(keys):
                raise ConfigError(f"the objective's metrics changed between steps: step {step} logged {sorted(m)}, "
                                  f"step {self._pending[-1][0]} {sorted(keys)}; return the same metrics every step")
        steps = [s for s, _ in self._pending]
        values = torch.stack([torch.stack([m[k].float().to(self.device) for k in keys])
                              for _, m in self._pending]).tolist()
        self._pending.clear()
        # a finite loss can still come with a non-finite gradient, which the optimizer step has already applied
        for step, row in zip(steps, values):
            for name in ("grad_norm",) if step in self._empty_steps else ("loss", "grad_norm"):  # (no loss to take)
                if name in keys and not math.isfinite(row[keys.index(name)]):
                    where = self.last_checkpoint or "none was written"
                    raise TrainingDiverged(f"{name} became {row[keys.index(name)]} at step {step}; stopped. Last good "
                                           f"checkpoint: {where}. Lower optim.lr or raise optim.warmup_steps")
        self._empty_steps.difference_update(steps)
        return dict(zip(keys, values[-1]))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The evaluator's metrics (validation loss, perplexity, bits-per-byte for pretraining)."""
        if self.evaluator is None:
            return {}
        self.model.eval()
        try:
            with self.forward_context():
                out = self.evaluator(self.model)
        finally:
            self.model.train()
        return checked_metrics(out, "the evaluator")

    # loop ----------------------------------------------------------------------------------------
    def _log_eval(self, bar, record: bool = True) -> dict[str, float]:
        """Evaluate, show and hand to the hooks; record=False leaves metrics.jsonl alone (a finished run's
        evaluation, recorded when it got there)."""
        t0 = time.perf_counter()
        ev = self.evaluate()
        self._paused_s += time.perf_counter() - t0  # left out of the next row's tok/s and MFU (it halved them)
        if ev:
            if record:
                self.metrics.log({"step": self.step, "tokens": self.tokens, **ev})
                self.evaluated_step = self.step
            if self.rank == 0:  # with the bar off too: a batch job's log keeps its evaluations
                line = f"step {self.step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items())
                if self._live:
                    bar.write(line)
                else:
                    print(line, flush=True)
            self._call("on_eval", ev)
        return ev

    def _log_step(self, bar, t_start: float) -> None:
        """Build the step's whole row, write it, and only then mark it logged: an interrupt while the row is
        built (a second Ctrl-C in a data source's log_stats) leaves the flushed stats in `_logged_stats` and
        `_logged_step` behind, so `Interrupts.interrupted` writes the row before the checkpoint."""
        if self._logged_stats is None or self._logged_stats[0] != self.step:
            self._logged_stats = (self.step, {**self.flush(), "lr": self.optimizer.param_groups[0]["lr"]})
        stats = self._logged_stats[1]
        now = time.perf_counter()
        self.elapsed = now - t_start
        # begin_step hooks' time (RL rollouts) is not training: tok/s and MFU leave it out, begin_step_s shows it
        tps = (self.tokens - self._tok_last) / max(now - self._t_last - self._begin_s - self._paused_s, 1e-9)
        row = {"step": self.step, "tokens": self.tokens, **stats, "tok_per_s": tps, "elapsed": self.elapsed}
        if self._begin_s:
            row["begin_step_s"] = self._begin_s
        if self.flops_per_token and self.peak:
            row["mfu"] = tps * self.flops_per_token / (self.peak * self.world)
        data_stats = getattr(self.data, "log_stats", None)
        if callable(data_stats):
            row.update(data_stats())
        self.metrics.log(row)  # before the hooks: a KeyboardInterrupt raised in one must not lose the row
        self._t_last, self._tok_last, self._logged_step, self._begin_s = now, self.tokens, self.step, 0.0
        self._paused_s = 0.0
        self._logged_stats = None
        shown = dict(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}", tok_s=f"{tps:,.0f}",
                     **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}))
        if self._live:
            bar.set_postfix(**shown)
        elif self.rank == 0:  # no bar (a batch job, a log file): one plain line per log step
            print(f"step {self.step:>6}/{self.cfg.max_steps} | " + " | ".join(f"{k} {v}" for k, v in shown.items()),
                  flush=True)
        self._call("on_log", row)

    def _is_log_step(self) -> bool:
        return self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps

    def request_stop(self, reason: str = "requested by a hook") -> None:
        """End `fit` at the end of the current step as if max_steps were reached there: evaluate, write a
        checkpoint, return (TrainResult.stop_reason says why). For hooks: early stopping, a time budget, a
        target metric. Under several ranks, one rank asking is enough (agreed at the step boundary)."""
        self.interrupts.reason = reason

    def has_current_checkpoint(self) -> bool:
        """Whether the last checkpoint written is of the current step."""
        return self.last_checkpoint is not None and self.last_checkpoint.name.endswith(f"{self.step:06d}")

    def _eval_owed(self) -> bool:
        """At the start of fit: step 0's evaluation, or a resumed evaluation step's that the interrupted run did
        not log (a second Ctrl-C during the step's log or evaluation checkpoints the step without it). The
        checkpoint carries evaluated_step, so every rank decides alike."""
        s, cfg = self.step, self.cfg
        due = s == 0 or s % cfg.eval_every == 0 or s == cfg.max_steps
        return due and self.evaluated_step != s

    def _save_at_boundary(self, t_start: float) -> None:
        self.flush()  # never checkpoint weights that a NaN step has already touched
        t0 = self.elapsed = time.perf_counter() - t_start
        self.save()
        self._paused_s += time.perf_counter() - t_start - t0  # not training, as evaluations are not

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.interrupts.reset(self)  # (refused after an interrupt inside an update)
        if self.rank == 0:
            self._lock.acquire()  # again after an earlier fit released it
            if self.step == 0:  # a fresh run starts a fresh log
                self.metrics.path.unlink(missing_ok=True)
            write_json_atomic(self.run_dir / "config.json",
                              {"config": to_dict(cfg), "seed": cfg.seed, **run_metadata()})
        self.model.train()
        # a live bar where someone watches; plain lines in a log file or a pipe (no carriage-return clutter)
        self._live = cfg.progress and sys.stderr.isatty()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self._live or self.rank > 0, dynamic_ncols=True,
                   desc="train", unit="step")
        ev: dict[str, float] = {}
        ev_step = -1
        self._t_last, self._tok_last, self._logged_step = time.perf_counter(), self.tokens, self.step
        self._logged_stats = None
        self._begin_s = self._paused_s = 0.0
        t_start = time.perf_counter() - self.elapsed
        try:
            with self.interrupts.deferred_signals():
                if self._eval_owed():
                    ev, ev_step = self._log_eval(bar), self.step
                    if self.evaluated_step == self.step and self.has_current_checkpoint():
                        # the resumed checkpoint said the evaluation was owed: rewrite it (atomically), or every
                        # later resume from it would log the evaluation again
                        self._save_at_boundary(t_start)
                asked = False
                while self.step < cfg.max_steps:
                    asked = self.interrupts.at_boundary(self.runner)  # one all-reduce; raises on a signal
                    if asked:
                        break
                    try:
                        self.train_step()
                    except DataEnded as end:  # a finite source at its end: the run ends at the last whole step
                        self.interrupts.to_boundary(self)  # (the unfinished step rolled back)
                        left = (f"; the {end.drawn} micro-batch(es) drawn for step {self.step + 1} are left untrained"
                                if end.drawn else "")
                        self.interrupts.reason = f"the data ended (its next_batch raised StopIteration{left})"
                        asked = True
                        break
                    bar.update(1)
                    if self._is_log_step():
                        self._log_step(bar, t_start)
                    if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                        self.flush()
                        ev, ev_step = self._log_eval(bar), self.step
                    if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                        self._save_at_boundary(t_start)
                if asked and self.step < cfg.max_steps:  # a hook's stop: end as a last step would
                    if self._logged_step != self.step:
                        self._log_step(bar, t_start)
                    if ev_step != self.step:
                        self.flush()
                        ev = self._log_eval(bar)
                    if self.step > 0 and not self.has_current_checkpoint():
                        self._save_at_boundary(t_start)
                    if self.rank == 0:
                        tqdm.write(f"stopped at step {self.step}: {self.interrupts.reason}")
                if not ev:  # resumed at (or past) the last step: report the finished model's evaluation
                    ev = self._log_eval(bar, record=False)
        except KeyboardInterrupt:
            self.interrupts.interrupted(self, bar, t_start)
            bar.close()
            raise
        finally:
            bar.close()
            self.metrics.close()
            self.close()
        if cfg.plot and self.rank == 0:
            plot_losses(self.run_dir, ylabel=loss_label(self.objective))
        return TrainResult(self.run_dir, self.step, ev.get("val_loss"), ev.get("val_bpb"), self.elapsed,
                           self.last_checkpoint, read_metrics(self.run_dir) if self.rank == 0 else [], ev,
                           self.interrupts.reason if self.step < cfg.max_steps else None)


def train(cfg: TrainConfig) -> TrainResult:
    """Train as `lmforge train` does: build model, data and optimizer from `cfg` and run to max_steps."""
    return Trainer(cfg).fit()


__all__ = ["Trainer", "TrainResult", "train", "DataError"]


def _sync(device) -> None:
    """Wait for the device's queued work (CUDA), so host time measures what ran between two calls."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)

