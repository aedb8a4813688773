"""The two seams of the training loop: a DataSource yields batches, an Objective turns a batch into a loss.

    Trainer(model, optimizer, data: DataSource, objective: Objective, hooks=...)

Pretraining is one objective (next-token cross-entropy) over one data source (windows of token shards);
SFT, reward models, DPO and its family, distillation and RL are other objectives over other sources, on
the same loop, checkpoints and metrics.

A batch is a plain dict of tensors, so objectives can ask for what they need. Keys with fixed meaning:
  input_ids   (B, T) long   tokens fed to the model
  targets     (B, T) long   next-token targets; -100 = no loss at that position
  loss_mask   (B, T) bool   positions that count in the loss (e.g. assistant tokens only)
  positions   (B, T) long   token positions (restart at 0 per document in packed rows)
  doc_ids     (B, T) long   document index per token in packed rows (-> lmforge.model.meta.AttnMetadata)
Objective-specific keys use prefixes, e.g. chosen_input_ids / rejected_input_ids (preference pairs),
label (KTO), teacher_logits, ref_chosen_logps (precomputed reference log-probs).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

Batch = dict[str, torch.Tensor]


@runtime_checkable
class DataSource(Protocol):
    """Yields training batches; its state round-trips through checkpoints so a resumed run sees the
    exact batches the uninterrupted run would have seen. `state_dict` returns a snapshot (copies, not
    live references): the Trainer takes one at every step start to roll an interrupted step back.
    Optional: `log_stats() -> dict[str, float]`, merged into every metrics row (e.g. tokens per source
    of a data mixture, lmforge.train.mixture)."""

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Objective(Protocol):
    """Turns (model, batch) into (scalar loss to backpropagate, metrics).

    Metrics are 0-d tensors left on the device (the loop reads them in one host sync at log time);
    names follow TRL where TRL logs the same quantity (rewards/chosen, rewards/margins, ...).
    Frozen extra models (reference policy, teacher, reward model) belong to the objective: eval mode,
    requires_grad False, possibly on another device. `state_dict` holds what a resumed run needs, e.g. a
    reference model's identity (path and checksum), never its weights a second time.
    Optional: `batch_weight(batch) -> int`, the number of items the loss averages over (trained tokens,
    pairs...), read on the host; with grad_accum the Trainer weighs micro-batches by it so accumulation
    equals one big batch. Without it every micro-batch weighs 1/grad_accum."""

    def loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
