"""Drafters whose KV cache lives in the engine's block pool, drafting for the whole batch at once: a draft
model (`PagedDraftModel`) and an EAGLE-style draft head over the target's features (`PagedDraftHead`).

The draft model keeps its own paged cache with the same block size and the same block ids as the
target's: a sequence's block table addresses both (vLLM's layout), so the draft needs no tables, no
allocation and no preemption logic of its own. Each round of drafting is one flat forward of the draft
model over every speculating sequence: the first feeds each sequence's tokens the draft has not seen
yet (its context since the last verified position, a small prefill), the next ones one draft token
each. Draft keys are valid up to the verified prefix (`accept`); a preempted sequence's blocks were
freed, so its draft state restarts from zero. A request of n > 1 samples has its prompt's draft keys
computed once, in the step that prefills it (`prefill`): its samples fork from the prompt's blocks (shared,
the last one copied on write with the draft keys in it) and start their catch-up after the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.processors import apply_processors
from lmforge.infer.runner import PagedRunner
from lmforge.infer.scheduler import Batch
from lmforge.infer.sampler import fit_vocab
from lmforge.infer.speculative import _probs
from lmforge.infer.token_tree import DraftTree
from lmforge.utils import eval_mode


@dataclass
class _View:
    """What PagedRunner.prepare reads of a sequence: the draft's own token and progress counts."""

    tokens: list[int]
    num_computed: int
    block_table: list[int]
    seq_id: int
    evicted: int = 0
    """keys dropped by a KV policy (Sequence.evicted): the draft's own cache keeps every key"""
    pos_shift: int = 0
    """positions within the cache (Sequence.pos_shift): a draft's queries keep the text's positions"""


class PagedDraftModel:
    """A draft model whose cache shares the target's block ids (the engine's pool): chains of k drafts, one
    decode row per sequence per round, or with `fit` token trees (a TreeDrafter's, lmforge.infer.token_tree):
    after the catch-up round, one tree-masked forward per depth over each sequence's nodes so far (slots L.. in
    node order, AttnMetadata trees on the paged cache) gives the frontier's logits, whose top tokens (greedy) or
    draws (sampled) are the next depth's nodes - the trees TreeDrafter's recomputing loop builds."""

    def __init__(self, model, num_blocks: int, block_size: int, device, graphs: str | None = None,
                 max_batch: int = 256, chunk_rows: int = 1, mixed_tokens: int = 0,
                 fit=None, window: int | None = None, vocab: tuple[int, int | None] | None = None):
        """graphs, max_batch, mixed_tokens: as the engine's runner (PagedRunner): rounds of single tokens,
        catch-up chunks of up to chunk_rows tokens (the tokens accepted since the last round), tree rounds and
        steps holding prompts replay CUDA graphs. fit: k -> the widths of a tree of at most k nodes
        (TreeDrafter.fit): trees instead of chains. window: the target's context window; a draft model with a
        shorter one is served that far (its block tables and RoPE tables widened: its drafts past its own training
        length are only less often accepted), or refused where its position embeddings cannot reach it.
        vocab: (the target's vocabulary size, the tokenizer's ids or None): the draft's logits are fitted to that
        width, ids past the tokenizer's masked (sampler.fit_vocab; None: its own width)."""
        from lmforge.infer.config import serving_spec

        self.model, self.fit = model, fit  # left in its mode: its forwards run in eval mode (prefill, propose)
        spec = model.cache_spec()
        self.vocab = (spec.vocab_size, None) if vocab is None else vocab
        if window is not None and window > spec.max_seq_len:
            spec = serving_spec(model, spec, window, what="the target's context window",
                                fix="use a draft model whose max_seq_len covers it, or lower the target's "
                                    "(EngineConfig.max_model_len)")
        self.runner = PagedRunner(model, spec, num_blocks, block_size, device, graphs=graphs,
                                  max_batch=max_batch, mixed_tokens=mixed_tokens)
        self.runner.allow_chunks(chunk_rows, trees=fit is not None)
        self.known: dict[int, tuple[int, int]] = {}  # seq_id -> (tokens with draft keys, preemptions seen)
        self.before_fork: dict[int, int] = {}  # a request's first seq_id -> prompt tokens with draft keys (`prefill`)
        self.tree_keys: dict[int, tuple[int, int]] = {}  # seq_id -> (its tree's first slot, nodes with keys)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.runner.cache.copy_blocks(pairs)

    def done(self, seq) -> int:
        """Tokens of seq whose draft keys are in its blocks: its own progress (none since a preemption), or for a
        sample forked from a prompt `prefill` computed, never preempted, the prompt's."""
        if seq.seq_id in self.known:
            done, pre = self.known[seq.seq_id]
            return done if pre == seq.preemptions else 0
        first = seq.request.seqs[0].seq_id
        return min(self.before_fork.get(first, 0), len(seq.tokens) - 1) if not seq.preemptions else 0

    @torch.inference_mode()
    def prefill(self, seqs) -> None:
        """Draft keys for these sequences' tokens (prompts whose n samples fork after this step), one forward."""
        views = [_View(list(s.tokens), self.done(s), s.block_table, s.seq_id) for s in seqs]
        chunks = sorted(((v, len(v.tokens) - v.num_computed) for v in views if v.num_computed < len(v.tokens)),
                        key=lambda c: c[1] != 1)  # decodes first, as the runner's layout wants
        if chunks:
            with eval_mode(self.model):
                self.runner.logits_at_ends(Batch(chunks=chunks))
        for seq in seqs:
            self.known[seq.seq_id] = (len(seq.tokens), seq.preemptions)
            self.before_fork[seq.seq_id] = len(seq.tokens)

    def accept(self, seq, verified: int) -> None:
        """seq's first `verified` tokens are final: draft keys past them are stale."""
        self.known[seq.seq_id] = (min(self.done(seq), verified), seq.preemptions)

    @torch.inference_mode()
    def propose(self, items, probs) -> dict[int, tuple[list[int], torch.Tensor]]:
        """items: (seq, number of drafts, processors, greedy); probs(logits, procs, greedy) -> q.
        Returns seq_id -> (drafts, q (d, V)). The draft model runs in eval mode, as the engine runs the target
        (no dropout in drafts), its own mode restored after: the caller's model is never changed."""
        with eval_mode(self.model):
            return self._propose(items, probs)

    def _propose(self, items, probs) -> dict[int, tuple[list[int], torch.Tensor]]:
        views = {}
        for seq, _, _, _ in items:
            views[seq.seq_id] = _View(list(seq.tokens), self.done(seq), seq.block_table, seq.seq_id)
        if self.fit is not None:  # sequences whose room fits the same tree shape draft together
            groups: dict[tuple[int, ...], list] = {}
            for it in items:
                groups.setdefault(self.fit(it[1]), []).append(it)
            trees = [self._trees(group, views, widths) for widths, group in groups.items()]
            return {sid: out for drafted in trees for sid, out in drafted.items()}
        out = {seq.seq_id: ([], []) for seq, _, _, _ in items}
        for r in range(max(k for _, k, _, _ in items)):
            chunks = []
            for it in items:
                if it[1] > r:
                    view = views[it[0].seq_id]
                    chunks.append(((view, len(view.tokens) - view.num_computed), it))
            chunks.sort(key=lambda c: c[0][1] != 1)  # decodes first, as the runner's layout wants
            logits = fit_vocab(self.runner.logits_at_ends(Batch(chunks=[c[0] for c in chunks])), *self.vocab, own=True)
            qs, picks = [], []
            for i, (_, (seq, _, procs, greedy)) in enumerate(chunks):
                qs.append(probs(logits[i:i + 1], procs, greedy)[0])
                picks.append(qs[-1].argmax()[None] if greedy else torch.multinomial(qs[-1], 1, generator=seq.generator))
            for (_, (seq, _, _, _)), q, tok in zip(chunks, qs, torch.cat(picks).tolist()):  # one sync per round
                view = views[seq.seq_id]
                view.num_computed = len(view.tokens)
                view.tokens.append(tok)
                out[seq.seq_id][0].append(tok)
                out[seq.seq_id][1].append(q)
        for seq, _, _, _ in items:
            self.known[seq.seq_id] = (views[seq.seq_id].num_computed, seq.preemptions)
        return {sid: (d, torch.stack(q) if q else None) for sid, (d, q) in out.items()}

    def _trees(self, items, views, widths: tuple[int, ...]) -> dict[int, tuple[DraftTree, torch.Tensor | None]]:
        """widths[d] children of each node of depth d (TreeDrafter's rule, `fit` to each sequence's room): the
        first depth from the catch-up round's last logits, each deeper one from a tree-masked forward over the
        nodes so far. Tree slots are stale after verification (known = the context)."""
        order = sorted(items, key=lambda it: len(it[0].tokens) - views[it[0].seq_id].num_computed != 1)
        logits = fit_vocab(self.runner.logits_at_ends(Batch(chunks=[(views[it[0].seq_id], len(it[0].tokens)
                                                                     - views[it[0].seq_id].num_computed)
                                                                    for it in order])), *self.vocab, own=True)
        tokens = {it[0].seq_id: [] for it in items}
        qs = {it[0].seq_id: [] for it in items}
        parents, frontier, written = [], [-1], 0
        asks = [(seq.seq_id, procs, greedy, seq.generator) for seq, _, procs, greedy in order]
        for depth, w in enumerate(widths):
            frontier = _grow(logits, frontier, w, asks, tokens, qs, parents)
            if depth + 1 == len(widths):
                break
            n = len(parents)
            batch = Batch(chunks=[(_View(list(it[0].tokens) + tokens[it[0].seq_id], len(it[0].tokens),
                                         it[0].block_table, it[0].seq_id), n) for it in order])
            if n > 1:  # (a one-node tree is a decode row after the context)
                batch.trees = {it[0].seq_id: list(parents) for it in order}
            rows = [(c, n - 1 - node) for c in range(len(order)) for node in frontier]
            logits = fit_vocab(self.runner.logits_at(batch, rows), *self.vocab, own=True)
            written = n
        for seq, _, _, _ in items:
            self.known[seq.seq_id] = (len(seq.tokens), seq.preemptions)
            self.tree_keys[seq.seq_id] = (len(seq.tokens), written)
        return {sid: (DraftTree(t, parents), torch.stack(qs[sid]) if qs[sid] else None) for sid, t in tokens.items()}

    def tree_accepted(self, seq, path: list[int], src: list[int], dst: list[int]) -> None:
        """The target kept these nodes of seq's tree (path, root to leaf) and moved their keys from slots src to
        dst (lmforge.model.meta.accepted_slots): the draft's keys move the same way, so its next catch-up
        starts after the accepted nodes it wrote (all but a deepest-level node), not at the tree's first slot -
        a sliding-window engine drops blocks behind the target's next query, which an earlier start could need."""
        first, written = self.tree_keys.pop(seq.seq_id, (None, 0))
        if first is None or seq.seq_id not in self.known:
            return
        keep = 0
        while keep < len(path) and path[keep] < written:
            keep += 1
        if src:  # (moving a deepest node's unwritten slot too: beyond `known`, rewritten before it is read)
            self.runner.move_positions(seq.block_table, src, dst)
        self.known[seq.seq_id] = (first + keep, self.known[seq.seq_id][1])

    def forget(self, seq) -> None:
        self.known.pop(seq.seq_id, None)
        self.before_fork.pop(seq.seq_id, None)
        self.tree_keys.pop(seq.seq_id, None)


def is_draft_head(draft) -> bool:
    """An EAGLE-style head the engine runs on its pool: it reads every position's features
    (uses_hidden_states = "all"), describes its attention layers (cache_spec) and runs pairs (`pairs`)."""
    return (getattr(draft, "uses_hidden_states", False) == "all" and callable(getattr(draft, "pairs", None))
            and callable(getattr(draft, "cache_spec", None)))


class PagedDraftHead:
    """An EAGLE-style draft head (Li et al. 2024, §4: f_{t+1} ~ head(f_t, emb(x_{t+1})), tokens read off the
    target's LM head) whose attention cache shares the target's block ids, as PagedDraftModel's does.

    The head's protocol (a module; tests/infer/eagle_toy.py's PagedEagle is one):
      uses_hidden_states = "all", optional hidden_layers, proposes_trees / widths / tree_size (trees)
      cache_spec() -> CacheSpec      its attention layers (their bytes per token are counted in the pool)
      pairs(feats (1, N, d), ids (1, N), positions (1, N), cache, meta) -> (1, N, d)
                                     one flat row of (feature, token) pairs -> each pair's predicted next
                                     feature; attention through `cache.attend` (the paged cache, `meta` from
                                     PagedRunner.prepare, tree masks included)
      logits(f (..., d)) -> (..., V) the target's LM head over predicted features
      fuse(states (n, D)) -> (n, d)  optional: the target's features as the head's input (EAGLE-3's fc over
                                     low/middle/high layers); absent = the features as they are
      begin_entry = False            optional: True = later pairs attend to the begin entry below too
    Layout: slot p of a sequence's blocks holds the head's entry for the pair (f_{p-1}, x_p), the feature of
    the token before p and token p itself, at position p. So an entry depends on tokens 0..p only, as the
    target's key at p does, and blocks shared by forks (copy-on-write included) hold the right entries for
    every holder. Position 0 has no feature before it: slot 0 holds the begin pair (zeros, x_0), which no later
    pair attends to (the head's cache has first_key = 1), so the head computes what EAGLE's own code feeds it:
    n pairs (f_j, x_{j+1}), each seeing the earlier ones (RoPE positions shifted by one, which attention does not
    see); a head trained with the begin entry sets begin_entry = True.
    A round for a context of L tokens, whose features reach position L - 2 (lmforge.infer.features):
    catch-up writes slots start + 1 .. L - 1 (from 0 when start = 0: every earlier slot holds a verified
    pair), the last one predicting the pending token's feature; a chain then writes one entry per draft at
    slots L, L + 1, ... (one decode row per sequence per depth), a tree its nodes so far at slots L.. in node
    order with the tree mask, once per depth (nodes at position L + depth). Draft entries are stale after
    verification and the next catch-up overwrites them. Only nodes that fit the sequence's budget k (the
    slots the scheduler reserved) are written, so a tree stops expanding once its first k nodes are known.
    Preemption frees the blocks and with them the head's entries: `preempt` restarts the sequence's feature
    stream, so the recomputed features are handed again and the first round rewrites every slot. Nothing
    else is kept per sequence (Features.start says which slots hold verified pairs), so a fork (which shares
    the blocks and copies the stream) and a release (which frees them) need no call of their own.
    Prefix caching: the head keeps the target's feature at each block's last position (`block_feature`,
    copied on copy-on-write); the engine names a block only once the head has caught up over it (`caught_up`)
    and resumes a sequence admitted on a hit of m tokens from the kept feature at m - 1 (`resume_hits`,
    FeatureStream.resume), so its first catch-up writes slot m."""

    uses_hidden_states = "all"

    def __init__(self, head, num_blocks: int, block_size: int, device, graphs: str | None = None,
                 max_batch: int = 256, chunk_rows: int = 1, limit: int | None = None):
        """graphs, max_batch, chunk_rows: as PagedDraftModel's (the head's rounds replay CUDA graphs). limit: the
        tokenizer's ids (Engine.vocab_limit): ids past it are never drafted (sampler.fit_vocab)."""
        self.head, self.limit = head, limit
        self.fuse = getattr(head, "fuse", None)
        self.proposes_trees = bool(getattr(head, "proposes_trees", False))
        if self.proposes_trees:
            self.widths, self.tree_size = tuple(head.widths), head.tree_size
        self.runner = PagedRunner(head, head.cache_spec(), num_blocks, block_size, device, graphs=graphs,
                                  max_batch=max_batch)
        # catch-up chunks (the pairs verified since the last round) and tree rounds run as rows of the graphs
        self.runner.allow_chunks(chunk_rows, trees=self.proposes_trees)
        self.runner.cache.first_key = 0 if getattr(head, "begin_entry", False) else 1  # slot 0: the begin pair
        self.block_size, self.num_blocks = block_size, num_blocks
        self.block_feature: torch.Tensor | None = None
        """(num_blocks + 1, D) the target's feature at each block's last position, written as the head catches
        up over it: a prefix-cache hit resumes a new sequence's feature stream from it (`resume_hits`)"""
        self.forwards = 0
        """head forwards so far: one catch-up per round, then one per draft depth"""

    @classmethod
    def for_engine(cls, engine, head, num_blocks: int) -> PagedDraftHead:
        if not isinstance(engine.runner, PagedRunner):
            raise ConfigError(f"a draft head with pairs() keeps its cache in the engine's paged pool, but "
                              f"{type(engine.model).__name__} has no cache_spec() (the recompute runner); use a "
                              "model with cache_spec() or a drafter object with propose()")
        if engine.window:
            raise ConfigError(f"a draft head's cache shares the target's blocks, which a sliding-window model "
                              f"(window {engine.window}) frees behind the window; use a drafter object with propose()")
        return cls(head, num_blocks, engine.config.block_size, engine.device, graphs=engine.runner.graphs_mode,
                   max_batch=engine.config.max_num_seqs, chunk_rows=1 + engine.num_draft_tokens,
                   limit=engine.vocab_limit)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write of the target's blocks: the head's entries in them go along, and their features."""
        self.runner.cache.copy_blocks(pairs)
        if pairs and self.block_feature is not None:
            with torch.inference_mode():  # (made inside propose_batch's inference mode)
                src, dst = (torch.tensor(x, device=self.block_feature.device) for x in zip(*pairs))
                self.block_feature.index_copy_(0, dst, self.block_feature.index_select(0, src))

    def caught_up(self, seq) -> int:
        """Leading full blocks of seq whose head entries and last feature are written (verified): only those
        may be named for the prefix cache (Engine._register_blocks)."""
        return seq.features.start // self.block_size

    def resume_hits(self, batch) -> None:
        """Sequences the scheduler just admitted on a prefix hit of m tokens start their feature stream at m,
        from the feature kept with the hit's last block (FeatureStream.resume)."""
        for seq, _ in batch.chunks:
            m, stream = seq.num_computed, seq.features
            if stream is not None and m and stream.next == 0:
                stream.resume(m, self.block_feature[seq.block_table[m // self.block_size - 1]])

    def preempt(self, seq) -> None:
        """seq lost its blocks: its features are computed and handed again from position 0."""
        if seq.features is not None:
            seq.features.restart()

    @torch.inference_mode()
    def propose_batch(self, items) -> list[tuple[list[int] | DraftTree, torch.Tensor | None]]:
        """items: lmforge.infer.speculative.DraftItem, hidden a Features, block_table the sequence's."""
        with eval_mode(self.head):
            views, f = self._catch_up(items)
            return self._trees(items, f) if self.proposes_trees else self._chains(items, views, f)

    def _catch_up(self, items) -> tuple[list[_View], dict[int, torch.Tensor]]:
        """One forward over every item's new verified pairs -> views (slots through L - 1 written) and item
        index -> (d,) the predicted feature of its pending token."""
        rows, views = [], []
        for b, it in enumerate(items):
            h = it.hidden
            if it.block_table is None or h.start + h.states.shape[0] != len(it.ctx) - 1:
                raise LmforgeError(f"internal: sequence {it.seq_id}'s features cover positions {h.start} .. "
                                   f"{h.start + h.states.shape[0] - 1} of a {len(it.ctx)}-token context "
                                   f"(block table {'missing' if it.block_table is None else 'given'})")
            self._keep_block_features(h, it.block_table)
            x = self.fuse(h.states) if self.fuse is not None else h.states
            first = h.start + 1 if h.start else 0
            if not h.start:  # the begin pair: no feature before x_0
                x = torch.cat([x.new_zeros(1, x.shape[1]), x])
            views.append(_View(list(it.ctx), first, it.block_table, it.seq_id))
            rows.append((b, views[-1], len(it.ctx) - first, x, None))
        out = self._run(rows)
        for view in views:
            view.num_computed = len(view.tokens)
        return views, {b: y[-1] for b, y in out.items()}

    def _keep_block_features(self, h, table: list[int]) -> None:
        """The handed features at block ends (positions b * block_size - 1), kept per block."""
        bs, n = self.block_size, h.states.shape[0]
        if self.block_feature is None:
            self.block_feature = h.states.new_zeros(self.num_blocks + 1, h.states.shape[1])
        ends = range(-(-(h.start + 1) // bs) * bs - 1, h.start + n, bs)  # block-end positions among them
        if ends:
            rows = torch.tensor([table[e // bs] for e in ends], device=h.states.device)
            self.block_feature.index_copy_(0, rows, h.states[[e - h.start for e in ends]])

    def _run(self, rows) -> dict[int, torch.Tensor]:
        """rows: (key, view, n, feats (n, d), tree parents or None): n pairs of each at its view's next
        slots, in one flat forward -> key -> (n, d) predicted features."""
        rows = sorted(rows, key=lambda r: r[2] != 1)  # decodes first, as the runner's layout wants
        batch = Batch(chunks=[(r[1], r[2]) for r in rows])
        batch.trees = {r[1].seq_id: r[4] for r in rows if r[4] is not None and r[2] > 1}
        out = self.runner.run_pairs(batch, torch.cat([r[3] for r in rows]))
        self.forwards += 1
        return dict(zip((r[0] for r in rows), out.split([r[2] for r in rows])))

    def _chains(self, items, views, f) -> list:
        """k drafts each: depth r reads the head's logits at the last predicted feature, then one decode row
        per sequence still drafting writes (f, draft r) at its next slot."""
        drafts, qs = [[] for _ in items], [[] for _ in items]
        for r in range(max(it.k for it in items)):
            live = [b for b, it in enumerate(items) if it.k > r]
            logits = fit_vocab(self.head.logits(torch.stack([f[b] for b in live])), None, self.limit, own=True)
            for j, b in enumerate(live):
                it = items[b]
                q = _probs(logits[j:j + 1], it.procs, it.greedy)[0]
                drafts[b].append(int(q.argmax()) if it.greedy else int(torch.multinomial(q, 1, generator=it.gen)))
                qs[b].append(q)
            rows = []
            for b in live:
                if items[b].k > r + 1:  # (f, draft r) at the next slot, position len(tokens)
                    view = views[b]
                    view.num_computed = len(view.tokens)
                    view.tokens.append(drafts[b][-1])
                    rows.append((b, view, 1, f[b][None], None))
            if rows:
                f.update((b, y[-1]) for b, y in self._run(rows).items())
        return [(d, torch.stack(q)) for d, q in zip(drafts, qs)]

    def _trees(self, items, f) -> list:
        """widths[d] children of each node of depth d: the head's top tokens (greedy), or drawn from its
        processed distribution with replacement (sampled; each child's q row is its parent's). Before each
        deeper level, one tree-masked forward per round over every sequence's nodes so far (slots L.., in node
        order) gives their predicted features; a sequence whose first k nodes are all known stops there."""
        tokens, qs, parents, frontier = [[] for _ in items], [[] for _ in items], [], [-1]
        feat = {-1: f}  # node -> item index -> (d,)
        live = list(range(len(items)))
        for depth, w in enumerate(self.widths):
            logits = fit_vocab(self.head.logits(torch.stack([feat[node][b] for b in live for node in frontier])),
                               None, self.limit, own=True)
            frontier = _grow(logits, frontier, w, [(b, items[b].procs, items[b].greedy, items[b].gen) for b in live],
                             tokens, qs, parents)
            live = [b for b in live if len(parents) < items[b].k]  # deeper nodes would be trimmed
            if depth + 1 == len(self.widths) or not live:
                break
            rows = []
            for b in live:
                it = items[b]
                view = _View(list(it.ctx) + tokens[b], len(it.ctx), it.block_table, it.seq_id)
                rows.append((b, view, len(parents), torch.stack([feat[p][b] for p in parents]), list(parents)))
            out = self._run(rows)
            for i in range(len(parents)):
                feat[i] = {b: y[i] for b, y in out.items()}
        return [(DraftTree(t, parents[:len(t)]), torch.stack(q) if q else None) for t, q in zip(tokens, qs)]


def _grow(logits: torch.Tensor, frontier: list[int], w: int, asks, tokens, qs, parents: list[int]) -> list[int]:
    """One depth of every sequence's tree (the same shape for all): logits (sequences x frontier nodes, V), row
    j·len(frontier) + i at sequence j's frontier node i; asks: per sequence (key into tokens / qs, processors,
    greedy, generator). Appends each node's w children to tokens[key] (and their q rows), their parents once to
    the shared `parents`; returns the new frontier (the children's node indices)."""
    for j, (key, procs, greedy, gen) in enumerate(asks):
        for i in range(len(frontier)):
            tokens[key] += _children(logits[j * len(frontier) + i], w, procs, greedy, gen, qs[key])
    parents += [node for node in frontier for _ in range(w)]
    return list(range(len(parents) - len(frontier) * w, len(parents)))


def _children(logits: torch.Tensor, w: int, procs, greedy: bool, gen, qs: list) -> list[int]:
    """A tree node's w children from the drafter's (V,) logits there: its top tokens (greedy), or w draws with
    replacement from its processed distribution (sampled; the q row goes to qs once per child)."""
    logits = apply_processors(procs, logits[None].float(), None)[0]
    if greedy:
        return logits.topk(w).indices.tolist()
    q = logits.softmax(-1)
    qs += [q] * w
    return torch.multinomial(q, w, replacement=True, generator=gen).tolist()
