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
verified pairs), or recomputed from the whole history (cached=False, the reference).
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

    def accept(self, ctx_len: int) -> None:
        pass  # the next Features.start says where the verified features end: nothing to rewind here

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
                logits = apply_processors(procs, logits[None].float(), None)[0]
                if greedy:
                    kids = logits.topk(w).indices.tolist()
                else:
                    q = logits.softmax(-1)
                    kids = torch.multinomial(q, w, replacement=True, generator=gen).tolist()
                    qs += [q] * w
                for kid in kids:
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


class CachedEagle(ToyEagle):
    """ToyEagle + one attention block (lmforge's Block, the target's shape) over every earlier pair, mixed in
    with weight `gate` so `fit`'s drafts stay mostly right. Its own KVCache per sequence holds one entry per
    verified pair (f_j, x_{j+1}); a round rewinds it to Features.start, appends the new pairs, then the
    drafts' entries, which the next round's rewind forgets. A tree's depth d is one forward over all its
    nodes so far with the tree mask (KVCache's tree_parents sees the verified pairs + each node's
    ancestors; deeper cached draft levels cannot be masked, so earlier levels are recomputed).
    `proposals[seq_id]`: (tokens, parents, the predicted feature of the pending token) of every round."""

    def __init__(self, target, widths: tuple[int, ...] | None = None, cached: bool = True, gate: float = 0.5):
        super().__init__(target, None, widths)
        cfg = dataclasses.replace(target.cfg, n_layers=1)
        self.block, self.cached, self.gate = Block(cfg, 0), cached, gate
        self.max_len = cfg.max_seq_len + 64
        self.caches: dict[int, KVCache] = {}
        self.proposals: dict[int, list[tuple[list[int], list[int], torch.Tensor]]] = {}

    def _cache(self) -> KVCache:
        attn = self.block.attn
        return KVCache(1, 1, attn.n_kv, attn.hd, self.max_len)

    def run(self, feats: torch.Tensor, toks: list[int], cache: KVCache, parents: list[int] | None = None):
        """(n, d) features + the n next tokens -> (n, d) predicted features, their K/V appended to cache."""
        target, base = self._target[0], cache.length
        x = self.fc(torch.cat([feats, target.embed(torch.tensor(toks, device=feats.device))], -1))
        x = (x + self.mlp(x))[None]
        tree = torch.tensor(parents) if parents is not None else None
        pos = (tree_positions(tree, base) if tree is not None else torch.arange(base, base + len(toks)))[None]
        y = self.block(x, target.rope.cos_sin(pos, int(pos.max()) + 1), None, cache,
                       AttnMetadata.tree(tree) if tree is not None else None)
        cache.advance(len(toks))
        return (x + self.gate * (y - x))[0]

    @torch.inference_mode()
    def propose(self, ctx: list[int], k: int, procs, greedy: bool, gen, hidden: Features):
        seen = self.state.get(hidden.seq_id)
        self.state[hidden.seq_id] = hidden.states if seen is None else torch.cat([seen, hidden.states])
        if self.cached:  # the verified pairs before Features.start are in the cache; drafts' entries go
            cache = self.caches.get(hidden.seq_id) or self.caches.setdefault(hidden.seq_id, self._cache())
            cache.rewind(hidden.start)
            feats, first = hidden.states, hidden.start
        else:
            cache, feats, first = self._cache(), self.state[hidden.seq_id], 0
        f = self.run(feats, ctx[first + 1:], cache)[-1]  # predicted feature of the pending token ctx[-1]
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
                logits = apply_processors(procs, self._target[0].logits(feat[node][None]).float(), None)[0]
                if greedy:
                    kids = logits.topk(w).indices.tolist()
                else:
                    q = logits.softmax(-1)
                    kids = torch.multinomial(q, w, replacement=True, generator=gen).tolist()
                    qs += [q] * w
                for kid in kids:
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
