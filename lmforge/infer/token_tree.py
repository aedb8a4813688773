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
     only (lmforge.model.meta; every cache kind's mask through attention.tree_visible). Such a step runs
     the eager path: no CUDA graph, no kernel step, prefill chunks on the reference attention;
  2. greedy verification (`greedy_path`) walks from the root, each time into the child whose token is
     the target's argmax there; the emitted tokens are the path + the target's argmax after its last
     node (the bonus token): exactly the target's greedy continuation;
  3. the accepted nodes' keys/values move to the positions right after the root (meta.accepted_slots ->
     PagedRunner.move_positions -> cache.move_slots, every layer, K/V or MLA latents), so later steps
     read a plain contiguous sequence; rejected nodes' slots are overwritten later, as rejected chain
     drafts' are.

Greedy only: verifying a sampled tree keeps the target's distribution only with multi-candidate
speculative sampling (SpecInfer §4.2; SpecTr, Sun et al. 2023), left for the Medusa / EAGLE work.

`TreeDrafter(draft_model, widths=(3, 2, 1))` builds trees from a small draft model: the top-3 tokens
after the root, the top-2 after each of those, the top-1 after each of these (3 + 6 + 6 = 15 nodes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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

    def first(self, n: int) -> DraftTree:
        """The first n nodes (a tree: parents come first)."""
        return self if n >= len(self) else DraftTree(self.tokens[:n], self.parents[:n])

    def chunk_parents(self) -> list[int]:
        """Parents within the scored chunk, root first (lmforge.infer.scheduler.Batch.trees)."""
        return [-1] + [p + 1 for p in self.parents]


def greedy_path(tree: DraftTree, target: list[int]) -> list[int]:
    """The accepted root-to-node path of a greedy verification. target[j]: the target's argmax after chunk
    row j (row 0: the root, row 1 + i: node i). From the root, step into the child whose token is the
    target's argmax at the current node (the first such child), while there is one."""
    child = {}
    for i, (tok, p) in enumerate(zip(tree.tokens, tree.parents)):
        child.setdefault((p, tok), i)
    path, node = [], -1
    while (node := child.get((node, target[node + 1]))) is not None:
        path.append(node)
    return path


class TreeDrafter:
    """Token trees from a small draft model sharing the target's tokenizer: the top widths[d] tokens
    after each node of depth d (the root: depth 0). The draft recomputes: each depth is one forward over
    the context + branch of every node of the previous depth, batched (rows of equal length, no cache),
    so the drafter keeps no per-sequence state (preemption and forks need nothing). A first, plain
    version: a cached draft, one forward per depth with the tree mask, is later work."""

    proposes_trees = True
    """the engine scores this drafter's proposals as token trees (greedy requests only)"""

    def __init__(self, model, widths: tuple[int, ...] = (3, 2, 1)):
        widths = tuple(widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise ConfigError(f"TreeDrafter widths must be positive ints, one per depth, e.g. (3, 2, 1); got {widths}")
        self.model, self.widths = model, widths

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
    def propose(self, ctx: list[int], k: int, procs, greedy: bool, gen) -> tuple[DraftTree, None]:
        """At most k nodes (`fit`), breadth first. Greedy only (the strategy refuses sampled requests)."""
        dev = next(self.model.parameters()).device
        tokens, parents, frontier = [], [], [-1]
        branch = {-1: []}  # node -> the tokens from the root's child down to it
        with eval_mode(self.model):
            for w in self.fit(k):
                rows = [ctx + branch[f] for f in frontier]
                logits = self.model(torch.tensor(rows, device=dev))[:, -1].float()  # (len(frontier), V)
                top = apply_processors(procs, logits, None).topk(w, dim=-1).indices.tolist()
                nxt = []
                for f, kids in zip(frontier, top):
                    for tok in kids:
                        nxt.append(len(tokens))
                        branch[len(tokens)] = branch[f] + [tok]
                        tokens.append(tok)
                        parents.append(f)
                frontier = nxt
        return DraftTree(tokens, parents), None

    def accept(self, ctx_len: int) -> None:
        pass


def tree_size(widths) -> int:
    """Nodes of a tree with widths[d] children per node of depth d: w0 + w0 w1 + w0 w1 w2 + ..."""
    return sum(math.prod(widths[:d + 1]) for d in range(len(widths)))
