"""Per-stage accounting shared by the executors: documents and bytes in/out, rejection reasons and
stage counters, so the report can prove that every input document was kept or rejected with a reason.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections import Counter
from typing import Any, Iterable

import numpy as np

from lmforge.data.document import Document
from lmforge.data.stage import StageContext, StageSpec, run_stage


def stage_record(name: str) -> dict[str, Any]:
    return {"name": name, "docs_in": 0, "docs_out": 0, "bytes_in": 0, "bytes_out": 0, "added": 0,
            "seconds": 0.0, "rejected": {}}


def read_stage(docs: Iterable[Document]) -> tuple[list[Document], list[Document], dict[str, Any]]:
    """The pseudo-stage "read": reader errors and empty documents are rejected here. The record keeps the ids'
    hashes (`id_hashes`), from which the report counts the documents sharing an id with an earlier one anywhere in
    the run (`duplicate_ids`): they are kept (ids are the input's, and dedup is a stage's choice) but counted, since
    anything keyed by id downstream would merge them."""
    rec = stage_record("read")
    live, dropped = [], []
    reasons: Counter[str] = Counter()
    ids = []
    for d in docs:
        if d.drop is None:
            ids.append(d.id)
        rec["docs_in"] += 1
        rec["bytes_in"] += d.nbytes
        if d.drop is None and not d.text.strip() and not d.raw:
            d.reject("empty")
        if d.drop is not None:
            reasons[d.drop] += 1
            dropped.append(d)
        else:
            live.append(d)
            rec["bytes_out"] += d.nbytes
    rec["docs_out"] = len(live)
    rec["rejected"] = dict(reasons)
    rec["id_hashes"] = id_hashes(ids)
    return live, dropped, rec


def id_hashes(ids: list[str]) -> str:
    """64-bit hashes of document ids, packed for a shard's marker (base64 of their bytes: 11 characters an id)."""
    return base64.b64encode(b"".join(hashlib.blake2b(i.encode("utf-8", "surrogatepass"), digest_size=8).digest()
                                     for i in ids)).decode("ascii")


def duplicate_ids(records: Iterable[dict[str, Any]]) -> int:
    """Documents whose id an earlier document of the run had, in any shard: the ids hashed in the "read" records
    (`id_hashes`) less the distinct ones. Two ids share a 64-bit hash with odds about n^2 / 2^65 (3e-4 for 1e8
    documents)."""
    packed = [np.frombuffer(base64.b64decode(r["id_hashes"]), dtype=np.uint64) for r in records if r.get("id_hashes")]
    hashes = np.concatenate(packed) if packed else np.zeros(0, dtype=np.uint64)
    return len(hashes) - len(np.unique(hashes))


def apply_stage(spec: StageSpec, cfg: Any, live: list[Document], ctx: StageContext
                ) -> tuple[list[Document], list[Document], dict[str, Any]]:
    """Run one stage on the live documents; returns (still live, newly rejected, stats record)."""
    rec = stage_record(spec.name)
    rec["docs_in"] = len(live)
    rec["bytes_in"] = sum(d.nbytes for d in live)
    ids_in = {id(d) for d in live}
    t0 = time.perf_counter()
    out = run_stage(spec, cfg, live, ctx) if live else []
    rec["seconds"] = time.perf_counter() - t0
    kept, dropped = record_outcome(rec, out, ids_in)
    return kept, dropped, rec


def record_outcome(rec: dict[str, Any], out: list[Document], ids_in: set[int]
                   ) -> tuple[list[Document], list[Document]]:
    """Fill a stage record's outputs from the documents a stage returned: those whose object id is not in
    `ids_in` (the ids of the documents it was given) it added. Returns (kept, rejected)."""
    rec["added"] = sum(1 for d in out if id(d) not in ids_in)
    kept = [d for d in out if d.drop is None]
    dropped = [d for d in out if d.drop is not None]
    rec["docs_out"] = len(kept)
    rec["bytes_out"] = sum(d.nbytes for d in kept)
    rec["rejected"] = dict(Counter(d.drop for d in dropped))
    return kept, dropped


def merge_stats(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sum per-shard stage records stage by stage (same stage order in every shard)."""
    merged: dict[str, dict[str, Any]] = {}
    for r in records:
        m = merged.setdefault(r["name"], stage_record(r["name"]))
        for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "added", "seconds"):
            m[k] += r.get(k, 0)
        for reason, n in r["rejected"].items():
            m["rejected"][reason] = m["rejected"].get(reason, 0) + n
    return list(merged.values())


def balance(stages: list[dict[str, Any]], kept: int) -> dict[str, Any]:
    """input + added == kept + rejected, the invariant of issue 6 ("nothing lost")."""
    read = next((s for s in stages if s["name"] == "read"), None)
    docs_in = read["docs_in"] if read else 0
    added = sum(s["added"] for s in stages)
    rejected = sum(sum(s["rejected"].values()) for s in stages)
    return {"input_docs": docs_in, "added_docs": added, "kept_docs": kept, "rejected_docs": rejected,
            "balanced": docs_in + added == kept + rejected}
