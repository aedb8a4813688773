"""The local executor: runs a pipeline's phases over shards with a multiprocessing pool.

Run directory layout (output.dir):
    pipeline.json                      the resolved pipeline, its inputs and the files its stages read (a
                                       rerun with another pipeline, changed inputs or changed files is refused)
    data/<shard>.<fmt>                 kept documents
    rejected/p<phase>-<shard>.jsonl    rejected documents: id, metadata, drop reason
    _work/p<phase>/<shard>.jsonl       documents between phases (deleted when the run completes)
    _work/p<phase>/<shard>.done.json   completion marker + that shard's statistics
    _token_files/<shard>.bin.json      a token shard the tokenize stage writes, recorded before it is written
    report.json / report.md / report.png
    .lock                              held by the run writing here (`output_dir_lock`): one run at a time

and in the tokenize stage's out_dir (wherever it lies) .lmforge-owner.json, naming the output.dir of the run that
writes its token shards there (a run with another output.dir is refused: `check_token_dirs`).

A shard whose marker exists is skipped, so a killed run resumes where it stopped; markers are written
(atomically) only after the shard's outputs are in place. The files the stages read (a tokenizer, models, decontam's
eval files: `StageSpec.reads`) are fixed at the run's start: one changed while the run goes on fails it before the
shard in hand gets its marker (`pipeline.check_stage_files`), so one run's shards never mix two tokenizers or eval
sets.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from lmforge.data.accounting import (apply_stage, balance, duplicate_ids, merge_stats, read_stage, record_outcome,
                                     stage_record)
from lmforge.data.document import Document, stable_id
from lmforge.data.pipeline import (PipelineConfig, check_stage_files, describe_changes, make_shards, phases,
                                   read_inputs, release_checked_models, stage_labels)
from lmforge.data.readers import read_documents
from lmforge.data.report import write_report
from lmforge.data.stage import StageContext
from lmforge.data.tokenize import OWNER, RECORDS, claim_token_dir, recorded_token_files
from lmforge.data.writers import write_docs, write_jsonl
from lmforge.errors import ConfigError, LmforgeError
from lmforge.train.rundir import RunDirLock
from lmforge.utils import check_output_path, process_pool, read_record, remove_stale_temps, write_json_atomic


class RunLayout:
    """Paths of one run directory."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.root = Path(cfg.output.dir)
        self.n_phases = len(phases(cfg.built_stages()))

    def live(self, p: int, shard: str) -> Path:
        if p == self.n_phases - 1:
            return self.root / "data" / f"{shard}.{self.cfg.output.format}"
        return self.root / "_work" / f"p{p}" / f"{shard}.jsonl"

    def marker(self, p: int, shard: str) -> Path:
        return self.root / "_work" / f"p{p}" / f"{shard}.done.json"

    def rejected(self, p: int, shard: str) -> Path:
        return self.root / "rejected" / f"p{p}-{shard}.jsonl"

    def stage_done(self, label: str) -> bool:
        """Whether a shard went through the stage of this label (`stage_labels`): its phase holds a marker."""
        labels = iter(stage_labels(self.cfg))
        phase_of = {next(labels): p for p, phase in enumerate(phases(self.cfg.built_stages())) for _ in phase}
        return any(self.marker(phase_of[label], "*").parent.glob("*.done.json"))


def read_run_json(path: Path) -> Any:
    """A JSON file the run wrote for itself (pipeline.json, a shard's done marker): utils.read_record, whose advice
    for a damaged one is --restart."""
    advice = "rerun with --restart to redo the run, or choose a new output.dir"
    record = read_record(path, advice)
    if not isinstance(record, dict):  # (valid JSON of another shape: a TypeError in the resume check before)
        raise ConfigError(f"{path}, one of the run's own records, is corrupt (a JSON {type(record).__name__}, not an "
                          f"object); {advice}")
    return record


def _load_input(cfg: PipelineConfig, layout: RunLayout, p: int, shard: str, files: list[Path]
                ) -> tuple[list[Document], list[Document], list[dict[str, Any]]]:
    """(live docs, rejected at read, stage records) entering phase p for one shard."""
    if p > 0:
        return list(read_documents(layout.live(p - 1, shard))), [], []
    live, dropped, rec = read_stage(read_inputs(cfg.input, files))
    return live, dropped, [rec]


def _finish_shard(cfg: PipelineConfig, layout: RunLayout, p: int, shard: str, live: list[Document],
                  dropped: list[Document], records: list[dict[str, Any]], counters: dict[str, int]) -> dict:
    fmt = cfg.output.format if p == layout.n_phases - 1 else "jsonl"
    write_docs(layout.live(p, shard), live, "parquet" if fmt == "parquet" else "jsonl")
    write_jsonl(layout.rejected(p, shard), dropped, with_text=cfg.output.rejected_text)
    stats = {"shard": shard, "phase": p, "stages": records, "counters": counters, "kept": len(live)}
    write_json_atomic(layout.marker(p, shard), stats)
    return stats


def run_map_shard(cfg: PipelineConfig, p: int, shard: str, files: list[Path],
                  fixed: dict[str, list[list]] | None = None) -> dict[str, Any]:
    """One shard through one map phase (runs in a worker process). `fixed`: the files the stages read, as the run
    found them at its start (`pipeline.stage_files`), checked before the shard and before its marker is written."""
    layout = RunLayout(cfg)
    check_stage_files(cfg, fixed, layout.root, done=layout.stage_done)
    stages = phases(cfg.built_stages())[p]
    labels = stage_labels(cfg)
    first = sum(len(ph) for ph in phases(cfg.built_stages())[:p])
    ctx = StageContext(shard=shard, workdir=layout.root)
    live, dropped, records = _load_input(cfg, layout, p, shard, files)
    for k, (spec, scfg) in enumerate(stages):
        live, gone, rec = apply_stage(spec, scfg, live, ctx)
        rec["name"] = labels[first + k]
        dropped += gone
        records.append(rec)
    check_stage_files(cfg, fixed, layout.root, done=layout.stage_done)
    return _finish_shard(cfg, layout, p, shard, live, dropped, records, ctx.counters)


def _run_map_shard_args(args: tuple) -> dict[str, Any]:
    return run_map_shard(*args)


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C (sent to the whole process group) to the parent, which terminates them."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_global_phase(cfg: PipelineConfig, p: int, shards: dict[str, list[Path]],
                     fixed: dict[str, list[list]] | None = None, desc: str = "") -> list[dict[str, Any]]:
    """A corpus-wide stage over every shard's documents at once; outputs keep the shard split. `fixed`: as
    run_map_shard's, checked before the markers are written. `desc`: the phase's progress bar (with
    cfg.progress): shards read, the stage over all their documents, shards written; the phase showed none, and
    a run sat silent after the map phase's bar reached 100% while its corpus-wide dedup ran."""
    from tqdm.auto import tqdm

    with tqdm(total=len(shards), desc=f"{desc} read", disable=not cfg.progress, unit="shard") as bar:
        return _global_phase(cfg, p, shards, fixed, bar, desc)


def _global_phase(cfg: PipelineConfig, p: int, shards: dict[str, list[Path]], fixed: dict[str, list[list]] | None,
                  bar: Any, desc: str) -> list[dict[str, Any]]:
    layout = RunLayout(cfg)
    (spec, scfg), = phases(cfg.built_stages())[p]
    label = stage_labels(cfg)[sum(len(ph) for ph in phases(cfg.built_stages())[:p])]
    ctx = StageContext(shard="global", workdir=layout.root)
    per_shard = {}
    for s, files in shards.items():
        per_shard[s] = _load_input(cfg, layout, p, s, files)
        bar.update()
    owner: dict[int, str] = {}
    all_live: list[Document] = []
    stage_recs: dict[str, dict[str, Any]] = {}
    for s, (live, _, _) in per_shard.items():
        for d in live:
            owner[id(d)] = s
        all_live += live
        # measured before the stage runs: line and Bloom dedup shorten the texts in place
        stage_recs[s] = {**stage_record(label), "docs_in": len(live), "bytes_in": sum(d.nbytes for d in live)}
    bar.set_description_str(f"{desc} running over {len(all_live):,} documents read")
    t0 = time.perf_counter()
    out = spec.fn(scfg, all_live, ctx) if all_live else []
    seconds = time.perf_counter() - t0
    bar.reset()
    bar.set_description_str(f"{desc} write")
    check_stage_files(cfg, fixed, layout.root, done=layout.stage_done)
    mine: dict[str, list[Document]] = {s: [] for s in per_shard}
    names = sorted(per_shard)
    for d in out:  # a document the stage added has no owner: a hash of its id picks one, the same every run
        mine[owner.get(id(d)) or names[int(stable_id(d.id), 16) % len(names)]].append(d)
    out_stats = []
    for i, (s, (live, dropped, records)) in enumerate(per_shard.items()):
        rec = stage_recs[s]
        kept, gone = record_outcome(rec, mine[s], {id(d) for d in live})  # counts the added ones it received
        rec["seconds"] = seconds if i == 0 else 0.0
        # corpus-wide counters are reported once, with the first shard
        out_stats.append(_finish_shard(cfg, layout, p, s, kept, dropped + gone, records + [rec],
                                       ctx.counters if i == 0 else {}))
        bar.update()
    return out_stats


# what a run writes directly in output.dir, in the order --restart removes them (see run_entries)
RUN_NAMES = ("_work", "data", "rejected", "report.json", "report.md", "report.png", RECORDS, "pipeline.json")


def token_dirs(cfg: PipelineConfig) -> list[tuple[str, Path]]:
    """(out_dir as configured, the directory it names) of the pipeline's tokenize stage, if it has one."""
    root = Path(cfg.output.dir)
    return [(stage.out_dir, stage.shard_dir(root)) for spec, stage in cfg.built_stages() if spec.name == "tokenize"]


def run_entries(cfg: PipelineConfig) -> list[Path]:
    """What a run writes in output.dir (the layout above, plus the tokenize stage's out_dir when that lies inside
    output.dir), in the order --restart removes them: the markers first (a shard without one is redone), then the
    token shard records and pipeline.json last, so that a --restart cut short leaves a directory the next run still
    recognises (and checks) as this run's, with its token shards still named. A token directory outside output.dir
    (absolute, or '../tokens') is not the run's to remove: it may hold other corpora's shards; the run's own there
    are the recorded ones (`remove_token_files`)."""
    root = Path(cfg.output.dir)
    inside = [d for _, d in token_dirs(cfg) if d.resolve().is_relative_to(root.resolve())]
    return [root / n for n in RUN_NAMES[:-2]] + inside + [root / n for n in RUN_NAMES[-2:]]


def remove_token_files(root: Path) -> None:
    """Remove the token shards the earlier run in `root` recorded (`recorded_token_files`), and their killed
    writers' temporaries, wherever its token directory was, and nothing else there. Rewriting them is not enough:
    the local executor names a shard after its input shard, so one the new run no longer has (fewer inputs) would
    stay; the Ray executor names each after a random batch id, so training on the directory would read both runs."""
    paths = recorded_token_files(root)
    remove_stale_temps(paths)
    for path in paths:
        path.unlink(missing_ok=True)


def check_token_dirs(cfg: PipelineConfig) -> None:
    """Refuse, before any work, a tokenize out_dir the run could not use, or could not own:
    - an existing file, a path under one, or a place this user cannot write: each shard's writer failed, every
      document was rejected as `error:tokenize`, and the run ended "balanced" with no token shard;
    - output.dir itself ("" or ".") or a directory above it (".."): --restart removes the token directory with
      everything in it, so it removed the whole output.dir (files of the user's there too) or, from "../..", the
      inputs and everything beside them;
    - one of the run's own entries (data/, rejected/, ...) or a directory inside one: the shards mixed with the
      kept documents or the work files;
    - a token directory another run (another output.dir) writes into: same-named shards overwrote each other's
      silently, one run's --restart removed the other's, and training read a mix of both (`claim_token_dir`: the
      tokenize stage claims the directory for its run before it writes there).
    (doc_sep with a tokenizer that has no end-of-text id is the stage's own check: `pipeline.check_stages`.)"""
    root = Path(cfg.output.dir)
    top = root.resolve()
    fix = "set tokenize.out_dir to a directory of its own, such as 'tokens' (the default)"
    for out_dir, path in token_dirs(cfg):
        check_output_path(path, "tokenize.out_dir")
        where = path.resolve()
        if top.is_relative_to(where):
            what = "output.dir itself" if where == top else f"{str(where)!r}, a directory above output.dir '{root}'"
            raise ConfigError(f"tokenize.out_dir {out_dir!r} is {what}: --restart removes the token directory with "
                              f"everything in it; {fix}")
        taken = next((top / n for n in RUN_NAMES if where.is_relative_to(top / n)), None)
        if taken is not None:
            raise ConfigError(f"tokenize.out_dir {out_dir!r} is {'' if where == taken else 'inside '}{str(taken)!r}, "
                              f"where the run writes its own files; {fix}")
        claim_token_dir(path, root, out_dir, create=False)


def _orphan_output(cfg: PipelineConfig) -> Path | None:
    """A file an earlier run left in output.dir (one of `run_entries`) without the pipeline.json that says what
    made it (a --restart of an older lmforge, which removed pipeline.json first, cut short): resuming from its
    markers, or writing beside its documents, would be blind."""
    for entry in run_entries(cfg)[:-1]:  # all but pipeline.json itself
        if entry.is_file():
            return entry
        found = next((f for f in entry.rglob("*") if f.is_file()), None) if entry.is_dir() else None
        if found is not None:
            return found
    return None


def _saved_identity(saved: dict[str, Any], cfg: PipelineConfig) -> dict[str, Any]:
    """A pipeline.json's identity in today's form: lmforge before 2026-12-05 stored only the output format
    ("output_format"), read here with this config's other output settings (it wrote no others)."""
    if "output_format" in saved and "output" not in saved:
        saved = dict(saved)
        saved["output"] = {**run_identity(cfg)["output"], "format": saved.pop("output_format")}
    return saved


def run_identity(cfg: PipelineConfig) -> dict[str, Any]:
    """What pipeline.json holds to tell this pipeline from another: everything that changes the files written
    (the output directory and the plot aside), as JSON would read it back."""
    output = {k: v for k, v in asdict(cfg.output).items() if k not in ("dir", "plot")}
    mine = {"input": asdict(cfg.input), "stages": [dict(t) for t in cfg.stages], "output": output}
    return json.loads(json.dumps(mine))


@contextmanager
def output_dir_lock(cfg: PipelineConfig) -> Iterator[RunDirLock]:
    """The lock on output.dir that a run takes (`_check_run_dir`: before the stages' checks load anything when
    output.dir exists, else once the checks passed, before the first file is written) and holds to its end:
    `RunDirLock`, training's run_dir lock (flock on output.dir/.lock; the kernel drops it when the process dies, so a
    kill -9 leaves no stale lock). Two runs in one output.dir at once (a pipeline started twice, a resume while the
    first still ran) removed the phase files each other was reading: those shards read as `read_error:io` and their
    kept documents were lost."""
    lock = RunDirLock(Path(cfg.output.dir), what="pipeline run", key="output.dir",
                      in_process="another run of this process")
    try:
        yield lock
    finally:
        lock.release()


def _check_run_dir(cfg: PipelineConfig, restart: bool, lock: RunDirLock
                   ) -> tuple[dict[str, list[Path]], dict[str, list[list]]]:
    """Check that output.dir and the token directory can be written (`check_token_dirs`), the optional packages
    the pipeline needs, each stage's own check (`check_stages`: its model files and labels; after `lock` is taken
    where output.dir exists, so a run refused for a run in progress loads nothing first), then that output.dir
    holds nothing or an earlier run of this pipeline on these same inputs (names, sizes, modification times);
    `restart` empties the directory of an earlier run first (`run_entries` only). The files the stages read
    (`stage_files`: a tokenizer, models, eval files) are fixed for the run and kept in pipeline.json; a resumed run
    whose files changed is refused (its shards so far used the old ones). Returns (the shards, those files)."""
    from lmforge.data.pipeline import check_requirements, check_stages, input_fingerprint, stage_files

    root = check_output_path(cfg.output.dir, "output.dir", flag="--output")
    check_token_dirs(cfg)
    saved = root / "pipeline.json"
    shards = make_shards(cfg.input)
    files = [f for fs in shards.values() for f in fs]
    inside = [f for f in files if f.resolve().is_relative_to(root.resolve())]
    if inside:
        raise ConfigError(f"input {inside[0]} lies inside output.dir {root}: a run writes (and --restart removes) "
                          "its files there; choose an output.dir apart from the inputs")
    if (holder := _input_dir_holding(cfg, root)) is not None:
        raise ConfigError(f"output.dir {root} lies inside the input directory {holder}: a rerun (a resume, "
                          "--restart) would read this run's files as inputs; choose an output.dir outside it")
    if root.is_dir():  # (none there is no run's; its .lock is no run entry and, hidden, no input: utils.input_files)
        lock.acquire()
    check_requirements(cfg, files)
    check_stages(cfg)
    orphan = None if saved.is_file() else _orphan_output(cfg)
    lock.acquire()  # (held already, or taken here, making output.dir) before the first file is removed or written
    if restart:
        remove_token_files(root)  # before the records that name them go with the run's entries
        for entry in run_entries(cfg):  # only what a run writes: other files in the directory stay
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
    elif orphan is not None:
        raise ConfigError(f"{root} holds an earlier run's files ({orphan}) but no pipeline.json saying which pipeline "
                          f"and inputs made them; rerun with --restart to remove them, or choose a new output.dir")
    mine = run_identity(cfg)
    inputs = input_fingerprint(shards)
    old = _saved_identity(read_run_json(saved), cfg) if saved.is_file() else None
    # (no stage_files from lmforge before 2026-12-07)
    old_inputs, old_files = (old.pop("inputs", None), old.pop("stage_files", None)) if old is not None else (None, None)
    if old_files is not None and not (isinstance(old_files, dict) and all(
            isinstance(v, list) and all(isinstance(f, list) and len(f) in (3, 4) and isinstance(f[0], str)
                                        and all(type(x) is int for x in f[1:3]) for f in v)
            for v in old_files.values())):
        raise ConfigError(f"{saved}, one of the run's own records, is corrupt (its stage_files is no "
                          "{stage: [[path, size, mtime], ...]}); rerun with --restart to redo the run, or choose "
                          "a new output.dir")
    fixed = stage_files(cfg, digests=True, known=old_files)  # (a resume reads no file its record holds unchanged)
    if old is not None:
        if old != mine:
            raise ConfigError(f"{root} holds a run of a different pipeline; choose a new output.dir, or rerun "
                              f"with --restart to replace it")
        changes = describe_changes(old_inputs, inputs) if old_inputs is not None else ""
        if changes:
            raise ConfigError(f"the inputs changed since the run in {root} was made: {changes}; rerun with "
                              f"--restart to redo it from scratch, or choose a new output.dir")
        _check_files_used(cfg, old_files or {}, fixed)
    write_json_atomic(saved, {**mine, "inputs": inputs, "stage_files": fixed})
    return shards, fixed


def _input_dir_holding(cfg: PipelineConfig, root: Path) -> Path | None:
    """The input directory (an input path that is one) output.dir lies in, where a directory's files are read
    (`input_files`: not under a hidden folder), or None. Caught only by the `inside` check of the next run, such a
    run finished once and then could neither resume nor restart."""
    for p in map(Path, cfg.input.paths):
        if p.is_dir() and root.resolve().is_relative_to(p.resolve()):
            if not any(part.startswith(".") for part in root.resolve().relative_to(p.resolve()).parts):
                return p
    return None


def _check_files_used(cfg: PipelineConfig, old: dict[str, list[list]], now: dict[str, list[list]]) -> None:
    """Refuse to resume a run when a file a stage reads changed since the run began and a shard went through that
    stage (its phase holds a marker): the shards done used the old file, the rest would use the new one. A stage no
    shard has reached yet takes the files as they are now."""
    layout = RunLayout(cfg)
    for label, files in old.items():
        changes = describe_changes(files, now.get(label, []))
        if changes and layout.stage_done(label):
            raise ConfigError(f"the files stage '{label}' reads changed since the run in {layout.root} was made: "
                              f"{changes}; the shards it has done used the old ones: rerun with --restart to redo "
                              f"the run with the new ones, or put the old ones back to resume")


def _run_map_phase(cfg: PipelineConfig, p: int, shards: dict[str, list[Path]], done: dict[str, dict],
                   desc: str, fixed: dict[str, list[list]]) -> dict[str, dict]:
    """Run the shards of map phase p that have no marker yet, in a process pool; returns all stats."""
    from tqdm.auto import tqdm

    todo = [s for s in shards if s not in done]
    bar = tqdm(total=len(shards), initial=len(done), desc=desc, disable=not cfg.progress, unit="shard")
    args = [(cfg, p, s, shards[s], fixed) for s in todo]
    pool = None
    if cfg.workers == 1 or len(todo) == 1:
        results: Any = (run_map_shard(*a) for a in args)
    else:
        release_checked_models()  # the workers load their own
        pool = process_pool(min(cfg.workers, len(todo)), worker_setup=_ignore_sigint)
        results = pool.imap_unordered(_run_map_shard_args, args)
    try:
        for st in results:
            done[st["shard"]] = st
            bar.update()
    except BaseException:  # Ctrl-C or a failed shard: stop the workers now (finished shards keep their markers)
        if pool is not None:
            pool.terminate()
            pool.join()
        raise
    finally:
        bar.close()
    if pool is not None:
        pool.close()
        pool.join()
    return done


def _outputs(cfg: PipelineConfig, layout: RunLayout, shards: list[str]) -> list[Path]:
    """Every file a run of these shards writes (whose killed writers' temporary files it may remove)."""
    out = [layout.root / n for n in ("pipeline.json", "report.json", "report.md", "report.png")]
    for p in range(layout.n_phases):
        out += [f(p, s) for s in shards for f in (layout.live, layout.marker, layout.rejected)]
    for _, tokens in token_dirs(cfg):
        out += [tokens / f"{s}.bin" for s in shards] + [layout.root / RECORDS / f"{s}.bin.json" for s in shards]
        out.append(tokens / OWNER)
    return out


def run_local(cfg: PipelineConfig, restart: bool = False) -> dict[str, Any]:
    """Run (or resume) the pipeline; returns the report (also written to output.dir).

    A map phase resumes shard by shard; a global phase is all-or-nothing (it needs every document), so a
    run killed inside one redoes that phase. `restart` discards an earlier run in output.dir. A stage that rejected
    every document as an error fails the run once the report is written (`check_stage_errors`)."""
    with output_dir_lock(cfg) as lock:
        shards, fixed = _check_run_dir(cfg, restart, lock)
        layout = RunLayout(cfg)
        remove_stale_temps(_outputs(cfg, layout, list(shards)))
        all_stats: list[dict[str, Any]] = []
        skipped = processed = 0
        for p, phase in enumerate(phases(cfg.built_stages())):
            done = {s: read_run_json(layout.marker(p, s)) for s in shards if layout.marker(p, s).is_file()}
            desc = f"phase {p + 1}/{layout.n_phases} [{', '.join(spec.name for spec, _ in phase) or 'copy'}]"
            if len(done) == len(shards):
                skipped += len(shards)
            elif phase and phase[0][0].kind == "global":
                processed += len(shards)
                done = {st["shard"]: st for st in run_global_phase(cfg, p, shards, fixed, desc)}
            else:
                skipped += len(done)
                processed += len(shards) - len(done)
                done = _run_map_phase(cfg, p, shards, done, desc, fixed)
            all_stats += [done[s] for s in shards]
            if p > 0:  # phase p is complete, also when an earlier run finished it: its input documents go
                for s in shards:
                    layout.live(p - 1, s).unlink(missing_ok=True)
        kept = sum(st["kept"] for st in all_stats if st["phase"] == layout.n_phases - 1)
        report = build_report(all_stats, kept, layout.root / "data")
        report["shards"] = {"total": len(shards), "processed": processed, "skipped": skipped}
        write_report(report, layout.root, cfg.output.plot)
        check_stage_errors(report, layout.root)
        return report


def check_stage_errors(report: dict[str, Any], root: Path) -> None:
    """Fail a run in which a stage rejected every document it was given as `error:<stage>` (a stage that cannot
    work: a token directory it cannot write, a bug), naming the stage and the first error. The report balances,
    so it passed as a run that kept nothing. A stage that rejects everything for its own reasons (langid keeping
    another language) made a decision, and passes; a model file that does not load is refused before the run
    (`check_stages`)."""
    for st in report["stages"]:
        reason = f"error:{st['name'].split('[')[0]}"  # "tokenize[3]": a label told apart by its place
        if st["docs_in"] and not st["docs_out"] and set(st["rejected"]) == {reason}:
            raise LmforgeError(f"stage '{st['name']}' rejected every document it was given ({st['docs_in']}) as "
                               f"{reason}; the first: {_first_error(root, reason)}. Fix that, then rerun with "
                               f"--restart (the report is in {root / 'report.md'})")


def _first_error(root: Path, reason: str) -> str:
    """The error recorded (meta.errors) on the first rejected record of `reason` in root/rejected/."""
    for path in sorted((root / "rejected").glob("*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("drop") == reason:
                    errors = (rec.get("meta") or {}).get("errors") or ["(not recorded)"]
                    return " ".join(str(errors[-1]).split())  # one line
    return "(not recorded)"


def build_report(all_stats: list[dict[str, Any]], kept: int, output: str | Path) -> dict[str, Any]:
    """Merge shard statistics (each {"phase", "shard", "stages", "counters"}) in pipeline order. Duplicate ids
    are counted over the whole run here, from the read records (a shard sees only its own)."""
    records = [r for st in sorted(all_stats, key=lambda s: (s["phase"], s["shard"])) for r in st["stages"]]
    stages = merge_stats(records)
    counters: dict[str, int] = {}
    for st in all_stats:
        for k, v in st["counters"].items():
            counters[k] = counters.get(k, 0) + v
    if dups := duplicate_ids(records):
        # (a marker an older lmforge wrote holds no hashes but its own shard's count, in its counters)
        counters["read:duplicate_ids"] = counters.get("read:duplicate_ids", 0) + dups
    return {"stages": stages, "counters": counters, "balance": balance(stages, kept), "output": str(output)}
