"""Batched per-row sampling: one call turns the step's logits rows into tokens, each row under its own
request's SamplingParams and random stream.

Rows are grouped by the SamplingParams fields that shape the distribution (temperature, filters,
penalties, bias: not max_tokens, stop or seed), and each group runs the processors of
lmforge.infer.processors once over its rows, so a batch of 256 rows of one kind costs one pass. The
common cases share a group whatever their values: greedy rows without penalties or bias take one
argmax, and rows that set only temperature, top-k and top-p run one chain with per-row arguments
(`PLAIN`). Penalties see each row's own history, kept with its Row from step to step and advanced by the tokens
appended since (`token_history`: ~0.5 ms a step for 8 rows of 1,500 tokens at V = 32,000 on a CPU core, where
rebuilding it from the token lists took ~5 ms and grew with length); a request's own logits_processors
(constrained decoding) run first, row by row, on a copy (`_custom`); a row they leave without an allowed token
(or whose processor raises, or returns anything but a float tensor shaped like its logits) is one request's
error, not the batch's: it is recorded on the Sampled (`failed`), the row draws from the model's own logits, and
the engine aborts that request alone. Ids at or beyond
`vocab_limit` (a model vocabulary padded past its tokenizer's, e.g. GPT-2's 50,257 tokens in 50,304 rows) are
never drawn, nor listed among the top log-probs or taken as greedy's argmax (they cannot be detokenized); but
'raw' log-probs, of the chosen token and of the listed top ids alike, are the model's own distribution, the
log_softmax over ALL its rows (the padded ones keep their mass): what a plain forward, the training side's
lmforge.align.logprobs.token_logprobs, HF and lm-eval compute, so an RL ratio starts at 1. 'processed' log-probs
(logprobs_mode) are the distribution drawn from, the padded ids excluded.
Seeded rows draw from their own torch.Generator, so a seeded sample never depends on its batch companions;
unseeded rows from the one stream their engine gives them all (a SharedStream, Engine.rng: never torch's global
RNG, which a training loop around the engine owns). The draw itself is one batched exponential race (`draw`), only
the noise of seeded rows is filled per row.
Nothing here reads the device: the caller syncs once, on the returned tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import RequestError
from lmforge.infer.processors import (TokenHistory, apply_processors, batched_processors, build_processors,
                                      only_infinite)
from lmforge.infer.sampling import SamplingParams
from lmforge.utils import HostCopy, to_device


@dataclass
class Row:
    params: SamplingParams
    generator: torch.Generator | None
    tokens: list[int]
    """the sequence so far (prompt + output), for penalties"""
    prompt_len: int
    kind: tuple = ()
    """rows of equal kind are processed together (`kind_of`); () = computed from params"""
    request_id: str | None = None
    """the request it samples for (named in the error its logits_processors may raise)"""
    processors: tuple | None = None
    """its sample's own logits processors (factory entries made per sample: Request.processors_for); None =
    params.logits_processors, shared"""
    history: RowHistory | None = None
    """the penalties' state of `tokens`, kept from one step to the next (`token_history`); None until a penalized
    group samples this row, and dropped (`forget`) when its sequence ends or its tokens change other than by
    appending"""


@dataclass
class Sampled:
    tokens: torch.Tensor
    """(M,) int64"""
    logprobs: torch.Tensor | None
    """(M,) log-probability of each chosen token under the raw model distribution (rows asking for it)"""
    top_values: torch.Tensor | None
    top_ids: torch.Tensor | None
    """(M, K) most likely tokens, K the largest logprobs any row asked for"""
    logits: torch.Tensor | None = None
    """(M, V) float logits before any processor (ids beyond the vocabulary limit at -inf), for strategies"""
    full: torch.Tensor | None = None
    """(M, V) the model's float logits, ids beyond the vocabulary limit unmasked: the rows raw log-probs are taken
    from (`token_logprobs`); None when nothing was masked (then `logits` are the model's)"""
    extra: torch.Tensor | None = None
    """(E, V) raw model logits at the step's extra positions (prompt log-probs), not sampled"""
    hidden: torch.Tensor | None = None
    """(M + E, d) the model's final hidden states at the sampled rows, then the extra ones (when asked)"""
    features: dict[int, torch.Tensor] | None = None
    """seq_id -> (n, D) hidden states at every position of its chunk, in order (drafters reading every
    position's features, lmforge.infer.features; then `hidden` is None)"""
    copy: HostCopy | None = None
    """tokens, logprobs, top values and ids on their way to the host (`to_host`)"""
    failed: dict[int, RequestError] | None = None
    """row -> the error of a request whose logits_processors failed on it (the row's token is meaningless: the
    engine aborts that request and drops it)"""

    def to_host(self) -> None:
        """Queue the copies of tokens, logprobs and top-k to host memory now, right behind the step that
        sampled them, so that reading them (`read`) waits for that step only, not for one launched since."""
        self.copy = HostCopy(self.tokens, self.logprobs, self.top_values, self.top_ids)

    def read(self) -> tuple[list, list | None, list | None, list | None]:
        """(tokens, logprobs, top values, top ids) as host lists (None where not asked for)."""
        if self.copy is None:
            self.to_host()
        return tuple(None if t is None else t.tolist() for t in self.copy.get())


_SHAPING = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
            "repetition_penalty", "frequency_penalty", "presence_penalty")


PLAIN, GREEDY = ("plain",), ("greedy",)
"""kinds of rows that need no processor but temperature, top-k and top-p (PLAIN: one batched group,
whatever their values: lmforge.infer.processors.batched_processors) or none at all (GREEDY: the argmax)"""


def kind_of(p: SamplingParams) -> tuple:
    """Rows with equal keys are processed together: the same processors with the same arguments, or
    PLAIN / GREEDY rows with their own arguments."""
    unbiased = not p.penalized and not p.logit_bias
    if unbiased and p.greedy:  # greedy ignores the filters (build_processors)
        return GREEDY
    if unbiased and (p.min_p, p.typical_p, p.epsilon_cutoff, p.eta_cutoff) == (0.0, 1.0, 0.0, 0.0):
        return PLAIN
    return tuple(getattr(p, f) for f in _SHAPING) + (tuple(sorted(p.logit_bias.items())),)


def _history(rows: list[Row], vocab: int, device) -> TokenHistory:
    """The rows' TokenHistory rebuilt from their whole token lists: the reference `token_history` keeps."""
    hist = TokenHistory.start([r.tokens for r in rows], vocab, device)
    for i, r in enumerate(rows):
        out = r.tokens[r.prompt_len:]
        if out:
            hist.counts[i].index_add_(0, torch.tensor(out, device=device), torch.ones(len(out), device=device))
    return hist


INCREMENTAL = True
"""False: penalized groups rebuild their history from the token lists every step (`_history`, the reference)"""
CHECK_HISTORY = False
"""True: every incremental history is compared with `_history` and a difference raises (tests)"""


class RowHistory:
    """One row's penalty state, its row of `_history`: counts (V,) of the output tokens and seen (V,) of all
    tokens among the first n of `src` (the row's token list, the sequence's own). It is valid while `src` has
    only grown by appending since: the same list, at least n long, tokens[n - 1] still `last` (a cut and
    regrown list is caught there; a site that rewrites tokens in place must `forget` the row)."""

    __slots__ = ("counts", "seen", "src", "n", "last", "prompt_len")

    def __init__(self, row: Row, vocab: int, device) -> None:
        hist = _history([row], vocab, device)  # built as the reference builds it: equal by construction
        self.counts, self.seen = hist.counts[0], hist.seen[0]
        self.src, self.n, self.prompt_len = row.tokens, len(row.tokens), row.prompt_len
        self.last = row.tokens[-1] if row.tokens else None

    def valid(self, row: Row, vocab: int, device, dtype) -> bool:
        toks, n = row.tokens, self.n
        return (toks is self.src and len(toks) >= n and (n == 0 or toks[n - 1] == self.last)
                and row.prompt_len == self.prompt_len and self.counts.shape[0] == vocab
                and self.counts.dtype == dtype and self.counts.device == device)


def forget(row: Row | None) -> None:
    """Drop a row's penalty state (its sequence ended, or its tokens changed other than by appending)."""
    if row is not None:
        row.history = None


def _appended(h: RowHistory, row: Row) -> list[int]:
    """The tokens appended to row's list since h's last step; h now covers them."""
    new = row.tokens[h.n:]
    h.n, h.last = len(row.tokens), row.tokens[-1]
    return new


def token_history(rows: list[Row], vocab: int, device) -> TokenHistory:
    """`_history(rows)`, bit for bit, from each row's kept state (Row.history) and the tokens appended since its
    last step: per step O(rows x V) for the batch's copy and O(new tokens) for the update, whatever the lengths.
    A row without a valid state builds it from its whole list (once: its first penalized step, or after its
    tokens changed other than by appending). The states advance in place; the returned tensors are the batch's
    own (processors may not write into them, and do not)."""
    if not INCREMENTAL or len({id(r) for r in rows}) < len(rows):  # (a row twice would advance its state twice)
        return _history(rows, vocab, device)
    device, dtype = torch.device(device), torch.get_default_dtype()  # (_history's counts: the default dtype)
    states, p_at, p_toks, at, toks = [], [], [], [], []  # (row, token) appended: prompt ones (seen only), output
    for i, r in enumerate(rows):
        h = r.history
        if h is None or not h.valid(r, vocab, device, dtype):
            h = r.history = RowHistory(r, vocab, device)
        elif len(r.tokens) > h.n:  # appended since its last step (one token, usually)
            start = h.n
            new = _appended(h, r)
            cut = min(max(r.prompt_len - start, 0), len(new))  # (a state built before its prompt was whole)
            p_at += [i] * cut
            p_toks += new[:cut]
            at += [i] * (len(new) - cut)
            toks += new[cut:]
        states.append(h)
    counts = torch.stack([h.counts for h in states])
    seen = torch.stack([h.seen for h in states])
    if p_at or at:
        idx = to_device([p_at + at, p_toks + toks], device, torch.long)  # (2, appended)
        seen[idx[0], idx[1]] = True
        out = idx[:, len(p_at):]
        counts.index_put_((out[0], out[1]), torch.ones((), dtype=counts.dtype, device=counts.device).expand(len(at)),
                          accumulate=True)
        changed = sorted(set(p_at + at))
        torch._foreach_copy_([states[i].counts for i in changed], [counts[i] for i in changed])
        torch._foreach_copy_([states[i].seen for i in changed], [seen[i] for i in changed])
    hist = TokenHistory(counts, seen)
    if CHECK_HISTORY:
        ref = _history(rows, vocab, device)
        if not (torch.equal(hist.counts, ref.counts) and torch.equal(hist.seen, ref.seen)):
            bad = [i for i in range(len(rows)) if not (torch.equal(hist.counts[i], ref.counts[i])
                                                       and torch.equal(hist.seen[i], ref.seen[i]))]
            raise AssertionError(f"incremental penalty history differs from the rebuilt one in rows {bad}")
    return hist


class SharedStream(torch.Generator):
    """A random stream many rows draw from: an engine's, for all its unseeded requests (Engine.rng). `draw` fills
    the noise of the rows drawing from it (and of rows without a generator) in one launch, where a generator of a
    row's own (a seeded request's) fills that row alone."""


def draw(probs: torch.Tensor, gens: list[torch.Generator | None]) -> torch.Tensor:
    """probs (B, V) -> (B,) one token per row by the exponential race: argmax(p / q) with q ~ Exp(1) is
    a draw from p (the Gumbel-max trick, exponentiated). torch.multinomial(p, 1) computes exactly this,
    so the tokens equal per-row multinomial calls bit for bit: a row with a generator of its own fills its row
    of q from it (the draw multinomial(p[i:i + 1], 1, generator=g) makes, whatever else is in the batch),
    then one division and one argmax serve every row. No per-row sampling call, and no device sync
    (multinomial reads its input's min and max on the host to validate it). The rows without a generator and
    those drawing from a SharedStream (at most one per batch: an engine's) fill theirs in one launch, from that
    stream (none: torch's default generator). probs is overwritten."""
    shared = next((g for g in gens if isinstance(g, SharedStream)), None)
    q = torch.empty_like(probs)
    if shared is not None or any(g is None for g in gens):
        q.exponential_(generator=shared)  # one launch for the rows drawing from a stream they share
    for i, g in enumerate(gens):
        if g is not None and g is not shared:
            q[i].exponential_(generator=g)
    return probs.div_(q).argmax(-1)


def fit_vocab(logits: torch.Tensor, width: int | None = None, limit: int | None = None, *,
              own: bool = False) -> torch.Tensor:
    """logits (..., W) as (..., width) with the ids a draw may not take at -inf: the one masking of ids past the
    tokenizer's, the sampler's and a draft model's (a draft of one would always be rejected). limit: the
    tokenizer's ids (Engine.vocab_limit); ids from it up are -inf. width: the target's logits' width (None: W), for a
    draft whose vocabulary differs only in rows past the tokenizer's ids (speculative.check_draft_vocab; Qwen2.5's
    small and large models pad the same 151,665 ids to 151,936 and 152,064 rows): its extra columns are dropped,
    missing ones -inf (probability 0: never drafted), as vLLM pads a draft's probabilities (vllm-project/vllm#13849).
    Returns `logits` itself where nothing changes (W == width, no limit below it), else one fresh tensor (`logits`
    is never written) - unless `own` (the caller's fresh forward: a draft round's logits), where a width that fits is
    masked in place, no copy."""
    have = logits.shape[-1]
    width = have if width is None else width
    keep = min(have, width, width if limit is None else limit)
    if keep == have == width:
        return logits
    if own and have == width:
        logits[..., keep:] = float("-inf")
        return logits
    out = logits.new_full((*logits.shape[:-1], width), float("-inf"))
    out[..., :keep] = logits[..., :keep]
    return out


def sample_rows(logits: torch.Tensor, rows: list[Row], vocab_limit: int | None = None) -> Sampled:
    """logits (M, V) raw model outputs, one per row -> Sampled."""
    full = logits.float()
    logits = fit_vocab(full, limit=vocab_limit)
    if logits is full:  # no padded rows to mask: `full` (the log-probs' source where it differs) is not kept
        full, vocab_limit = None, None
    raw = logits  # the model's logits, undrawable ids masked: what strategies read and draw from
    failed = None
    if any(r.params.logits_processors for r in rows):
        logits, failed = _custom(logits, rows, vocab_limit)
    tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    processed = [r.params.logprobs is not None and r.params.logprobs_mode == "processed" and not r.params.greedy
                 for r in rows]
    shaped = logits.clone() if any(processed) else None  # the rows' logits as sampled from
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.kind or kind_of(r.params), []).append(i)
    for kind, rows_of in groups.items():
        params = rows[rows_of[0]].params
        # a device index (an index list is copied to the GPU with a stream sync)
        idx = None if len(rows_of) == len(rows) else to_device(rows_of, logits.device)
        sub = logits if idx is None else logits[idx]
        if kind == PLAIN:
            sub = apply_processors(batched_processors([rows[i].params for i in rows_of], logits.device), sub, None)
        elif kind != GREEDY:
            hist = (token_history([rows[i] for i in rows_of], logits.shape[-1], logits.device)
                    if params.penalized else None)
            sub = apply_processors(build_processors(params), sub, hist)
        if not params.greedy:
            sub = only_infinite(sub)  # a row with +inf logits draws among those (softmax would be NaN)
        if shaped is not None and kind != GREEDY:
            if idx is None:
                shaped = sub
            else:
                shaped[idx] = sub
        if params.greedy:
            chosen = sub.argmax(-1)
        else:
            chosen = draw(sub.softmax(-1), [rows[i].generator for i in rows_of])
        if idx is None:
            tokens = chosen
        else:
            tokens[idx] = chosen
    model = raw if full is None else full  # 'raw' log-probs: the model's distribution over all its rows
    source = model if shaped is None else torch.where(to_device(processed, logits.device)[:, None], shaped, model)
    out = _logprobs(raw, tokens, rows, source, vocab_limit)
    out.failed, out.full = failed, full
    return out


def _custom(logits: torch.Tensor, rows: list[Row], vocab_limit: int | None = None
            ) -> tuple[torch.Tensor, dict[int, RequestError] | None]:
    """A copy of logits with each row's own logits_processors applied (SamplingParams.logits_processors:
    f(output ids, (V,) logits) -> (V,) logits, in order), and {row: error} for the rows where one raised or
    returned something other than a floating (V,) tensor, or that they left without an allowed token below
    vocab_limit (or with NaN). Ids at or beyond vocab_limit are masked again after them: a processor may not
    reopen a padded id (it cannot be detokenized). Raising here would fail the whole step, every request in the
    batch, for one request's input: a failed row keeps the model's logits (its draw is valid, and dropped)."""
    out, failed = logits.clone(), {}
    for i, r in enumerate(rows):
        if r.params.logits_processors:
            ids = r.tokens[r.prompt_len:]
            row, what, cause = out[i], None, None
            try:
                for f in r.params.logits_processors if r.processors is None else r.processors:
                    row = f(ids, row)
                    what = _bad_output(row, logits.shape[-1], f, vocab_limit)
                    if what is not None:
                        break
                else:
                    out[i] = row  # (inside the try: a device or dtype the copy refuses is this request's error)
                    if vocab_limit is not None:
                        out[i, vocab_limit:] = float("-inf")
                    kept = out[i, :vocab_limit]  # (the ids a draw may take)
                    if not bool(torch.isfinite(kept).any()) or bool(torch.isnan(kept).any()):  # (a host read per row)
                        what = "left no token allowed (or gave NaN)" + (
                            f" among the ids below {vocab_limit}, the tokenizer's; ids from {vocab_limit} up (the "
                            "model's padded rows) are never drawn" if vocab_limit is not None else "")
            except Exception as e:  # the request's own code: its error, not the engine's
                what, cause = f"raised {type(e).__name__}: {e}", e
            if what is None:
                continue
            out[i] = logits[i]  # (a processor may have written into its view of out's row)
            failed[i] = RequestError(f"request {r.request_id!r}: a logits processor {what} after {len(ids)} output "
                                     "tokens; the request was aborted. A processor must return a float tensor shaped "
                                     "like the logits it is given and allow at least one token (e.g. the "
                                     "end-of-text id once its constraint is complete)", r.request_id)
            failed[i].__cause__ = cause
    return out, failed or None


def _bad_output(row, vocab: int, f, vocab_limit: int | None) -> str | None:
    """What is wrong with a logits processor's return value (None: a floating tensor shaped (vocab,)). Only
    metadata is read (no device sync). A 0-d tensor or a bool mask would broadcast or cast silently into the
    row (every logit equal, or 0/1 logits), so they are refused like a wrong shape."""
    name = getattr(f, "__qualname__", None) or type(f).__name__
    if not isinstance(row, torch.Tensor):
        return (f"{name} returned {type(row).__name__}, not a torch.Tensor: return the (modified) logits tensor "
                "it was given")
    if tuple(row.shape) != (vocab,):
        sized = (f" (the model's rows, more than the tokenizer's {vocab_limit}: build masks with "
                 "logits.shape[-1] or torch.full_like(logits, ...), not the tokenizer's vocab_size)"
                 if vocab_limit is not None else "")
        return (f"{name} returned a tensor of shape {tuple(row.shape)}, but the logits it is given have shape "
                f"({vocab},){sized}: return a tensor of that exact shape")
    if not row.dtype.is_floating_point:
        return (f"{name} returned a {row.dtype} tensor: return float logits (-inf forbids a token), not a mask; "
                "e.g. logits.masked_fill(~allowed, float('-inf'))")
    return None


def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[Row], source: torch.Tensor | None = None,
              vocab_limit: int | None = None) -> Sampled:
    """source: the logits the log-probs are taken from (the model's, unmasked; rows with
    logprobs_mode='processed': as sampled)."""
    want = [r.params.logprobs for r in rows if r.params.logprobs is not None]
    if not want:
        return Sampled(tokens, None, None, None, logits)
    return Sampled(tokens, *token_logprobs(logits if source is None else source, tokens, max(want), vocab_limit),
                   logits)


def logprob_entries(logits: torch.Tensor, targets: list[int], ks: list[int], vocab_limit: int | None = None
                    ) -> list[dict[int, float]]:
    """Per row: {target: log p(target), then the row's k most likely ids: their log p} (vLLM's prompt
    log-prob entries; the target first, and once if it is among the top k). The first of the top ids is the
    argmax, greedy decoding's choice on ties (token_logprobs): with k = 1 the entry's last key is that id."""
    chosen, values, ids = token_logprobs(logits, torch.tensor(targets, device=logits.device), max(ks), vocab_limit)
    top = zip(ids.tolist(), values.tolist()) if ids is not None else (([], []) for _ in targets)
    return [{t: lp, **dict(zip(i[:k], v[:k]))} for t, lp, k, (i, v) in zip(targets, chosen.tolist(), ks, top)]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int, vocab_limit: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """logits (M, V), tokens (M,) -> log p(tokens) (M,) and the k most likely (values, ids) (M, k) (None
    for k = 0) under log_softmax of the logits over all V ids: the semantics of generated and prompt log-probs
    alike, a plain forward's. Ids at or beyond vocab_limit (a padded vocabulary's rows past the tokenizer's) keep
    their mass in that normalisation but are never listed: the top ids are the k (at most vocab_limit) most
    likely among the ids below it, with their values under the full distribution (so they need not sum to 1
    even for k = vocab_limit). The first id is the argmax of the logits below vocab_limit, the first maximal
    id: what greedy decoding picks (sample_rows) and lm-eval's is_greedy compares with; topk's order among tied
    values is unspecified."""
    logits = logits.float()
    logp = logits.log_softmax(-1)
    chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:  # listed ids: those a tokenizer can decode
        logits, logp = logits[:, :vocab_limit], logp[:, :vocab_limit]
    k = min(k, logp.shape[-1])
    if k == 0:
        return chosen, None, None
    values, ids = logp.topk(k, dim=-1)
    # put the argmax first: swapped with column 0 where topk has it elsewhere, else in column 0's place. Its
    # log-prob equals column 0's (x - lse rounds monotonically), so the values keep their order
    first = logits.argmax(-1, keepdim=True)  # (M, 1)
    hit = ids == first
    at = torch.where(hit.any(-1, keepdim=True), hit.int().argmax(-1, keepdim=True), 0)  # (M, 1)
    ids = ids.scatter(1, at, ids[:, :1]).scatter(1, torch.zeros_like(at), first)
    return chosen, values, ids
