"""A tiny EAGLE-style draft head: the reference drafter of the engine's hidden-state seam (lmforge.infer.features).

EAGLE-1 (Li et al. 2024, §4): the draft head predicts the target's next feature from the current one and
the next token's embedding, f_{t+1} ~ block(fc([f_t; emb(x_{t+1})])), and reads a token off the target's own
LM head; k drafts run it k times on its own predictions (a chain), or on each of the top tokens (a tree,
EAGLE-2's shape without its dynamic expansion). EAGLE-3 (Li et al. 2025, §3) first fuses a low, a middle and
a high layer's features (`fuse`: an fc over their concatenation). The block here is one residual MLP, no
attention, so a draft reads only the newest feature; the head still keeps each sequence's whole feature
history (`state`, dropped at `release`), as a real head keeps its attention cache, and `record` keeps a copy
for the tests. `fit` sets the head by least squares on the target's own features, so drafts are sometimes
right and sometimes wrong. `CachedEagle` adds EAGLE's decoder layer, attention over every earlier (feature,
token) pair, with the KV cache a real head keeps per sequence: rewound each round to Features.start (its
verified pairs), or recomputed from the whole history (cached=False, the reference). With begin=True its history
starts with the begin pair (zeros, x_0), the layout of the engine's paged head (lmforge.infer.draft.PagedDraftHead:
slot p holds the pair (f_{p-1}, x_p)); `PagedEagle` is that head, run by the engine in its own block pool.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lmforge.infer.features import Features
from lmforge.infer.processors import apply_processors
from lmforge.infer.token_tree import DraftTree, tree_size
from lmforge.model.cache import KVCache
from lmforge.model.layers.block import Block
from lmforge.model.meta import AttnMetadata, tree_positions


class ToyEagle(nn.Module):
    uses_hidden_states = "all"
    proposes_trees = False

    def __init__(self, target, hidden_layers: tuple[int, ...] | None = None, widths: tuple[int, ...] | None = None):
        super().__init__()
        d = target.cfg.d_model
        if hidden_layers is not None:
            self.hidden_layers = tuple(hidden_layers)
        self.fuse = nn.Linear(d * len(hidden_layers), d) if hidden_layers else nn.Identity()
        self.fc = nn.Linear(2 * d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.SiLU(), nn.Linear(2 * d, d))
        nn.init.zeros_(self.mlp[2].weight)  # starts as the identity: fc alone (what `fit` sets)
        nn.init.zeros_(self.mlp[2].bias)
        self._target = (target,)  # not a submodule: its parameters stay the target's
        if widths is not None:
            self.proposes_trees, self.widths, self.tree_size = True, tuple(widths), tree_size(widths)
        self.state: dict[int, torch.Tensor] = {}  # seq_id -> (T, D) every feature handed so far
        self.record: dict[int, tuple[list[int], torch.Tensor]] = {}  # the same, kept after release: (ctx, features)
        self.released: list[int] = []

    @torch.inference_mode()
    def propose(self, ctx: list[int], k: int, procs, greedy: bool, gen, hidden: Features):
        seen = self.state.get(hidden.seq_id)
        have = 0 if seen is None else seen.shape[0]
        if hidden.start != have or hidden.start + hidden.states.shape[0] != len(ctx) - 1:
            raise AssertionError(f"sequence {hidden.seq_id}: features of positions {hidden.start} .. "
                                 f"{hidden.start + hidden.states.shape[0] - 1} after {have} of them, with a "
                                 f"{len(ctx)}-token context")
        seen = hidden.states if seen is None else torch.cat([seen, hidden.states])
        self.state[hidden.seq_id] = seen
        self.record[hidden.seq_id] = (list(ctx), seen)
        f = self.fuse(seen[-1])
        if self.proposes_trees:
            return self._tree(f, ctx[-1], procs, greedy, gen)
        return self._chain(f, ctx[-1], k, procs, greedy, gen)

    # no accept(seq_id, ctx_len): the next Features.start says where the verified features end

    def release(self, seq_id: int) -> None:
        self.state.pop(seq_id, None)
        self.released.append(seq_id)

    def step(self, f: torch.Tensor, tok: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(d,) feature of the token before `tok` -> the predicted feature of `tok` and its logits (V,)."""
        target = self._target[0]
        x = self.fc(torch.cat([f, target.embed(torch.tensor([tok], device=f.device))[0]]))
        f = x + self.mlp(x)
        return f, target.logits(f[None])[0]

    def _chain(self, f, tok, k, procs, greedy, gen):
        drafts, qs = [], []
        for _ in range(k):
            f, logits = self.step(f, tok)
            q = _dist(logits, procs, greedy)
            tok = int(q.argmax()) if greedy else int(torch.multinomial(q, 1, generator=gen))
            drafts.append(tok)
            qs.append(q)
        return drafts, torch.stack(qs) if qs else None

    def _tree(self, f, tok, procs, greedy, gen):
        """The full tree, breadth first (the engine keeps its first nodes when room is short): widths[d]
        children of each node of depth d, the head's top tokens (greedy) or drawn from it (sampled)."""
        tokens, parents, qs, frontier = [], [], [], [(-1, f, tok)]
        for w in self.widths:
            nxt = []
            for node, f, tok in frontier:
                f, logits = self.step(f, tok)
                for kid in _children(logits, w, procs, greedy, gen, qs):
                    nxt.append((len(tokens), f, kid))
                    tokens.append(kid)
                    parents.append(node)
            frontier = nxt
        return DraftTree(tokens, parents), torch.stack(qs) if qs else None

    @torch.no_grad()
    def fit(self, sequences: list[list[int]]) -> ToyEagle:
        """Least squares on the target's own features: fuse(x_t) + W [emb(x_{t+1})] ~ f_{t+1}, the final
        feature the LM head reads (EAGLE's feature regression, Li et al. 2024 §4.2, in closed form)."""
        target = self._target[0]
        inputs, outputs = [], []
        for ids in sequences:
            ids_t = torch.tensor([ids])
            final = target(ids_t, return_hidden=True)[1][0]
            feats = target(ids_t, return_hidden=getattr(self, "hidden_layers", True))[1][0]
            emb = target.embed(ids_t)[0]
            inputs.append(torch.cat([feats[:-1], emb[1:], torch.ones(len(ids) - 1, 1)], -1))
            outputs.append(final[1:])
        w = torch.linalg.lstsq(torch.cat(inputs), torch.cat(outputs)).solution  # (D + d + 1, d)
        D, d = w.shape[0] - 1 - w.shape[1], w.shape[1]
        eye = torch.eye(d)
        if isinstance(self.fuse, nn.Linear):  # fuse carries the features' part; fc passes it on
            self.fuse.weight.copy_(w[:D].T)
            self.fuse.bias.zero_()
            self.fc.weight.copy_(torch.cat([eye, w[D:D + d].T], 1))
        else:
            self.fc.weight.copy_(torch.cat([w[:D].T, w[D:D + d].T], 1))
        self.fc.bias.copy_(w[-1])
        return self


def _dist(logits: torch.Tensor, procs, greedy: bool) -> torch.Tensor:
    """(V,) the distribution a draft is drawn from: one-hot at the argmax when greedy."""
    logits = apply_processors(procs, logits[None].float(), None)[0]
    if greedy:
        return torch.nn.functional.one_hot(logits.argmax(), logits.shape[-1]).float()
    return logits.softmax(-1)


def _children(logits: torch.Tensor, w: int, procs, greedy: bool, gen, qs: list) -> list[int]:
    """A tree node's w children from the head's (V,) logits there: its top tokens (greedy), or drawn from its
    processed distribution with replacement (sampled; each child's q row goes to qs)."""
    logits = apply_processors(procs, logits[None].float(), None)[0]
    if greedy:
        return logits.topk(w).indices.tolist()
    q = logits.softmax(-1)
    qs += [q] * w
    return torch.multinomial(q, w, replacement=True, generator=gen).tolist()


class CachedEagle(ToyEagle):
    """ToyEagle + one attention block (lmforge's Block, the target's shape) over every earlier pair, mixed in
    with weight `gate` so `fit`'s drafts stay mostly right. Its own KVCache per sequence holds one entry per
    verified pair (f_j, x_{j+1}); a round rewinds it to Features.start, appends the new pairs, then the
    drafts' entries, which the next round's rewind forgets. A tree's depth d is one forward over all its
    nodes so far with the tree mask (KVCache's tree_parents sees the verified pairs + each node's
    ancestors; deeper cached draft levels cannot be masked, so earlier levels are recomputed).
    `proposals[seq_id]`: (tokens, parents, the predicted feature of the pending token) of every round."""

    def __init__(self, target, widths: tuple[int, ...] | None = None, cached: bool = True, gate: float = 0.5,
                 begin: bool = False):
        super().__init__(target, None, widths)
        cfg = dataclasses.replace(target.cfg, n_layers=1)
        self.block, self.cached, self.gate, self.begin = Block(cfg, 0), cached, gate, begin
        self.max_len = cfg.max_seq_len + 64
        self.caches: dict[int, KVCache] = {}
        self.proposals: dict[int, list[tuple[list[int], list[int], torch.Tensor]]] = {}

    def _cache(self) -> KVCache:
        attn = self.block.attn
        return KVCache(1, 1, attn.n_kv, attn.hd, self.max_len)

    def run(self, feats: torch.Tensor, toks: list[int], cache: KVCache, parents: list[int] | None = None):
        """(n, d) features + the n next tokens -> (n, d) predicted features, their K/V appended to cache."""
        tree = torch.tensor(parents) if parents is not None else None
        base = cache.length
        pos = tree_positions(tree, base) if tree is not None else torch.arange(base, base + len(toks))
        return self.rows(feats[None], torch.tensor([toks], device=feats.device), pos[None], cache, tree)[0]

    def rows(self, feats: torch.Tensor, toks: torch.Tensor, pos: torch.Tensor, cache: KVCache,
             tree: torch.Tensor | None = None) -> torch.Tensor:
        """B rows at once: (B, T, d) features, (B, T) next tokens at positions pos (B, T) -> (B, T, d) predicted
        features; their K/V go to the cache's next T slots (one tree, `tree` (T,) parents, for every row)."""
        out = self.pairs(feats, toks, pos, cache, AttnMetadata.tree(tree) if tree is not None else None)
        cache.advance(toks.shape[1])
        return out

    def pairs(self, feats: torch.Tensor, toks: torch.Tensor, pos: torch.Tensor, cache, meta=None) -> torch.Tensor:
        """The head over (B, T) pairs at positions pos, attending through any cache kind (`attend`): this
        contiguous one, or the engine's paged one with its metadata (PagedDraftHead's protocol)."""
        target = self._target[0]
        x = self.fc(torch.cat([feats, target.embed(toks)], -1))
        x = x + self.mlp(x)
        y = self.block(x, target.rope.cos_sin(pos), None, cache, meta)  # (no host bound: capturable)
        return x + self.gate * (y - x)

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        """(..., d) predicted features -> (..., V): the target's LM head."""
        return self._target[0].logits(f)

    @torch.inference_mode()
    def propose(self, ctx: list[int], k: int, procs, greedy: bool, gen, hidden: Features):
        seen = self.state.get(hidden.seq_id)
        self.state[hidden.seq_id] = hidden.states if seen is None else torch.cat([seen, hidden.states])
        if self.cached:  # the verified pairs before Features.start are in the cache; drafts' entries go
            cache = self.caches.get(hidden.seq_id) or self.caches.setdefault(hidden.seq_id, self._cache())
            cache.rewind(hidden.start + (1 if self.begin and hidden.start else 0))
            feats, first = hidden.states, hidden.start
        else:
            cache, feats, first = self._cache(), self.state[hidden.seq_id], 0
        toks = ctx[first + 1:]
        if self.begin and first == 0:  # the begin pair (zeros, x_0) first
            feats, toks = torch.cat([feats.new_zeros(1, feats.shape[1]), feats]), list(ctx)
        f = self.run(feats, toks, cache)[-1]  # predicted feature of the pending token ctx[-1]
        drafts, q = self._cached_tree(f, cache, procs, greedy, gen) if self.proposes_trees else \
            self._cached_chain(f, cache, k, procs, greedy, gen)
        tokens = drafts.tokens if isinstance(drafts, DraftTree) else drafts
        parents = drafts.parents if isinstance(drafts, DraftTree) else list(range(-1, len(drafts) - 1))
        self.proposals.setdefault(hidden.seq_id, []).append((list(tokens), list(parents), f.clone()))
        return drafts, q

    def _cached_chain(self, f, cache, k, procs, greedy, gen):
        drafts, qs = [], []
        for i in range(k):
            q = _dist(self._target[0].logits(f[None])[0], procs, greedy)
            drafts.append(int(q.argmax()) if greedy else int(torch.multinomial(q, 1, generator=gen)))
            qs.append(q)
            if i + 1 < k:
                f = self.run(f[None], drafts[-1:], cache)[-1]
        return drafts, torch.stack(qs) if qs else None

    def _cached_tree(self, f, cache, procs, greedy, gen):
        base, tokens, parents, qs, feat, frontier = cache.length, [], [], [], {-1: f}, [-1]
        for depth, w in enumerate(self.widths):
            nxt = []
            for node in frontier:
                for kid in _children(self._target[0].logits(feat[node][None])[0], w, procs, greedy, gen, qs):
                    nxt.append(len(tokens))
                    tokens.append(kid)
                    parents.append(node)
            frontier = nxt
            if depth + 1 < len(self.widths):
                cache.rewind(base)
                out = self.run(torch.stack([feat[p] for p in parents]), tokens, cache, parents)
                feat.update(enumerate(out))
        return DraftTree(tokens, parents), torch.stack(qs) if qs else None

    def release(self, seq_id: int) -> None:
        super().release(seq_id)
        self.caches.pop(seq_id, None)


class BatchedEagle(CachedEagle):
    """CachedEagle drafting for every sequence of a step at once (the engine's propose_batch): one head forward
    for all the sequences' new verified pairs, then one per draft depth, in one contiguous KVCache of B rows
    built for the step. Row b holds its cached pairs right-aligned, left-padded (KVCache.set_padding); the
    catch-up chunk is as long as the longest row's new pairs, and a shorter row recomputes its last cached
    pairs to fill it (the same inputs at the same positions: the same keys), or pads when it has too few.
    After the forward, the new verified pairs' K/V go back to each sequence's own cache (what `propose`
    keeps), so the two forms agree round by round (the tests compare them). Trees: every row's tree has the
    same shape (widths), so one tree mask serves all rows."""

    def __init__(self, target, widths: tuple[int, ...] | None = None, gate: float = 0.5):
        super().__init__(target, widths, True, gate)
        self.head_forwards = 0

    @torch.inference_mode()
    def propose_batch(self, items) -> list:
        for it in items:
            seen = self.state.get(it.seq_id)
            self.state[it.seq_id] = it.hidden.states if seen is None else torch.cat([seen, it.hidden.states])
        room = self.tree_size if self.proposes_trees else max(it.k for it in items)
        cache, f, ends = self._catch_up(items, room)
        if self.proposes_trees:
            answers = self._batched_tree(f, cache, ends, items)
        else:
            answers = self._batched_chain(f, cache, ends, items)
        for it, (drafts, _), f_b in zip(items, answers, f):
            tokens = drafts.tokens if isinstance(drafts, DraftTree) else drafts
            parents = drafts.parents if isinstance(drafts, DraftTree) else list(range(-1, len(drafts) - 1))
            self.proposals.setdefault(it.seq_id, []).append((list(tokens), list(parents), f_b.clone()))
        return answers

    def _catch_up(self, items, room: int) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """One forward over every row's new verified pairs -> (the step's cache, (B, d) predicted feature of
        each pending token, (B,) pairs per row = its next position); the new pairs' K/V go to each own cache."""
        own = [self.caches.get(it.seq_id) or self.caches.setdefault(it.seq_id, self._cache()) for it in items]
        ends = [self.state[it.seq_id].shape[0] for it in items]  # m_b: verified pairs, len(ctx) - 1
        starts = [it.hidden.start for it in items]  # pairs already in the row's own cache
        T = max(m - c for m, c in zip(ends, starts))
        kept = [max(0, m - T) for m in ends]  # cached pairs copied in; the rest of the chunk is recomputed
        L0, B, attn = max(kept), len(items), self.block.attn
        cache = KVCache(1, B, attn.n_kv, attn.hd, L0 + T + room, dtype=own[0].k.dtype)
        feats = torch.zeros(B, T, self.state[items[0].seq_id].shape[1])
        toks, pos = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
        for b, it in enumerate(items):
            e, m = kept[b], ends[b]
            cache.k[0, b, :, L0 - e:L0], cache.v[0, b, :, L0 - e:L0] = own[b].k[0, 0, :, :e], own[b].v[0, 0, :, :e]
            j = torch.arange(m - T, m).clamp(min=0)  # pair index of each chunk slot (< 0: padding)
            first = max(0, m - T)
            feats[b, T - (m - first):] = self.state[it.seq_id][first:m]
            toks[b, T - (m - first):] = torch.tensor(it.ctx[first + 1:m + 1])
            pos[b] = j
        cache.set_padding([L0 - e + max(0, T - m) for e, m in zip(kept, ends)])
        cache.length = L0
        out = self.rows(feats, toks, pos, cache)
        self.head_forwards += 1
        for b, (m, c) in enumerate(zip(ends, starts)):  # the new pairs [c, m) sit at slots [L0 + T - (m - c), L0 + T)
            own[b].rewind(c)
            own[b].k[0, 0, :, c:m], own[b].v[0, 0, :, c:m] = cache.k[0, b, :, L0 + T - m + c:L0 + T], \
                cache.v[0, b, :, L0 + T - m + c:L0 + T]
            own[b].advance(m - c)
        return cache, out[:, -1], torch.tensor(ends)

    def _batched_chain(self, f, cache, ends, items) -> list:
        """_cached_chain for every row: one head forward per depth (rows past their own k compute unused drafts)."""
        drafts, qs = [[] for _ in items], [[] for _ in items]
        K = max(it.k for it in items)
        for i in range(K):
            logits = self._target[0].logits(f)
            for b, it in enumerate(items):
                if i < it.k:
                    q = _dist(logits[b], it.procs, it.greedy)
                    drafts[b].append(int(q.argmax()) if it.greedy else int(torch.multinomial(q, 1, generator=it.gen)))
                    qs[b].append(q)
            if i + 1 < K:
                last = torch.tensor([d[-1] if d else 0 for d in drafts])[:, None]
                f = self.rows(f[:, None], last, (ends + i)[:, None], cache)[:, 0]
                self.head_forwards += 1
        return [(d, torch.stack(q)) for d, q in zip(drafts, qs)]

    def _batched_tree(self, f, cache, ends, items) -> list:
        """_cached_tree for every row: depth d's expansion is one tree-masked forward over all rows' nodes."""
        base, parents, frontier = cache.length, [], [-1]
        tokens, qs, feat = [[] for _ in items], [[] for _ in items], {-1: f}  # feat[node]: (B, d)
        for depth, w in enumerate(self.widths):
            logits = self._target[0].logits(torch.stack([feat[node] for node in frontier], 1))  # (B, F, V)
            for b, it in enumerate(items):
                for i in range(len(frontier)):
                    tokens[b] += _children(logits[b, i], w, it.procs, it.greedy, it.gen, qs[b])
            parents += [node for node in frontier for _ in range(w)]
            frontier = list(range(len(parents) - len(frontier) * w, len(parents)))
            if depth + 1 < len(self.widths):
                cache.rewind(base)
                tree = torch.tensor(parents)
                out = self.rows(torch.stack([feat[p] for p in parents], 1), torch.tensor(tokens), tree_positions(tree, ends),
                                cache, tree)
                self.head_forwards += 1
                feat.update((i, out[:, i]) for i in range(len(parents)))
        return [(DraftTree(t, list(parents)), torch.stack(q) if q else None) for t, q in zip(tokens, qs)]


class PagedEagle(CachedEagle):
    """CachedEagle's head run by the engine in its block pool (lmforge.infer.draft.PagedDraftHead): the engine
    calls `pairs` with its paged cache and metadata, `logits`, and sizes the pool for `cache_spec`. Its
    contiguous reference is CachedEagle(begin=begin_entry) with the same weights: without the begin entry
    (the default, EAGLE's own layout) the plain CachedEagle."""

    def __init__(self, target, widths: tuple[int, ...] | None = None, gate: float = 0.5, begin_entry: bool = False):
        super().__init__(target, widths, True, gate, begin=begin_entry)
        self.begin_entry = begin_entry

    def cache_spec(self):
        """One attention layer of the target's shape (the block is Block(cfg with n_layers=1, 0))."""
        spec = self._target[0].cache_spec()
        return dataclasses.replace(spec, layers=spec.layers[:1])


def growing_rounds(g: torch.Generator, feats: torch.Tensor, lengths=(3, 11, 6, 2),
                   grows=((0, 0, 0, 0), (1, 4, 2, 3), (3, 1, 1, 4))):
    """Rounds of drafting for len(lengths) sequences whose contexts grow between rounds (random tokens from g):
    per round, (index, context so far, Features of its positions not handed yet) for each sequence, the
    features read from feats (sequences, positions, d) - what the engine hands a drafter round by round."""
    ctxs = [torch.randint(1, 257, (n,), generator=g).tolist() for n in lengths]
    handed = [0] * len(lengths)
    for grow in grows:
        out = []
        for b, n in enumerate(grow):
            ctxs[b] += torch.randint(1, 257, (n,), generator=g).tolist()
            out.append((b, list(ctxs[b]), Features(b, handed[b], feats[b, handed[b]:len(ctxs[b]) - 1])))
            handed[b] = len(ctxs[b]) - 1
        yield out
