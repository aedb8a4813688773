"""Token trees for speculative decoding: several candidate continuations verified in one target forward
(SpecInfer, Miao et al. 2023, §3-4: token trees and tree-based parallel decoding; Medusa, Cai et al. 2024,
§2.1.2: tree attention).

A drafter may propose a tree instead of a chain: `DraftTree(tokens, parents)`, node i's parent an
earlier node or -1 for the root, the sequence's pending last token; a chain is parents [-1, 0, 1, ...].
Nodes are listed parents first, so every prefix of the list is a tree too (`first`: the engine trims a
tree to the room the scheduler reserved). On the engine (lmforge.infer.speculative.Speculative):

  1. the target scores root + nodes as one chunk of the step's flat batch: the nodes' keys go to the
     chunk's slots in node order, their positions are the root's + depth (runner.tree_chunk_positions),
     and AttnMetadata.tree_parents makes each node see the cached prefix, the root and its own ancestors
     only (lmforge.model.meta; every cache kind's mask through attention.tree_visible). Such a step runs no
     kernel step; on the CUDA graphs each node is a decode row masked by its ancestor bits (lmforge.infer.graphs),
     eagerly its attention runs the reference path;
  2. greedy verification (`greedy_path`) walks from the root, each time into the child whose token is
     the target's argmax there; the emitted tokens are the path + the target's argmax after its last
     node (the bonus token): exactly the target's greedy continuation;
  3. the accepted nodes' keys/values move to the positions right after the root (meta.accepted_slots ->
     PagedRunner.move_positions -> cache.move_slots, every layer, K/V or MLA latents), so later steps
     read a plain contiguous sequence; rejected nodes' slots are overwritten later, as rejected chain
     drafts' are.

Sampling (temperature > 0) verifies a tree with SpecInfer's multi-step speculative sampling (§4.2,
Algorithm 2; `sampled_path`): the children of a node are drawn independently from the drafter's
distribution q there (with replacement: siblings may repeat a token), and at the node, with the target's
distribution p, child x is accepted with probability min(1, p(x)/q(x)); on a rejection p becomes
norm(max(0, p - q)) and the next child is tried; when none is accepted, a token is drawn from what p has
become. Every emitted token is then distributed as the target's own sample (SpecInfer, Theorem 4.2), as
with a chain (which is this with one child per node). The drafter gives q as a chain drafter does: one row
per node, the distribution the node was drawn from.

`TreeDrafter(draft_model, widths=(3, 2, 1))` builds trees from a small draft model: after the root 3
tokens, after each of those 2, after each of these 1 (3 + 6 + 6 = 15 nodes): the draft's most likely
tokens for greedy requests, tokens drawn from its (processed) distribution for sampled ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lmforge.config import is_int
from lmforge.errors import ConfigError
from lmforge.infer.processors import apply_processors
from lmforge.model.meta import check_tree
from lmforge.utils import eval_mode


@dataclass(frozen=True)
class DraftTree:
    tokens: list[int]
    """(N,) candidate token of each node"""
    parents: list[int]
    """(N,) index of each node's parent, an earlier node; -1 = the root (the sequence's pending token)"""

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ConfigError(f"a draft tree needs one parent per token: {len(self.tokens)} tokens, "
                              f"{len(self.parents)} parents")
        check_tree(torch.tensor(self.parents, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        """Nodes on the longest root-to-leaf path: the most drafts one verification can accept."""
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 if p < 0 else depths[p] + 1)
        return max(depths, default=0)

    def first(self, n: int) -> DraftTree:
        """The first n nodes (a tree: parents come first)."""
        return self if n >= len(self) else DraftTree(self.tokens[:n], self.parents[:n])

    def chunk_parents(self) -> list[int]:
        """Parents within the scored chunk, root first (lmforge.infer.scheduler.Batch.trees)."""
        return [-1] + [p + 1 for p in self.parents]


def _children(tree: DraftTree) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, parent in enumerate(tree.parents):
        out.setdefault(parent, []).append(i)
    return out


def sampled_path(tree: DraftTree, p: torch.Tensor, q: torch.Tensor, gen: torch.Generator | None = None
                 ) -> tuple[list[int], int]:
    """Multi-step speculative sampling over a tree (SpecInfer Algorithm 2). p (N + 1, V): the target's
    distributions after chunk row j (row 0: the root, row 1 + i: node i); q (N, V): the distribution node i
    was drawn from (its parent's, in the drafter). Returns (accepted path, the next token)."""
    children, node = _children(tree), -1
    path = []
    while True:
        dist = p[node + 1]
        for c in children.get(node, ()):
            x = tree.tokens[c]
            px, qx = float(dist[x]), float(q[c, x])
            u = float(torch.rand((), generator=gen, device=p.device))
            if qx > 0 and u * qx < px:  # u < p/q without dividing by a tiny q
                path.append(c)
                node = c
                break
            rest = (dist - q[c]).clamp_min(0)
            if float(rest.sum()) > 0:  # (0 only where p <= q everywhere: then x was accepted surely)
                dist = rest / rest.sum()
        else:
            return path, int(torch.multinomial(dist, 1, generator=gen))


def greedy_path(tokens: list[int], parents: list[int], target: list[int]) -> list[int]:
    """The accepted root-to-node path of a greedy verification of the tree (tokens, parents) - a DraftTree's, or a
    chain's: parents [-1, 0, 1, ...] (lmforge.infer.acceptance.ExactAcceptance: one greedy matching for both).
    target[j]: the target's argmax after chunk row j (row 0: the root, row 1 + i: node i). From the root, step
    into the child whose token is the target's argmax at the current node (the first such child), while there
    is one."""
    child = {}
    for i, (tok, p) in enumerate(zip(tokens, parents)):
        child.setdefault((p, tok), i)
    path, node = [], -1
    while (node := child.get((node, target[node + 1]))) is not None:
        path.append(node)
    return path


class TreeDrafter:
    """Token trees from a small draft model sharing the target's tokenizer: widths[d] children after each
    node of depth d (the root: depth 0), its top tokens for greedy requests, drawn from its processed
    distribution (independently, with replacement) for sampled ones. `propose` recomputes: each depth is one
    forward over the context + branch of every node of the previous depth, batched (rows of equal length, no
    cache), so it keeps no per-sequence state - the readable reference. A paged engine drafts the same trees on
    its block pool instead (lmforge.infer.draft.PagedDraftModel with this drafter's `fit`: one tree-masked
    forward per depth over a cached context), unless a subclass overrides propose."""

    proposes_trees = True
    """the engine scores this drafter's proposals as token trees"""

    def __init__(self, model, widths: tuple[int, ...] = (3, 2, 1), acceptance=None):
        """acceptance: the rule its trees are verified by (lmforge.infer.speculative.AcceptanceRule, e.g.
        TypicalAcceptance); None = the exact one."""
        widths = tuple(widths)
        if not widths or any(not is_int(w) or w < 1 for w in widths):
            raise ConfigError(f"TreeDrafter widths must be positive ints, one per depth, e.g. (3, 2, 1); got {widths}")
        self.model, self.widths, self.acceptance = model, tuple(int(w) for w in widths), acceptance

    @property
    def tree_size(self) -> int:
        """Nodes of a full tree: the engine reserves this many cache slots per step (its lookahead)."""
        return tree_size(self.widths)

    def fit(self, k: int) -> tuple[int, ...]:
        """The widths of a tree of at most k nodes (room is short near max_tokens or the step's token
        budget): narrow the widest depth first (the shallower of equals), drop depths only as a chain. A
        greedy path gains a token per depth, never per sibling."""
        widths = list(self.widths)
        while tree_size(widths) > k and max(widths) > 1:
            widths[widths.index(max(widths))] -= 1
        return tuple(widths[:max(k, 0)])

    @torch.inference_mode()
    def propose(self, ctx: list[int], k: int, procs, greedy: bool, gen
                ) -> tuple[DraftTree, torch.Tensor | None]:
        """At most k nodes (`fit`), breadth first, and for a sampled request q (N, V): the distribution
        each node was drawn from (None when greedy)."""
        dev = next(self.model.parameters()).device
        tokens, parents, frontier, q = [], [], [-1], []
        branch = {-1: []}  # node -> the tokens from the root's child down to it
        with eval_mode(self.model):
            for w in self.fit(k):
                rows = [ctx + branch[f] for f in frontier]
                logits = apply_processors(procs, self.model(torch.tensor(rows, device=dev))[:, -1].float(), None)
                if greedy:
                    kids = logits.topk(w, dim=-1).indices.tolist()
                else:
                    probs = logits.softmax(-1)  # (len(frontier), V)
                    kids = torch.multinomial(probs, w, replacement=True, generator=gen).tolist()
                    q += [row for row in probs for _ in range(w)]
                nxt = []
                for f, toks in zip(frontier, kids):
                    for tok in toks:
                        nxt.append(len(tokens))
                        branch[len(tokens)] = branch[f] + [tok]
                        tokens.append(tok)
                        parents.append(f)
                frontier = nxt
        return DraftTree(tokens, parents), (torch.stack(q) if q else None)


def tree_size(widths) -> int:
    """Nodes of a tree with widths[d] children per node of depth d: w0 + w0 w1 + w0 w1 w2 + ..."""
    return sum(math.prod(widths[:d + 1]) for d in range(len(widths)))
