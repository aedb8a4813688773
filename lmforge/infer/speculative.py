"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023, "Accelerating LLM Decoding with Speculative Sampling").

A cheap drafter proposes k tokens x_1..x_k with probabilities q_i; the target scores the last context
token plus all drafts in one forward, giving p_1..p_{k+1}. Draft i is accepted with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection a token is drawn from norm(max(0, p_i - q_i)), and if
all k pass, one more from p_{k+1}. Every emitted token is then distributed exactly as the target's own
sample (Leviathan et al., Theorem 3.5). Greedy decoding accepts a draft iff it is the target's argmax,
so it reproduces the target's greedy output token for token.

Drafters: a smaller model (`ModelDrafter`), prompt lookup (`NGramDrafter`, Saxena 2023): copy the
tokens that followed the latest earlier occurrence of the context's last n-gram (a deterministic draft:
q is one-hot), or the target's own multi-token-prediction heads (`MTPDrafter`). One sequence at a time; both caches are rewound past rejected tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError
from lmforge.infer.detok import safe_decode
from lmforge.infer.decoders import decode_attention
from lmforge.infer.request import stop_ids
from lmforge.infer.outputs import CompletionOutput, RequestOutput
from lmforge.infer.processors import apply_processors, build_processors
from lmforge.infer.sampling import SamplingParams
from lmforge.model.cache import KVCache


def _probs(logits: torch.Tensor, procs, greedy: bool) -> torch.Tensor:
    """(T, V) logits -> the distribution actually sampled from (one-hot argmax when greedy)."""
    logits = apply_processors(procs, logits.float(), None)
    if greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return logits.softmax(-1)


def _draw(p: torch.Tensor, gen: torch.Generator | None) -> int:
    return int(torch.multinomial(p, 1, generator=gen))


def verify(p: torch.Tensor, q: torch.Tensor, drafts: list[int], gen: torch.Generator | None = None
           ) -> tuple[int, int]:
    """Modified rejection sampling. p (k+1, V) target, q (k, V) draft distributions, drafts (k,).
    Returns (accepted count a, the next token): drafts[:a] + [token] are emitted."""
    for i, x in enumerate(drafts):
        px, qx = float(p[i, x]), float(q[i, x])
        u = float(torch.rand((), generator=gen, device=p.device))
        if qx > 0 and u * qx < px:  # u < p/q without dividing by a tiny q
            continue
        residual = (p[i] - q[i]).clamp(min=0)
        if float(residual.sum()) <= 0:  # p == q here; any rejection is then measure-zero: sample p
            residual = p[i]
        return i, _draw(residual / residual.sum(), gen)
    return len(drafts), _draw(p[len(drafts)], gen)


class ModelDrafter:
    """A small model sharing the target's tokenizer; keeps its own KV cache of the accepted context."""

    def __init__(self, model, max_len: int):
        self.model = model
        self.cache = KVCache.for_model(model, 1, max_len)

    def propose(self, ctx: list[int], k: int, procs, greedy: bool, gen) -> tuple[list[int], torch.Tensor]:
        dev = self.cache.k.device
        feed = ctx[self.cache.length:]
        drafts, qs = [], [torch.zeros(0, self.model.cfg.vocab_size, device=dev)]
        for i in range(k):
            logits = self.model(torch.tensor([feed], device=dev), cache=self.cache)[0, -1:]
            q = _probs(logits, procs, greedy)[0]
            drafts.append(_draw(q, gen) if not greedy else int(q.argmax()))
            qs.append(q[None])
            feed = drafts[-1:]
        return drafts, torch.cat(qs)

    def accept(self, ctx_len: int) -> None:
        """The verified context now has ctx_len tokens: forget cached drafts beyond it."""
        self.cache.rewind(min(self.cache.length, ctx_len))


class NGramDrafter:
    """Prompt lookup: match the context's last n tokens (n from max_n down to 1) earlier in the context
    and propose the k tokens that followed the latest match."""

    def __init__(self, max_n: int = 3, vocab_size: int = 0):
        self.max_n, self.vocab_size = max_n, vocab_size

    def propose(self, ctx: list[int], k: int, procs, greedy: bool, gen) -> tuple[list[int], torch.Tensor]:
        drafts = self.lookup(ctx, k)
        q = torch.zeros(len(drafts), self.vocab_size)
        q[torch.arange(len(drafts)), torch.tensor(drafts, dtype=torch.long)] = 1.0
        return drafts, q

    def lookup(self, ctx: list[int], k: int) -> list[int]:
        for n in range(min(self.max_n, len(ctx) - 1), 0, -1):
            tail = ctx[-n:]
            for start in range(len(ctx) - n - 1, -1, -1):
                if ctx[start:start + n] == tail:
                    return ctx[start + n:start + n + k]
        return []

    def accept(self, ctx_len: int) -> None:
        pass


class MTPDrafter:
    """Drafts from the target's own multi-token-prediction heads (Gloeckle et al. 2024 'parallel' heads:
    at the last position, head k predicts token t+1+k; the main head gives the first draft). One uncached
    `forward_mtp` per round - the hook, not yet a fast path; verification keeps the output exact."""

    def __init__(self, model):
        mtp = getattr(model.cfg, "mtp", None)
        if mtp is None or mtp.kind != "parallel":
            raise ConfigError("draft='mtp' needs a model with parallel MTP heads (model.mtp.kind='parallel')")
        self.model = model

    def propose(self, ctx: list[int], k: int, procs, greedy: bool, gen) -> tuple[list[int], torch.Tensor]:
        dev = next(self.model.parameters()).device
        main, heads = self.model.forward_mtp(torch.tensor([ctx], device=dev))
        logits = torch.cat([main[0, -1:]] + [h[0, -1:] for h in heads])[:k]
        q = _probs(logits, procs, greedy)
        drafts = [int(q[i].argmax()) if greedy else _draw(q[i], gen) for i in range(q.shape[0])]
        return drafts, q

    def accept(self, ctx_len: int) -> None:
        pass


@dataclass
class SpecStats:
    drafted: int = 0
    accepted: int = 0
    target_forwards: int = 0
    seconds: float = 0.0

    def as_dict(self, emitted: int) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "target_forwards": self.target_forwards,
                "acceptance_rate": self.accepted / max(self.drafted, 1),
                "tokens_per_forward": emitted / max(self.target_forwards, 1), "seconds": self.seconds}


@torch.inference_mode()
@decode_attention()
def speculative_generate(target, drafter, prompt: list[int], params: SamplingParams, k: int, eos: set[int],
                         max_seq_len: int, gen: torch.Generator | None = None) -> tuple[list[int], SpecStats]:
    """Generate up to params.max_tokens tokens for one prompt; returns them and the acceptance stats."""
    procs, stats, t0 = build_processors(params), SpecStats(), time.perf_counter()
    dev = next(target.parameters()).device
    budget = min(params.max_tokens, max_seq_len - len(prompt))
    cache = KVCache.for_model(target, 1, len(prompt) + budget + k + 1)
    ctx = list(prompt)
    if len(ctx) > 1:  # the cache holds all but the last context token, which each round feeds
        target(torch.tensor([ctx[:-1]], device=dev), cache=cache)
    out: list[int] = []
    while len(out) < budget:
        drafts, q = drafter.propose(ctx, min(k, budget - len(out) - 1), procs, params.greedy, gen)
        logits = target(torch.tensor([ctx[-1:] + drafts], device=dev), cache=cache)[0]
        stats.target_forwards += 1
        p = _probs(logits, procs, params.greedy)
        a, nxt = verify(p, q.to(p.device), drafts, gen)
        stats.drafted, stats.accepted = stats.drafted + len(drafts), stats.accepted + a
        new = drafts[:a] + [nxt]
        ctx += new
        out += new
        cache.rewind(len(ctx) - 1)
        drafter.accept(len(ctx) - 1)
        if any(t in eos for t in new):
            break
    for i, t in enumerate(out):  # cut after the first stop token
        if t in eos:
            out = out[: i + 1]
            break
    stats.seconds = time.perf_counter() - t0
    return out[:budget], stats


def speculative_request(llm, prompt, ids: list[int], params: SamplingParams) -> RequestOutput:
    """LLM.generate's path when the LLM has a draft: n samples of one prompt, with acceptance metrics."""
    if params.repetition_penalty != 1 or params.frequency_penalty or params.presence_penalty:
        raise ConfigError("speculative decoding does not support repetition/frequency/presence penalties; "
                          "drop them or generate without a draft")
    if params.logprobs is not None or params.stop:
        raise ConfigError("speculative decoding returns no logprobs and has no stop strings; "
                          "generate without a draft for those")
    eos = stop_ids(params, llm.tokenizer)
    outputs, total = [], SpecStats()
    for j in range(params.n):
        if llm.draft == "ngram":
            drafter = NGramDrafter(vocab_size=llm.model.cfg.vocab_size)
        elif llm.draft == "mtp":
            drafter = MTPDrafter(llm.model)
        else:
            drafter = ModelDrafter(llm.draft, len(ids) + params.max_tokens + llm.num_draft_tokens + 1)
        toks, st = speculative_generate(llm.model, drafter, ids, params, llm.num_draft_tokens, eos,
                                        llm.max_seq_len, llm._generator(params, j))
        for f in ("drafted", "accepted", "target_forwards", "seconds"):
            setattr(total, f, getattr(total, f) + getattr(st, f))
        finish = "stop" if toks and toks[-1] in eos else "length"
        outputs.append(CompletionOutput(j, safe_decode(llm.tokenizer, [t for t in toks if t not in eos]),
                                        toks, finish))
    emitted = sum(len(o.token_ids) for o in outputs)
    return RequestOutput(prompt if isinstance(prompt, str) else None, ids, outputs, total.as_dict(emitted))
