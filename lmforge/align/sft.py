"""Supervised fine-tuning: the SFT objective, with NEFTune noise as an option.

    token_mean      sum of -log p(target) over trained tokens / their number (TRL's and HF's default:
                    long answers weigh more); with grad_accum, over all micro-batches' tokens together
                    (`batch_weight`), as HF/TRL normalise
    sequence_mean   mean over examples of each example's mean token loss (every answer weighs the same);
                    in packed rows an example is a document of `doc_ids`

NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning", Alg. 1): in
training, the token embeddings get uniform noise ε ~ U(-1, 1) scaled by α / sqrt(L·d), L the sequence
length and d the embedding width; as in HF/TRL, L is the batch's padded (or packed) row length.

`model_logits(model, batch, prefix)` (lmforge.align.logprobs) runs the forward every post-training objective
shares: packed rows pass their positions and document ids (lmforge.model.meta.AttnMetadata) so documents never
attend to each other. The trained positions are `response_mask`'s: loss_mask where the batch has one (bool or
0/1 integers), and never a -100 target; without loss_mask every target other than -100 trains (pretraining's
layout). An MoE or MTP model's auxiliary losses are added to the loss (lmforge.align.logprobs.ModelAux).
"""

from __future__ import annotations

import contextlib
import math

import torch

from lmforge.align.config import SFTConfig
from lmforge.align.logprobs import ModelAux, masked_mean, model_logits, response_mask, token_logprobs
from lmforge.errors import ConfigError
from lmforge.train.distributed import eval_rows, sum_over_ranks
from lmforge.train.objective import Stateless, metric_terms


def input_embedding(model: torch.nn.Module) -> torch.nn.Module:
    emb = getattr(model, "tok_emb", None)
    if emb is None and hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
    if not isinstance(emb, torch.nn.Module):
        raise ConfigError(f"NEFTune needs the model's token embedding (model.tok_emb or get_input_embeddings()); "
                          f"{type(model).__name__} has neither: set sft.neftune_alpha=0")
    return emb


@contextlib.contextmanager
def neftune(model: torch.nn.Module, alpha: float):
    """Within the context, the model's token embeddings get NEFTune noise while model.training."""
    def hook(module, inputs, out):
        if not module.training:
            return out
        mag = alpha / math.sqrt(out.shape[-2] * out.shape[-1])  # α / sqrt(L·d)
        return out + torch.zeros_like(out).uniform_(-mag, mag)

    handle = input_embedding(model).register_forward_hook(hook) if alpha > 0 else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def document_keys(mask: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, T) id of each token's document, unique across the batch: its row, or (row, doc_id) when packed."""
    B, T = mask.shape
    rows = torch.arange(B, device=mask.device)[:, None]
    return rows * (T + 1) + (doc_ids if doc_ids is not None else torch.zeros_like(mask, dtype=torch.long))


def sequence_mean(values: torch.Tensor, mask: torch.Tensor, doc_ids: torch.Tensor | None) -> torch.Tensor:
    """Mean over documents of each document's masked mean of `values` (B, T). A document is a row, or a
    (row, doc_id) pair in packed rows; documents without masked tokens do not count."""
    mask = mask.bool()  # (a 0/1 integer mask would index rows, not select positions)
    uniq, inv = torch.unique(document_keys(mask, doc_ids)[mask], return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=values.dtype, device=values.device).index_add(0, inv, values[mask])
    counts = torch.bincount(inv, minlength=len(uniq)).to(values.dtype)
    return (sums / counts).mean()


class SFTObjective(Stateless):
    """Negative log-likelihood of the trained targets (response_mask: loss_mask if given, never -100), plus an
    MoE/MTP model's aux losses. Metrics (TRL's names): loss (the NLL alone), mean_token_accuracy, num_tokens
    (trained tokens in the batch); with aux losses also aux_loss and moe/* as pretraining. Stateless."""

    Config = SFTConfig

    def __init__(self, cfg: SFTConfig | None = None):
        self.cfg = cfg or SFTConfig()

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        aux = ModelAux(model)
        with neftune(model, self.cfg.neftune_alpha):
            logits = model_logits(model, batch, aux=aux)
        targets = batch["targets"]
        mask = response_mask(batch)
        nll = -token_logprobs(logits, targets)
        if self.cfg.loss == "token_mean":
            loss = masked_mean(nll, mask)
        else:
            loss = sequence_mean(nll, mask, batch.get("doc_ids"))
        with torch.no_grad():
            acc = masked_mean((logits.argmax(-1) == targets).float(), mask)
        return aux.add(loss, {"loss": loss.detach(), "mean_token_accuracy": acc, "num_tokens": mask.sum().float()})

    def batch_weight(self, batch: dict[str, torch.Tensor]) -> int:
        """Items this loss averages over (trained tokens, or examples with sequence_mean): the Trainer
        weighs accumulated micro-batches by it, so grad_accum x B rows = one batch of grad_accum*B rows."""
        mask = response_mask(batch)
        if self.cfg.loss == "token_mean":
            return int(mask.sum())
        return int(torch.unique(document_keys(mask, batch.get("doc_ids"))[mask]).numel())


class ObjectiveEvaluator:
    """Mean over fixed batches of an objective's metrics, for the Trainer's evaluator slot (keys get a
    `val_` prefix: val_loss, val_mean_token_accuracy, val_rewards/accuracies, ...).

    A batch's metrics are combined from shares of its rows: each share's metric weighted by the items the
    objective averages over (its `batch_weight`, e.g. SFT's trained tokens; else the share's rows), and
    `num_*` counts summed. With a ParallelRunner (N processes) each rank evaluates only its share of every
    batch (lmforge.train.distributed.eval_rows, the rows pretraining's LMEvaluator splits) and the
    weighted sums are added up in one all-reduce (sum_over_ranks): the single-process numbers, computed
    once. That holds for metrics that are means over those items (SFT token_mean, the DPO family's and a
    reward model's pair means, KTO's reference point: a mean over all ranks); batch-level statistics
    (KTO's per-label means, a reward model's min/max, ORPO's token-mean nll, distillation's token means,
    sequence_mean's token accuracy) come out as the shares' weighted mean instead: leave out the runner to
    evaluate whole batches on every rank. A metric a share or batch cannot define (NaN: KTO's mean over a
    label it lacks) is averaged over those that do; NaN only if none does. A subset mean (the objective's
    `subset_means`) whose subset has no row in any batch is left out, with the differences that use it (KTO's
    val_rewards/rejected, val_logps/rejected and val_rewards/margins when no batch has an undesirable row, as
    TRL's KTOTrainer logs only the labels present); its count (val_num_rejected) is reported, 0."""

    def __init__(self, objective, batches: list[dict[str, torch.Tensor]], runner=None):
        self.objective, self.batches, self.runner = objective, batches, runner

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        if not self.batches:
            return {}
        device = next(model.parameters()).device
        keys: list[str] = []
        subsets = getattr(self.objective, "subset_means", None)  # (KTO's per-label means: by their own counts)
        rows = []  # per batch: this rank's weighted sum of each metric, then the weight behind each
        for b in self.batches:
            # a batch with fewer rows than ranks to split it over (a short last one): every rank runs all of
            # it (each must join the forward's collectives) and the first one reports it
            whole = self.runner is None or next(iter(b.values())).shape[0] < self.runner.eval_size
            share = b if whole else eval_rows(self.runner, b)
            w = self._weight(share) if self.runner is None or not whole or self.runner.eval_rank == 0 else 0.0
            with contextlib.nullcontext() if self.runner is None else self.runner._loss_context():  # as in training
                loss, metrics = self.objective.loss(model, {k: v.to(device) for k, v in share.items()})
            metrics = {"loss": loss, **metrics}  # val_loss for every objective (SFT also names it itself)
            keys = keys or list(metrics)
            # every rank runs the forward (FSDP gathers inside it); a share without items adds nothing, and
            # neither does a metric the share cannot define (NaN: e.g. KTO's mean over a label it lacks)
            rows.append(torch.cat(metric_terms({k: metrics[k] for k in keys}, w, torch.float64, subsets=subsets)).cpu())
        sums = sum_over_ranks(torch.stack(rows), self.runner)
        out = {}
        for i, k in enumerate(keys):  # per batch: counts summed, means weighted; then the mean over batches
            total, weight = sums[:, i], sums[:, len(keys) + i]
            ok = weight > 0
            per_batch = total[ok] if k.startswith("num_") else total[ok] / weight[ok]
            out[f"val_{k}"] = float(per_batch.mean()) if ok.any() else float("nan")
        # a subset no batch has a row of (KTO's undesirable label in a validation set of desirable rows) has no
        # mean: its metrics are left out, as TRL's KTOTrainer leaves them out, rather than logged NaN
        empty = {k for k, n in subsets.counts.items() if not sums[:, keys.index(n)].sum() > 0} if subsets else set()
        for k, (a, b) in (subsets.differences.items() if subsets is not None else ()):  # (a margin: of the means)
            out[f"val_{k}"] = out[f"val_{a}"] - out[f"val_{b}"]
            empty |= {k} if {a, b} & empty else set()
        return {k: v for k, v in out.items() if k.removeprefix("val_") not in empty}

    def _weight(self, share: dict[str, torch.Tensor]) -> float:
        """Items the share's metrics average over (0 on a rank that shares another's rows and does not report)."""
        if self.runner is not None and not self.runner.reports:
            return 0.0
        weigh = getattr(self.objective, "batch_weight", None)
        return float(weigh(share)) if weigh is not None else float(next(iter(share.values())).shape[0])
