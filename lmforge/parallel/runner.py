"""ParallelRunner: one rank's share of a training layout, with the calls a training loop needs -
forward+backward of this rank's part of a batch, the global loss, gradient clipping over all shards, and
validation nats over this rank's rows. lmforge.train.Trainer drives it (`Trainer(..., runner=runner)`);
by hand:

    runner = ParallelRunner(model, ParallelConfig(dp_shard=4, tp=2), device=device)
    opt = build_optimizer(runner.model, cfg.optim)            # after parallelisation: over DTensor shards
    for micro in range(accum):
        x, y = rank_batches.next()                            # this data-parallel rank's rows
        loss = runner.forward_backward(x, y, scale=1 / accum)
    norm = runner.clip_grad_norm_(1.0); opt.step(); opt.zero_grad()
    log(runner.global_loss(loss))

objective_step runs any objective's loss(model, batch) instead of the LM loss (not on pipelines).
Pipeline layouts hold one stage per pp rank: forward_backward runs the whole schedule (GPipe or 1F1B over
cfg.n_microbatches micro-batches of x); only the last stage sees a loss. Context parallel ranks take
their load-balanced tokens of each sequence; loss_parallel computes the cross-entropy on vocabulary
shards.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError
from lmforge.parallel.config import ParallelConfig, build_mesh, submesh
from lmforge.parallel.cp import apply_cp, shard_batch
from lmforge.parallel.ddp import average_gradients
from lmforge.parallel.parallelize import dp_rank_and_size, parallelize, stage_replicas
from lmforge.parallel.pp import build_schedule, schedule_scales_grads, split_stage
from lmforge.train.loss import lm_loss, summed_nats, token_losses


LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def default_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return lm_loss(logits, targets)[0]


def plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value as an ordinary tensor (a replicated loss of a tensor-parallel model)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class ParallelRunner:
    def __init__(self, model: nn.Module, cfg: ParallelConfig, *, device: torch.device | str = "cpu",
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = default_loss,
                 seq_len: int | None = None, batch_size: int | None = None):
        """`model` is the whole model on every rank (or on the meta device for large ones); batch_size is
        the global batch, checked against the layout."""
        self.cfg, self.device, self.loss_fn = cfg, torch.device(device), loss_fn
        cfg.validate(dist.get_world_size(), getattr(model, "cfg", None), seq_len=seq_len, batch_size=batch_size)
        self.mesh = build_mesh(cfg, self.device.type)
        self.dp_rank, self.dp_size = dp_rank_and_size(self.mesh)
        self.pp_mesh, self.cp_mesh = submesh(self.mesh, "pp"), submesh(self.mesh, "cp")
        self._scale = 1.0
        self.eval_rank, self.eval_size = self.dp_rank, self.dp_size  # rows of a validation batch (eval_nats)
        if self.cp_mesh is not None:
            self.eval_rank = self.eval_rank * cfg.cp + self.cp_mesh.get_local_rank()
            self.eval_size *= cfg.cp
        coords = dict(zip(self.mesh.mesh_dim_names, self.mesh.get_coordinate()))
        # the rank that reports a replica's validation sums: tp rank 0 of the last pipeline stage
        self.reports = coords.get("tp", 0) == 0 and coords.get("pp", cfg.pp - 1) == cfg.pp - 1
        # the rank that gathers its pipeline stage's full state for checkpoints: coordinate 0 on every dim but pp
        self.stage_leader = all(c == 0 for n, c in coords.items() if n != "pp")
        # tiny host-side all-reduces (validation sums, the Trainer's stop flag) never wait for the GPU
        self.cpu_group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        if self.pp_mesh is None:
            self.model = parallelize(model, cfg, self.mesh)
            if self.cp_mesh is not None:
                apply_cp(self.model, self.cp_mesh)
            return
        self.stage = self.pp_mesh.get_local_rank()
        self.first, self.last = self.stage == 0, self.stage == cfg.pp - 1
        self.model = split_stage(model, self.stage, cfg.pp)
        rest = [n for n in self.mesh.mesh_dim_names if n != "pp"]
        parallelize(self.model, cfg, submesh(self.mesh, *rest) if rest else None)
        self.replicas = stage_replicas(cfg, submesh(self.mesh, *rest) if rest else None)  # averaged after a step
        # training and validation each get a schedule (and stage) of their own over the same stage module:
        # older torch (2.11 on the H200) keeps the receive buffers made by a stage's first call, so an eval before
        # the first step (the Trainer's step-0 eval) left training without gradients to send back
        self._schedule = lambda loss_fn: build_schedule(self.model, self.stage, cfg.pp, self.pp_mesh.get_group(),
                                                        cfg.n_microbatches, cfg.pp_schedule, loss_fn, self.device)
        self.schedule = self._schedule(self._pipeline_loss)
        # a stage keeps the buffers shaped by its first call, so validation gets a schedule per batch shape
        self.eval_schedules: dict[tuple[int, ...], object] = {}
        self._eval_counted: torch.Tensor | None = None  # the target ids eval_nats' second sum counts

    def _grad_sync(self, sync: bool) -> None:
        """FSDP2 reduce-scatters after every backward unless told not to: with gradient accumulation only
        the last micro-batch needs it (the others accumulate unsharded gradients locally)."""
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.model, FSDPModule):
            self.model.set_requires_gradient_sync(sync)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0, sync: bool = True
                         ) -> torch.Tensor:
        """Forward and backward of this rank's rows (x, y: (B_local, T)); gradients accumulate scaled by
        `scale` (1/grad_accum); sync=False on all but the last micro-batch skips FSDP's reduce-scatter.
        Returns the detached local loss, whose mean over the ranks (global_loss) is the token mean over the rows'
        trained targets: a rank's own mean, times cp x its share of the trained tokens under context parallelism
        (_cp_weighted); zero on pipeline stages but the last, whose loss is the token mean over the rows' trained
        targets however the schedule cuts them."""
        self._grad_sync(sync)
        if self.pp_mesh is not None:
            # each pipeline micro-batch's loss sum (_pipeline_loss) carries the share scale / (the rows' trained
            # tokens), times n_microbatches where older torch's schedule divides the accumulated .grad by it
            # (build_schedule keeps a newer one from doing so)
            share = scale * self.cfg.n_microbatches / (self.cfg.n_microbatches if schedule_scales_grads() else 1)
            tokens = (y != -100).sum()  # (a device tensor: no host sync)
            self._scale = share / tokens.clamp(min=1)
            losses = self._through_pipeline(self.schedule.step, x, y)  # each: its loss sum x self._scale
            if sync and self.replicas is not None:  # whole replicas of this stage: their mean gradient
                average_gradients(self.model.parameters(), self.replicas)
            if not self.last:
                return torch.zeros((), device=self.device)
            # the token mean; NaN for rows with nothing to train (a mean over nothing, as in one process) and where
            # scale is 0 (a micro-batch the Trainer leaves out, whose sums the zero share hides)
            return torch.stack(losses).sum().detach() * tokens.clamp(min=1) / share / tokens
        self.cfg.check_seq_len(x.shape[1])  # (else tp's sequence shards failed in a layer, naming tensor sizes)
        if self.cp_mesh is not None:  # this rank's tokens of every sequence; attention gathers K/V
            b = shard_batch({"input_ids": x, "targets": y}, self.cp_mesh)
            x, y = b["input_ids"], b["targets"]
        with self._loss_context():
            loss = self.loss_fn(self.model(x), y)
            if self.cp_mesh is not None:
                loss = self._cp_weighted(loss, (y != -100).sum())
            (loss * scale).backward()
        return plain(loss.detach())

    def objective_step(self, batch: dict[str, torch.Tensor], loss_fn: LossFn, scale: float = 1.0,
                       sync: bool = True, weight: Callable[[dict[str, torch.Tensor]], float] | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of an objective's loss on this rank's batch (dict of (B, T) tensors):
        loss_fn(model, batch) -> (loss, metrics), e.g. an lmforge.train Objective's `loss`. Returns the
        detached local loss and metrics as plain tensors. Not for pipeline layouts (a stage has no logits).
        Under context parallelism the loss and the metrics other than counts (num_*) are taken as means over
        this rank's items and weighed by cp x its share of them (_cp_weighted), so their mean over the ranks is
        the whole rows' mean: the items are `weight(shard)` (the objective's batch_weight), else the trained
        targets (other than -100) where the batch has targets, else every rank weighs 1."""
        self._grad_sync(sync)
        if self.pp_mesh is not None:
            raise ConfigError("pipeline parallel runs the LM loss of forward_backward; objectives with their "
                              "own model calls need parallel.pp=1")
        for seq_len in {v.shape[1] for k, v in batch.items() if k.endswith("input_ids") and v.dim() == 2}:
            self.cfg.check_seq_len(seq_len)  # (a preference batch's chosen_ / rejected_input_ids too)
        n = None
        if self.cp_mesh is not None:
            batch = shard_batch(batch, self.cp_mesh)
            if weight is not None:  # (read on the host, as the Trainer reads it)
                n = torch.tensor(int(weight(batch)), device=self.device)
            elif "targets" in batch:
                n = (batch["targets"] != -100).sum()
        with self._loss_context():
            loss, metrics = loss_fn(self.model, batch)
            if n is not None:
                share = self._cp_share(n)
                loss = self._cp_weighted(loss, n, share)
                metrics = {k: v if k.startswith("num_") else self._cp_weighted(v, n, share)
                           for k, v in metrics.items()}
            (loss * scale).backward()
        return plain(loss.detach()), {k: plain(v.detach()) for k, v in metrics.items()}

    def _cp_share(self, n: torch.Tensor) -> torch.Tensor:
        """cp x this rank's share of the items (trained tokens) that the context-parallel ranks hold together:
        exactly 1 when the load-balanced chunks give every rank as many (no ignored targets)."""
        total = n.clone()
        dist.all_reduce(total, group=self.cp_mesh.get_group())
        return n * self.cfg.cp / total.clamp(min=1)

    def _cp_weighted(self, mean: torch.Tensor, n: torch.Tensor, share: torch.Tensor | None = None) -> torch.Tensor:
        """A context-parallel rank's mean over its n items, weighed so the ranks' mean (gradients and losses are
        averaged over them) is the whole rows' mean, not the mean of the ranks' means: mean x cp x its share of
        the items (_cp_share). A rank without items adds exactly 0, not its mean over nothing (NaN)."""
        share = self._cp_share(n) if share is None else share
        return torch.where(n > 0, plain(mean) * share, 0.0)

    def _pipeline_loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss the schedule backpropagates for one pipeline micro-batch: loss_fn's mean times its trained
        tokens (targets other than -100), times self._scale (the share over the tokens of all this rank's rows),
        so the micro-batches add up to one process's token mean however the tokens fall among them (a mean of
        their means weighs them equally). One without any adds exactly 0, not its mean over nothing: when one of
        the pieces the schedule cut the rows into had no trained token, that NaN lost the step's logged loss and
        the others' gradient was still divided by the number of pieces. A Trainer's micro-batch of ignored rows
        (batch_weight 0, scale 0) adds 0 the same way."""
        n = (y != -100).sum()
        return torch.where(n > 0, plain(self.loss_fn(out, y)) * n, 0.0) * self._scale

    def _through_pipeline(self, run: Callable, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """One call of the schedule's step or eval: the first stage feeds x, the last scores y and returns
        the micro-batches' losses. The stages check strides as well as shapes (torch 2.11), so rows sliced
        from longer ones (x = rows[:, :-1]) are copied to their own storage first."""
        losses: list[torch.Tensor] = []
        run(*([x.contiguous()] if self.first else []),
            **({"target": y.contiguous(), "losses": losses} if self.last else {}))
        return losses

    @torch.no_grad()
    def eval_nats(self, x: torch.Tensor, y: torch.Tensor, counted: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward only, for validation: (next-token nats summed over all targets and over the `counted` ones
        (lmforge.train.loss.summed_nats: (2,)), targets) of this rank's share of the rows of the global (x, y).
        Rows are split over the data-parallel and context-parallel ranks (in eval mode context-parallel ranks
        see whole sequences, so they take rows as data-parallel ranks do); the ranks of one tensor-parallel
        group or pipeline share rows, and only one of them (tp rank 0 of the last stage) reports, the others
        return (0, no targets): summed over all ranks, every row counts once. Call in eval mode on every rank."""
        most = -(-x.shape[0] // self.eval_size)  # the rows of this split's largest share
        x, y = (t.tensor_split(self.eval_size)[self.eval_rank] for t in (x, y))
        if self.pp_mesh is not None:
            nats = self._pipeline_nats(x, y, most, counted)
        else:
            with self._loss_context():
                nats = summed_nats(plain(token_losses(self.model(x), y)), y, counted)
        if not self.reports:
            return torch.zeros_like(nats), y[:0]
        return nats, y

    def _pipeline_nats(self, x: torch.Tensor, y: torch.Tensor, most: int, counted: torch.Tensor | None
                       ) -> torch.Tensor:
        """Summed nats (2,) of (x, y) through the pipeline, all and `counted` (on the last stage; zero on the others).
        The schedule cuts a batch into n_microbatches equal parts, and its stages keep the buffers of their
        first call: every rank pads its rows to one shape, `most` rows rounded up to a multiple of
        n_microbatches (at least one row each), with ignored targets (-100: zero loss), and each shape gets a
        schedule of its own (the short last validation batch). One shape on all data-parallel replicas, even
        one given no rows, keeps their calls in step (FSDP-sharded stages all-gather together). Each
        micro-batch reports its summed nats, so micro-batches of unequal token counts add up to the one-process
        sum."""
        m = self.cfg.n_microbatches
        pad = max(m, -(-most // m) * m) - x.shape[0]
        if pad:  # (rows + pad, T): padded inputs are any valid id, their targets ignored
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
            y = torch.cat([y, y.new_full((pad, *y.shape[1:]), -100)])
        key = tuple(x.shape)
        if key not in self.eval_schedules:  # (its loss reads the call's `counted`: forward only, (2,) is fine)
            self.eval_schedules[key] = self._schedule(
                lambda out, t: summed_nats(plain(token_losses(out, t)), t, self._eval_counted))
        self._eval_counted = counted
        with self._loss_context():
            losses = self._through_pipeline(self.eval_schedules[key].eval, x, y)
        return (torch.stack(losses).sum(0) if self.last
                else torch.zeros(2, dtype=torch.float64, device=self.device))

    def _loss_context(self):
        if not self.cfg.loss_parallel:
            return contextlib.nullcontext()
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()

    def global_loss(self, local: torch.Tensor) -> torch.Tensor:
        """Mean over the data-parallel (and context-parallel) ranks of their local losses, on every rank.
        Element-wise: a stack of several per-rank means (loss and metrics) is reduced in one call."""
        loss = local.detach().float().clone()
        if self.pp_mesh is not None:
            loss = loss * self.cfg.pp  # only the last stage's world / pp ranks hold a loss
        dist.all_reduce(loss)
        return loss / dist.get_world_size()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Global L2 norm of all gradients across every shard, stage and replica; clip to max_norm if > 0.
        DTensor gradients are grouped by mesh and placement (a TP model without sequence parallelism mixes
        DTensor weights with plain norm gains); each group's norm is reduced over its own mesh."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        groups: dict = {}
        for g in grads:
            key = (g.device_mesh, tuple(g.placements)) if hasattr(g, "device_mesh") else None
            groups.setdefault(key, []).append(g)
        sq = torch.zeros((), device=self.device)
        for key, gs in groups.items():
            n = torch.nn.utils.get_total_norm(gs)
            sq = sq + (n.full_tensor() if key is not None else n).float().square()
        if self.pp_mesh is not None:  # stages hold disjoint parameters: add their squared norms
            dist.all_reduce(sq, group=self.pp_mesh.get_group())
        norm = sq.sqrt()
        if max_norm > 0:  # scale the local shards in place: no communication, no host sync
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([g.to_local() if hasattr(g, "to_local") else g for g in grads], coef)
        return norm
