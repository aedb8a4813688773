"""Normalisation layers: RMSNorm (Zhang & Sennrich, 2019) and LayerNorm (Ba et al., 2016).

RMSNorm rescales by the root mean square only (no centring, no bias): y = x / sqrt(mean(x²) + eps) · g.
With an offset (Gemma) the gain is g = offset + w: w is the stored parameter (0 at init) and the sum is taken
in fp32, as transformers' Gemma does; a bf16 gain 1 + w itself would round w away to bf16's step at 1 (2^-7).
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
    def __init__(self, dim: int, eps: float = 1e-5, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))  # a gain of 1

    def gain(self) -> torch.Tensor:
        """The multiplier of the normalised input: the weight, or offset + weight in fp32."""
        return self.weight if not self.offset else self.weight.float() + self.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gain()
        if x.is_cuda and x.dtype == g.dtype:
            return F.rms_norm(x, (x.shape[-1],), g, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), g.float(), self.eps).to(x.dtype)


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


def build_norm(kind: str, dim: int, eps: float, bias: bool, offset: float = 0.0) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, offset)
    if kind == "layernorm":
        return LayerNorm(dim, eps, bias)
    raise ValueError(f"unknown norm {kind!r}")


def model_norm(cfg) -> nn.Module:
    """A norm of the trunk (the blocks', the final one, MTP's before the shared head) as ModelConfig sets it:
    model.norm, norm_eps, bias (LayerNorm's) and norm_offset (RMSNorm's)."""
    return build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias, cfg.norm_offset)
