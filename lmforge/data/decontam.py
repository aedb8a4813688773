"""Decontamination: drop training documents that share word n-grams with evaluation sets.

GPT-3 (Brown et al. 2020, App. C) flagged overlaps of 13-grams (after lowercasing and stripping
punctuation); we do the same with a configurable n, on the texts' Unicode NFKC forms (`hashing.nfkc`: a decomposed,
full-width or ligatured copy of an eval item matches it). Evaluation items shorter than n words are skipped,
as in GPT-3, because their n-grams would be too generic. Eval files: JSONL (every string in a record is one
item, e.g. GSM8K's question and answer, including those in lists and nested objects; a line may also be a
bare string or list), JSON (.json: JSON Lines, or one JSON array or object), CSV (every cell, e.g. MMLU's question
and choices), plain text (one item per line); each may be .gz or .zst compressed.

A file named outright is read whatever its name. A directory or a glob pattern gives its files of these formats but
those a benchmark folder holds beside its items: a README, license or URL list (README*, LICENSE*, urls.txt) and its
train split (`TRAIN_WORDS` in the file's name or a folder's below the one named: `gsm8k/train.jsonl`,
`mmlu/auxiliary_train/`). Read as eval items, their n-grams rejected clean training text (a README's boilerplate, the
train split that is meant to be trained on). Every other file is read (`HumanEval.jsonl`, `mbpp.jsonl`, `test.jsonl`,
`mmlu/dev/`): an eval file skipped would pass its contamination as clean, which is the worse mistake. The files a
path skips are named in one warning before a pipeline runs (`check_decontam`); a path that gives no eval file at all
is refused.
An eval file that cannot be read, or eval sets with no item of n words, fail the run with a one-line error: a
decontamination that silently matches nothing would pass contaminated data as clean.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.hashing import ngram_hashes, normalize_words, word_hashes
from lmforge.data.readers import ARCHIVE_ERRORS, decode_text, open_binary, uncompressed_name
from lmforge.data.stage import StageContext
from lmforge.errors import DataError, warn_caller
from lmforge.utils import input_files, once_per_file


@dataclass(frozen=True, kw_only=True)
class DecontamConfig:
    """eval_paths: files or directories of evaluation data; ngram: n; min_matches: reject a document
    when at least this many of its distinct n-grams occur in the evaluation sets."""

    eval_paths: tuple[str, ...] = ()
    ngram: int = 13
    min_matches: int = 1

    def __post_init__(self) -> None:
        coerce_fields(self, "decontam")  # each field's type, named when wrong
        check(len(self.eval_paths) > 0, "decontam.eval_paths must name at least one evaluation file")
        check(self.ngram >= 1, f"decontam.ngram must be >= 1, got {self.ngram}")
        check(self.min_matches >= 1, f"decontam.min_matches must be >= 1, got {self.min_matches}")


def _strings(value: object) -> Iterator[str]:
    """Every string in a JSON value: itself, or those inside its lists and objects (a record's "choices" list
    holds eval text as much as its "question" field does; a line may also be a bare string or list)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


EVAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".txt")


def _kind(path: Path) -> str:
    """"json", "csv" or "text" from the name, compression suffixes looked through."""
    name = uncompressed_name(path)
    return "json" if name.endswith((".jsonl", ".ndjson", ".json")) else "csv" if name.endswith(".csv") else "text"


def _items(path: Path) -> Iterator[str]:
    """The eval items of one file; a file that cannot be read or parsed raises a DataError naming it (and the line)."""
    try:
        with open_binary(path) as f:
            text = decode_text(f.read())[0].removeprefix("\ufeff")
    except (OSError, *ARCHIVE_ERRORS) as e:
        raise DataError(f"cannot read decontamination set {path}: {type(e).__name__}: {e}; fix or replace the "
                        "file") from e
    kind = _kind(path)
    if kind == "csv":
        try:
            rows = list(csv.reader(io.StringIO(text, newline="")))
        except csv.Error as e:  # a cell past csv's field limit, a NUL byte
            raise DataError(f"decontamination set {path} is not readable CSV ({e}); fix the file or give it as "
                            ".jsonl") from None
        yield from (cell for row in rows for cell in row)
    elif kind == "text":
        yield from text.splitlines()
    elif (whole := _whole_json(text)) is not None:  # one array or object (.json)
        yield from _strings(whole)
    else:
        # split on "\n" only: str.splitlines also splits on U+2028, U+2029 and U+0085, which JSON allows
        # unescaped inside strings
        for lineno, line in enumerate(text.split("\n"), 1):
            if line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"decontamination set {path} line {lineno} is not JSON ({e.msg}): "
                                    f"{line.strip()[:60]!r}; fix the line or remove the file from "
                                    "decontam.eval_paths") from None
                yield from _strings(value)


def _whole_json(text: str) -> object:
    """text parsed as one JSON array or object, or None when it is not one (JSON Lines: json.loads stops at the
    second line's "Extra data")."""
    if not text.lstrip().startswith(("[", "{")):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# name words that mark a train split (GSM8K's train.jsonl, MMLU's auxiliary_train/, HF's train-00000-of-00001 files)
TRAIN_WORDS = frozenset({"train", "training"})
_NAME_WORD = re.compile(r"[^0-9a-z]+")


def _is_side_file(f: Path) -> bool:
    """A README, license or URL list (README*, LICENSE*, LICENCE*, a name word starting with "url" or ending in
    "urls"): what a benchmark folder holds beside its items, whatever folder it is in."""
    name = f.name.lower()
    return name.startswith(("readme", "license", "licence")) or any(
        w.startswith("url") or w.endswith("urls") for w in _NAME_WORD.split(name))


def _is_eval_file(f: Path, root: Path) -> bool:
    """Whether file `f`, found under `root` (a named directory, or a pattern's fixed part), is read as eval data: an
    eval format, no README, license or URL list (`_is_side_file`), and no train split: no `TRAIN_WORDS` in its name or
    a folder's name below `root` (`root`'s own and those above it were chosen by the user)."""
    if not uncompressed_name(f).endswith(EVAL_SUFFIXES) or _is_side_file(f):
        return False
    parts = f.relative_to(root).parts if f.is_relative_to(root) else (f.name,)
    return not any(w in TRAIN_WORDS for part in parts for w in _NAME_WORD.split(part.lower()))


def _pattern_root(pattern: str) -> Path:
    """The fixed leading folders of a glob pattern (`evals/**/*.jsonl` -> `evals`)."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
    return Path(*parts[:fixed]) if fixed else Path(".")


def eval_files(paths: tuple[str, ...]) -> tuple[list[Path], dict[str, list[Path]]]:
    """(the eval files read, {path: the files it skipped}) of the paths, directories and glob patterns, through the
    one rule for inputs (`input_files`: hidden files and directories skipped): a file named outright is read whatever
    its name; of a directory's or a pattern's files all but READMEs, licenses, URL lists and train splits
    (`_is_eval_file`; the module docstring says why). A path that gives no eval file is a DataError naming it and
    what it skipped."""
    out: list[Path] = []
    skipped: dict[str, list[Path]] = {}
    for p in paths:
        try:
            files = input_files([p])
        except DataError as e:
            raise DataError(f"decontam.eval_paths {p!r}: {e}") from None
        if Path(p).is_file():
            out += files
            continue
        root = Path(p) if Path(p).is_dir() else _pattern_root(p)
        mine = [f for f in files if _is_eval_file(f, root)]
        if not mine:
            raise DataError(f"decontam.eval_paths {p!r} holds no eval file of .jsonl/.json/.csv/.txt (a directory or "
                            f"pattern skips READMEs, licenses, URL lists and train splits; it holds {_names(files)}); "
                            f"name the eval files outright")
        out += mine
        if len(mine) < len(files):
            chosen = set(mine)
            skipped[p] = [f for f in files if f not in chosen]
    return list(dict.fromkeys(out)), skipped  # a file once, though two paths name it (`mmlu`, `mmlu/test`)


def _names(files: list[Path], k: int = 3) -> str:
    """'a.txt, b.md, c.jsonl and 4 more'."""
    more = f" and {len(files) - k} more" if len(files) > k else ""
    return ", ".join(f.name for f in files[:k]) + more


def check_decontam(cfg: DecontamConfig) -> None:
    """The stage's check before a pipeline runs (`StageSpec.check`): its eval sets read (an unreadable file, or no
    item of n words, refused before any document is), and one warning naming what the directories and patterns
    skipped, so a file left out is seen to be."""
    eval_ngrams(tuple(cfg.eval_paths), cfg.ngram)
    _, skipped = eval_files(tuple(cfg.eval_paths))
    if skipped:
        n = sum(len(fs) for fs in skipped.values())
        per_path = "; ".join(f"{p!r}: {_names(fs)}" for p, fs in skipped.items())
        warn_caller(f"decontam skips {n} file(s) of eval_paths: READMEs, licenses, URL lists, train splits and "
                    f"files not .jsonl/.json/.csv/.txt ({per_path}); name a file outright to read it as eval data")


def eval_ngrams(paths: tuple[str, ...], n: int) -> np.ndarray:
    """Sorted distinct uint64 hashes of every n-gram of every evaluation item with >= n words. Memoised on the files
    the paths name now (utils.once_per_file over `eval_files`' stamps: resolved names, sizes, times): keyed on the
    paths alone, a benchmark file added to an eval directory (or one edited) was ignored by every later call in the
    process (a notebook's second run), and keyed on relative names another checkout's eval set of one size and time
    was the first's. The folders are listed on every call, so a file added later is seen (~25 ms a batch for 200
    files); within a pipeline run the set is fixed (`pipeline.check_stage_files`: a file added or edited mid-run fails
    the run, which records the files it used in pipeline.json)."""
    return _eval_ngrams(tuple(paths), n)


def decontam_files(cfg: DecontamConfig) -> list[Path]:
    """What the stage reads (StageSpec.reads): the eval files its paths name now."""
    return eval_files(tuple(cfg.eval_paths))[0]


def _eval_files(paths: tuple[str, ...], n: int) -> list[Path]:
    return eval_files(paths)[0]


@once_per_file(files_of=_eval_files)
def _eval_ngrams(paths: tuple[str, ...], n: int) -> np.ndarray:
    chunks = []
    files = eval_files(paths)[0]
    for f in files:
        for item in _items(f):
            words = normalize_words(item)
            if len(words) >= n:
                chunks.append(ngram_hashes(word_hashes(words), n))
    if not chunks:
        raise DataError(f"decontam.eval_paths {list(paths)} hold no item of {n} words or more ({len(files)} file(s) "
                        f"of .jsonl/.json/.csv/.txt, optionally .gz/.zst), so nothing could be matched; point it at "
                        f"the eval data or lower decontam.ngram")
    return np.unique(np.concatenate(chunks))


def count_matches(text: str, table: np.ndarray, n: int) -> int:
    """Number of distinct n-grams of `text` present in the sorted table."""
    words = normalize_words(text)
    if len(words) < n or len(table) == 0:
        return 0
    h = np.unique(ngram_hashes(word_hashes(words), n))
    idx = np.searchsorted(table, h).clip(max=len(table) - 1)
    return int((table[idx] == h).sum())


def decontam(cfg: DecontamConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Reject documents overlapping an evaluation set (`decontam`), recording `meta.eval_ngram_matches`."""
    table = eval_ngrams(tuple(cfg.eval_paths), cfg.ngram)
    for d in docs:
        m = count_matches(d.text, table, cfg.ngram)
        if m:
            d.meta["eval_ngram_matches"] = m
        if m >= cfg.min_matches:
            d.reject("decontam")
    return docs
