"""Tokenizing corpora: text files -> the memory-mapped token shards the trainer reads, and corpus
statistics (compression, vocabulary use). Files are cut into byte ranges at safe points, encoded by
worker processes in order, and streamed into `TokenShardWriter`, so memory stays bounded.

Documents: each file is one, and inside a file `<|endoftext|>` (GPT-2's and TinyStories' convention) and Llama 3's
`<|end_of_text|>` separate documents, where the tokenizer has an end-of-text id (`SEPARATORS`); the writer puts that
id before every document. Other end texts stay text (Llama 2's `</s>` is also HTML's strikethrough tag). Within a
document, text is encoded with `encode_ordinary`, as the data pipeline's `tokenize` stage does: a special-token
string in the text (a web page quoting "<|im_start|>") stays text and never becomes a control token, while an
added token that is not special (Qwen3's <think>) is one token, as HF tokenizes it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer.load import takes_where
from lmforge.tokenizer.pretokenize import PATTERNS, safe_byte_cut
from lmforge.tokenizer.train import check_text_file, file_ranges, read_range, text_codec
from lmforge.utils import input_files

_TOK = None  # the tokenizer inside a worker process (set by _init)


def expand_inputs(patterns: tuple[str, ...] | list[str]) -> list[Path]:
    """Files, directories and glob patterns -> existing, non-empty list (`lmforge.utils.input_files`), each a text
    file (`check_text_file`: compressed, Parquet or token data refused)."""
    files = input_files(patterns)
    for f in files:
        check_text_file(f)
    return files


def _init(tok) -> None:
    global _TOK
    _TOK = tok


SEPARATORS = ("<|endoftext|>", "<|end_of_text|>")
"""texts that end a document inside a corpus file (GPT-2's and TinyStories' convention, Llama 3's), where the tokenizer
has an end-of-text id; not the tokenizer's own end text in general: `</s>` is also HTML, and an instruct tokenizer's
`<|eot_id|>` / `<|im_end|>` turn ends in chat transcripts, which stay text"""


def separators(tok) -> tuple[str, ...]:
    """The texts that end a document inside a corpus file (SEPARATORS); none where the tokenizer has no end-of-text
    id."""
    return SEPARATORS if tok.eot_id is not None else ()


def _encode_range(task: tuple[str, int, int, bool]) -> tuple[list[tuple[np.ndarray, bool]], int, int, int]:
    """Encode bytes [start, end) of a file -> [(ids, starts_a_document)], bytes read, undecodable bytes, UTF-8 bytes
    of the text (what compression is counted in: a UTF-16 file's text is about half its bytes).
    `first`: the range opens a file (or its validation tail), so its text starts a document."""
    path, start, end, first = task
    raw, text, bad = read_range(path, start, end)
    tok = _TOK
    seps = separators(tok)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    if hasattr(tok, "encode_bytes"):  # the byte tokenizer keeps bytes that are not UTF-8 as they are
        docs_b = re.split(b"|".join(re.escape(t.encode()) for t in seps), raw) if seps else [raw]
        pieces = [(np.asarray(tok.encode_bytes(d), dtype=dtype), i > 0 or first) for i, d in enumerate(docs_b)]
        return [(ids, new) for ids, new in pieces if len(ids)], end - start, bad, len(raw)
    docs = re.split("|".join(map(re.escape, seps)), text) if seps else [text]
    encode = getattr(tok, "encode_ordinary", tok.encode)  # (a tokenizer without specials has only encode)
    if not first and takes_where(tok):  # the range's first piece continues a document: no "▁" put before it
        cont = encode(docs[0], where="inside") if docs[0] else []  # (SentencePiece-style tokenizers)
        pieces = [(np.asarray(cont, dtype=dtype), False)]
        pieces += [(np.asarray(encode(d), dtype=dtype), True) for d in docs[1:]]
    else:
        pieces = [(np.asarray(encode(d), dtype=dtype), i > 0 or first) for i, d in enumerate(docs)]
    return [(ids, new) for ids, new in pieces if len(ids)], end - start, bad, len(raw)  # empty docs are dropped


def _split_point(path: Path, val_fraction: float, pat: str, specials: tuple[str, ...]) -> int:
    """Where a file's validation tail begins: the first safe cut after (1 - val_fraction) of it, or, where
    that would leave less than half the tail asked for, the first line start after it. Source code has no
    safe cut inside an indented block (each line starts with a space), so a file ending in a long one
    (Debian's Python standard library, the README's corpus) gave no tail at all. The tail is a document
    of its own, so any line start keeps both sides whole (the one pre-token across it is split)."""
    size = path.stat().st_size
    if val_fraction <= 0:
        return size
    target = int(size * (1 - val_fraction))
    codec = text_codec(path)[1]
    if codec != "utf-8":  # UTF-16: after the first line end (an even offset) past the target, or no tail
        return _utf16_line_start(path, target, size, codec)
    with open(path, "rb") as f:
        f.seek(target)
        window = f.read(1 << 20)
    cut = safe_byte_cut(window, 0, pat, specials)
    if cut != -1 and cut <= (size - target) // 2:
        return target + cut
    line = window.find(b"\n") + 1  # 0 = none; no special token spans a line start unless it holds one
    if 0 < line < size - target and not any("\n" in s for s in specials):
        return target + line
    return size if cut == -1 else target + cut


def _utf16_line_start(path: Path, target: int, size: int, codec: str) -> int:
    """The first line start after `target` in a UTF-16 file (`safe_byte_cut` reads UTF-8 only), else `size`."""
    start = target - target % 2  # code units sit at even offsets (the mark is one)
    with open(path, "rb") as f:
        f.seek(start)
        window = f.read(1 << 20)
    newline = "\n".encode(codec)
    i = window.find(newline)
    while i != -1 and i % 2:
        i = window.find(newline, i + 1)
    return size if i == -1 else start + i + len(newline)


def _encode_tasks(tok, files: list[Path], val_fraction: float) -> Iterator[tuple[str, tuple[str, int, int, bool]]]:
    specials = tuple(dict.fromkeys((*tok.special_tokens, *separators(tok))))  # (no cut splits a separator)
    # The byte tokenizer has no pattern; any cut suits it, so the GPT-2 pattern's cut points do.
    pat = getattr(tok, "pattern", PATTERNS["gpt2"])
    for f in files:
        cut = _split_point(f, val_fraction, pat, specials)
        for split, a, b in (("train", 0, cut), ("val", cut, f.stat().st_size)):
            for s, e in (file_ranges(f, pat, specials, start=a, end=b) if b > a else []):
                yield split, (str(f), s, e, s == a)


def _run_ordered(tok, tasks: list, workers: int | None, progress: bool, total: int, desc: str) -> Iterator:
    """Results of _encode_range over tasks, in order, from a pool of worker processes."""
    from tqdm.auto import tqdm

    from lmforge.utils import INLINE_BYTES

    workers = 1 if total < INLINE_BYTES else max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress)
    try:
        if workers == 1:
            _init(tok)
            results = map(_encode_range, tasks)
            yield from _tick(results, bar)
            return
        from lmforge.utils import process_pool

        with process_pool(workers, initializer=_init, initargs=(tok,)) as pool:
            yield from _tick(pool.imap(_encode_range, tasks), bar)
    finally:
        bar.close()


def _tick(results, bar) -> Iterator:
    for r in results:
        bar.update(r[1])
        yield r


@dataclass
class EncodeReport:
    shards: dict[str, Path] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    docs: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    """UTF-8 bytes of the text encoded (a byte-order mark left out; a UTF-16 file's text as UTF-8)"""
    undecodable_bytes: int = 0
    removed: list[Path] = field(default_factory=list)
    """an earlier encode's val.bin, which this one (writing none) removed: the pair would mix two encodes"""


def _earlier_val(out: Path) -> Path | None:
    """out/val.bin, when an encode that writes none must remove it: beside the new train.bin it would be read as
    its pair, made by the same tokenizer from the same files. It is removed only when the folder is evidently an
    earlier encode's output (train.bin and val.bin both token shards); any other val.bin is refused."""
    from lmforge.data.shards import TokenFile

    val = out / "val.bin"
    if not val.exists():
        return None
    try:
        for name in ("train.bin", "val.bin"):
            TokenFile(out / name)
    except DataError:
        raise ConfigError(f"{val} is there but is not half of an earlier encode's train.bin/val.bin pair, and "
                          "this encode writes no val.bin (--val-fraction 0), so it would be taken for the new "
                          "train.bin's; move it away, or encode into another directory") from None
    return val


def check_shard_paths(out: str | Path, val_fraction: float = 0.0, name: str = "out_dir") -> Path:
    """Refuse, before encoding, an output directory no writer could use (`check_output_path`), or one whose
    train.bin / val.bin (val.bin only when `val_fraction` asks for one) is a directory: the shard, encoded in
    full, was then renamed onto it and failed with an IsADirectoryError traceback (for val.bin, after the new
    train.bin was in place, left with no val.bin beside it). `name` is the setting in the message (the CLI's
    --out). Returns the directory."""
    from lmforge.utils import check_output_path

    folder = check_output_path(out, name)
    splits = ("train", "val") if val_fraction > 0 else ("train",)
    taken = next((folder / f"{s}.bin" for s in splits if (folder / f"{s}.bin").is_dir()), None)
    if taken is not None:
        raise ConfigError(f"{name} {out}: {taken} is a directory, not a token file; move it away, or encode into "
                          f"another {name}")
    return folder


def encode_to_shards(tok, inputs: list[str] | tuple[str, ...], out_dir: str | Path, *, val_fraction: float = 0.0,
                     workers: int | None = None, progress: bool = True, spec: str | None = None) -> EncodeReport:
    """Encode files into out_dir/train.bin (and val.bin: the last `val_fraction` of each file).

    The shard header records `spec` (default: the tokenizer's own spec) so the trainer can reopen it.
    """
    from lmforge.data.shards import TokenShardWriter
    from lmforge.utils import remove_stale_temps

    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction} must be in [0, 1)")
    check_shard_paths(out_dir, val_fraction)
    files = expand_inputs(inputs)
    tagged = list(_encode_tasks(tok, files, val_fraction))
    if not tagged:
        raise DataError(f"input is empty: {', '.join(map(str, files[:3]))}")
    out = Path(out_dir)
    splits = ["train", "val"] if val_fraction > 0 else ["train"]
    earlier_val = _earlier_val(out) if "val" not in splits else None
    remove_stale_temps([out / "train.bin", out / "val.bin"])  # a killed run's partial shards (as large as one)
    writers: dict[str, TokenShardWriter] = {}
    report = EncodeReport()
    try:
        for s in splits:
            writers[s] = TokenShardWriter(out / f"{s}.bin", vocab_size=tok.vocab_size, tokenizer=spec or tok.spec(),
                                          doc_sep=tok.eot_id)
        results = _run_ordered(tok, [t for _, t in tagged], workers, progress, sum(t[2] - t[1] for _, t in tagged),
                               "encode")
        for (split, _), (pieces, _, bad, size) in zip(tagged, results):
            w = writers[split]
            for ids, new_doc in pieces:
                w.add_document(ids) if new_doc else w.add(ids)
            report.bytes += size
            report.undecodable_bytes += bad
        for s, w in writers.items():
            report.tokens[s], report.docs[s] = w.num_tokens, w.num_docs
            report.shards[s] = w.close()
    except BaseException:  # abort() removes each temporary file; a shard already renamed into place stays
        for w in writers.values():
            w.abort()
        raise
    if earlier_val is not None:  # only now: a failed encode leaves the earlier pair as it was
        earlier_val.unlink(missing_ok=True)
        report.removed.append(earlier_val)
    if val_fraction > 0 and not report.tokens["val"]:
        from lmforge.errors import warn_caller

        warn_caller(f"val.bin holds no tokens: each file is split at a line start near its last "
                    f"{val_fraction:.0%}, and these files are too short for one; give a separate validation file "
                    "(data.val) or encode larger files")
    return report


def corpus_stats(tok, inputs: list[str] | tuple[str, ...], *, workers: int | None = None,
                 progress: bool = True, top: int = 10) -> dict:
    """Compression and vocabulary use of `tok` on the given files. `bytes` counts the text's UTF-8 bytes, documents'
    separators included; `bytes_per_token` is the ratio `data.bytes_per_token` takes: the UTF-8 bytes the text tokens
    stand for over those tokens, separators and special tokens left out of both, and the "▁" a SentencePiece-style
    tokenizer puts before a document from the bytes (as val_bpb counts them: infer.detok.token_text_bytes,
    sentencepiece.put_prefix_bytes)."""
    files = expand_inputs(inputs)
    tasks = [t for _, t in _encode_tasks(tok, files, 0.0)]
    if not tasks:
        raise DataError(f"input is empty: {', '.join(map(str, files[:3]))}")
    from lmforge.tokenizer.sentencepiece import put_prefix_bytes

    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    n_bytes = bad = put = 0  # put: the bytes of the "▁" a SentencePiece-style tokenizer put before texts (as val_bpb)
    prefix = put_prefix_bytes(tok, tok.vocab_size)
    lead, opens = (np.asarray(t) for t in prefix) if prefix is not None else (None, None)
    at_input = prefix is not None and tok.dummy_prefix()[0]
    for pieces, _, b, size in _run_ordered(tok, tasks, workers, progress, sum(t[2] - t[1] for t in tasks), "stats"):
        for ids, new in pieces:
            counts += np.bincount(ids, minlength=tok.vocab_size)
            if lead is not None:  # (a piece that opens a document follows its separator)
                put += lead[ids[1:]][opens[ids[:-1]]].sum() + (lead[ids[0]] if new and at_input else 0)
        n_bytes += size
        bad += b
    n_tokens = int(counts.sum())
    used = int((counts > 0).sum())
    order = np.argsort(-counts, kind="stable")[:top]
    from lmforge.infer.detok import token_text_bytes

    id_bytes = np.asarray(token_text_bytes(tok, tok.vocab_size), dtype=np.int64)  # as val_bpb counts them
    text_tokens = int(counts[id_bytes > 0].sum())
    return {
        "files": len(files), "bytes": n_bytes, "tokens": n_tokens, "undecodable_bytes": bad,
        "bytes_per_token": float(counts @ id_bytes - put) / max(text_tokens, 1), "vocab_size": tok.vocab_size,
        "vocab_used": used,
        "vocab_used_fraction": used / tok.vocab_size,
        "top_tokens": [(int(i), tok.decode([int(i)]), int(counts[i])) for i in order if counts[i] > 0],
    }
