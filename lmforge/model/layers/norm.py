"""Normalisation layers: RMSNorm (Zhang & Sennrich, 2019) and LayerNorm (Ba et al., 2016).

RMSNorm rescales by the root mean square only (no centring, no bias): y = x / sqrt(mean(x²) + eps) · g.
Both compute in fp32 and cast back, so bf16 activations do not lose the statistic's precision. On a GPU,
when the input and the weight share a dtype, PyTorch's own kernel is called on them directly: it accumulates
in fp32 (in one launch in recent torch, 2.11 on the H200) instead of three casts around an fp32 kernel
(tests/model/test_layers.py compares the two paths on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), b, self.eps).to(x.dtype)


def build_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps, bias)
    raise ValueError(f"unknown norm {kind!r}")
