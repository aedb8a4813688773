"""Rotary position embedding (RoFormer, Su et al. 2021).

Each pair of channels of a query/key head is rotated by angle pos·θ_i, θ_i = base^(-2i/d), so the
dot product of a rotated query and key depends only on their relative position. Two layouts exist in
the wild and both are supported:
  'half'        pairs (i, i + d/2)   - GPT-NeoX, Llama, HF transformers
  'interleaved' pairs (2i, 2i + 1)   - RoFormer, GPT-J, Meta's original Llama code
"""

from __future__ import annotations

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """θ_i = theta^(-2i/d) for i in [0, d/2): shape (d/2,)."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0, layout: str = "half"):
        super().__init__()
        self.head_dim, self.layout = head_dim, layout
        self.attention_scale = 1.0  # scaled-RoPE variants (YaRN) multiply cos/sin by a temperature
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta).float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int -> cos, sin of shape (B, T, head_dim/2), in fp32."""
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.to(positions.device)
        return angles.cos() * self.attention_scale, angles.sin() * self.attention_scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "half") -> torch.Tensor:
    """x (B, H, T, hd); cos/sin (B, T, hd/2). Rotates channel pairs; computed in fp32."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd/2): broadcast over heads
    xf = x.float()
    if layout == "half":
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    else:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.to(x.dtype)
