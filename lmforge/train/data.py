"""Batches of token windows from memory-mapped shards, with state that checkpoints resume exactly.

Two ways to walk the data:
  random      each sequence starts at a uniformly random offset of a shard chosen in proportion to its
              size (nanoGPT); the torch.Generator state is saved, so a resumed run draws the same windows
  sequential  consecutive non-overlapping windows, shard after shard, epoch after epoch; the position
              is saved
Windows have seq_len + 1 tokens: inputs x = w[:-1], targets y = w[1:].
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from lmforge.data.shards import SCAN_AT_OPEN, TokenFile
from lmforge.errors import DataError, LmforgeError

PROBE = "The quick brown fox, 1234 times: jumps! éü 日本 \n\tdef f(x): return x ** 2  \u2014 end"
"""text two tokenizers encode to compare them (ids of one model's data or frozen models must mean its tokens)"""


def encode_alike(a, b) -> bool:
    """Whether two tokenizer objects give PROBE the same ids (tokenizers that differ in merges, bytes or
    special tokens do not)."""
    return a.encode(PROBE) == b.encode(PROBE)


def tokenizer_spec(spec: str | None, shard: TokenFile) -> str | None:
    """A tokenizer spec for a shard (its header's, or the run's): a path that names nothing as given is read
    relative to the shard's folder, where it may have been moved with the shards."""
    if spec and spec != "byte" and not Path(spec).exists() and (shard.path.parent / spec).exists():
        return str(shard.path.parent / spec)
    return spec


def _tokenizer_file(shard: TokenFile) -> Path | None:
    """The file or folder of a shard's tokenizer, resolved (two spellings of one path compare equal); None: a
    spec that names none ('byte', a content hash, a file not found)."""
    spec = tokenizer_spec(shard.tokenizer, shard)
    return Path(spec).resolve() if spec and spec != "byte" and Path(spec).exists() else None


def check_one_tokenizer(shards: Iterable[TokenFile]) -> TokenFile:
    """The first shard, once every other one is known to hold ids of the same tokenizer: the same vocab_size
    and the same spec, or the same file however spelled (relative, absolute, through a link), or files that
    load as tokenizers encoding alike (a copy). A shard of another tokenizer (a byte-level val.bin beside BPE
    training shards) is refused: its ids would be read as other tokens, and its validation loss mean nothing."""
    from lmforge.tokenizer.load import load_tokenizer

    first, *rest = list(shards)
    loaded: dict[Path, Any] = {}

    def load(path: Path):
        if path not in loaded:
            loaded[path] = load_tokenizer(path)
        return loaded[path]

    a = _tokenizer_file(first)
    for shard in rest:
        b = _tokenizer_file(shard)
        same = first.vocab_size == shard.vocab_size and (
            shard.tokenizer == first.tokenizer if a is None or b is None else a == b or encode_alike(load(a), load(b)))
        if not same:
            raise DataError(f"{shard.path} was encoded by tokenizer {shard.tokenizer!r} (vocab {shard.vocab_size}) "
                            f"but {first.path} by {first.tokenizer!r} (vocab {first.vocab_size}), so one id means "
                            "another token in each; re-encode one with the other's tokenizer (lmforge tokenizer "
                            "encode --tokenizer ...)")
    return first


def check_run_tokenizer(tokenizer, spec: str, shard: TokenFile) -> None:
    """The tokenizer a run names (TrainConfig.tokenizer) over the one the shards' header names: where theirs loads
    ('byte', a file that is there) the two must encode alike, or every checkpoint would decode the ids as other
    tokens (a BPE tokenizer named over byte shards trained, and only `lmforge sample` refused it). Where it does
    not (moved, damaged, a content hash), the run's tokenizer is the way to name it, and is taken as it is."""
    from lmforge.tokenizer.load import load_tokenizer

    theirs = tokenizer_spec(shard.tokenizer, shard)
    if not theirs or (theirs != "byte" and _tokenizer_file(shard) is None):
        return
    try:
        loaded = load_tokenizer(theirs)
    except LmforgeError:  # there but unreadable: the run's tokenizer stands in for it
        return
    if not encode_alike(tokenizer, loaded):
        raise DataError(f"tokenizer={spec!r} does not encode as {theirs!r}, the tokenizer {shard.path} was encoded "
                        "with, so its ids would be read as other tokens; leave tokenizer empty to use the shards' "
                        "own, or re-encode the shards with it (lmforge tokenizer encode --tokenizer ...)")


@dataclass
class Split:
    """A view [start, stop) of one shard's tokens."""

    file: TokenFile
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, offset: int, length: int) -> np.ndarray:
        """(length,) int64 tokens from `offset`, refused where one is outside the vocabulary (TokenFile.check_ids:
        one max over the window read, for a shard too large to scan at open)."""
        at = self.start + offset
        w = np.asarray(self.file.tokens[at: at + length], dtype=np.int64)
        if not self.file.scanned:
            self.file.check_ids(w, at)
        return w

    def doc_starts(self, offset: int, length: int) -> np.ndarray:
        """(length,) bool: which tokens of `window(offset, length)` open a document, where the shard records it
        (documents back to back, no separator: TokenFile.doc_starts); all False where it does not."""
        out = np.zeros(length, dtype=bool)
        starts = self.file.doc_starts
        if starts is not None and len(starts):
            lo = self.start + offset
            at = np.asarray(starts[np.searchsorted(starts, lo):np.searchsorted(starts, lo + length)]) - lo
            out[at] = True
        return out


def directory_error(path: Path, what: str, pattern: str, prefer: str = "", key: str = "") -> DataError:
    """The error for a directory given where `what` (a file) belongs, naming the files in it that would do
    (`prefer` when it is there, else those matching `pattern`)."""
    fits = [path / prefer] if prefer and (path / prefer).is_file() else sorted(path.glob(pattern))
    names = ", ".join(map(str, fits[:3])) + (", ..." if len(fits) > 3 else "")
    hint = (f"; give the file in it: {names}" if len(fits) == 1 else f"; give the files in it: {names}" if fits
            else f", and holds no {pattern} file; give the path of {what}")
    return DataError(f"{key + ': ' if key else ''}{path} is a directory, not {what}{hint}")


def shard_paths(paths: tuple[str, ...], key: str) -> list[Path]:
    """The token shard files `paths` names, in order: a file as it is; a directory, the *.bin files in it; a glob
    pattern (*, ?, [...]; ** for any depth), the files it matches; those two sorted by name. A directory holding the
    other split's shard (val.bin under data.train, train.bin under data.val: the folder `lmforge tokenizer encode`
    writes) or a pattern matching it is refused, its validation text would be trained on, as is one holding no
    shard or a pattern matching no file. Every shard found is checked as a listed one is (check_one_tokenizer,
    check_vocab)."""
    out: list[Path] = []
    other = "val.bin" if key.endswith("train") else "train.bin"
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.glob("*.bin") if q.is_file())
            if not found:
                raise DataError(f"{key}: {p} holds no *.bin token shard; make them with lmforge tokenizer encode or a "
                                "data pipeline's tokenize stage")
            if p / other in found:
                rest = ", ".join(str(q) for q in found if q.name != other)
                raise DataError(f"{key}: {p} holds {other}, the other split's shard, beside its training shards: name "
                                f"them ({rest}) or a pattern that leaves {other} out")
            out += found
        elif not p.exists() and any(c in str(p) for c in "*?["):
            found = sorted(Path(q) for q in glob.glob(str(p), recursive=True) if Path(q).is_file())
            if not found:
                raise DataError(f"{key}: {p} matches no file (a token shard file, a directory of *.bin shards or a "
                                "glob pattern is taken)")
            if theirs := [q for q in found if q.name == other]:
                split = "training" if key.endswith("train") else "validation"
                raise DataError(f"{key}: {p} matches {theirs[0]}, the other split's shard; name the {split} shards "
                                f"or a pattern that leaves {other} out")
            out += found
        else:
            out.append(p)
    seen: dict[Path, Path] = {}
    for p in out:  # (["shards", "shards/*.bin"] listed each shard twice: sampled twice as often, in silence)
        try:
            where = p.resolve()
        except (RuntimeError, OSError) as e:  # (Python < 3.13: RuntimeError "Symlink loop")
            raise DataError(f"{key}: {p} cannot be followed ({e}); give the token shard file itself") from e
        if (q := seen.setdefault(where, p)) is not p:
            raise DataError(f"{key}: {p} is listed twice{f' (also as {q})' if str(q) != str(p) else ''}: a shard "
                            "is read once; give each once (to weigh sources: [[data.sources]] and [[data.phases]] "
                            "weights)")
    return out


def open_splits(train: tuple[str, ...], val: tuple[str, ...], val_fraction: float, seq_len: int,
                model_vocab: int, key: str = "data") -> tuple[list[Split], list[Split]]:
    """Open the shards; without val shards, hold out the last `val_fraction` of every training shard. `key`
    names their config section in errors (data, data.sources[1])."""
    if not train:
        raise DataError(f"no training data: set {key}.train to one or more token shard files")
    train_paths, val_paths = shard_paths(train, f"{key}.train"), shard_paths(val, f"{key}.val")
    trained = {p.resolve(): p for p in train_paths}
    for p in val_paths:
        if (q := trained.get(p.resolve())) is not None:
            raise DataError(f"{q} is in both {key}.train and {key}.val{f' (as {p})' if p != q else ''}: the "
                            "validation loss would measure text trained on; give it to one of them")
    files = [TokenFile(p) for p in train_paths]
    val_files = [TokenFile(p) for p in val_paths]
    budget = SCAN_AT_OPEN  # (tokens scanned whole at open, over all the shards: the rest per window read)
    for f in files + val_files:
        f.check_vocab(model_vocab, scan=len(f.tokens) <= budget)
        budget -= len(f.tokens) if f.scanned else 0
    if val_files:
        tr = [Split(f, 0, len(f)) for f in files]
        va = [Split(f, 0, len(f)) for f in val_files]
    else:
        tr, va = [], []
        for f in files:
            cut = len(f) - int(len(f) * val_fraction)
            tr.append(Split(f, 0, cut))
            va.append(Split(f, cut, len(f)))
    need = seq_len + 1
    short = [s for s in tr if len(s) < need]
    tr = [s for s in tr if len(s) >= need]
    va = [s for s in va if len(s) >= need]
    if not tr:
        raise DataError(f"the training shards hold fewer than seq_len+1={need} tokens; add data or lower data.seq_len")
    if short:  # a shard listed, never read: said, not left out in silence
        from lmforge.errors import warn_caller

        names = ", ".join(f"{s.file.path} ({len(s)})" for s in short[:3]) + (", ..." if len(short) > 3 else "")
        warn_caller(f"{key}.train: {len(short)} shard(s) hold fewer training tokens than one window (seq_len+1="
                    f"{need}) and are not trained on: {names}")
    if not va and (val_fraction > 0 or val_files):
        raise DataError(f"the validation split holds fewer than seq_len+1={need} tokens; "
                        "raise data.val_fraction, give data.val shards, or lower data.seq_len")
    return tr, va


class BatchSampler:
    """Pretraining's DataSource (lmforge.train.objective): batches {"input_ids": x, "targets": y} of
    (batch_size, seq_len) LongTensors."""

    def __init__(self, splits: list[Split], batch_size: int, seq_len: int, mode: str, seed: int, key: str = "data"):
        self.splits, self.batch_size, self.seq_len, self.mode, self.key = splits, batch_size, seq_len, mode, key
        self.gen = torch.Generator().manual_seed(seed)
        sizes = torch.tensor([len(s) - seq_len - 1 + 1 for s in splits], dtype=torch.float64)
        self.weights = sizes / sizes.sum()
        self.shard, self.pos, self.epoch = 0, 0, 0

    def _random_window(self) -> np.ndarray:
        i = int(torch.multinomial(self.weights, 1, generator=self.gen)) if len(self.splits) > 1 else 0
        s = self.splits[i]
        off = int(torch.randint(0, len(s) - self.seq_len, (1,), generator=self.gen))
        return s.window(off, self.seq_len + 1)

    def _sequential_window(self) -> np.ndarray:
        if self.pos + self.seq_len + 1 > len(self.splits[self.shard]):
            self.shard, self.pos = self.shard + 1, 0
            if self.shard == len(self.splits):
                self.shard, self.epoch = 0, self.epoch + 1
        w = self.splits[self.shard].window(self.pos, self.seq_len + 1)
        self.pos += self.seq_len
        return w

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        take = self._random_window if self.mode == "random" else self._sequential_window
        w = torch.from_numpy(np.stack([take() for _ in range(self.batch_size)]))
        return w[:, :-1], w[:, 1:]

    def next_batch(self) -> dict[str, torch.Tensor]:
        x, y = self.next()
        return {"input_ids": x, "targets": y}

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "shard": self.shard, "pos": self.pos, "epoch": self.epoch,
                "sizes": [len(s) for s in self.splits]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A sequential position is a split index and an offset into it: it resumes only over the splits it was
        saved with (their token counts, saved since 2026-12-05; an older state is checked for range). Over other
        shards it read past the list (an IndexError mid-run) or continued at a place that means other text."""
        sizes = [len(s) for s in self.splits]
        if self.mode == "sequential" and (state.get("sizes", sizes) != sizes or state["shard"] >= len(sizes)):
            was = state.get("sizes")
            raise DataError(f"{self.key}.train changed since the checkpoint: its sequential position (split "
                            f"{state['shard']} of {len(was) if was else 'its'} training splits, token {state['pos']}) "
                            f"does not apply to the {len(sizes)} split(s) given now; resume with the same "
                            f"{self.key}.train, or set data.sampling = 'random'")
        self.gen.set_state(state["gen"])
        self.shard, self.pos, self.epoch = state["shard"], state["pos"], state["epoch"]


def eval_windows(splits: list[Split], n_batches: int, batch_size: int, seq_len: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A fixed set of validation batches (x, y, opens): windows evenly spaced over the validation tokens, so every
    evaluation scores the same text; opens (B, T) bool marks the targets y that open a document in shards written
    without a separator (Split.doc_starts: what val_bpb needs to find the "▁" put before a document there)."""
    n = n_batches * batch_size
    spans = [(s, off) for s in splits for off in range(0, len(s) - seq_len, seq_len)]
    if not spans:
        return []
    idx = np.linspace(0, len(spans) - 1, num=min(n, len(spans))).round().astype(int)
    wins = np.stack([spans[i][0].window(spans[i][1], seq_len + 1) for i in idx])
    opens = np.stack([spans[i][0].doc_starts(spans[i][1], seq_len + 1) for i in idx])
    t, o = torch.from_numpy(wins), torch.from_numpy(opens)
    return [(t[i:i + batch_size, :-1], t[i:i + batch_size, 1:], o[i:i + batch_size, 1:])
            for i in range(0, len(t), batch_size)]
