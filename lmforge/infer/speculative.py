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
q is one-hot), or the target's own multi-token-prediction heads (`MTPDrafter`). A drafter object is
anything with `propose(ctx, k, procs, greedy, gen) -> (drafts, q (len(drafts), V))`, and optionally
`accept(seq_id, ctx_len)` (sequence seq_id's verified context now has ctx_len tokens: forget drafts past it;
a drafter object is shared by every sequence of the engine, hence the id); it may also define
`propose_batch(items: list[DraftItem]) -> [(drafts, q), ...]`, one answer per item: the engine then asks it
once per step for every speculative sequence (`propose_step`), so a head runs one forward per depth for the
whole batch instead of one per sequence; `propose` stays the one-sequence form (and the reference);
with `uses_hidden_states` (EAGLE, Medusa) propose also gets `hidden=` the target's features: with True the
final hidden state (after its final norm, Transformer.forward(return_hidden=True)) at ctx[-2], whose logits
gave ctx[-1]; with "all" (EAGLE) every verified position's, each once, in order (`Features`); hidden_layers
picks blocks' outputs instead (EAGLE-3). lmforge.infer.features has the alignment rules; such a drafter may
define `release(seq_id)`, called when a sequence ends. An "all" head module with `pairs` and `cache_spec` (no
propose needed) is run by the engine with its attention cache in the pool's blocks, batched
(lmforge.infer.draft.PagedDraftHead; DraftItem.block_table says where).
A drafter may propose a token tree instead, `(DraftTree(tokens, parents), q (N, V) or None)`, when it says
so with `proposes_trees = True` and `tree_size` (the nodes the scheduler reserves room for), verified by
walking the tree: into the argmax's child when greedy, by SpecInfer's multi-step speculative sampling when
sampled (lmforge.infer.token_tree, e.g. TreeDrafter).
Which drafts are kept is the drafter's `acceptance` (an AcceptanceRule; absent: `ExactAcceptance`, the rules
above, which keep the target's output law): `TypicalAcceptance` is Medusa's typical acceptance, which trades
that exactness for longer accepted runs.

`Speculative` is the strategy that runs it on the engine, for every sequence of every request at once (but
beam searches and requests with penalties or logits_processors, which run plain beside them: `speculates`):
the scheduler reserves cache room for k drafts beyond a sequence's pending token (Request.lookahead),
the drafter proposes, the target scores pending token + drafts as one chunk of the engine's flat batch
with logits at each of those positions, and the verified tokens go through the engine's usual token
path (stop tokens, stop strings, logprobs, max_tokens). Rejected drafts are cut from the sequence; the
cache slots they wrote are simply overwritten later (attention only reads up to each context length).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import dataclass
from typing import Callable

import torch

from lmforge.config import check, is_int
from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.acceptance import (  # noqa: F401 (the rules' home is lmforge.infer.acceptance)
    EXACT,
    AcceptanceRule,
    TypicalAcceptance,
    _draw,
    acceptance_of,
    verify,
)
from lmforge.infer.features import FeatureStream, HiddenAsk, hidden_ask
from lmforge.infer.processors import apply_processors, build_processors
from lmforge.infer.runner import PagedRunner
from lmforge.infer.sampler import fit_vocab, forget, token_logprobs
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.token_tree import DraftTree, TreeDrafter
from lmforge.model.cache import KVCache
from lmforge.model.meta import accepted_slots
from lmforge.utils import eval_mode

NEEDS_Q = ("a sampled request verifies drafts against the distribution each was drawn from, but q is None; set "
           "temperature=0, or return q (len(drafts), V)")


def _probs(logits: torch.Tensor, procs, greedy: bool) -> torch.Tensor:
    """(T, V) logits -> the distribution actually sampled from (one-hot argmax when greedy)."""
    logits = apply_processors(procs, logits.float(), None)
    if greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return logits.softmax(-1)


@dataclass(frozen=True)
class DrafterFactory:
    """seq -> a fresh drafter for it (make), the rule every sequence's drafts are verified by, and the target's
    vocabulary size (the logits' width: drafts are ids below it, q rows this wide)."""

    make: Callable
    vocab_size: int
    acceptance: AcceptanceRule = EXACT
    trusted: bool = False
    """the drafters `make` builds are lmforge's own (prompt lookup, MTP heads, a draft model: make_drafter_factory),
    whose answers are valid by construction - at most the asked drafts, ids below vocab_size, q (len(drafts),
    vocab_size) - so `Speculative.take` does not check them (about 4.5 us a sequence a step on a CPU, 1 ms of host
    time a step at 256 sequences). False for a user's drafter object: its answers are checked"""

    def __call__(self, seq):
        return self.make(seq)


class ModelDrafter:
    """A small model sharing the target's tokenizer; keeps its own KV cache of the accepted context. vocab_size:
    the target's (its logits' width: the draft's are fitted to it, fit_vocab; None: the draft's own); limit: the
    tokenizer's ids."""

    def __init__(self, model, max_len: int, vocab_size: int | None = None, limit: int | None = None):
        self.model, self.limit = model, limit
        self.vocab_size = model.cache_spec().vocab_size if vocab_size is None else vocab_size
        self.cache = KVCache.for_model(model, 1, max_len)

    def propose(self, ctx: list[int], k: int, procs, greedy: bool, gen) -> tuple[list[int], torch.Tensor]:
        dev = self.cache.k.device
        feed = ctx[self.cache.length:]
        drafts, qs = [], [torch.zeros(0, self.vocab_size, device=dev)]
        with eval_mode(self.model):  # no dropout in drafting; the caller's model left in its own mode
            for i in range(k):
                logits = fit_vocab(self.model(torch.tensor([feed], device=dev), cache=self.cache)[0, -1:],
                                   self.vocab_size, self.limit, own=True)
                q = _probs(logits, procs, greedy)[0]
                drafts.append(_draw(q, gen) if not greedy else int(q.argmax()))
                qs.append(q[None])
                feed = drafts[-1:]
        return drafts, torch.cat(qs)

    def accept(self, seq_id: int, ctx_len: int) -> None:
        """The verified context now has ctx_len tokens: forget cached drafts beyond it (one drafter per sequence)."""
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


class MTPDrafter:
    """Drafts from the target's own multi-token-prediction heads (Gloeckle et al. 2024 'parallel' heads:
    at the last position, head k predicts token t+1+k; the main head gives the first draft). One uncached
    `forward_mtp` per round - the hook, not yet a fast path; verification keeps the output exact."""

    def __init__(self, model, limit: int | None = None):
        """limit: the tokenizer's ids (Engine.vocab_limit): ids past it are never drafted (fit_vocab)."""
        mtp = getattr(model.cfg, "mtp", None)
        if mtp is None or mtp.kind != "parallel":
            raise ConfigError("draft='mtp' needs a model with parallel MTP heads (model.mtp.kind='parallel')")
        self.model, self.limit = model, limit

    def propose(self, ctx: list[int], k: int, procs, greedy: bool, gen) -> tuple[list[int], torch.Tensor]:
        dev = next(self.model.parameters()).device
        main, heads = self.model.forward_mtp(torch.tensor([ctx], device=dev))
        logits = fit_vocab(torch.cat([main[0, -1:]] + [h[0, -1:] for h in heads])[:k], None, self.limit, own=True)
        q = _probs(logits, procs, greedy)
        drafts = [int(q[i].argmax()) if greedy else _draw(q[i], gen) for i in range(q.shape[0])]
        return drafts, q


@dataclass
class SpecStats:
    """drafted: tokens proposed (a tree's nodes); accepted: drafts verification kept (a stop among them emits
    fewer: this measures the drafter, not the output); reachable: the most each round
    could have accepted (a chain's length, a tree's depth), so acceptance_rate = accepted / reachable reads
    the same for chains and trees. tokens_per_forward (emitted tokens / target forwards) is the number to
    compare drafters by: it counts the bonus token and whatever a tree's width bought. seconds: the wall time
    speculative_generate measured (not in a request's metrics, which the engine times itself)."""

    drafted: int = 0
    accepted: int = 0
    reachable: int = 0
    target_forwards: int = 0
    seconds: float = 0.0

    def as_dict(self, emitted: int) -> dict:
        return {"drafted": self.drafted, "accepted": self.accepted, "target_forwards": self.target_forwards,
                "acceptance_rate": self.accepted / max(self.reachable, 1),
                "tokens_per_forward": emitted / max(self.target_forwards, 1)}


NOT_SPECULATIVE = ("a request with repetition/frequency/presence penalties or logits_processors does not decode "
                   "speculatively (drafts are verified against the model's own distribution): an Engine with a draft "
                   "runs it without speculation, speculative_generate cannot")


def speculates(params: SamplingParams) -> bool:
    """Whether a request runs speculatively on an engine with a drafter. Not with penalties or logits_processors:
    they read every earlier output token, which each draft changes, and drafts are verified against the model's
    own distribution. The engine runs those requests plain beside the speculative ones (as it runs beam
    searches), so their outputs are an engine's without a drafter."""
    return not (params.penalized or params.logits_processors)


class Speculative:
    """The strategy of one request on an engine with a draft (see the module docstring)."""

    def __init__(self, request, make_drafter, k: int, hidden: HiddenAsk | None = None):
        p = request.params
        if not speculates(p):  # (the engine gives such requests no strategy: `speculates`)
            raise ConfigError(NOT_SPECULATIVE)
        self.request, self.make_drafter, self.k, self.hidden = request, make_drafter, k, hidden
        self.acceptance: AcceptanceRule = make_drafter.acceptance  # (a DrafterFactory)
        self.vocab_size: int = make_drafter.vocab_size
        self.trusted: bool = make_drafter.trusted
        if hidden is not None and hidden.every:  # forks copy it (Engine.fork)
            request.seqs[0].features = FeatureStream()
        self.procs = build_processors(p)
        self.drafters: dict[int, object] = {}
        self.pending: dict[int, tuple[list[int], torch.Tensor]] = {}
        self.stats = SpecStats(target_forwards=1)  # the prefill forward gives the first token
        request.lookahead = k

    def claims(self, seq) -> bool:
        return seq.seq_id in self.pending

    def budget(self, engine, seq, room: int) -> int | None:
        """Drafts seq may take this step; None before its first token (the prefill samples normally); 0 while
        its restarted feature stream (lmforge.infer.features.FeatureStream.restart) is behind its context."""
        if not seq.request.forked:
            return None
        if seq.features is not None and seq.features.next < len(seq.tokens) - 1:
            return 0  # a restarted stream (a paged head's sequence, preempted): this chunk computes what drafts read
        p = seq.params
        return max(0, min(self.k, room, p.max_tokens - seq.num_output - 1, engine.max_seq_len - len(seq.tokens) - 1))

    def drafter(self, seq):
        """seq's drafter: its own (prompt lookup, MTP, a small model) or the engine's one drafter object."""
        return self.drafters.get(seq.seq_id) or self.drafters.setdefault(seq.seq_id, self.make_drafter(seq))

    def ask(self, seq, budget: int) -> DraftItem:
        """What seq's drafter gets this step (an "all" drafter's features are taken from the stream here)."""
        hidden = (None if self.hidden is None else seq.hidden if not self.hidden.every
                  else seq.features.take(seq.seq_id, len(seq.tokens)))
        return DraftItem(seq.seq_id, seq.tokens, budget, self.procs, seq.params.greedy, seq.generator, hidden,
                         seq.block_table)

    def take(self, seq, budget: int, answer) -> tuple[list[int] | DraftTree, torch.Tensor | None]:
        """A drafter's answer (drafts, q) for seq, checked (a user's drafter object gets a one-line error naming
        it, not a failure deep in the step) and trimmed to the room the step has for it: a chain's first
        `budget` drafts, a tree's first nodes. lmforge's own drafters' answers (DrafterFactory.trusted) are valid
        and within the budget by construction: taken as they are."""
        return answer if self.trusted else self._checked(seq, budget, answer)

    def _checked(self, seq, budget: int, answer) -> tuple[list[int] | DraftTree, torch.Tensor | None]:
        """take's checks and trimming of a user's drafter's answer."""
        if not (isinstance(answer, (tuple, list)) and len(answer) == 2):
            raise LmforgeError(f"{self._who(seq)} must be a pair (drafts, q), got {answer!r:.80}")
        drafts, q = answer
        if isinstance(drafts, DraftTree):
            drafts = drafts.first(budget)
        else:
            ids = drafts.tolist() if isinstance(drafts, torch.Tensor) and drafts.dim() == 1 else drafts
            if not (isinstance(ids, (list, tuple)) and all(is_int(t) for t in ids)):
                raise LmforgeError(f"{self._who(seq)}: drafts must be a list of token ids or a DraftTree, got "
                                   f"{drafts!r:.80}")
            drafts = [int(t) for t in ids[:budget]]
        tokens = drafts.tokens if isinstance(drafts, DraftTree) else drafts
        bad = next((t for t in tokens if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise LmforgeError(f"{self._who(seq)} has token id {bad}, outside the model's vocabulary "
                               f"[0, {self.vocab_size})")
        if not (len(drafts) and self.acceptance.needs_q):  # (typical acceptance reads no q)
            return drafts, q
        if q is None:
            if not seq.params.greedy:
                raise ConfigError(f"{self._who(seq)}: {NEEDS_Q}")
            return drafts, None  # a greedy verification matches the target's argmax (ExactAcceptance)
        if not (isinstance(q, torch.Tensor) and q.dim() == 2 and q.shape[0] >= len(drafts)
                and q.shape[1] == self.vocab_size):
            shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
            raise LmforgeError(f"{self._who(seq)}: q must be (len(drafts), V) = ({len(drafts)}, {self.vocab_size}), "
                               f"the distribution each draft was drawn from, got {shape}")
        return drafts, q[:len(drafts)]

    def _who(self, seq) -> str:
        """Whose answer take refuses (built only then: take runs for every sequence at every step)."""
        return f"{type(self.drafter(seq)).__name__}'s proposal"

    def set_drafts(self, seq, drafts: list[int] | DraftTree, q) -> int:
        """The target scores them this step: they join the sequence's tokens until verified (a tree's
        nodes in node order, lmforge.infer.token_tree)."""
        self.pending[seq.seq_id] = (drafts, q)
        seq.tokens += drafts.tokens if isinstance(drafts, DraftTree) else drafts
        return len(drafts)

    def tree(self, seq) -> list[int] | None:
        """Parents of the token tree seq's chunk ends in this step (pending token first), None for a chain."""
        drafts = self.pending[seq.seq_id][0]
        return drafts.chunk_parents() if isinstance(drafts, DraftTree) and len(drafts) else None

    def rows(self, seq, n: int):
        from lmforge.infer.runner import row_for

        d = len(self.pending[seq.seq_id][0])
        return [(d - i, row_for(seq, None)) for i in range(d + 1)]

    def on_logits(self, engine, seq, rows: list[int], sampled) -> None:
        drafts, q = self.pending.pop(seq.seq_id)
        logits = sampled.logits[rows]  # (d + 1, V): after the pending token and after each draft (node)
        p = _probs(logits, self.procs, seq.params.greedy)
        L = len(seq.tokens) - len(drafts)
        if isinstance(drafts, DraftTree):
            accepted, at, nxt = self._walk(engine, seq, drafts, p, q)
        else:
            a, nxt = self.acceptance.chain(p, q, drafts, seq.params.greedy, seq.generator)
            accepted, at = drafts[:a], list(range(a + 1))
        # at[i]: the logits row emitted token i was verified or drawn against
        if sampled.hidden is not None:  # features of the last verified input token, whose logits gave nxt
            seq.hidden = sampled.hidden[rows[at[-1]]]
        if sampled.features is not None and seq.seq_id in sampled.features:
            _push_verified(seq.features, sampled.features[seq.seq_id], len(drafts), at, L - 1)
        st = self.stats
        st.drafted, st.accepted = st.drafted + len(drafts), st.accepted + len(accepted)
        st.reachable += drafts.depth if isinstance(drafts, DraftTree) else len(drafts)
        st.target_forwards += 1
        del seq.tokens[L:]
        forget(seq.row)  # tokens cut, not appended: a penalties' state of them is stale (sampler.token_history)
        seq.num_computed = L  # the pending token's keys were written in this forward
        if engine.has_state:  # recurrent layers: the state after the pending token and the accepted drafts
            engine.runner.cache.verified(seq.seq_id, 1 + len(accepted))
        new = accepted + [nxt]
        k = seq.params.logprobs
        shaped = seq.params.logprobs_mode == "processed" and not seq.params.greedy
        lps, tops = [None] * len(new), [{}] * len(new)
        if k is not None and shaped:  # the distribution p the tokens were verified and drawn against (above)
            logp = p.log()
            for i, tok in enumerate(new):
                lps[i] = float(logp[at[i], tok])
                if k:
                    vals, ids = logp[at[i]].topk(min(k, logp.shape[-1]))
                    tops[i] = dict(zip(ids.tolist(), vals.tolist()))
        elif k is not None:  # raw: the model's own distribution over all its rows (sampler.token_logprobs)
            full = sampled.full if sampled.full is not None else sampled.logits
            lp, vals, ids = token_logprobs(full[[rows[j] for j in at]], torch.tensor(new, device=full.device), k,
                                           engine.vocab_limit)
            lps = lp.tolist()
            if k:
                tops = [dict(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
        for i, tok in enumerate(new):
            engine.accept(seq, tok, lps[i], tops[i])
            if seq.finish is not None:
                return
            if i < len(accepted):
                seq.num_computed += 1  # an accepted draft was this forward's input at its position
        drafter = self.drafters.get(seq.seq_id)
        if hasattr(drafter, "accept"):
            drafter.accept(seq.seq_id, len(seq.tokens) - 1)
        if engine.draft_model is not None:
            engine.draft_model.accept(seq, len(seq.tokens) - 1)

    def _walk(self, engine, seq, tree: DraftTree, p: torch.Tensor, q) -> tuple[list[int], list[int], int]:
        """Tree verification by the acceptance rule: (accepted tokens, logits row of each emitted token, the
        next token). The accepted nodes' keys/values, written in node order after the root, move to the
        positions right after it in every layer."""
        path, nxt = self.acceptance.tree(tree, p, q, seq.params.greedy, seq.generator)
        src, dst = accepted_slots(tree.parents, path, len(seq.tokens) - len(tree))
        if src:
            engine.runner.move_positions(seq.block_table, src, dst)
        if engine.draft_model is not None:  # a draft model drafting trees on the pool moves its own keys
            engine.draft_model.tree_accepted(seq, path, src, dst)
        return [tree.tokens[i] for i in path], [0] + [i + 1 for i in path], nxt

    def metrics(self) -> dict:
        return self.stats.as_dict(sum(s.num_output for s in self.request.seqs))

    def release(self, seq) -> None:
        """seq finished or was aborted (the engine's release event): its drafter state goes."""
        self.pending.pop(seq.seq_id, None)
        drafter = self.drafters.pop(seq.seq_id, None)
        if hasattr(drafter, "release"):
            drafter.release(seq.seq_id)


@dataclass(frozen=True)
class DraftItem:
    """One speculative sequence's ask in a step (a drafter's propose_batch gets one per sequence): what
    propose(ctx, k, procs, greedy, gen, hidden=) gets, and the sequence's id."""

    seq_id: int
    ctx: list[int]
    """the verified context, ending in the pending token (read it, do not keep it: it grows)"""
    k: int
    """at most this many drafts (the engine trims a longer answer: a chain to its first k, a tree to its first
    k nodes)"""
    procs: list
    greedy: bool
    gen: torch.Generator | None
    """the sequence's random stream (sampled requests): draw each sequence's drafts from its own"""
    hidden: object = None
    """with uses_hidden_states: the (D,) feature (True) or Features ("all"); None otherwise"""
    block_table: list[int] | None = None
    """the sequence's blocks in the engine's pool (read it, do not keep it): a drafter whose cache shares the
    target's block ids writes at the same slots (lmforge.infer.draft.PagedDraftHead)"""


def propose_step(todo: list[tuple[object, int]]) -> dict[int, tuple[list[int] | DraftTree, torch.Tensor | None]]:
    """todo: (seq, budget) of every sequence drafting this step -> seq_id -> (drafts, q). A drafter object
    with propose_batch is asked once for all its sequences (in todo's order); others, one sequence at a time."""
    out, groups = {}, {}
    for seq, budget in todo:
        if budget <= 0:
            out[seq.seq_id] = ([], None)
            continue
        strategy = seq.request.strategy
        drafter, item = strategy.drafter(seq), strategy.ask(seq, budget)
        if getattr(drafter, "propose_batch", None) is not None:
            groups.setdefault(id(drafter), (drafter, []))[1].append((seq, item))
            continue
        kw = {} if strategy.hidden is None else {"hidden": item.hidden}
        with torch.inference_mode(), _eval(drafter):
            drafts = drafter.propose(item.ctx, budget, item.procs, item.greedy, item.gen, **kw)
        out[seq.seq_id] = strategy.take(seq, budget, drafts)
    for drafter, members in groups.values():
        with torch.inference_mode(), _eval(drafter):
            answers = drafter.propose_batch([item for _, item in members])
        if len(answers) != len(members):
            raise LmforgeError(f"{type(drafter).__name__}.propose_batch answered {len(answers)} of "
                               f"{len(members)} items; return one (drafts, q) per item, in order")
        for (seq, item), answer in zip(members, answers):
            out[seq.seq_id] = seq.request.strategy.take(seq, item.k, answer)
    return out


def _eval(drafter):
    """A drafter that is a module (a user's Medusa-style heads) drafts in eval mode, left in the caller's mode."""
    return eval_mode(drafter) if isinstance(drafter, torch.nn.Module) else contextlib.nullcontext()


def _push_verified(stream: FeatureStream, states: torch.Tensor, d: int, at: list[int], pending: int) -> None:
    """states (n, D): every position of a sequence's chunk this step, ending in its pending token (at
    position `pending`) + d drafts (a chain, or tree nodes in node order). The chain part and the pending
    token are verified; of the drafts only the accepted ones (at[1:]: their rows after the pending token's,
    in path order), now at the positions right after the pending token."""
    root = states.shape[0] - d - 1  # the pending token's row
    if at == list(range(len(at))):  # a chain (or a tree's first-children path): one slice
        kept = states[:root + len(at)]
    else:
        kept = states[torch.tensor(list(range(root)) + [root + i for i in at], device=states.device)]
    stream.push(pending - root, kept)


def make_drafter_factory(draft, model, vocab_size: int, k: int, tokens: int | None = None,
                         acceptance: AcceptanceRule = EXACT) -> DrafterFactory:
    """seq -> a fresh drafter for it: draft is 'ngram', 'mtp', a draft model, or a drafter object (the one kind
    whose answers take checks: the others are lmforge's own, DrafterFactory.trusted). tokens: the tokenizer's ids
    (check_draft_vocab)."""
    if draft == "ngram":
        return DrafterFactory(lambda seq: NGramDrafter(vocab_size=vocab_size), vocab_size, acceptance, trusted=True)
    if draft == "mtp":
        MTPDrafter(model)  # raises now if the model has no parallel MTP heads
        return DrafterFactory(lambda seq: MTPDrafter(model, tokens), vocab_size, acceptance, trusted=True)
    if hasattr(draft, "propose") or hasattr(draft, "propose_batch"):  # a drafter object (a module or not)
        _check_accept(draft)
        return DrafterFactory(lambda seq: draft, vocab_size, acceptance)
    if isinstance(draft, torch.nn.Module):  # only without a paged draft model (lmforge.infer.draft)
        check_draft_vocab(draft, vocab_size, tokens)
        return DrafterFactory(lambda seq: ModelDrafter(draft, seq.request.prompt_len + seq.params.max_tokens + k + 1,
                                                       vocab_size, tokens), vocab_size, acceptance, trusted=True)
    raise ConfigError(f"draft must be None, 'ngram', 'mtp', a draft model or a drafter, got {draft!r}")


def check_draft_vocab(model, vocab_size: int, tokens: int | None = None) -> None:
    """A draft model (a chain's, a TreeDrafter's) must have the target's vocabulary: its distributions are compared
    with the target's token by token, and it reads the target's token ids. Its width may differ where both hold
    every one of the tokenizer's `tokens` ids (the rest are padding rows: fit_vocab); None: the target's width."""
    from lmforge.infer.config import limits

    draft_vocab = limits(model, model.cache_spec() if hasattr(model, "cache_spec") else None)[1]
    tokens = vocab_size if tokens is None else tokens
    if draft_vocab != vocab_size and min(draft_vocab, vocab_size) < tokens:
        raise ConfigError(f"the draft model's vocabulary ({draft_vocab}) differs from the target's ({vocab_size}) "
                          f"and lacks ids of the tokenizer's {tokens}: speculative decoding compares their "
                          "distributions token by token; use a draft with the target's tokenizer (its width may "
                          "differ only in padding rows past the tokenizer's ids)")


def _check_accept(draft) -> None:
    """A shared drafter object's accept must say which sequence it means: accept(seq_id, ctx_len)."""
    fn = getattr(draft, "accept", None)
    if fn is None:
        return
    params = list(inspect.signature(fn).parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != 2:
        raise ConfigError(f"{type(draft).__name__}.accept{inspect.signature(fn)}: a drafter object is shared by every "
                          "sequence, so the engine calls accept(seq_id, ctx_len); add the seq_id parameter "
                          "(or drop accept if the drafter keeps no drafts)")


def speculative_generate(target, drafter, prompt: list[int], params: SamplingParams, k: int, eos: set[int],
                         max_seq_len: int, gen: torch.Generator | None = None) -> tuple[list[int], SpecStats]:
    """One prompt on a fresh engine with this drafter (for benchmarks and tests); returns the tokens and
    the acceptance stats. gen seeds the request's random stream."""
    from lmforge.infer.detok import IdTokenizer
    from lmforge.infer.engine import Engine, EngineConfig

    if not speculates(params):  # (its stats are a speculative request's: this one would run plain)
        raise ConfigError(NOT_SPECULATIVE)
    seed = int(torch.randint(2**62, (1,), generator=gen)) if gen is not None else params.seed
    params = params.derived(seed=seed, stop_token_ids=tuple(eos), n=1)
    vocab = target.cache_spec().vocab_size
    tokens = min(max_seq_len, len(prompt) + params.max_tokens + k + 1)
    engine = Engine(target, IdTokenizer(vocab), EngineConfig(num_kv_tokens=-(-tokens // 16) * 16 + 16),
                    draft=drafter, num_draft_tokens=k)
    rid = engine.add_request(list(prompt), params)
    stats, out, t0 = engine.requests[rid].strategy.stats, None, time.perf_counter()
    while engine.has_unfinished():
        out = next((o for o in engine.step() if o.request_id == rid and o.finished), out)
    stats.seconds = time.perf_counter() - t0
    return out.token_ids, stats


def attach_drafter(engine, draft, num_draft_tokens: int, num_blocks: int, acceptance=None) -> None:
    """The engine's drafting state for `draft` (None: no speculative decoding): what the drafter reads of the
    target (`hidden`), its factory, a draft model or EAGLE-style head on the engine's block pool
    (lmforge.infer.draft), and verify chunks (chains and trees) on the decode graphs. acceptance: the rule
    drafts are verified by (lmforge.infer.acceptance; None: the drafter's own `acceptance`, else the exact one)."""
    if draft is None and acceptance is not None:
        raise ConfigError("acceptance= applies to speculative decoding: give a draft too (draft='mtp', 'ngram', a "
                          "draft model or a drafter), or drop acceptance")
    engine.draft_trees = bool(getattr(draft, "proposes_trees", False))
    if engine.draft_trees and not isinstance(engine.runner, PagedRunner):
        raise ConfigError(f"a tree drafter needs a model with cache_spec() (the paged runner); "
                          f"{type(engine.model).__name__} has none: use a chain drafter (a draft model, 'ngram')")
    engine.num_draft_tokens = draft.tree_size if engine.draft_trees else num_draft_tokens
    engine.make_drafter, engine.draft_model, engine.draft_head = None, None, None
    engine.hidden = hidden_ask(draft, engine.model)  # what a drafter reads of the target (lmforge.infer.features)
    if draft is None:
        return
    from lmforge.infer.draft import (  # (draft imports this module)
        PagedDraftHead,
        PagedDraftModel,
        is_draft_head,
    )

    check(is_int(num_draft_tokens) and num_draft_tokens >= 0,
          f"num_draft_tokens must be an int >= 0, got {num_draft_tokens!r}")
    acceptance = acceptance_of(draft, acceptance)  # (the user's object: a head is wrapped below)
    paged = isinstance(engine.runner, PagedRunner)
    if is_draft_head(draft):  # an EAGLE-style head whose cache shares the pool's blocks (infer.draft)
        draft = engine.draft_head = PagedDraftHead.for_engine(engine, draft, num_blocks)
        engine.scheduler.features_cached = True  # hits resume from the features kept with the blocks
    tokens = engine.vocab_limit or engine.vocab_size  # the tokenizer's ids (past them, padding rows)
    engine.make_drafter = make_drafter_factory(draft, engine.model, engine.vocab_size, engine.num_draft_tokens, tokens,
                                               acceptance)
    model = pool_model(draft)
    if model is not None and model is not draft:  # a TreeDrafter's draft model (a chain's: make_drafter_factory)
        check_draft_vocab(model, engine.vocab_size, tokens)
    if paged and model is not None and engine.draft_head is None:  # a draft model (or a TreeDrafter's) on the pool
        engine.draft_model = PagedDraftModel(model, num_blocks, engine.config.block_size, engine.device,
                                             graphs=engine.runner.graphs_mode, max_batch=engine.config.max_num_seqs,
                                             chunk_rows=1 + engine.num_draft_tokens,
                                             mixed_tokens=engine.runner.mixed_tokens,
                                             fit=draft.fit if model is not draft else None,
                                             window=engine.max_seq_len,
                                             vocab=(engine.vocab_size, engine.vocab_limit))
    if paged:  # verify chunks (chains, trees) replay graphs too
        engine.runner.allow_chunks(1 + engine.num_draft_tokens, trees=engine.draft_trees)


def pool_model(draft):
    """What of a draft keeps a cache on the engine's pool (its bytes per token count in it): a draft model
    (cache_spec(), no propose), a TreeDrafter's draft model (its own propose, not a subclass's), an EAGLE-style
    head (cache_spec and pairs); None for drafters without one ('ngram', 'mtp', drafter objects, models without
    cache_spec)."""
    model = draft.model if isinstance(draft, TreeDrafter) and type(draft).propose is TreeDrafter.propose else draft
    return model if callable(getattr(model, "cache_spec", None)) and not hasattr(model, "propose") else None


def draft_step(engine, batch) -> None:
    """Speculative requests scheduled for their last token extend that chunk by their drafts (the
    scheduler reserved room for them: Request.lookahead). A draft model drafts for all at once, and so
    does a drafter object with propose_batch (lmforge.infer.speculative.propose_step); it also computes the
    prompts of requests whose n > 1 samples fork after this step, once for all of them (PagedDraftModel.prefill)."""
    todo, forking = [], []
    for i, (seq, n) in enumerate(batch.chunks):
        strategy = seq.request.strategy
        if hasattr(strategy, "budget") and n == seq.remaining:
            k = strategy.budget(engine, seq, batch.room.get(seq.seq_id, 0))
            if k is not None:
                todo.append((i, seq, k))
            elif seq.params.n > 1 and seq.params.max_tokens - 1 > 1:
                # its samples fork after this step; each drafts while more than its next token is left after the
                # first (`budget`: max_tokens - num_output - 1 > 0 at num_output = 1), so only then is the prompt
                # worth the draft model's keys
                forking.append(seq)
    if forking and engine.draft_model is not None:  # the prompt's draft keys once, for every sample
        engine.draft_model.prefill(forking)
    if not todo:
        return
    if engine.draft_model is not None:
        items = [(s, k, s.request.strategy.procs, s.params.greedy) for _, s, k in todo if k > 0]
        drafts = engine.draft_model.propose(items, _probs) if items else {}
    else:  # drafter objects: once for the step when they batch (propose_batch), else per sequence
        drafts = propose_step([(s, k) for _, s, k in todo])
    for i, seq, _ in todo:
        strategy = seq.request.strategy
        d = strategy.set_drafts(seq, *drafts.get(seq.seq_id, ([], None)))
        batch.chunks[i] = (seq, batch.chunks[i][1] + d)
        if d:
            batch.drafts[seq.seq_id] = d
        tree = strategy.tree(seq)
        if tree is not None:  # the chunk ends in a token tree: positions and mask follow it (runner)
            batch.trees[seq.seq_id] = tree
