"""Token-level knowledge distillation: match the teacher's next-token distribution at every response token.

    obj = DistillObjective(DistillConfig(divergence="forward_kl", temperature=2.0), teacher=big_model)

Divergences per position, with p_T = softmax(teacher / tau), p_S = softmax(student / tau), summed over the
vocabulary and averaged over the counted tokens (loss_mask, targets != -100):
  forward_kl   KL(p_T || p_S)                        (Hinton et al. 2015; mode-covering)
  reverse_kl   KL(p_S || p_T)                        (MiniLLM, Gu et al. 2024; mode-seeking)
  jsd          beta KL(p_T || M) + (1-beta) KL(p_S || M),  M = beta p_T + (1-beta) p_S
               (GKD's generalised JSD, Agarwal et al. 2024, eq. 1; beta -> 0 / 1 is forward / reverse KL
               up to scale, so those endpoints are plain KLs as in TRL)
  sampled_reverse_kl   on-policy: the targets are the student's own samples x, and log p_S(x) - log p_T(x)
               is a one-sample estimate of KL(p_S || p_T) at each (sampled_reverse_kl below); the teacher
               enters only through log p_T(x), which the engine's prompt_logprobs give (batch key
               teacher_logps (B, T)) or the teacher model computes
No tau^2 factor (as TRL's GKD): with tau > 1 scale the learning rate or `weight` instead.

A top-k teacher (logits -inf outside its k tokens) gives a finite forward KL and JSD; reverse KL measures
the student's mass on tokens the teacher rules out, which is infinite (~1e38 per token after clamping):
DistillConfig(teacher_support=True) compares the student renormalised over the teacher's tokens instead.
Teacher rows outside the loss mask are neutralised before the divergence, so a prompt or padding position
with nothing given (all -inf) costs nothing and leaves gradients finite.

Teacher and student may differ in vocabulary padding only (one tokenizer; Qwen2.5-0.5B's embedding has
151936 rows, 7B's 152064): given vocab_size (the tokenizer's, which `lmforge distill` passes), the logits are
compared over those first ids; without it the two vocabularies must be equal.
`sft_weight` > 0 adds that much of the usual cross-entropy on the data's own targets. A student with MoE or MTP
layers gets its auxiliary losses added (lmforge.align.logprobs.ModelAux; never the teacher's): metrics loss
(the distillation loss alone), aux_loss, moe/*.

Batch keys: input_ids / targets / loss_mask (B, T), optional teacher_logits (B, T, V) precomputed, or a top-k
teacher as teacher_topk_ids / teacher_topk_logprobs (B, T, K) (sparse_teacher; use teacher_support for reverse
KL), or teacher_logps (B, T) for sampled_reverse_kl.
Sequence-level distillation (training on the teacher's generations) is data: lmforge.align.sampled.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.align.config import DIVERGENCES, DistillConfig  # noqa: F401 (DIVERGENCES: re-exported)
from lmforge.align.dpo import ReferenceHolder
from lmforge.align.frozen import Frozen, held
from lmforge.align.logprobs import ModelAux, masked_mean, model_logits, response_mask, token_logprobs
from lmforge.errors import ConfigError

def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """(..., V) log-probs -> (...) KL(p || q) = sum p (log p - log q) (torch's kl_div takes q first)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, kind: str = "forward_kl",
                     beta: float = 0.5, temperature: float = 1.0, mask: torch.Tensor | None = None,
                     teacher_support: bool = False, chunk: int = 0) -> torch.Tensor:
    """(B, T, V) logits -> (B, T) divergence per position, in fp32. Logits may be -inf (a top-k teacher's):
    their log-probs are clamped to the lowest float, so p log p = 0 there (not 0 * -inf = NaN) and gradients
    stay finite (p_S - p_T for forward KL); one truly infinite (reverse KL onto a token the teacher rules out)
    comes out huge (~1e38) rather than inf, unless teacher_support: then the student is renormalised over the
    tokens whose teacher logit is finite (the divergence of the two distributions on the teacher's support).
    mask (B, T): the counted positions; the teacher's other rows are set to 0 first, since a row of all -inf
    (nothing given at a prompt or padding position) has a NaN softmax, which a masked mean's zero weight does
    not remove (NaN * 0 = NaN, in the value and the gradient); their divergence is then meaningless.
    chunk > 0: `chunk` positions (along T) at a time, each recomputed in the backward pass (activation
    checkpointing), so the fp32 (.., V) intermediates of one chunk are alive rather than of the whole batch."""
    if 0 < chunk < student_logits.shape[-2]:
        # split, not slices: one backward joins the chunks' gradients (a slice's would fill a whole-size tensor)
        students, teachers = student_logits.split(chunk, -2), teacher_logits.split(chunk, -2)
        masks = mask.split(chunk, -1) if mask is not None else [None] * len(students)
        return torch.cat([checkpoint(_divergence, s, t, kind, beta, temperature, m, teacher_support,
                                     use_reentrant=False) for s, t, m in zip(students, teachers, masks)], -1)
    return _divergence(student_logits, teacher_logits, kind, beta, temperature, mask, teacher_support)


def _divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, beta: float,
                temperature: float, mask: torch.Tensor | None, teacher_support: bool) -> torch.Tensor:
    lowest = torch.finfo(torch.float32).min
    t = teacher_logits.float() / temperature  # a new tensor: filled in place below
    if mask is not None:
        t.masked_fill_(~mask.unsqueeze(-1), 0.0)
    s = student_logits.float() / temperature
    if teacher_support:
        s = s.masked_fill(t == float("-inf"), float("-inf"))
    log_s = F.log_softmax(s, -1).clamp(min=lowest)
    log_t = F.log_softmax(t, -1).clamp(min=lowest)
    if kind == "forward_kl":
        return _kl(log_t, log_s)
    if kind == "reverse_kl":
        return _kl(log_s, log_t)
    # log M = logsumexp(log beta + log p_T, log(1-beta) + log p_S)
    log_m = torch.logaddexp(log_t + torch.log(torch.tensor(beta)), log_s + torch.log1p(torch.tensor(-beta)))
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def sampled_reverse_kl(student_logps: torch.Tensor, teacher_logps: torch.Tensor) -> torch.Tensor:
    """(B, T) log-probs of tokens x the student sampled -> (B, T) surrogate whose value is k = log p_S(x) -
    log p_T(x), the one-sample estimate of KL(p_S || p_T) at that position, and whose gradient is
    k * grad log p_S(x): the score-function gradient of the reverse KL, since grad E_{x~p_S}[log p_S(x) -
    log p_T(x)] = E[k grad log p_S(x)] + E[grad log p_S(x)] and the last term is 0 in expectation. Each token
    is rewarded by its own term only (the per-token reverse KL of on-policy distillation as Thinking Machines
    describe it, 2025; MiniLLM, Gu et al. 2024, also sums the later tokens' terms). Unbiased only for samples
    of the current student."""
    k = (student_logps - teacher_logps).detach()
    return k + k * (student_logps - student_logps.detach())


def sparse_teacher(ids: torch.Tensor, logprobs: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, T, K) top-k token ids and their log-probs (the engine's prompt_logprobs=k) -> (B, T, vocab) fp32
    logits, -inf off the k tokens (their softmax is the top-k renormalised). A repeated id keeps its largest
    log-prob, so a short row may be padded with any id and -inf."""
    dense = torch.full((*ids.shape[:-1], vocab), float("-inf"), device=logprobs.device)
    return dense.scatter_reduce_(-1, ids.long(), logprobs.float(), reduce="amax")


class DistillObjective(ReferenceHolder):
    Config = DistillConfig

    def __init__(self, cfg: DistillConfig | None = None, *, teacher: torch.nn.Module | Frozen | None = None,
                 teacher_path: str | None = None, vocab_size: int | None = None):
        """vocab_size: the tokenizer's; the logits are compared over its ids, so the two models' embeddings may
        be padded differently beyond it (None: their vocabularies must be equal)."""
        self.cfg = cfg = cfg or DistillConfig()
        self.vocab_size = vocab_size
        self.ref = held(teacher, role="teacher", device=cfg.teacher_device, dtype=cfg.teacher_dtype,
                        path=teacher_path, vocab=vocab_size)

    def batch_weight(self, batch: dict) -> int:
        """The response tokens the loss averages over: accumulated micro-batches are weighed by them, so
        grad_accum x B rows equal one batch of grad_accum * B rows (as TRL's token-level normalisation)."""
        return int(response_mask(batch).sum())

    def _teacher_logits(self, batch: dict, student_vocab: int) -> torch.Tensor:
        teacher = batch.get("teacher_logits")
        if teacher is None and "teacher_topk_ids" in batch:
            teacher = sparse_teacher(batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
                                     self.vocab_size or student_vocab)
        if teacher is None:
            if self.ref is None:
                raise ConfigError("DistillObjective needs teacher= or precomputed teacher_logits (or teacher_topk_ids "
                                  "and teacher_topk_logprobs) in the batch")
            teacher = self.ref.logits(batch)
        V = self.vocab_size
        if V is None and teacher.shape[-1] != student_vocab:
            raise ConfigError(f"teacher logits have vocab {teacher.shape[-1]} but the student's have {student_vocab}; "
                              "distil between models sharing one tokenizer (if only their embedding padding differs, "
                              "pass vocab_size= the tokenizer's vocabulary size)")
        if V is not None and min(teacher.shape[-1], student_vocab) < V:
            raise ConfigError(f"teacher logits have vocab {teacher.shape[-1]} and the student's {student_vocab}, but "
                              f"the tokenizer has vocab_size={V}; both models must cover the tokenizer's ids")
        return teacher if V is None else teacher[..., :V]

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check(model)
        cfg = self.cfg
        aux = ModelAux(model)  # read at the student's forward, before a teacher (a BaseReference) reruns its layers
        logits = model_logits(model, batch, aux=aux)
        mask = response_mask(batch)
        lp = token_logprobs(logits, batch["targets"])
        if cfg.divergence == "sampled_reverse_kl":
            lp_t = batch.get("teacher_logps")
            if lp_t is None:
                if self.ref is None:
                    raise ConfigError("sampled_reverse_kl needs teacher= or teacher_logps (B, T) in the batch")
                lp_t = self.ref.token_logps(batch)
            # a position outside the mask may hold anything (-inf, NaN): its estimate is 0, its gradient too
            per_token = sampled_reverse_kl(lp, torch.where(mask, lp_t.to(lp.dtype), lp.detach()))
        else:
            teacher = self._teacher_logits(batch, logits.shape[-1])
            student = logits if self.vocab_size is None else logits[..., :self.vocab_size]
            per_token = token_divergence(student, teacher, kind=cfg.divergence, beta=cfg.beta,
                                         temperature=cfg.temperature, mask=mask, teacher_support=cfg.teacher_support,
                                         chunk=cfg.chunk)
        div = masked_mean(per_token, mask)
        ce = -masked_mean(lp, mask)
        loss = cfg.weight * div + (cfg.sft_weight * ce if cfg.sft_weight else 0.0)
        return aux.add(loss, {"distill/divergence": div.detach(), "distill/ce": ce.detach()})
