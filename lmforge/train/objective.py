"""The two seams of the training loop: a DataSource yields batches, an Objective turns a batch into a loss.

    Trainer(model, optimizer, data: DataSource, objective: Objective, hooks=...)

Pretraining is one objective (next-token cross-entropy) over one data source (windows of token shards);
SFT, reward models, DPO and its family, distillation and RL are other objectives over other sources, on
the same loop, checkpoints and metrics.

A batch is a plain dict of tensors, so objectives can ask for what they need (the Trainer moves its tensors to
the device; other values, such as an RL source's prompt texts or a list of rewards, reach the objective as they
are; a runner that cuts global batches into ranks' rows, RankRows, needs tensors). Keys with fixed meaning:
  input_ids   (B, T) long   tokens fed to the model
  targets     (B, T) long   next-token targets; -100 = no loss at that position
  loss_mask   (B, T) bool   positions that count in the loss (e.g. assistant tokens only)
  positions   (B, T) long   token positions (restart at 0 per document in packed rows)
  doc_ids     (B, T) long   document index per token in packed rows (-> lmforge.model.meta.AttnMetadata)
Objective-specific keys use prefixes, e.g. chosen_input_ids / rejected_input_ids (preference pairs),
label (KTO), teacher_logits, ref_chosen_logps (precomputed reference log-probs).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch

from lmforge.errors import ConfigError

Batch = dict[str, torch.Tensor]


@runtime_checkable
class DataSource(Protocol):
    """Yields training batches; its state round-trips through checkpoints so a resumed run sees the
    exact batches the uninterrupted run would have seen. `state_dict` returns a snapshot (copies, not
    live references): the Trainer takes one at every step start to roll an interrupted step back.
    Optional: `log_stats() -> dict[str, float]`, merged into every metrics row (e.g. tokens per source
    of a data mixture, lmforge.train.mixture); `begin_step(trainer)`, called at the start of every optimizer
    step before its batches are drawn (and after the step's rollback snapshot of `state_dict`): an RL source
    samples the step's rollouts there from the engine on `trainer.model`, with the step number, grad_accum
    and `trainer.forward_context()` (the training forward's precision, for old log-probs) at hand;
    `per_rank = True`, a source that yields only its data-parallel rank's rows itself
    (lmforge.train.distributed.distribute then does not cut a global batch for it); `per_rank_state = True`,
    a source whose state differs per rank (its rank's share of a rollout that several PPO epochs train on):
    checkpoints then hold every rank's state and each rank resumes its own (on as many processes); without
    it rank 0's state is saved and every rank resumes from it.
    A finite source ends the run by raising StopIteration from `next_batch`: the run ends at the last whole
    step as at max_steps (a step it cannot fill is rolled back, its drawn micro-batches left untrained; then
    the final evaluation, a checkpoint, a line saying the data ended, and TrainResult.stop_reason saying so);
    resuming that checkpoint ends there again."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Objective(Protocol):
    """Turns (model, batch) into (scalar loss to backpropagate, metrics).

    Metrics are 0-d tensors left on the device (the loop reads them in one host sync at log time; a plain
    number is taken too), the same names every step; names follow TRL where TRL logs the same quantity
    (rewards/chosen, rewards/margins, ...). A metric is a mean over the batch, weighted like the loss
    across micro-batches, except counts named `num_*`, which add up over the step; a metric a micro-batch
    cannot define (NaN: a mean over a label it lacks) is averaged over those that do (`metric_terms`).
    Optional: `subset_means: SubsetMeans`, metrics that are means over a subset of the items (KTO's over its
    desirable rows), combined over the step from sums and counts, and differences of them (a margin).
    Frozen extra models (reference policy, teacher, reward model) belong to the objective: eval mode,
    requires_grad False, possibly on another device. `state_dict` holds what a resumed run needs, e.g. a
    reference model's identity (path and checksum), never its weights a second time; like a data source's it
    returns a snapshot (copies, not live references): the Trainer takes one at every step start (before the
    begin_step hooks) and loads it back to roll an interrupted step back.
    Optional: `batch_weight(batch) -> int`, the number of items the loss averages over (trained tokens,
    pairs...), read on the host; with grad_accum the Trainer weighs micro-batches by it so accumulation
    equals one big batch. Without it every micro-batch weighs 1/grad_accum. A batch_weight of 0 (nothing to
    train: all rows masked out, an RL group with no advantage) skips the micro-batch: its loss (NaN is fine) gets
    no backward and its means are left out (its num_* counts still add up); a step whose micro-batches all weigh
    0 makes no update (weights and optimizer state unchanged), counts as a step and logs loss null. Under
    [parallel] such a loss must still come from the model's forward (every rank joins the collectives; the
    Trainer zeroes its gradient). A loss without gradient (a constant) is refused: skip with batch_weight 0.
    `begin_step(trainer)`, as for data sources (called after the data source's), e.g. an adaptive KL
    coefficient's update."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Stateless:
    """Base of objectives with nothing to save (no reference model, no running statistics): the Objective
    protocol's state_dict / load_state_dict, empty."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def checked_loss(loss_fn: Callable, name: str) -> Callable:
    """An objective's loss with its output checked: (a scalar tensor, {name: 0-d tensor or number}); a
    mistake is a one-line error naming the objective and what it returned, not a failure deep in the loop."""

    def loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = loss_fn(model, batch)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ConfigError(f"{name}.loss must return (loss, metrics), got {type(out).__name__}")
        value, metrics = out
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise ConfigError(f"{name}.loss's loss must be a scalar tensor, got "
                              f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")
        return value.reshape(()), _metric_tensors(metrics, f"{name}.loss", value.device)

    return loss


def _metric_tensors(metrics, who: str, device) -> dict[str, torch.Tensor]:
    if not isinstance(metrics, dict):
        raise ConfigError(f"{who} must return its metrics as a dict {{name: value}}, got {type(metrics).__name__}")
    out = {}
    for k, v in metrics.items():
        if isinstance(v, numbers.Real) and not isinstance(v, bool):
            v = torch.tensor(float(v), device=device)
        if not isinstance(v, torch.Tensor) or v.numel() != 1:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ConfigError(f"{who}: metric {k!r} must be one number (a 0-d tensor), got {shape}")
        out[str(k)] = v.reshape(())
    return out


@dataclass(frozen=True, kw_only=True)
class SubsetMeans:
    """An objective's metrics that are means over a subset of its items, e.g. KTO's rewards/chosen over the
    desirable rows: each share (micro-batch, rank) weighs its value by its own count of that subset, a `num_*`
    metric of the same objective, so the step's value is the subset's sum over all its shares divided by its
    count - the mean over the subset's rows wherever they fell - and NaN (logged null) only when no share of the
    step has one. Weighing by the share instead (the rule for plain means) is wrong when the subset is spread
    unevenly over the micro-batches. `differences` are recomputed from the combined metrics, a - b, instead of
    averaging each share's own (KTO's rewards/margins: a share lacking a label has none, and a mean of
    per-share differences is not the difference of the means); NaN when a or b is."""

    counts: dict[str, str]
    """{mean metric: the num_* metric counting the items it averages over}"""
    differences: dict[str, tuple[str, str]] = field(default_factory=dict)
    """{metric: (a, b)}: a - b of the combined metrics"""

    def __post_init__(self):
        for mean, count in self.counts.items():
            if not count.startswith("num_") or mean.startswith("num_"):
                raise ConfigError(f"SubsetMeans.counts[{mean!r}] = {count!r}: map a mean to the num_* count of the "
                                  "items it averages over")

    def check(self, keys: list[str]) -> None:
        """Refuses metrics that lack a name this declares (an objective's subset_means out of date)."""
        named = {*self.counts, *self.counts.values(), *self.differences, *(x for d in self.differences.values()
                                                                           for x in d)}
        if missing := sorted(named - set(keys)):
            raise ConfigError(f"the objective's subset_means names metrics {missing} that its loss does not return "
                              f"(it returns {sorted(keys)})")


def metric_terms(metrics: dict[str, torch.Tensor | float], weight: float, dtype: torch.dtype = torch.float32,
                 counted: bool | None = None, subsets: SubsetMeans | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One share's part in metrics combined over shares (micro-batches of a step, ranks, validation batches): the
    rule of the Trainer's step metrics (and of lmforge.align.sft.ObjectiveEvaluator's). Returns (totals,
    weights), stacked in the metrics' order, to be summed over the shares and read by `combined_metrics`. A mean
    adds value x weight (weight: the share's part of the items its loss averages over, its `batch_weight`), and
    a share without items (weight 0) adds nothing to it; a count (`num_*`) adds its value where the share is
    `counted` (default: weight > 0; a micro-batch with nothing to train still counts its zero, a rank's
    Repeated rows, counted by the rank that trains on them, do not). A metric the share cannot define (NaN/inf:
    KTO's mean over a label the share lacks) adds nothing, so it is averaged over those that do. Metrics may
    be 0-d tensors or numbers. `subsets`: means weighed by their subset's count in the share (where the share
    has weight) rather than by the share, and differences left to `combined_metrics`. Stays on the device, with
    no host-to-device copy for tensor metrics (no sync); `dtype`: the terms' (float64 for evaluation)."""
    counted = weight > 0 if counted is None else counted
    device = next((v.device for v in metrics.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
    values = torch.stack([(v.detach() if isinstance(v, torch.Tensor) else torch.tensor(float(v))).to(dtype)
                          .reshape(()).to(device) for v in metrics.values()])
    w = torch.full_like(values, float(weight) if weight > 0 else 0.0)
    for i, k in enumerate(metrics):
        if k.startswith("num_"):
            w[i] = 1.0 if counted else 0.0
    if subsets is not None:
        keys = list(metrics)
        subsets.check(keys)
        for k, n in subsets.counts.items():
            w[keys.index(k)] = values[keys.index(n)] if weight > 0 else 0.0
        for k in subsets.differences:
            w[keys.index(k)] = 0.0
    use = torch.isfinite(values) & (w > 0)
    return torch.where(use, values * w, 0.0), torch.where(use, w, 0.0)


def combined_metrics(keys: list[str], totals: torch.Tensor, weights: torch.Tensor,
                     subsets: SubsetMeans | None = None) -> dict[str, torch.Tensor]:
    """The metrics from `metric_terms` summed over shares: a mean is its weighted mean, a count (`num_*`) its
    sum; NaN (logged as null) where no share defined it; `subsets`' differences from the combined values."""
    defined = weights > 0
    means = totals / torch.where(defined, weights, 1.0)
    nan = torch.full_like(totals, float("nan"))
    value = torch.where(defined, means, nan), torch.where(defined, totals, nan)
    out = {k: value[k.startswith("num_")][i] for i, k in enumerate(keys)}
    for k, (a, b) in (subsets.differences if subsets is not None else {}).items():
        out[k] = out[a] - out[b]
    return out


def checked_metrics(metrics, who: str) -> dict[str, float]:
    """An evaluator's {name: number} (0-d tensors become floats) or a one-line error."""
    return {k: float(v) for k, v in _metric_tensors(metrics, who, "cpu").items()}
