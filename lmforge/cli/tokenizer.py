"""`lmforge tokenizer train | encode | stats`: train a byte-level BPE tokenizer, turn text files into
the token shards the trainer reads, and measure a tokenizer on a corpus."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from lmforge.cli.common import parse_config, run_group
from lmforge.config import check, names_field
from lmforge.errors import ConfigError
from lmforge.utils import check_output_path, input_files


@dataclass(frozen=True, kw_only=True)
class TrainArgs:
    """Train a byte-level BPE tokenizer on text files (files, directories or glob patterns)."""

    input: tuple[str, ...]
    """text files, directories (their files, recursively) or glob patterns to train on"""
    vocab_size: int
    """tokens in all: 256 bytes + the special tokens + the merges learned"""
    out: str
    """directory for lmforge_tokenizer.json (and the --export formats), or a .json file path"""
    special: tuple[str, ...] = ("<|endoftext|>",)
    """special tokens, kept whole: never split into bytes or merged"""
    pattern: str = "gpt2"
    """'gpt2', 'cl100k', 'o200k' or a custom pre-tokenization regex"""
    export: tuple[Literal["hf", "gpt2", "tiktoken"], ...] = names_field(())
    """also write these formats into --out (apart or comma-separated: --export hf gpt2, --export hf,gpt2)"""
    workers: Optional[int] = None
    """worker processes (None = one per core, 8 at most)"""
    progress: bool = True
    """progress bars on stderr"""

    def __post_init__(self):
        check(len(self.input) > 0, "input: give at least one text file")
        check(self.vocab_size >= 256 + len(self.special),
              f"vocab_size={self.vocab_size} is below 256 bytes + {len(self.special)} special tokens")
        check(not (self.export and Path(self.out).suffix == ".json"), f"--export writes its files into a "
              f"directory, but --out {self.out!r} names one .json file; give --out a directory")
        check_workers(self.workers)


@dataclass(frozen=True, kw_only=True)
class EncodeArgs:
    """Encode text files into token shards (OUT/train.bin, and OUT/val.bin with --val-fraction)."""

    tokenizer: str
    """'byte', a tokenizer directory or file: lmforge JSON, HF tokenizer.json, GPT-2 vocab.json + merges.txt,
    or a tiktoken rank file"""
    input: tuple[str, ...]
    """text files, directories or glob patterns to encode"""
    out: str
    """directory for train.bin (and val.bin)"""
    val_fraction: float = 0.0
    """the last this-much of every file goes to val.bin (at most: the tail starts at the first safe cut or line
    start after that point, so usually half of it or more; a file with neither in its tail gives less or none)"""
    workers: Optional[int] = None
    """worker processes (None = every core)"""
    progress: bool = True
    """progress bars on stderr"""

    def __post_init__(self):
        check(len(self.input) > 0, "input: give at least one text file")
        check(0 <= self.val_fraction < 1, f"val_fraction={self.val_fraction} must be in [0, 1)")
        check_workers(self.workers)


@dataclass(frozen=True, kw_only=True)
class StatsArgs:
    """Compression (bytes per token) and vocabulary use of a tokenizer on text files."""

    tokenizer: str
    """'byte' or a tokenizer directory or file (any format load_tokenizer reads)"""
    input: tuple[str, ...]
    """text files to measure on"""
    top: int = 10
    """list the most frequent tokens (0: none)"""
    json: bool = False
    """print the numbers as JSON"""
    workers: Optional[int] = None
    """worker processes (None = every core)"""
    progress: bool = False
    """progress bars on stderr"""

    def __post_init__(self):
        check_workers(self.workers)
        check(self.top >= 0, f"--top must be >= 0 (0 lists none), got {self.top}")


def check_workers(workers: int | None) -> None:
    check(workers is None or workers >= 1, f"--workers must be >= 1 (worker processes), got {workers}; leave it "
          "out to use every core")


def train(argv: list[str]) -> int:
    from lmforge.tokenizer.train import train_bpe

    a = parse_config(TrainArgs, argv, prog="lmforge tokenizer train", description=TrainArgs.__doc__ or "")
    check_output_path(a.out, "--out", file=Path(a.out).suffix == ".json")  # a .json --out is the tokenizer file
    check_stale_exports(a.out, a.export)
    files = input_files(a.input)  # each checked for text once, by train_bpe before it counts (not expand_inputs too)
    stats: dict = {}
    t0 = time.perf_counter()
    tok = train_bpe(files, a.vocab_size, a.special, pattern=a.pattern, workers=a.workers,
                    progress=a.progress, stats=stats)
    path = tok.save(a.out)
    writers = {"hf": tok.save_hf, "gpt2": tok.save_gpt2, "tiktoken": tok.save_tiktoken}  # each into --out
    exported = ""
    for fmt in a.export:
        writers[fmt](a.out)
        written = [str(path.parent / n) for n in EXPORT_FILES[fmt] if (path.parent / n).is_file()]
        exported += f"; --export {fmt}: {', '.join(written)}"
    print(f"trained {tok.vocab_size} tokens ({len(tok.merges)} merges) on {stats['bytes']:,} bytes in "
          f"{len(files)} file(s), {stats['distinct_pretokens']:,} distinct pre-tokens, "
          f"{time.perf_counter() - t0:.1f}s -> {path}{exported}")
    if stats["undecodable_bytes"]:
        print(undecodable_note(stats["undecodable_bytes"], kept=False))
    return 0


# what each --export format writes into --out
EXPORT_FILES = {"hf": ("tokenizer.json", "tokenizer_config.json"), "gpt2": ("vocab.json", "merges.txt",
                "added_tokens.json"), "tiktoken": ("bpe.tiktoken",)}


def check_stale_exports(out: str, export: tuple[str, ...]) -> None:
    """Refuse, before training, an --out folder holding files of an --export format this train does not write (an
    earlier train's): left beside the new lmforge_tokenizer.json they were another tokenizer, which HF
    (AutoTokenizer on the folder), tiktoken or `--tokenizer DIR/tokenizer.json` read without a word."""
    folder = Path(out)
    if folder.suffix == ".json" or not folder.is_dir():
        return
    formats = [f for f, names in EXPORT_FILES.items() if f not in export and any((folder / n).exists() for n in names)]
    if formats:
        names = [n for f in formats for n in EXPORT_FILES[f] if (folder / n).exists()]
        raise ConfigError(f"--out {out} holds {', '.join(names)} (another tokenizer's {'/'.join(formats)} export), "
                          f"which this train would leave beside its new lmforge_tokenizer.json; add --export "
                          f"{' '.join([*export, *formats])} to rewrite them, remove them, or choose another --out")


def encode(argv: list[str]) -> int:
    from lmforge.tokenizer.corpus import check_shard_paths, encode_to_shards
    from lmforge.tokenizer.load import load_tokenizer

    a = parse_config(EncodeArgs, argv, prog="lmforge tokenizer encode", description=EncodeArgs.__doc__ or "")
    check_shard_paths(a.out, a.val_fraction, "--out")  # encode_to_shards checks too; here before the tokenizer loads
    tok = load_tokenizer(a.tokenizer)
    t0 = time.perf_counter()
    rep = encode_to_shards(tok, a.input, a.out, val_fraction=a.val_fraction, workers=a.workers, progress=a.progress)
    secs = time.perf_counter() - t0
    for split, path in rep.shards.items():
        docs = f"{rep.docs[split]:,} document{'s' * (rep.docs[split] != 1)}"
        print(f"{split}: {rep.tokens[split]:,} tokens, {docs} -> {path}")
    for path in rep.removed:
        print(f"removed {path}: an earlier encode's, and this one writes no val.bin (give --val-fraction for one)")
    total = sum(rep.tokens.values())
    print(f"{rep.bytes:,} bytes, {rep.bytes / max(total, 1):.3f} bytes/token, {rep.bytes / 1e6 / secs:.1f} MB/s, "
          f"{rep.undecodable_bytes:,} undecodable bytes (not UTF-8)")
    if rep.undecodable_bytes:
        print(undecodable_note(rep.undecodable_bytes, kept=hasattr(tok, "encode_bytes")))
    return 0


def undecodable_note(n: int, kept: bool) -> str:
    if kept:
        return f"note: the byte tokenizer kept the {n:,} bytes that are not UTF-8 as they are"
    return (f"note: {n:,} bytes that are not UTF-8 were read as Windows-1252 (Latin-1) characters; "
            f"--tokenizer byte keeps every byte as it is")


def stats(argv: list[str]) -> int:
    from lmforge.tokenizer.corpus import corpus_stats
    from lmforge.tokenizer.load import load_tokenizer

    a = parse_config(StatsArgs, argv, prog="lmforge tokenizer stats", description=StatsArgs.__doc__ or "")
    s = corpus_stats(load_tokenizer(a.tokenizer), a.input, workers=a.workers, progress=a.progress, top=a.top)
    if a.json:
        print(json.dumps(s, ensure_ascii=False))
        return 0
    print(f"files {s['files']}  bytes {s['bytes']:,}  tokens {s['tokens']:,}  "
          f"bytes/token {s['bytes_per_token']:.3f} (of the text, separators left out: data.bytes_per_token's ratio)")
    print(f"vocabulary used {s['vocab_used']:,} of {s['vocab_size']:,} ({100 * s['vocab_used_fraction']:.1f}%)")
    if s["undecodable_bytes"]:
        print(f"undecodable bytes {s['undecodable_bytes']:,} (read as Windows-1252)")
    for i, text, n in s["top_tokens"]:
        print(f"  {i:>7} {n:>12,}  {text!r}")
    return 0


COMMANDS = {
    "train": (train, "train a byte-level BPE tokenizer on text files"),
    "encode": (encode, "encode text files into token shards for training"),
    "stats": (stats, "bytes per token and vocabulary use on a corpus"),
}


def main(argv: list[str]) -> int:
    return run_group("tokenizer", argv, COMMANDS)
