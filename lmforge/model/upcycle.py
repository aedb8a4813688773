"""Sparse upcycling (Komatsuzaki et al. 2023): an MoE Transformer initialised from a dense one.

Everything but the MLPs is copied; each MoE layer's experts start as copies of the dense layer's MLP
(optionally with Gaussian noise to break symmetry), the router starts near uniform and shared experts
start with a zero output. Without noise, the upcycled model computes exactly the dense model's function
when the top-k weights sum to one and every assignment is kept: norm_topk=true, routed_scale=1 and
capacity_factor=0. Other settings are a legitimate starting point (DeepSeek-V3 scales its routed output),
so `upcycle` warns rather than refuses; a dense MLP's biases need expert_bias=true (refused otherwise).
"""

from __future__ import annotations

import dataclasses

import torch

from lmforge.errors import warn_caller
from lmforge.model.config import MoEConfig
from lmforge.model.layers.moe import MoE, upcycle_mlp


def upcycle(dense, moe: MoEConfig, noise_std: float = 0.0):
    """dense Transformer -> new Transformer with mlp='moe' (d_expert defaults to the dense d_ff)."""
    from lmforge.model.transformer import Transformer

    inexact = [why for why, on in (("norm_topk=false", not moe.norm_topk),
                                   (f"routed_scale={moe.routed_scale}", moe.routed_scale != 1),
                                   (f"capacity_factor={moe.capacity_factor}", moe.capacity_factor > 0)) if on]
    if inexact:
        warn_caller(f"upcycle with model.moe {', '.join(inexact)}: the MoE model starts from a different function "
                    "than the dense one (exact with norm_topk=true, routed_scale=1, capacity_factor=0)")
    cfg = dataclasses.replace(dense.cfg, mlp="moe", moe=dataclasses.replace(moe, d_expert=moe.d_expert or dense.cfg.ff))
    model = Transformer(cfg).to(next(dense.parameters()).device)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if name in own and own[name].shape == p.shape:
                own[name].copy_(p)
    for name, module in model.named_modules():  # every MoE layer: the blocks' and the MTP modules' alike
        if isinstance(module, MoE):
            upcycle_mlp(module, dense.get_submodule(name), noise_std)
    return model
