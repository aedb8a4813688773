"""Sparse upcycling (Komatsuzaki et al. 2023): an MoE Transformer initialised from a dense one.

Everything but the MLPs is copied; each MoE layer's experts start as copies of the dense layer's MLP
(optionally with Gaussian noise to break symmetry) and the router starts near uniform. With
normalised top-k weights and no noise, the upcycled model computes exactly the dense model's function.
"""

from __future__ import annotations

import dataclasses

import torch

from lmforge.model.config import MoEConfig
from lmforge.model.layers.moe import MoE, upcycle_mlp


@torch.no_grad()
def upcycle(dense, moe: MoEConfig, noise_std: float = 0.0):
    """dense Transformer -> new Transformer with mlp='moe' (d_expert defaults to the dense d_ff)."""
    from lmforge.model.transformer import Transformer

    cfg = dataclasses.replace(dense.cfg, mlp="moe", moe=dataclasses.replace(moe, d_expert=moe.d_expert or dense.cfg.ff))
    model = Transformer(cfg).to(next(dense.parameters()).device)
    own = dict(model.named_parameters())
    for name, p in dense.named_parameters():
        if name in own and own[name].shape == p.shape:
            own[name].copy_(p)
    for name, module in model.named_modules():  # every MoE layer: the blocks' and the MTP modules' alike
        if isinstance(module, MoE):
            upcycle_mlp(module, dense.get_submodule(name), noise_std)
    return model
