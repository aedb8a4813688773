"""Logits processors: each is a function (logits (B, V) float, state) -> logits, from one paper's
definition; `build_processors(params)` chains the ones a SamplingParams turns on, in the usual order:
penalties and bias on the raw logits, then temperature, then the truncation filters (each computed on
the distribution left by the previous one). Filters remove tokens by setting their logit to -inf and
always keep the most likely token, so no distribution becomes empty. Tied tokens share one fate: a filter
keeps every token tied with one it keeps (ties at the top, with the k-th or with the nucleus's last member),
so what survives never depends on token ids or on the order a sort happens to leave ties in.
`batched_processors(params list)` is the same chain over rows that set only temperature, top-k and top-p,
each with its own values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from lmforge.infer.sampling import SamplingParams, is_factory
from lmforge.utils import to_device

NEG_INF = float("-inf")


def for_sample(entries: tuple) -> tuple[Callable, ...] | None:
    """One sample's logits processors: each factory entry replaced by a fresh `entry.for_sequence()`, the plain
    functions as they are; None when no entry is a factory (the sample uses params.logits_processors)."""
    if not any(is_factory(f) for f in entries):
        return None
    return tuple(_made(f) if is_factory(f) else f for f in entries)


def _made(factory) -> Callable:
    """factory.for_sequence(), or where it raises or gives no function a processor raising that: the sampler
    makes it the request's error (lmforge.infer.sampler._custom), where an exception here would fail the step."""
    try:
        made, cause = factory.for_sequence(), None
    except Exception as e:  # the request's own code
        made, cause = None, e
    if callable(made):
        return made
    what = (f"raised {type(cause).__name__}: {cause}" if cause is not None else
            f"returned {type(made).__name__}, not a function f(output_ids, logits) -> logits")

    def failed(ids, logits):
        raise TypeError(f"{type(factory).__name__}.for_sequence() {what}") from cause
    return failed


@dataclass
class TokenHistory:
    """What the penalties look at, per row: counts (B, V) of generated tokens, and `seen` (B, V) bool for
    tokens in the prompt or the output (the CTRL repetition penalty covers both)."""

    counts: torch.Tensor
    seen: torch.Tensor

    @classmethod
    def start(cls, prompts: list[list[int]], vocab_size: int, device=None) -> "TokenHistory":
        counts = torch.zeros(len(prompts), vocab_size, device=device)
        seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            seen[i, torch.as_tensor(p, dtype=torch.long, device=device)] = True
        return cls(counts, seen)

    def add(self, tokens: torch.Tensor) -> None:
        """tokens (B,) just generated."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        self.counts[rows, tokens] += 1
        self.seen[rows, tokens] = True


Processor = Callable[[torch.Tensor, TokenHistory | None], torch.Tensor]


# penalties and bias -----------------------------------------------------------------------------------
def repetition_penalty(logits: torch.Tensor, hist: TokenHistory, penalty: float) -> torch.Tensor:
    """CTRL (Keskar et al. 2019, eq. in §4.1): a seen token's logit is divided by the penalty when
    positive and multiplied by it when negative, so penalty > 1 always makes it less likely. A penalty past the
    logits' dtype's range (1e300 in float32: inf) takes its largest value, whose products are the limit's (a
    zero logit times inf was NaN, which greedy decoding then picked)."""
    penalty = min(penalty, torch.finfo(logits.dtype).max)
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(hist.seen, pen, logits)


def frequency_presence_penalty(logits: torch.Tensor, hist: TokenHistory, frequency: float,
                               presence: float) -> torch.Tensor:
    """OpenAI API: logit[j] -= frequency·count[j] + presence·[count[j] > 0], counting generated tokens."""
    return logits - frequency * hist.counts - presence * (hist.counts > 0).to(logits.dtype)


def logit_bias(logits: torch.Tensor, hist: TokenHistory | None, bias: dict[int, float]) -> torch.Tensor:
    ids = to_device(torch.tensor(list(bias), dtype=torch.long), logits.device)
    vals = to_device(torch.tensor(list(bias.values()), dtype=logits.dtype), logits.device)
    return logits.index_add(-1, ids, vals.expand(logits.shape[0], -1))


SMALL_TEMPERATURE = 1e-4
"""below it a row's largest logit is subtracted before the division (the same distribution): logits / 1e-45
overflow to +-inf, and softmax of a row of infinities is NaN"""


def temperature(logits: torch.Tensor, hist: TokenHistory | None, t: float | torch.Tensor, shift: bool = False
                ) -> torch.Tensor:
    if shift:
        logits = only_infinite(logits)
        top = logits.amax(-1, keepdim=True)
        logits = logits - torch.where(torch.isfinite(top), top, 0.0)
    # t within the normal range of the logits' dtype: one that is 0 there (1e-300 in float32) gave the shifted top
    # logit 0 / 0 = NaN, one that is inf there (1e300, inf) a masked token's -inf / inf = NaN, and the row drew
    # token 0; the clamped values divide as the limits do (greedy; uniform over the tokens still allowed)
    info = torch.finfo(logits.dtype)
    t = t.clamp(info.tiny, info.max) if isinstance(t, torch.Tensor) else min(max(t, info.tiny), info.max)
    return logits / t


def only_infinite(logits: torch.Tensor) -> torch.Tensor:
    """A row holding +inf (a logit_bias past float32's range, a processor's +inf) keeps its +inf entries only,
    as logits 0 and the rest -inf: the limit of its distribution, all its +inf tokens equally likely, where
    softmax would give NaN (and the sampler token 0)."""
    inf = torch.isposinf(logits)
    return torch.where(inf.any(-1, keepdim=True), torch.where(inf, 0.0, NEG_INF), logits)


# truncation filters ---------------------------------------------------------------------------------
def _keep(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mask out tokens where keep is False, always keeping each row's most likely tokens (all tied at the top)."""
    return logits.masked_fill(~(keep | (logits == logits.max(-1, keepdim=True).values)), NEG_INF)


def _sorted_prefix(score: torch.Tensor, weight: torch.Tensor, mass: float | torch.Tensor) -> torch.Tensor:
    """Keep mask of the shortest run of tokens, in ascending `score`, whose `weight` (probability) reaches
    `mass`, widened to every token whose score ties the run's last member's."""
    s, order = score.sort(-1)
    w = weight.gather(-1, order)
    last = ((w.cumsum(-1) - w) < mass).sum(-1, keepdim=True).clamp(min=1) - 1  # index of the run's last member
    return score <= s.gather(-1, last)


def top_k(logits: torch.Tensor, hist: TokenHistory | None, k: int | list[int]) -> torch.Tensor:
    """Keep the k largest logits (ties with the k-th are kept too) (Fan et al. 2018). k: one for every
    row, or a list of one per row (0 = that row unfiltered)."""
    V = logits.shape[-1]
    if isinstance(k, int):
        if k >= V:
            return logits
        kth = logits.topk(k, dim=-1).values[..., -1:]
    else:
        ks = [j if 0 < j < V else 0 for j in k]
        if not any(ks):
            return logits
        kk = to_device(ks, logits.device)[:, None]
        kth = logits.topk(max(ks), dim=-1).values.gather(-1, (kk - 1).clamp(min=0))  # (B, 1): row's k-th largest
        kth = kth.masked_fill(kk == 0, NEG_INF)
    return _keep(logits, logits >= kth)


def top_p(logits: torch.Tensor, hist: TokenHistory | None, p: float | torch.Tensor) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020, eq. 2): the smallest set of most likely tokens whose
    probability mass reaches p. p: one for every row, or (B, 1) per row (inf = that row unfiltered)."""
    probs = logits.softmax(-1)
    return _keep(logits, _sorted_prefix(-probs, probs, p))


def min_p(logits: torch.Tensor, hist: TokenHistory | None, p: float) -> torch.Tensor:
    """min-p (Nguyen et al. 2024): keep tokens with probability >= p · (largest probability)."""
    probs = logits.softmax(-1)
    return _keep(logits, probs >= p * probs.max(-1, keepdim=True).values)


def typical(logits: torch.Tensor, hist: TokenHistory | None, mass: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2023, §5): rank tokens by |-log p - H(p)| (closest to the
    expected information first) and keep the smallest such prefix whose probability reaches `mass`. The
    set need not hold the most likely token (the paper's point), so unlike the other filters it is not
    added: the set is never empty. A row holding +inf logits ranks its +inf tokens (only_infinite: log_softmax
    of +inf is NaN, which masked every token)."""
    logp = only_infinite(logits).log_softmax(-1)
    probs = logp.exp()
    entropy = -(probs * logp.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
    return logits.masked_fill(~_sorted_prefix((-logp - entropy).abs(), probs, mass), NEG_INF)


def epsilon(logits: torch.Tensor, hist: TokenHistory | None, eps: float) -> torch.Tensor:
    """Epsilon sampling (Hewitt et al. 2022, eq. 4): keep tokens with probability > eps."""
    return _keep(logits, logits.softmax(-1) > eps)


def eta(logits: torch.Tensor, hist: TokenHistory | None, eta_: float) -> torch.Tensor:
    """Eta sampling (Hewitt et al. 2022, eq. 6): keep tokens with probability > min(eta, sqrt(eta)·exp(-H))
    where H is the distribution's entropy, so flat distributions keep more tokens."""
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    entropy = -(probs * logp.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
    threshold = torch.minimum(torch.full_like(entropy, eta_), math.sqrt(eta_) * torch.exp(-entropy))
    return _keep(logits, probs > threshold)


def build_processors(params: SamplingParams) -> list[Processor]:
    """The processors `params` turns on, in application order (greedy keeps only penalties and bias)."""
    procs: list[Processor] = []
    if params.repetition_penalty != 1.0:
        procs.append(partial(repetition_penalty, penalty=params.repetition_penalty))
    if params.frequency_penalty or params.presence_penalty:
        procs.append(partial(frequency_presence_penalty, frequency=params.frequency_penalty,
                             presence=params.presence_penalty))
    if params.logit_bias:
        procs.append(partial(logit_bias, bias=params.logit_bias))
    if params.greedy:
        return procs
    if params.temperature != 1.0:
        procs.append(partial(temperature, t=params.temperature, shift=params.temperature < SMALL_TEMPERATURE))
    filters = ((params.top_k != 0, partial(top_k, k=params.top_k)),
               (params.top_p != 1.0, partial(top_p, p=params.top_p)),
               (params.min_p != 0.0, partial(min_p, p=params.min_p)),
               (params.typical_p != 1.0, partial(typical, mass=params.typical_p)),
               (params.epsilon_cutoff != 0.0, partial(epsilon, eps=params.epsilon_cutoff)),
               (params.eta_cutoff != 0.0, partial(eta, eta_=params.eta_cutoff)))
    return procs + [proc for on, proc in filters if on]


def batched_processors(params: list[SamplingParams], device=None) -> list[Processor]:
    """One chain for rows that set only temperature, top_k and top_p (no penalties, bias or other filter),
    each row with its own values: build_processors' functions and order with per-row arguments. A row
    whose option is off comes out as build_processors leaves it (divided by 1, k = 0, p = inf), so each
    row equals its own chain. All rows at one temperature divide by that number, as build_processors
    does; mixed temperatures divide by a (B, 1) tensor (on a GPU, division by a Python number runs as a
    multiplication by its reciprocal, so such rows may differ from their own chain in the last bit)."""
    procs: list[Processor] = []
    temps = {p.temperature for p in params}
    if temps != {1.0}:
        shift = min(temps) < SMALL_TEMPERATURE
        t = temps.pop() if len(temps) == 1 else to_device([[p.temperature] for p in params], device)
        procs.append(partial(temperature, t=t, shift=shift))
    if any(p.top_k for p in params):
        procs.append(partial(top_k, k=[p.top_k for p in params]))
    if any(p.top_p != 1.0 for p in params):
        ps = [[p.top_p if p.top_p != 1.0 else math.inf] for p in params]
        procs.append(partial(top_p, p=to_device(ps, device)))
    return procs


def apply_processors(procs: list[Processor], logits: torch.Tensor, hist: TokenHistory | None) -> torch.Tensor:
    for proc in procs:
        logits = proc(logits, hist)
    return logits


def sample(logits: torch.Tensor, greedy: bool, generators: list[torch.Generator | None] | None = None
           ) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids: argmax, or one draw per row from softmax(logits),
    with row b's own generator when one is given (seeded requests stay reproducible in any batch)."""
    if greedy:
        return logits.argmax(-1)
    probs = logits.float().softmax(-1)
    if not generators or all(g is None for g in generators):
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])
