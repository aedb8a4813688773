"""Rank-aware batches: every data-parallel rank reads its own slice of one global batch, every window
of tokens is seen exactly once per epoch across all ranks, and the position is one global number, so
a run resumes exactly - on the same or on a different number of ranks.

Each token shard is cut into non-overlapping windows of seq_len + 1 tokens (consecutive windows share
their boundary token: inputs w[:-1], targets w[1:]; no window crosses two shards), numbered across
shards. Epoch e visits the windows in a permutation seeded
by (seed, e); the epochs' permutations are concatenated into one stream, and global step s takes stream
positions [s·G, (s+1)·G) for a global batch of G windows. Rank r of N takes the r-th contiguous G/N of
them. An epoch boundary may fall inside a batch: no window is dropped or repeated within an epoch.
"""

from __future__ import annotations

import numpy as np
import torch

from lmforge.errors import ConfigError, DataError


class RankBatches:
    def __init__(self, tokens, seq_len: int, global_batch: int, rank: int, world: int, seed: int = 0):
        """`tokens`: one 1-D token array (numpy, memmap, tensor) or a list of them (shards)."""
        if global_batch % world:
            raise ConfigError(f"global batch {global_batch} must be divisible by the data-parallel size {world}")
        if not 0 <= rank < world:
            raise ConfigError(f"rank={rank} must lie in [0, world={world})")
        self.shards = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
        self.seq_len, self.global_batch = seq_len, global_batch
        self.rank, self.world, self.seed = rank, world, seed
        per_shard = [max(0, (len(t) - 1) // seq_len) for t in self.shards]
        self._first = np.cumsum([0] + per_shard)  # window id of each shard's first window
        self.n_windows = int(self._first[-1])
        if self.n_windows < 1:
            raise DataError(f"{sum(len(t) for t in self.shards)} tokens hold no window of seq_len+1={seq_len + 1}; "
                            "add data or lower seq_len")
        self.position = 0  # windows consumed by all ranks together since the start
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            g = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = g.permutation(self.n_windows), epoch
        return self._perm

    def window_ids(self, step_position: int) -> list[int]:
        """Window indices this rank reads for the global batch starting at stream position `step_position`."""
        per = self.global_batch // self.world
        start = step_position + self.rank * per
        return [int(self._order(p // self.n_windows)[p % self.n_windows]) for p in range(start, start + per)]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (B/N, seq_len) inputs and targets of the next global batch."""
        ids = self.window_ids(self.position)
        self.position += self.global_batch
        w = torch.from_numpy(np.stack([self._window(i) for i in ids]))
        return w[:, :-1], w[:, 1:]

    def _window(self, i: int) -> np.ndarray:
        shard = int(np.searchsorted(self._first, i, side="right")) - 1
        start = (i - int(self._first[shard])) * self.seq_len
        return np.asarray(self.shards[shard][start:start + self.seq_len + 1], dtype=np.int64)

    @property
    def epoch(self) -> float:
        return self.position / self.n_windows

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        if state["n_windows"] != self.n_windows or state["seed"] != self.seed:
            raise DataError(f"data state was saved for {state['n_windows']} windows (seed {state['seed']}) but "
                            f"this data has {self.n_windows} (seed {self.seed}); resume on the same data and seq_len")
        self.position = int(state["position"])
