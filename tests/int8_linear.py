"""A stand-in for a weight-only quantized Linear, shared by the tests of what a future quantizer plugs into
(MLA's absorbed path, FLOPs counting, fusing): int8 codes and one scale per output row in buffers, no `weight`,
integer in_features / out_features - what lmforge.adapt.lora.linear_like calls linear-like."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        scales = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
        self.register_buffer("qweight", torch.round(w / scales).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
