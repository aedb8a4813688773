"""Feed-forward blocks. Plain: down(act(up(x))). Gated (Shazeer 2020, "GLU Variants"):
down(act(gate(x)) * up(x)) with SiLU (SwiGLU) or GELU (GeGLU, exact or tanh-approximated as Gemma).
ReLU² is So et al. 2021 (Primer). 'swiglu_oss' is gpt-oss's clamped variant:
(clamp(up, ±7) + 1) · g·σ(1.702·g) with g = min(gate, 7)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.layers.fused import fuse_linears

ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu2": lambda x: F.relu(x).square(),
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
GATED = ("swiglu", "geglu", "geglu_tanh", "swiglu_oss")
OSS_ALPHA, OSS_LIMIT = 1.702, 7.0


def glu(activation: str, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated hidden activation act(gate)·up (also used by the MoE experts)."""
    if activation == "swiglu_oss":
        gate = gate.clamp(max=OSS_LIMIT)
        return (up.clamp(-OSS_LIMIT, OSS_LIMIT) + 1) * gate * torch.sigmoid(gate * OSS_ALPHA)
    return ACT[activation](gate) * up


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.activation = activation
        self.gated = activation in GATED
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.gate = nn.Linear(d_model, d_ff, bias=bias) if self.gated else None
        self.down = nn.Linear(d_ff, d_model, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.gate_up: nn.Linear | None = None  # set by fuse(): gate and up in one matmul

    def fuse(self) -> None:
        """Compute gate and up with one matmul (lmforge.model.layers.fused); checkpoints keep both names."""
        if self.gated and self.gate_up is None:
            fuse_linears(self, "gate_up", ("gate", "up"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            h = glu(self.activation, *self.gate_up(x).chunk(2, dim=-1))
        elif self.gated:
            h = glu(self.activation, self.gate(x), self.up(x))
        else:
            h = ACT[self.activation](self.up(x))
        return self.dropout(self.down(h))
