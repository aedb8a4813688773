"""Absolute position embeddings added to the token embeddings: learned (GPT-2) and sinusoidal
(Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...))."""

from __future__ import annotations

import math

import torch
from torch import nn


class LearnedPositions(nn.Module):
    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len, dim))
        self.max_len = max_len

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # (checked in eager mode only: reading the max is a graph break under torch.compile, which trains on
        # positions below max_seq_len - the data config is checked against it)
        if not torch.compiler.is_compiling() and int(positions.max()) >= self.max_len:
            from lmforge.errors import LmforgeError

            raise LmforgeError(f"position {int(positions.max())} is beyond model.max_seq_len={self.max_len} "
                               "(learned positions cannot extrapolate)")
        return self.weight[positions]


def sinusoidal_table(max_len: int, dim: int) -> torch.Tensor:
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    pe = torch.zeros(max_len, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe.float()


class SinusoidalPositions(nn.Module):
    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("table", sinusoidal_table(max_len, dim), persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        # grow on demand (the formula extrapolates); not under torch.compile, whose training positions lie in
        # the table built for max_seq_len (reading the max would break the graph)
        if not torch.compiler.is_compiling() and int(positions.max()) >= self.table.shape[0]:
            self.table = sinusoidal_table(int(positions.max()) + 1, self.dim).to(self.table.device)
        return self.table[positions]
