"""A corpus with known near-duplicate clusters, for testing and benchmarking fuzzy dedup: random
documents over a large made-up vocabulary (so unrelated documents share almost no shingles), and for
some of them a few copies with a small share of words substituted, inserted or deleted."""

from __future__ import annotations

import random


def _vocabulary(rng: random.Random, size: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "pel", "dri", "no", "ast", "qui", "bel", "fo",
                 "gri", "zen", "ul", "tam", "ori", "wex"]
    words = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def _perturb(words: list[str], vocab: list[str], edit_frac: float, rng: random.Random) -> list[str]:
    out = list(words)
    for _ in range(max(1, int(len(words) * edit_frac))):
        op, i = rng.random(), rng.randrange(len(out))
        if op < 0.6:
            out[i] = rng.choice(vocab)
        elif op < 0.8:
            out.insert(i, rng.choice(vocab))
        elif len(out) > 1:
            del out[i]
    return out


def near_duplicate_corpus(*, n_unique: int = 1000, n_clusters: int = 100, copies: int = 3,
                          words: int = 300, edit_frac: float = 0.01, seed: int = 0
                          ) -> tuple[list[str], list[list[int]]]:
    """(texts, clusters): `n_clusters` originals each followed by `copies` perturbed copies, then
    `n_unique` unrelated documents, shuffled; clusters lists the indices of each planted group."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng, 20_000)
    groups: list[list[str]] = []
    for _ in range(n_clusters):
        base = [rng.choice(vocab) for _ in range(words)]
        groups.append([" ".join(base)] + [" ".join(_perturb(base, vocab, edit_frac, rng)) for _ in range(copies)])
    groups += [[" ".join(rng.choice(vocab) for _ in range(words))] for _ in range(n_unique)]
    order = list(range(sum(len(g) for g in groups)))
    rng.shuffle(order)
    flat = [(gi, t) for gi, g in enumerate(groups) for t in g]
    texts = [""] * len(flat)
    members: dict[int, list[int]] = {}
    for pos, (gi, t) in zip(order, flat):
        texts[pos] = t
        members.setdefault(gi, []).append(pos)
    clusters = sorted(sorted(m) for gi, m in members.items() if gi < n_clusters)
    return texts, clusters
