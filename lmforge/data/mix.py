"""Mixing sources by weight: each document is repeated floor(w) times plus once more with probability
frac(w), where w is the weight of its source (so w = 0.5 keeps about half, w = 2 doubles it), the way
GPT-3 and The Pile up-weight high-quality sources by epochs. The draw is a hash of (seed, id), so it is
the same in every worker and every rerun.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from dataclasses import dataclass, field, replace

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.stage import StageContext


@dataclass(frozen=True, kw_only=True)
class MixConfig:
    """weights: {pattern: weight}, patterns (fnmatch) matched against `meta[key]` in the given order;
    default_weight for documents no pattern matches."""

    weights: dict[str, float] = field(default_factory=dict)
    key: str = "source"
    default_weight: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        coerce_fields(self, "mix")  # each field's type, named when wrong
        for k, w in {**self.weights, "default_weight": self.default_weight}.items():
            check(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0,
                  f"mix.weights[{k!r}] must be a finite number >= 0, got {w!r}")


def weight_of(doc: Document, cfg: MixConfig) -> float:
    value = str(doc.meta.get(cfg.key, ""))
    for pattern, w in cfg.weights.items():
        if fnmatch.fnmatchcase(value, pattern):
            return float(w)
    return cfg.default_weight


def _uniform(seed: int, doc_id: str) -> float:
    h = hashlib.blake2b(f"{seed}\0{doc_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


def mix(cfg: MixConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Reject (`mix:downsampled`) or repeat each document per its source's weight; copies get ids
    `<id>#mix<k>` and `meta.mix_copy = k`.

    The originals keep their order; the copies follow them round by round (every first copy, then every second
    ...), each round ordered by a hash of (seed, copy id), so no two instances of a document are neighbours
    (where a round would start with the document just before it, the round is rotated by one). A copy right
    after its original shares a training context window with it once short documents are packed, and the model
    can copy the first instance instead of predicting."""
    rounds: dict[int, list[tuple[float, str, Document]]] = {}
    for d in docs:
        w = weight_of(d, cfg)
        n = int(w) + (1 if _uniform(cfg.seed, d.id) < w - int(w) else 0)
        if n == 0:
            d.reject("mix:downsampled")
        for k in range(1, n):
            copy_id = f"{d.id}#mix{k}"
            rounds.setdefault(k, []).append(
                (_uniform(cfg.seed, copy_id), d.id, replace(d, id=copy_id, meta={**d.meta, "mix_copy": k})))
            ctx.count("mix.copies_added")
    out = list(docs)
    last = next((d.id for d in reversed(docs) if d.drop is None), None)  # (a downsampled one is dropped)
    for k in sorted(rounds):
        r = sorted(rounds[k], key=lambda c: (c[0], c[2].id))
        if len(r) > 1 and r[0][1] == last:
            r = r[1:] + r[:1]
        out += [c for _, _, c in r]
        last = r[-1][1]
    return out
