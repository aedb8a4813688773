"""The same pipeline on Ray Data (`pip install 'lmforge[ray]'`), for corpora larger than one machine.

Rows carry documents (id, text, JSON metadata, raw bytes, drop reason) plus "stats" rows: every batch
that a phase processes emits one stats row with its per-stage records, so the report is assembled
from the dataset itself without side channels. Map phases run as `map_batches` over the cluster; the
final write is also a `map_batches` (each batch writes its own output file); global stages (corpus-wide
dedup) gather the live documents on the driver, which bounds them by the driver's memory.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from pathlib import Path
from typing import Any

from lmforge.data.accounting import apply_stage, read_stage
from lmforge.data.document import Document
from lmforge.data.executor import (_check_run_dir, build_report, check_stage_errors, output_dir_lock, run_entries,
                                   stage_labels)
from lmforge.data.pipeline import (PipelineConfig, check_stage_files, make_shards, phases, read_inputs,
                                   release_checked_models, stage_files)
from lmforge.data.report import write_report
from lmforge.data.stage import StageContext
from lmforge.data.writers import _json_line, write_docs, write_jsonl
from lmforge.errors import ConfigError, LmforgeError, require

COLUMNS = ("kind", "id", "text", "meta", "raw", "drop")


def _schema() -> Any:
    pa = require("pyarrow", "data")
    # id and text are bytes, not Arrow strings: a lone surrogate (a legal JSON escape, "\ud800", that the local
    # executor keeps and writes back) is no valid UTF-8, and an Arrow string column refused the whole batch
    return pa.schema([("kind", pa.string()), ("id", pa.binary()), ("text", pa.binary()),
                      ("meta", pa.string()), ("raw", pa.binary()), ("drop", pa.string())])


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")


def doc_row(d: Document) -> dict[str, Any]:
    # meta through the writers' JSON, which writes lone surrogates as their escapes (drop reasons are lmforge's)
    return {"kind": "doc", "id": _utf8(d.id), "text": _utf8(d.text), "meta": _json_line(d.meta),
            "raw": d.raw or b"", "drop": d.drop or ""}


def stats_row(stats: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "stats", "id": b"", "text": b"", "meta": json.dumps(stats), "raw": b"", "drop": ""}


def row_doc(r: dict[str, Any]) -> Document:
    return Document(id=r["id"].decode("utf-8", "surrogatepass"), text=r["text"].decode("utf-8", "surrogatepass"),
                    meta=json.loads(r["meta"] or "{}"), raw=r["raw"] or None, drop=r["drop"] or None)


def _table(rows: list[dict[str, Any]]) -> Any:
    pa = require("pyarrow", "data")
    return pa.Table.from_pylist(rows, schema=_schema())


class _ReadShard:
    """flat_map: one shard's input files -> document rows + one stats row for the "read" stage."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg

    def __call__(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        live, dropped, rec = read_stage(read_inputs(self.cfg.input, [Path(f) for f in item["files"]]))
        return [doc_row(d) for d in live + dropped] + [stats_row({"phase": 0, "stages": [rec], "counters": {}})]


# {run id: the files the stages read, as this worker process found them at its first batch of that run} (`_MapPhase`)
_FIRST_SEEN: dict[str, dict[str, list[list]]] = {}


class _MapPhase:
    """map_batches: run one phase's map stages over a batch; dropped docs and stats rows pass through. `fixed`: the
    files the stages read as the driver found them at the run's start (`pipeline.stage_files`; None: no check);
    `run`: the run's id, which its phases share."""

    def __init__(self, cfg: PipelineConfig, p: int, fixed: dict[str, list[list]] | None = None, run: str = ""):
        self.cfg, self.p, self.fixed, self.run = cfg, p, fixed, run or uuid.uuid4().hex
        all_phases = phases(cfg.built_stages())
        self.stages = all_phases[p]
        first = sum(len(ph) for ph in all_phases[:p])
        self.labels = stage_labels(cfg)[first:first + len(self.stages)]

    def _files_seen(self) -> dict[str, list[list]] | None:
        """The stage files this process holds itself to: as it found them at its first batch of the run, not the
        driver's `fixed`. On another machine a model copied to each node has another mtime and a symlink may resolve
        elsewhere, so comparing the driver's stamps failed every batch; a change on this node mid-run still fails,
        and the driver checks its own files before and after the run (`run_ray`). With their content digests, so a
        file only touched is no change (`pipeline.describe_changes`): the driver's where path, size and mtime match,
        else read once per machine (utils.remembered_sha256)."""
        if self.fixed is None:
            return None
        if self.run not in _FIRST_SEEN:
            now = stage_files(self.cfg, digests=True, known=self.fixed)
            _FIRST_SEEN[self.run] = {k: v for k, v in now.items() if k in self.fixed}
        return _FIRST_SEEN[self.run]

    def __call__(self, batch: Any) -> Any:
        rows = batch.to_pylist()
        passthrough = [r for r in rows if r["kind"] != "doc" or r["drop"]]
        live = [row_doc(r) for r in rows if r["kind"] == "doc" and not r["drop"]]
        # a batch is no input shard, so its token shard gets a random name: the tokenize stage records each in
        # output.dir before writing it, and --restart removes those (`remove_token_files`)
        ctx = StageContext(shard=f"ray-{uuid.uuid4().hex[:12]}", workdir=Path(self.cfg.output.dir))
        seen = self._files_seen()  # (checked after the stages: the previous batch's check covers the time before)
        dropped, records = [], []
        for (spec, scfg), label in zip(self.stages, self.labels):
            live, gone, rec = apply_stage(spec, scfg, live, ctx)
            rec["name"] = label
            dropped += gone
            records.append(rec)
        check_stage_files(self.cfg, seen, ctx.workdir, done=None)
        stats = stats_row({"phase": self.p, "stages": records, "counters": ctx.counters})
        return _table(passthrough + [doc_row(d) for d in live + dropped] + [stats])


class _WriteBatch:
    """map_batches: write a batch's kept and rejected documents to their own files; keep stats rows."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg

    def __call__(self, batch: Any) -> Any:
        rows = batch.to_pylist()
        docs = [row_doc(r) for r in rows if r["kind"] == "doc"]
        kept, rejected = [d for d in docs if d.drop is None], [d for d in docs if d.drop is not None]
        name, out = f"ray-{uuid.uuid4().hex[:12]}", Path(self.cfg.output.dir)
        fmt = self.cfg.output.format
        if kept:
            write_docs(out / "data" / f"{name}.{fmt}", kept, "parquet" if fmt == "parquet" else "jsonl")
        if rejected:
            write_jsonl(out / "rejected" / f"{name}.jsonl", rejected, with_text=self.cfg.output.rejected_text)
        stats = [r for r in rows if r["kind"] == "stats"]
        return _table(stats + [stats_row({"phase": -1, "stages": [], "counters": {}, "kept": len(kept)})])


def _global_phase(ds: Any, cfg: PipelineConfig, p: int) -> Any:
    """Gather the live documents on the driver, run the corpus-wide stage, rebuild the dataset."""
    ray = require("ray", "ray")
    (spec, scfg), = phases(cfg.built_stages())[p]
    label = stage_labels(cfg)[sum(len(ph) for ph in phases(cfg.built_stages())[:p])]
    rows = ds.take_all()
    passthrough = [r for r in rows if r["kind"] != "doc" or r["drop"]]
    live = [row_doc(r) for r in rows if r["kind"] == "doc" and not r["drop"]]
    ctx = StageContext(shard="global", workdir=Path(cfg.output.dir))
    kept, gone, rec = apply_stage(spec, scfg, live, ctx)
    rec["name"] = label
    new = passthrough + [doc_row(d) for d in kept + gone] + [stats_row({"phase": p, "stages": [rec],
                                                                      "counters": ctx.counters})]
    return ray.data.from_arrow(_table(new))


@contextlib.contextmanager
def _preserve_order(ray: Any) -> Any:
    """Ray Data hands blocks on in the order their tasks finish unless `preserve_order` is set (off by default):
    a global stage then saw the documents in an order that varied between runs, and exact dedup kept whichever
    copy came back first, where the local executor keeps the first in shard order. A Dataset takes a copy of the
    current DataContext when it is made, so the setting is on while the pipeline's datasets are made and run, and
    the caller's is restored after."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def _task_error(e: BaseException) -> LmforgeError | None:
    """The LmforgeError a Ray task raised (a stage file changed mid-run, a stage's setup), out of the wrapper the
    driver gets: RayTaskError(UserCodeException), 16 lines of traceback where the local executor gives one line. Ray
    Data raises UserCodeException from the error and that link is not pickled, so the error is left only in the
    worker's traceback, the wrapper's text: its last exception line outside Ray's own (`lmforge.errors.DataError:
    <message>`) is read back; None when that is no lmforge error (a bug, raised as it came). (Ray Data's
    raise_original_map_exception keeps the exception itself, but Ray then logs it as a bug of its own, with its whole
    stack and a request to open an issue.)"""
    from ray.exceptions import RayTaskError

    from lmforge import errors

    while e is not None and not isinstance(e, RayTaskError):
        e = e.__cause__ or e.__context__
    raised = [m for m in re.findall(r"^(\w+(?:\.\w+)*): (.+)$", str(e) if e is not None else "", flags=re.M)
              if not m[0].startswith("ray.")]  # (traceback lines are indented; Ray's wrappers are its own)
    if not raised or not raised[-1][0].startswith("lmforge.errors."):
        return None
    name, message = raised[-1]
    cls = getattr(errors, name.rsplit(".", 1)[1], None)
    return (cls if isinstance(cls, type) and issubclass(cls, LmforgeError) else LmforgeError)(message)


def _run_dataset(ray: Any, cfg: PipelineConfig, batch_size: int, fixed: dict[str, list[list]]) -> list[dict]:
    """Every phase over the dataset and the write; the stats rows that come back."""
    shards, run = make_shards(cfg.input), uuid.uuid4().hex
    with _preserve_order(ray):
        ds = ray.data.from_items([{"shard": s, "files": [str(f) for f in fs]} for s, fs in shards.items()])
        ds = ds.flat_map(_ReadShard(cfg))
        for p, phase in enumerate(phases(cfg.built_stages())):
            if not phase:
                continue
            if phase[0][0].kind == "global":
                ds = _global_phase(ds, cfg, p)
            else:
                ds = ds.map_batches(_MapPhase(cfg, p, fixed, run), batch_size=batch_size, batch_format="pyarrow")
        ds = ds.map_batches(_WriteBatch(cfg), batch_size=batch_size, batch_format="pyarrow")
        return [json.loads(r["meta"]) for r in ds.take_all()]


def run_ray(cfg: PipelineConfig, batch_size: int = 256, restart: bool = False) -> dict[str, Any]:
    """Run the pipeline on Ray Data (connecting to a running cluster, or starting a local one). It keeps no
    per-shard markers, so it cannot resume: an output.dir holding an earlier run's output is refused (every
    document would be written a second time beside it) unless `restart` removes that run first."""
    ray = require("ray", "ray")
    with output_dir_lock(cfg) as lock:
        _, fixed = _check_run_dir(cfg, restart, lock)
        release_checked_models()  # Ray's workers load their own
        earlier = [e for e in run_entries(cfg) if e.is_dir() and e.name != "_work" and any(e.iterdir())]
        if earlier:
            raise ConfigError(f"{cfg.output.dir} holds an earlier run's output ({earlier[0]}), and the Ray executor "
                              "cannot resume one; rerun with --restart to redo it, or choose a new output.dir")
        if not ray.is_initialized():
            ray.init(num_cpus=cfg.workers, include_dashboard=False, log_to_driver=False)
        try:
            stats = _run_dataset(ray, cfg, batch_size, fixed)
        except Exception as e:
            found = _task_error(e)
            if found is None:
                raise
            raise found from None
        check_stage_files(cfg, fixed, cfg.output.dir, done=None)  # the driver's files (the workers hold to their own)
        kept = sum(s.get("kept", 0) for s in stats if s["phase"] == -1)
        # the read rows share phase 0 with the first map phase's and may come back after them: read first, so the
        # report lists the stages in pipeline order whatever the batching
        rows = sorted((s for s in stats if s["phase"] >= 0),
                      key=lambda s: (s["phase"], not any(r["name"] == "read" for r in s["stages"])))
        records = [{"phase": s["phase"], "shard": f"{i:08d}", "stages": s["stages"], "counters": s["counters"]}
                   for i, s in enumerate(rows)]
        report = build_report(records, kept, Path(cfg.output.dir) / "data")
        report["executor"] = "ray"
        write_report(report, cfg.output.dir, cfg.output.plot)
        check_stage_errors(report, Path(cfg.output.dir))
        return report
