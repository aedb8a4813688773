"""What a pipeline stage is, and the context an executor hands it.

A stage is a pair (frozen config dataclass, function). Map stages see one batch of live documents at a
time and may run in any worker, in any order; global stages (corpus-wide dedup) see every live document
at once. Both return the documents they were given (possibly with `drop` set, text and metadata
changed) and may add new ones (upsampling when mixing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from lmforge.data.document import Document
from lmforge.errors import LmforgeError


@dataclass(frozen=True)
class StageContext:
    """Where a stage runs: the shard it is processing and a directory for side outputs (token shards)."""

    shard: str = "shard-00000"
    workdir: Path = field(default_factory=lambda: Path("."))
    counters: dict[str, int] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        """Add to a named counter (per-rule failures, lines removed); executors sum them into the report."""
        self.counters[key] = self.counters.get(key, 0) + n


StageFn = Callable[[Any, list[Document], StageContext], list[Document]]


@dataclass(frozen=True)
class StageSpec:
    """A registered stage: its config class, its function, and whether it is per-batch or corpus-wide."""

    name: str
    config: type
    fn: StageFn
    kind: Literal["map", "global"] = "map"
    help: str = ""


def run_stage(spec: StageSpec, cfg: Any, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Apply a map stage to a batch; if it raises, retry document by document so one bad document is
    rejected as `error:<stage>` instead of failing the run (issue 6, "nothing crashes"). An LmforgeError is
    no document's fault (a stage's setup: a tokenizer, model or file that is not there): it fails the run
    with its one-line error, before the shard is marked done."""
    try:
        return spec.fn(cfg, docs, ctx)
    except LmforgeError:
        raise
    except Exception as e:
        if spec.kind != "map" or len(docs) <= 1:
            if len(docs) == 1:
                reject_error(docs[0], spec.name, e)
                return docs
            raise
    out: list[Document] = []
    for d in docs:
        try:
            out.extend(spec.fn(cfg, [d], ctx))
        except LmforgeError:
            raise
        except Exception as e:  # the stage's own bug or a pathological document
            reject_error(d, spec.name, e)
            out.append(d)
    return out


def reject_error(d: Document, stage: str, e: Exception) -> None:
    """Reject d as `error:<stage>`, the exception recorded in meta.errors (what run_stage does to a document
    a stage fails on; stages that catch per-document errors themselves use it too)."""
    d.meta.setdefault("errors", []).append(f"{stage}: {type(e).__name__}: {e}"[:200])
    d.reject(f"error:{stage}")
