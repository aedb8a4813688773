"""Per-token log-probabilities, entropies and masked reductions: the exact semantics every post-training
objective shares.

`token_logprobs` computes log p(target) in fp32 without materialising a (B, T, V) fp32 log-softmax: the
log-normaliser is accumulated over vocabulary chunks, and the backward pass recomputes each chunk's
softmax from the saved logits (in their own dtype) and the (B, T) log-normaliser. At a 128k vocabulary
in bf16 that saves two fp32 copies of the logits per batch.

Masked reductions: `masked_mean` over an all-zero mask is 0/0 = NaN by design (an empty selection has no
mean; objectives must not hide that); `masked_sum` of an empty selection is 0.

`ModelAux` adds the trained model's own auxiliary losses (MoE balancing / router z-losses, MTP) to every
post-training objective's loss, as pretraining's LMObjective adds them (lmforge.train.loss.with_aux).
"""

from __future__ import annotations

import torch

from lmforge.train.loss import model_aux

DEFAULT_CHUNK = 8192  # vocabulary entries per chunk


def _logsumexp_chunked(logits: torch.Tensor, chunk: int) -> torch.Tensor:
    """(..., V) -> (...) fp32 logsumexp, one vocabulary chunk in fp32 at a time."""
    V = logits.shape[-1]
    m = torch.full(logits.shape[:-1], float("-inf"), device=logits.device)
    s = torch.zeros(logits.shape[:-1], device=logits.device)
    for lo in range(0, V, chunk):
        z = logits[..., lo:lo + chunk].float()
        m_new = torch.maximum(m, z.amax(-1))
        shift = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows masked (-inf) so far: exp(-inf) = 0
        # rescale the running sum to the new maximum (online softmax, Milakov & Gimelshein 2018)
        s = s * torch.exp(m - shift) + torch.exp(z - shift[..., None]).sum(-1)
        m = m_new
    return m + torch.log(s)


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        lse = _logsumexp_chunked(logits, chunk)
        picked = logits.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1).float()
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return picked - lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        # d logp(t) / d z_j = 1[j = t] - softmax(z)_j, recomputed chunk by chunk
        out = torch.empty_like(logits)
        V = logits.shape[-1]
        for lo in range(0, V, ctx.chunk):
            p = torch.exp(logits[..., lo:lo + ctx.chunk].float() - lse[..., None])
            out[..., lo:lo + ctx.chunk] = (-p * grad[..., None]).to(out.dtype)
        idx = targets.clamp(min=0)[..., None]
        out.scatter_add_(-1, idx, grad[..., None].to(out.dtype))
        return out, None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """logits (B, T, V) any float dtype, targets (B, T) -> log p(targets) (B, T) in fp32, differentiable.
    Negative targets (-100 = ignore) give a finite, meaningless value: mask them out."""
    return _TokenLogProbs.apply(logits, targets, chunk)


@torch.no_grad()
def token_entropy(logits: torch.Tensor, *, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(B, T, V) -> (B, T) fp32 entropy of each position's distribution, H = lse - sum p·z (no grad); masked
    logits (-inf, p = 0) add nothing."""
    lse = _logsumexp_chunked(logits, chunk)
    acc = torch.zeros_like(lse)
    for lo in range(0, logits.shape[-1], chunk):
        z = logits[..., lo:lo + chunk].float()
        p = torch.exp(z - lse[..., None])
        acc += (p * z.masked_fill(p == 0, 0.0)).sum(-1)
    return lse - acc


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of values where mask is true (over `dim`, or everything)."""
    v = values * mask.to(values.dtype)
    return v.sum() if dim is None else v.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the masked entries; NaN where the mask selects nothing (see module docstring)."""
    return masked_sum(values, mask, dim) / mask.to(values.dtype).sum() if dim is None else \
        masked_sum(values, mask, dim) / mask.to(values.dtype).sum(dim)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *,
                      average: bool = False, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(B,) sum (or mean, SimPO's length normalisation) of log p(target) over each row's masked tokens."""
    lp = token_logprobs(logits, targets, chunk=chunk)
    return masked_mean(lp, mask, dim=-1) if average else masked_sum(lp, mask, dim=-1)


# ---------------------------------------------------------------------------------------------------
# Model-facing helpers: the batch layout of lmforge.train.objective, optionally under a key prefix
# ("chosen_", "rejected_", "kl_") so one batch carries several sequences per example.

def response_mask(batch: dict, prefix: str = "") -> torch.Tensor:
    """(B, T) bool: positions whose target counts (loss_mask if given, and never a -100 target)."""
    targets = batch[f"{prefix}targets"]
    mask = targets >= 0
    lm = batch.get(f"{prefix}loss_mask")
    return mask & lm.bool() if lm is not None else mask


class ModelAux:
    """The trained model's auxiliary losses (model.aux_loss(): MoE balancing and router z-losses, MTP) over an
    objective's forwards of it, added to the objective's loss as pretraining adds them (lmforge.train.loss.with_aux;
    TRL adds the router aux loss to SFT and DPO the same way). One per loss() call:

        aux = ModelAux(model)
        logits = model_logits(model, batch, aux=aux)           # or batch_logps(..., aux=aux): read() after each forward
        ... reference / teacher forwards, the objective's loss ...
        return aux.add(loss, metrics)

    read() must follow the trained model's forward before any other forward of its modules: model.aux_loss() is
    the LAST forward's, and a BaseReference runs the same MoE layers (adapters off, eval mode: no MTP loss). Only
    the trained model's forwards are read (never a reference's or teacher's, nor KTO's no-grad reference-point
    rows), and only in training mode: evaluation (the Trainer's runs the model in eval mode, as pretraining's, whose
    val_loss has no aux either) adds nothing. A training-mode forward without gradients (the Trainer's micro-batch
    with nothing to train) still reports them, so every micro-batch returns the same metrics.
    Several policy forwards (chosen and rejected rows of packed pairs) add the mean of theirs: one concatenated
    forward's aux is a mean over all its tokens too. A model of several trunks (PolicyAndCritic) names each trunk's
    losses (its aux_losses(): {'policy': ..., 'critic': ...}): repeat reads of one trunk average, different trunks'
    sum, so model_logits then values_of add what one policy_and_values forward adds.
    add(loss, metrics) -> (loss + aux, metrics with `loss` = the objective's own loss (unless it names one),
    aux_loss and moe/* stats), as pretraining logs them; a model without aux losses (aux_loss() None, or no such
    method) gets both back unchanged."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.losses: list[dict[str, torch.Tensor]] = []  # per read: {trunk: its aux loss}
        self.stats: list[dict[str, torch.Tensor]] = []

    def read(self) -> None:
        """Take the model's aux losses (and MoE stats) of the forward just run; nothing in eval mode."""
        got = model_aux(self.model) if self.model.training else None
        if got is not None:
            per_trunk = getattr(self.model, "aux_losses", None)
            self.losses.append(per_trunk() if callable(per_trunk) else {"": got[0]})
            self.stats.append(got[1])

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor]
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.losses:
            return loss, metrics
        trunks: dict[str, list[torch.Tensor]] = {}
        for read in self.losses:
            for trunk, term in read.items():
                trunks.setdefault(trunk, []).append(term)
        means = [ts[0] if len(ts) == 1 else torch.stack([t.float() for t in ts]).mean() for ts in trunks.values()]
        aux = means[0] if len(means) == 1 else torch.stack([m.float() for m in means]).sum()
        one = len(self.losses) == 1
        stats = self.stats[0] if one else {k: torch.stack([s[k] for s in self.stats]).mean() for k in self.stats[0]}
        return loss + aux, {"loss": loss.detach(), **metrics, "aux_loss": aux.detach(), **stats}


def mtp_targets(model: torch.nn.Module, batch: dict, prefix: str = "") -> dict:
    """{'targets': the counted targets (-100 elsewhere)} for a model with MTP heads, whose MTP loss then skips
    what the objective skips (prompts, padding), as pretraining's; {} for any other model."""
    if getattr(model, "mtp", None) is None:
        return {}
    return {"targets": batch[f"{prefix}targets"].masked_fill(~response_mask(batch, prefix), -100)}


def model_logits(model: torch.nn.Module, batch: dict, prefix: str = "", *, aux: ModelAux | None = None
                 ) -> torch.Tensor:
    """(B, T, V) logits of batch[prefix + 'input_ids']; packed rows (doc_ids present) attend per document. With
    `aux`, the trained model's forward: its aux losses are read (ModelAux) and an MTP model's MTP loss gets the
    counted targets."""
    ids, kwargs = model_inputs(batch, prefix)
    logits = model(ids, **kwargs, **mtp_targets(model, batch, prefix)) if aux is not None else model(ids, **kwargs)
    if aux is not None:
        aux.read()
    return logits


def model_inputs(batch: dict, prefix: str = "") -> tuple[torch.Tensor, dict]:
    """(input_ids, kwargs) for `model(ids, positions=..., meta=...)`; packed rows pass their doc ids."""
    kwargs = {}
    if batch.get(f"{prefix}positions") is not None:
        kwargs["positions"] = batch[f"{prefix}positions"]
    if batch.get(f"{prefix}doc_ids") is not None:
        from lmforge.model.meta import AttnMetadata

        kwargs["meta"] = AttnMetadata.packed(batch[f"{prefix}doc_ids"])
    return batch[f"{prefix}input_ids"], kwargs


def batch_logps(model: torch.nn.Module, batch: dict, prefixes: tuple[str, ...] = ("",), *,
                average: bool = False, aux: ModelAux | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Sequence log-probs of several prefixed sequences of a batch in ONE forward (chosen and rejected
    concatenated along the batch, as TRL does; the shorter side right-padded, which a causal model's
    earlier positions never see), or one forward each for packed rows. `aux`: the trained model's forwards,
    whose aux losses it reads (model_logits).
    Returns per prefix: sequence sums (or means) (B,), token log-probs (B, T_prefix), masks (B, T_prefix)."""
    packed = any(batch.get(f"{p}doc_ids") is not None or batch.get(f"{p}positions") is not None for p in prefixes)
    if len(prefixes) > 1 and not packed:
        lens = [batch[f"{p}input_ids"].shape[1] for p in prefixes]
        T = max(lens)
        pad = lambda x, v: torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)  # noqa: E731
        ids = torch.cat([pad(batch[f"{p}input_ids"], 0) for p in prefixes])
        targets = torch.cat([pad(batch[f"{p}targets"], -100) for p in prefixes])
        ms = [response_mask(batch, p) for p in prefixes]
        joined = {"input_ids": ids, "targets": targets, "loss_mask": torch.cat([pad(m, False) for m in ms])}
        tok = token_logprobs(model_logits(model, joined, aux=aux), targets)
        toks = [t[:, :n] for t, n in zip(tok.chunk(len(prefixes)), lens)]
    else:
        toks, ms = [], []
        for p in prefixes:
            toks.append(token_logprobs(model_logits(model, batch, p, aux=aux), batch[f"{p}targets"]))
            ms.append(response_mask(batch, p))
    seqs = [masked_mean(t, m, dim=-1) if average else masked_sum(t, m, dim=-1) for t, m in zip(toks, ms)]
    return seqs, toks, ms
