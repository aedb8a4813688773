"""Tokenization into the trainer's memory-mapped token shards (`lmforge.data.shards`): the pipeline's
`tokenize` stage (one token shard per pipeline shard, documents separated by the tokenizer's end-of-text
id), the record of the shards a run wrote (`recorded_token_files`), the token directory's owner (`claim_token_dir`),
and `tokenize_to_shards`, the one-call public way from text files to train.bin / val.bin."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lmforge.config import check, coerce_fields
from lmforge.data.document import Document
from lmforge.data.shards import TokenShardWriter
from lmforge.data.stage import StageContext, reject_error
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer.byte import FILE_NAME
from lmforge.utils import once_per_file, read_record, temp_name, write_json_atomic

# the folder of the stage's workdir (output.dir) where each token shard is recorded before it is written: the token
# directory may lie outside output.dir beside other corpora's shards, so --restart removes exactly the files named
# here, and a shard a killed run began is named too
RECORDS = "_token_files"
# the file in a token directory naming the output.dir of the one run that writes its shards there (`claim_token_dir`):
# another run's shards of the same names would be overwritten, and its --restart would remove them
OWNER = ".lmforge-owner.json"


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """tokenizer: a spec for `lmforge.tokenizer.load.load_tokenizer` ("byte", a tokenizer directory or file
    in any format it reads);
    out_dir: where `<shard>.bin` files go (relative to the pipeline's output directory): a directory of its own,
    not the output directory, one above it, or one of the run's own (data/, rejected/), and one run's: the first
    run to write there claims it, and a run with another output directory is refused (`claim_token_dir`);
    --restart removes the earlier run's shards there (`recorded_token_files`), and the directory itself only when
    it lies inside the output directory;
    doc_sep: write the tokenizer's end-of-text id before each document (a tokenizer without one is refused);
    false writes the documents back to back (the shard records where each starts: TokenFile.doc_starts)."""

    tokenizer: str = "byte"
    out_dir: str = "tokens"
    doc_sep: bool = True

    def __post_init__(self) -> None:
        coerce_fields(self, "tokenize")  # each field's type, named when wrong
        check(bool(self.tokenizer), "tokenize.tokenizer must be set (e.g. 'byte' or a tokenizer directory)")

    def shard_dir(self, workdir: Path) -> Path:
        """Where the `.bin` files go: out_dir, relative to `workdir` (the pipeline's output directory)."""
        return Path(workdir) / self.out_dir  # an absolute out_dir stays as it is


def _tokenizer_files(spec: str) -> list[Path]:
    from lmforge.tokenizer.load import tokenizer_files

    return tokenizer_files(spec)


@once_per_file(files_of=_tokenizer_files)
def _tokenizer(spec: str) -> Any:
    """The tokenizer of `spec`, loaded once per process while the files it is read from stay as they are
    (utils.once_per_file, keyed on tokenizer_files' stamps): keyed on the spec alone, a tokenizer file rewritten in
    the process (a notebook's retrained tokenizer) was never read again, its shards written with the old ids. Within
    a pipeline run those files are fixed (`pipeline.check_stage_files`: one tokenizer for every shard of a run). The
    executors free the parent's before workers start (`pipeline.release_checked_models`)."""
    from lmforge.tokenizer.load import load_tokenizer

    return load_tokenizer(spec)


def tokenize_files(cfg: TokenizeConfig) -> list[Path]:
    """What the stage reads (StageSpec.reads): its tokenizer's files."""
    return _tokenizer_files(cfg.tokenizer)


def doc_separator(cfg: TokenizeConfig) -> int | None:
    """The id written before each document: the tokenizer's end-of-text id, None with doc_sep false. A tokenizer
    without one under doc_sep is refused (the documents were written back to back, the shard saying doc_sep null),
    before a pipeline runs (its StageSpec.check: pipeline.check_stages) and by the stage itself."""
    if not cfg.doc_sep:
        return None
    sep = getattr(_tokenizer(cfg.tokenizer), "eot_id", None)
    if sep is None:
        raise ConfigError(f"tokenize.doc_sep is true, but the tokenizer {cfg.tokenizer!r} has no end-of-text token "
                          "(<|endoftext|>, </s>, ...: lmforge.tokenizer.byte.EOT_NAMES, or its tokenizer_config.json's "
                          "eos_token) to separate documents with; use one that has (train it with "
                          "special_tokens=['<|endoftext|>']), or set doc_sep = false to write them back to back")
    return sep


def tokenize(cfg: TokenizeConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Write the batch's documents to `<out_dir>/<shard>.bin` in one go; records `meta.num_tokens`. A
    document's text is ordinary text: a special token's string in it (web text may hold `<|endoftext|>`) is
    encoded as text, never as the separator (an added token that is not special, Qwen3's `<think>`, is still one
    token: encode_ordinary). A document that cannot be encoded is rejected
    (`error:tokenize`) and the others are written: the shard holds exactly the documents kept. The shard is
    recorded in `<workdir>/_token_files/` before it is written (`recorded_token_files`), and the token directory
    claimed for the run first (`claim_token_dir`: another run's is refused)."""
    tok = _tokenizer(cfg.tokenizer)
    encode = getattr(tok, "encode_ordinary", tok.encode)
    sep = doc_separator(cfg)
    path = cfg.shard_dir(ctx.workdir) / f"{ctx.shard}.bin"
    claim_token_dir(path.parent, ctx.workdir, cfg.out_dir)
    write_json_atomic(Path(ctx.workdir) / RECORDS / f"{path.name}.json", {"out_dir": cfg.out_dir, "file": path.name})
    encoded = []
    for d in docs:
        try:
            encoded.append((d, encode(d.text)))
        except Exception as e:  # noqa: BLE001  (a pathological document; the stage goes on without it)
            reject_error(d, "tokenize", e)
    try:
        with TokenShardWriter(path, vocab_size=tok.vocab_size, tokenizer=cfg.tokenizer, doc_sep=sep) as w:
            for d, ids in encoded:
                w.add_document(ids)
                d.meta["num_tokens"] = len(ids)
    except OSError as e:  # no document's fault: retried document by document (run_stage), each retry rewrote the
        # shard with its one document, and the others were lost while counted as kept
        raise DataError(f"tokenize: cannot write the token shard {path}: {e.strerror or e}; fix that and run "
                        "again (the shards finished before are kept)") from e
    ctx.count("tokenize.tokens", w.num_tokens)
    return docs


def recorded_token_files(workdir: str | Path) -> list[Path]:
    """The token shards the run in `workdir` (output.dir) wrote or began to write, wherever its out_dir was
    (relative paths resolve from `workdir`, as the stage resolved them). Each record names one `.bin` file in its
    out_dir; one naming anything else is refused rather than followed (--restart removes what is listed)."""
    folder = Path(workdir) / RECORDS
    if not folder.is_dir():
        return []
    out = []
    for rec in sorted(folder.glob("*.bin.json")):
        entry = read_record(rec, f"remove it by hand, with the token shard {rec.name[:-len('.json')]} it is named "
                                 "after if the run wrote one", what=f"token shard record {rec}")
        name = entry.get("file") if isinstance(entry, dict) else None
        if f"{name}.json" != rec.name:  # (the glob: a bare name ending .bin)
            raise ConfigError(f"token shard record {rec} names {name!r}, not the token shard it is named after; "
                              f"remove the record (or {folder}) by hand if it is not the run's")
        out.append(TokenizeConfig(out_dir=str(entry["out_dir"])).shard_dir(Path(workdir)) / name)
    return out


def claim_token_dir(token_dir: str | Path, workdir: str | Path, out_dir: str, *, create: bool = True) -> None:
    """Make `token_dir` the run in `workdir`'s (output.dir) token directory: its OWNER marker, written atomically
    and only where there is none yet (a hard link of a finished temporary: two runs claiming at once cannot both
    win), names the resolved output.dir (relative to the token dir when it lies inside output.dir: a moved or
    renamed run stays the owner). A marker naming another output.dir is refused in one line (`out_dir`, the
    setting as configured, names it): the other run's shards of the same names would be overwritten and its
    --restart would remove this run's. With `create` false only that check is made (`check_token_dirs`, before
    any work); the tokenize stage claims the directory before it writes a shard there."""
    token_dir, top = Path(token_dir).resolve(), Path(workdir).resolve()
    marker = token_dir / OWNER
    if not marker.exists():
        if not create:
            return
        token_dir.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(marker)
        # inside output.dir the owner is named relative to the token dir, so a moved or renamed run stays its owner
        owner = os.path.relpath(top, token_dir) if token_dir.is_relative_to(top) else str(top)
        tmp.write_text(json.dumps({"output_dir": owner}) + "\n")
        try:
            os.link(tmp, marker)
            return
        except FileExistsError:  # another run claimed it first: checked below
            pass
        except OSError:  # a filesystem without hard links: written whole all the same
            os.replace(tmp, marker)
            return
        finally:
            tmp.unlink(missing_ok=True)
    try:
        entry = json.loads(marker.read_text())
        owner = token_dir / entry["output_dir"]  # (an absolute path stays itself; a relative one: from the marker)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"tokenize.out_dir {out_dir!r}: its owner marker {marker} cannot be read ({e}); remove it "
                          f"if no other run writes token shards into '{token_dir}'") from e
    owner = owner.resolve()
    if owner != top:
        raise ConfigError(f"tokenize.out_dir {out_dir!r} ('{token_dir}') holds the token shards of another run, "
                          f"output.dir '{owner}' ({marker}): this run (output.dir '{Path(workdir)}') would overwrite "
                          f"them and its --restart would remove them; set tokenize.out_dir to another directory, or "
                          f"remove that run's shards and {marker} if they are no longer wanted")


def tokenize_to_shards(inputs: str | Path | Iterable[str | Path], tokenizer: Any, out_dir: str | Path, *,
                       val_fraction: float = 0.0, workers: int | None = None, progress: bool = False):
    """Text files (paths, directories or globs) -> `out_dir/train.bin` (+ `val.bin`, the last
    `val_fraction` of every file), the shards `TrainConfig(data=dict(train=...))` reads. `tokenizer` is a
    tokenizer object or a spec for `load_tokenizer` ("byte", a directory, a file). An unsaved tokenizer, or one
    read from another format (a HF tokenizer.json, GPT-2 files, a tiktoken file), is saved to `out_dir/tokenizer/`
    first, so the shards name a file the trainer (and checkpoints) can
    reopen. Returns the `EncodeReport` (paths, token and document counts, bytes that were not UTF-8)."""
    from lmforge.tokenizer.corpus import check_shard_paths, encode_to_shards
    from lmforge.tokenizer.load import load_tokenizer

    check_shard_paths(out_dir, val_fraction)  # before the tokenizer is saved there (encode_to_shards checks again)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    if hasattr(tok, "path") and (tok.path is None or Path(tok.path).name != FILE_NAME):  # (a HF / tiktoken file: a
        tok.save(Path(out_dir) / "tokenizer")  # copy the shards keep, whatever becomes of the user's file)
    paths = [str(inputs)] if isinstance(inputs, (str, Path)) else [str(p) for p in inputs]
    return encode_to_shards(tok, paths, out_dir, val_fraction=val_fraction, workers=workers, progress=progress)
