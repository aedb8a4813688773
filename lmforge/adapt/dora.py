"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank
Adaptation", eq. 5). The adapted weight is split into a per-row magnitude m (trained) and a direction, which
LoRA updates:

    W' = m · (W + s·BA) / ||W + s·BA||_row          m: (out,), initialised to ||W||_row (B = 0 at start)

and the norm is treated as a constant in the backward pass (section 4.3: "we treat ||V + ΔV||_c as a
constant", which saves the memory of its graph). As PEFT (`LoraConfig(use_dora=True)`) computes it, the
output is the base output plus a correction, so a frozen bias is added once:

    y = x W^T + b + (g - 1) · drop(x) W^T + g · s · drop(x) A^T B^T,    g = m / ||W + s·BA||_row

(with dropout off, drop(x) W^T is the base output less its bias). Tested equal to PEFT's DoRA.

`apply_lora(model, LoRAConfig(dora=True, ...))` builds these layers; checkpoints record them as "dora"
(lmforge.adapt.lora.lora_record), so load_model rebuilds them; merge_lora folds W' into the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.adapt.lora import LoRALinear
from lmforge.errors import ConfigError
from lmforge.model.layers.fused import plain_linear


class DoRALinear(LoRALinear):
    """A frozen nn.Linear with LoRA's B A on the weight's direction and a trained magnitude per output row."""

    adapter_params = (*LoRALinear.adapter_params, "magnitude")
    kind = "dora"

    def __init__(self, base: nn.Module, r: int, scale: float, dropout: float = 0.0):
        if not plain_linear(base):  # the norm needs the weight itself, which a quantized layer does not hold
            w = getattr(base, "weight", None)
            held = f" of {type(w).__name__}" if isinstance(w, torch.Tensor) else ""
            raise ConfigError(f"DoRA adapts an nn.Linear's weight, not a {type(base).__name__}{held} (e.g. a "
                              "quantized base): use plain LoRA there (dora=false)")
        super().__init__(base, r, scale, dropout)
        self.magnitude = nn.Parameter(self.weight_norm())  # (out,): ||W||_row, as B = 0

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """(out,) row norms of W + s·BA in the adapters' dtype, without gradient (the paper's constant)."""
        return torch.linalg.norm(self.weight.to(self.lora_A.dtype) + super().delta_weight(), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        xa = x.to(self.lora_A.dtype)
        dropped = self.dropout(xa)
        g = self.magnitude / self.weight_norm()  # (out,)
        if self.training and isinstance(self.dropout, nn.Dropout):  # drop(x) W^T recomputed on the dropped input
            base = F.linear(dropped, self.weight.to(xa.dtype))
        else:  # the base output less its bias, as PEFT reuses it
            base = out if self.bias is None else out - self.bias
        lora = F.linear(F.linear(dropped, self.lora_A), self.lora_B)
        return (out + (g - 1) * base + g * self.scale * lora).to(out.dtype)

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """W' - W, (out, in), in the adapters' dtype: what merge_lora adds to the weight in place."""
        w = self.weight.to(self.lora_A.dtype)
        return (self.magnitude / self.weight_norm())[:, None] * (w + super().delta_weight()) - w
