"""Batches of token windows from memory-mapped shards, with state that checkpoints resume exactly.

Two ways to walk the data:
  random      each sequence starts at a uniformly random offset of a shard chosen in proportion to its
              size (nanoGPT); the torch.Generator state is saved, so a resumed run draws the same windows
  sequential  consecutive non-overlapping windows, shard after shard, epoch after epoch; the position
              is saved
Windows have seq_len + 1 tokens: inputs x = w[:-1], targets y = w[1:].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmforge.data.shards import TokenFile
from lmforge.errors import DataError


@dataclass
class Split:
    """A view [start, stop) of one shard's tokens."""

    file: TokenFile
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start

    def window(self, offset: int, length: int) -> np.ndarray:
        return np.asarray(self.file.tokens[self.start + offset: self.start + offset + length], dtype=np.int64)


def open_splits(train: tuple[str, ...], val: tuple[str, ...], val_fraction: float, seq_len: int,
                model_vocab: int) -> tuple[list[Split], list[Split]]:
    """Open the shards; without val shards, hold out the last `val_fraction` of every training shard."""
    if not train:
        raise DataError("no training data: set data.train to one or more token shard files")
    files = [TokenFile(p) for p in train]
    val_files = [TokenFile(p) for p in val]
    for f in files + val_files:
        f.check_vocab(model_vocab)
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
    tr = [s for s in tr if len(s) >= need]
    va = [s for s in va if len(s) >= need]
    if not tr:
        raise DataError(f"the training shards hold fewer than seq_len+1={need} tokens; add data or lower data.seq_len")
    if not va and (val_fraction > 0 or val_files):
        raise DataError(f"the validation split holds fewer than seq_len+1={need} tokens; "
                        "raise data.val_fraction, give data.val shards, or lower data.seq_len")
    return tr, va


class BatchSampler:
    """Pretraining's DataSource (lmforge.train.objective): batches {"input_ids": x, "targets": y} of
    (batch_size, seq_len) LongTensors."""

    def __init__(self, splits: list[Split], batch_size: int, seq_len: int, mode: str, seed: int):
        self.splits, self.batch_size, self.seq_len, self.mode = splits, batch_size, seq_len, mode
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
        return {"gen": self.gen.get_state(), "shard": self.shard, "pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.shard, self.pos, self.epoch = state["shard"], state["pos"], state["epoch"]


def eval_windows(splits: list[Split], n_batches: int, batch_size: int, seq_len: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of validation batches: windows evenly spaced over the validation tokens, so every
    evaluation scores the same text."""
    n = n_batches * batch_size
    spans = [(s, off) for s in splits for off in range(0, len(s) - seq_len, seq_len)]
    if not spans:
        return []
    idx = np.linspace(0, len(spans) - 1, num=min(n, len(spans))).round().astype(int)
    wins = np.stack([spans[i][0].window(spans[i][1], seq_len + 1) for i in idx])
    t = torch.from_numpy(wins)
    return [(t[i:i + batch_size, :-1], t[i:i + batch_size, 1:]) for i in range(0, len(t), batch_size)]
