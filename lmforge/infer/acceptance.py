"""Acceptance rules of speculative decoding: which drafts a verification keeps and the token after them.

The target scores a step's drafts in one forward (lmforge.infer.speculative); a rule turns those
distributions into the emitted tokens. A drafter names its rule with an `acceptance` attribute
(`acceptance_of`); the engine's one decode loop calls it for chains (`chain`) and token trees (`tree`).
`ExactAcceptance` (the default) keeps the target's output law: speculative sampling's rejection test
(Leviathan et al. 2023; Chen et al. 2023), greedy matching, SpecInfer's multi-step test over trees.
`TypicalAcceptance` is Medusa's, which trades that exactness for longer accepted runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from lmforge.config import check
from lmforge.errors import ConfigError
from lmforge.infer.token_tree import DraftTree, greedy_path, sampled_path


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


class AcceptanceRule(Protocol):
    """Which drafts a verification keeps and the token after them: the seam a drafter plugs its own rule into
    (`acceptance` on the drafter object, e.g. Medusa's typical acceptance), one decode loop for all rules.
    p (d + 1, V): the target's distributions the request samples from (processors applied; one-hot argmax
    when greedy), row 0 after the pending token, row 1 + i after draft (node) i; q (d, V): the distribution
    each draft was drawn from, or None where the drafter gave none."""

    needs_q: bool
    """sampled requests need q (a tree proposed without it is refused before it is scored)"""

    def chain(self, p: torch.Tensor, q: torch.Tensor | None, drafts: list[int], greedy: bool,
              gen: torch.Generator | None) -> tuple[int, int]:
        """-> (a, token): drafts[:a] + [token] are emitted; token is drawn against row a of p."""
        ...

    def tree(self, tree: DraftTree, p: torch.Tensor, q: torch.Tensor | None, greedy: bool,
             gen: torch.Generator | None) -> tuple[list[int], int]:
        """-> (the accepted root-to-node path of node indices, the token after its last node)."""
        ...


class ExactAcceptance:
    """Speculative sampling's rejection test (`verify`; SpecInfer's over trees, `sampled_path`) and greedy
    matching (`greedy_path`): every emitted token is distributed as the target's own (the default)."""

    needs_q = True

    def chain(self, p, q, drafts, greedy, gen) -> tuple[int, int]:
        if greedy:  # a chain is the tree whose node i hangs from node i - 1 (q, None or given, is not read)
            path, token = _greedy(drafts, list(range(-1, len(drafts) - 1)), p)
            return len(path), token
        return verify(p, q.to(p.device) if drafts else p[:0], drafts, gen)  # (a sampled chain has q: take)

    def tree(self, tree, p, q, greedy, gen) -> tuple[list[int], int]:
        if greedy:
            return _greedy(tree.tokens, tree.parents, p)
        return sampled_path(tree, p, q.to(p.device) if q is not None else None, gen)


def _greedy(tokens: list[int], parents: list[int], p: torch.Tensor) -> tuple[list[int], int]:
    """Greedy matching of a chain or a tree (tokens, parents) against p (d + 1, V) (one-hot argmax rows: p's argmax
    is the target's greedy token): the accepted path (`greedy_path`) and the argmax after its last node, from one
    host read. A chain keeps what the rejection test (`verify`) with that p keeps wherever q gives each draft a
    probability > 0 (where q gives a matching draft 0, the test rejected it, then drew that same token: the output
    is the same), and draws nothing from the sequence's generator."""
    target = p.argmax(-1).tolist()
    path = greedy_path(tokens, parents, target)
    return path, target[path[-1] + 1 if path else 0]


EXACT = ExactAcceptance()


@dataclass(frozen=True, kw_only=True)
class TypicalAcceptance:
    """Typical acceptance (Cai et al. 2024, "Medusa: Simple LLM Inference Acceleration Framework with Multiple
    Decoding Heads", arXiv:2401.10774, §2.3.1): draft x at a position is kept when the target's probability
    of it passes an entropy-dependent threshold,
        p(x) > min(epsilon, delta * exp(-H(p))),     H(p) = -sum_v p(v) log p(v),
    so a flat target (high entropy) accepts many plausible tokens and a peaked one little but its mode. Drafts
    are kept up to the first that fails; the token after them is the target's own choice at that position (its
    argmax when greedy, a draw from p when sampled), never a draft: the paper's "first token" of each step,
    taken from the target. A tree keeps its longest accepted root-to-node path, ties to the likelier (sum of
    log p), as the reference implementation chooses among candidates (FasterDecoding/Medusa,
    medusa/model/utils.py, evaluate_posterior; its defaults posterior_threshold 0.09 = epsilon, posterior_alpha
    0.3 = delta). Greedy requests (one-hot p, H = 0) keep exactly the drafts greedy matching keeps; sampled
    ones are NOT distributed as the target's samples (the trade the paper makes for longer accepted runs), and
    q is not read. One host read per verification (acceptance, likelihoods and each row's choice together)."""

    epsilon: float = 0.09
    """hard cap of the threshold: a draft with p(x) > epsilon is always kept"""
    delta: float = 0.3
    """scale of the entropy-dependent threshold delta * exp(-H)"""

    needs_q = False

    def __post_init__(self) -> None:
        for name, value in (("epsilon", self.epsilon), ("delta", self.delta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"TypicalAcceptance {name} must be a finite number, got {value!r}; "
                                  f"Medusa uses epsilon=0.09, delta=0.3")
        check(0 < self.epsilon < 1, f"TypicalAcceptance epsilon must be in (0, 1), got {self.epsilon}: a threshold "
                                    "of 1 or more keeps no draft; Medusa uses 0.09")
        check(self.delta > 0, f"TypicalAcceptance delta must be > 0, got {self.delta}: a threshold of 0 keeps every "
                              "token the target allows; Medusa uses 0.3")

    def passes(self, p: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """p (n, V), tokens (n,) -> (n,) bool: whether tokens[i] passes row i's threshold."""
        entropy = -torch.special.xlogy(p, p).sum(-1)
        threshold = (self.delta * torch.exp(-entropy)).clamp(max=self.epsilon)
        return p.gather(-1, tokens[:, None])[:, 0] > threshold

    def _choices(self, p: torch.Tensor, greedy: bool, gen) -> torch.Tensor:
        """(rows,) the target's own token at every row (which one is emitted is known only after the read)."""
        return p.argmax(-1) if greedy else torch.multinomial(p, 1, generator=gen)[:, 0]

    def chain(self, p, q, drafts, greedy, gen) -> tuple[int, int]:
        choices = self._choices(p, greedy, gen)
        if not drafts:
            return 0, int(choices[0])
        ok = self.passes(p[:len(drafts)], torch.tensor(drafts, device=p.device))
        a = ok.long().cumprod(0).sum()  # accepted up to the first failure
        a, *choices = torch.cat([a[None], choices]).tolist()
        return a, choices[a]

    def tree(self, tree, p, q, greedy, gen) -> tuple[list[int], int]:
        choices = self._choices(p, greedy, gen)
        if not len(tree):
            return [], int(choices[0])
        at = torch.tensor([parent + 1 for parent in tree.parents], device=p.device)  # the row each node is read at
        tokens = torch.tensor(tree.tokens, device=p.device)
        ok = self.passes(p[at], tokens)
        logp = p[at, tokens].log()
        n = len(tree)
        read = torch.cat([ok.double(), logp.double(), choices.double()]).tolist()
        ok, logp, choices = read[:n], read[n:2 * n], [int(c) for c in read[2 * n:]]
        depth, score, best = [0] * n, [0.0] * n, -1
        for i, parent in enumerate(tree.parents):  # parents first: a node is reached through its accepted parent
            if not ok[i] or (parent >= 0 and not depth[parent]):
                continue
            depth[i] = 1 + (depth[parent] if parent >= 0 else 0)
            score[i] = logp[i] + (score[parent] if parent >= 0 else 0.0)
            if best < 0 or (depth[i], score[i]) > (depth[best], score[best]):
                best = i
        path, node = [], best
        while node >= 0:
            path.append(node)
            node = tree.parents[node]
        return path[::-1], choices[best + 1]


def acceptance_of(draft, rule=None) -> AcceptanceRule:
    """The rule a draft's proposals are verified by: `rule` (the engine's `acceptance=`), else the drafter's
    `acceptance`, else ExactAcceptance."""
    given = rule is not None
    rule = rule if given else getattr(draft, "acceptance", None)
    if rule is None:
        return EXACT
    if not (callable(getattr(rule, "chain", None)) and callable(getattr(rule, "tree", None))
            and hasattr(rule, "needs_q")):
        whose = "acceptance" if given else f"{type(draft).__name__}.acceptance"
        raise ConfigError(f"{whose} must be an acceptance rule (needs_q, chain(p, q, drafts, greedy, gen), tree(tree, "
                          f"p, q, greedy, gen)), got {rule!r}; use e.g. TypicalAcceptance(epsilon=0.09, delta=0.3), "
                          "or drop it for the exact rule")
    return rule
