"""KTO (Ethayarajh et al. 2024): preference optimisation from unpaired good/bad completions.

    obj = KTOObjective(KTOConfig(beta=0.1), reference=sft_model)      # or reference=BaseReference(lora_policy)

Batch keys: input_ids / targets / loss_mask (B, T) one completion per row, label (B,) bool (True =
desirable); kl_input_ids / kl_targets / kl_loss_mask (B, T) the same prompts with MISMATCHED completions
(another row's), whose policy-vs-reference log-ratio estimates the reference point z0; when the batch has
none they are built from its own rows (`mismatched_rows`: row i's prompt + row i-1's completion, as TRL;
lmforge's KTO data pairs them over the global batch, lmforge.align.data.kto_batch), or z0 = 0 with
KTOConfig(kl=False) (TRL's calculate_KL=False); ref_logps / ref_kl_logps (B,) optional precomputed
reference log-prob sums. On N data-parallel processes z0 is the mean over every rank's mismatched rows (one
all-reduce, as TRL gathers it over processes), so the ranks share one reference point.
Loss per example as in lmforge.align.losses.kto_loss, averaged over the batch. Metrics: kl (z0); per label
(chosen = desirable, rejected = undesirable) the means of rewards/* (beta (pi - ref)) and logps/*, with their
counts num_chosen / num_rejected; rewards/margins = rewards/chosen - rewards/rejected. The Trainer combines the
per-label means over a step's micro-batches and ranks from sums and counts (`subset_means`,
lmforge.train.objective.SubsetMeans): a step whose labels fall in different micro-batches logs each label's
mean over all its rows and their difference; a step without any row of a label logs that label's means and the
margin as null (NaN; the keys stay, so every step logs the same names). Older TRL KTOTrainer releases (0.x) define
them the same way (per-label `*_sum` and `count/*` summed over the processes and the logging window, here the
step; the margin from the two means), but leave out an absent label's keys and do not log the counts; TRL 1.x (1.16
checked) averages each micro-batch's per-label means (gathered over processes) unweighted, and the margins of
the micro-batches that have both labels, which is not chosen - rejected when the labels are split unevenly.
One call of `loss` (e.g. an evaluation batch) reports its own per-label means (NaN for a label it lacks) and
their difference. Validation (lmforge.align.sft.ObjectiveEvaluator) leaves out the means of a label no
validation batch has, and the margin, as TRL does (val_num_* says which). An MoE or MTP policy's auxiliary
losses of its forward on the batch's rows (not the no-grad reference-point rows) are added
(lmforge.align.logprobs.ModelAux): metrics loss (KTO's alone), aux_loss, moe/*.
"""

from __future__ import annotations


import torch

from lmforge.align.dpo import ReferenceHolder, reference_logps
from lmforge.align.config import KTOConfig
from lmforge.align.frozen import Frozen, held
from lmforge.align.logprobs import ModelAux, batch_logps, response_mask
from lmforge.align.losses import kto_kl, kto_loss
from lmforge.errors import ConfigError
from lmforge.train.objective import SubsetMeans

PER_LABEL = SubsetMeans(counts={"rewards/chosen": "num_chosen", "rewards/rejected": "num_rejected",
                                "logps/chosen": "num_chosen", "logps/rejected": "num_rejected"},
                        differences={"rewards/margins": ("rewards/chosen", "rewards/rejected")})


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """Mean of x (B,) over the rows of every process in torch.distributed's default group (post-training's
    ranks are all data parallel), or x.mean() without one. Every rank must call it (a collective)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.mean()
    sums = torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)])
    dist.all_reduce(sums)
    return sums[0] / sums[1]


def mismatched_rows(batch: dict, max_tokens: int | None = None, keep_end: bool = False) -> dict:
    """kl_input_ids / kl_targets / kl_loss_mask: row i's prompt followed by row (i-1) mod B's completion (TRL's
    KTOTrainer shifts the completions the same way: `completions[-1:] + completions[:-1]`).
    A row's prompt is its tokens up to its first counted target; its completion runs from there to its last
    counted target, taken from the row's tokens (so the gaps a conversational completion has between its
    assistant turns are real tokens, never -100) and trained where the row was; rows are right-padded.
    A long prompt with another row's long completion can be up to twice as long as either row: `max_tokens` (the
    data's seq_len + 1) truncates each such row as the data truncates an example (its first tokens, or with
    `keep_end` its last), as TRL truncates its KL rows to max_length; a row left without completion tokens then
    adds a log-ratio of 0 to the reference point, as in TRL. A batch of one row has no other completion: its row
    counts no token (a log-ratio of 0, so z0 = 0 as with KTOConfig(kl=False)), where pairing the row with its own
    completion (TRL's shift of one row) would make z0 its own implied reward (a short last batch of an epoch or of
    the validation set; `lmforge kto` refuses data.batch_size = 1, as TRL refuses a batch size of 1)."""
    ids, tgt, mask = batch["input_ids"], batch["targets"], response_mask(batch)
    parts = []
    for b in range(ids.shape[0]):
        pos = mask[b].nonzero().flatten()
        if len(pos) == 0:
            raise ConfigError(f"KTO row {b} has no completion token to score; drop the example")
        start, end = int(pos[0]), int(pos[-1])
        # the tokens after the prompt (input ids start+1..end, then the last target) and which are counted
        completion = torch.cat([ids[b, start + 1:end + 1], tgt[b, end:end + 1]])
        parts.append((ids[b, :start + 1], completion, mask[b, start:end + 1]))
    rows = []  # (tokens, which of tokens[1:] are counted targets)
    for i, (prompt, _, _) in enumerate(parts):
        _, completion, counted = parts[i - 1]
        r = torch.cat([prompt, completion])
        counted = counted.bool() & (len(parts) > 1)  # a lone row is its own completion: nothing mismatched to count
        c = torch.cat([torch.zeros(len(prompt) - 1, dtype=torch.bool, device=ids.device), counted])
        if max_tokens is not None and len(r) > max_tokens:
            r, c = (r[-max_tokens:], c[-(max_tokens - 1):]) if keep_end else (r[:max_tokens], c[:max_tokens - 1])
        rows.append((r, c))
    T = max(len(r) for r, _ in rows) - 1
    out_ids = torch.zeros(len(rows), T, dtype=ids.dtype, device=ids.device)
    out_tgt = torch.full((len(rows), T), -100, dtype=tgt.dtype, device=ids.device)
    for i, (r, c) in enumerate(rows):
        out_ids[i, :len(r) - 1] = r[:-1]
        out_tgt[i, :len(r) - 1] = torch.where(c, r[1:], -100)
    return {"kl_input_ids": out_ids, "kl_targets": out_tgt, "kl_loss_mask": out_tgt >= 0}


class KTOObjective(ReferenceHolder):
    Config = KTOConfig
    subset_means = PER_LABEL

    def __init__(self, cfg: KTOConfig | None = None, *, reference: torch.nn.Module | Frozen | None = None,
                 reference_path: str | None = None):
        self.cfg = cfg = cfg or KTOConfig()
        self.ref = held(reference, role="reference", device=cfg.reference_device, dtype=cfg.reference_dtype,
                        path=reference_path, cache_size=cfg.reference_cache)

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check(model)
        cfg = self.cfg
        if cfg.kl and "kl_input_ids" not in batch:
            batch = {**batch, **mismatched_rows(batch)}
        has_kl = cfg.kl
        prefixes = ("", "kl_") if has_kl else ("",)
        aux = ModelAux(model)  # read at the policy's forward, before a BaseReference reruns its layers
        pi = batch_logps(model, batch, aux=aux)[0][0]
        ref_keys = ("ref_logps", "ref_kl_logps") if has_kl else ("ref_logps",)
        refs = reference_logps(self.ref, batch, prefixes, average=False, keys=ref_keys)
        ref = refs[0]
        if has_kl:  # z0 carries no gradient, so the policy's KL rows run without autograd (as TRL)
            with torch.no_grad():
                kl = kto_kl(batch_logps(model, batch, ("kl_",))[0][0], refs[1], mean=mean_over_ranks)
        else:
            kl = torch.zeros((), device=pi.device)
        good = batch["label"].bool()
        losses = kto_loss(pi, ref, good, kl, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                          undesirable_weight=cfg.undesirable_weight)
        rewards = cfg.beta * (pi - ref).detach()
        nan = torch.full((), float("nan"), device=pi.device)
        mean = lambda x, m: x[m].mean() if m.any() else nan  # noqa: E731  (TRL logs only present classes)
        metrics = {"kl": kl, "rewards/chosen": mean(rewards, good), "rewards/rejected": mean(rewards, ~good),
                   "logps/chosen": mean(pi.detach(), good), "logps/rejected": mean(pi.detach(), ~good)}
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        metrics.update(num_chosen=good.sum().float(), num_rejected=(~good).sum().float())
        return aux.add(losses.mean(), metrics)
