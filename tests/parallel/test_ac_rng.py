"""Activation checkpointing recomputes a block with the random numbers of its forward: with dropout or noisy
MoE gating the gradients equal those of the model without checkpointing (one process, CPU)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.model.transformer import Transformer
from lmforge.parallel.ac import apply_ac
from lmforge.train.loss import lm_loss

BASE = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
RANDOM = {"noisy_moe": dict(mlp="moe", moe=MoEConfig(n_experts=4, top_k=1, noisy=True, norm_topk=False)),
          "dropout": dict(dropout=0.1)}


def _loss_and_grads(model, ids) -> tuple[float, torch.Tensor]:
    torch.manual_seed(123)  # the same draws for both models
    loss = lm_loss(model(ids), ids)[0]
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("kind", list(RANDOM))
def test_recompute_reuses_the_forwards_random_numbers(kind, mode):
    """Without the preserved RNG state the recompute drew new noise / masks: same loss, gradients 5.5% (noisy
    gating) and 21% (dropout) off."""

    torch.manual_seed(0)
    plain = Transformer(dataclasses.replace(BASE, **RANDOM[kind])).train()
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "noise" in n:
                p.normal_(0, 0.5)  # noise std that varies per token (it starts at softplus(0) for all)
    checkpointed = apply_ac(copy.deepcopy(plain), mode)
    ids = torch.randint(0, 50, (2, 16))
    (loss, grads), (ac_loss, ac_grads) = _loss_and_grads(plain, ids), _loss_and_grads(checkpointed, ids)
    assert ac_loss == pytest.approx(loss, rel=1e-6)
    assert ((ac_grads - grads).norm() / grads.norm()).item() < 1e-5


def test_only_models_that_draw_random_numbers_preserve_the_rng_state():
    from lmforge.parallel.ac import draws_random


    assert not draws_random(Transformer(BASE))
    assert not draws_random(Transformer(dataclasses.replace(BASE, mlp="moe", moe=MoEConfig(n_experts=4))))
    assert all(draws_random(Transformer(dataclasses.replace(BASE, **kw))) for kw in RANDOM.values())
    assert draws_random(torch.nn.Linear(2, 2))  # not an lmforge model: preserved, to be safe


@pytest.mark.parametrize("attention", ["mha", "mla"])
def test_a_model_whose_dropout_was_switched_off_draws_no_random_numbers(attention):
    """Post-training's drop_dropout sets the modules' dropout to 0 and keeps model.cfg's (the checkpoints save the
    init's): draws_random read cfg.dropout and still preserved and restored the RNG state in every block. It reads
    the modules: an nn.Dropout's p, attention's dropout on its weights (its train_spec)."""
    from lmforge.model.dropout import set_dropout
    from lmforge.parallel.ac import draws_random

    cfg = dataclasses.replace(BASE, dropout=0.1, attention=attention)
    model = Transformer(cfg)
    set_dropout(model, 0.0)
    assert model.cfg.dropout == 0.1 and not draws_random(model)
    weights_only = Transformer(cfg)
    for m in weights_only.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    assert draws_random(weights_only)  # attention's dropout on its weights, which is no module
    from lmforge.model.dropout import dropout_sites

    # one walk for both (set_dropout sets the sites draws_random reads): all at 0 after set_dropout, the same sites
    sites, others = list(dropout_sites(model)), list(dropout_sites(weights_only))
    assert len(sites) == len(others) > 0 and all(p == 0.0 for p, _ in sites)
    assert {p for p, _ in others} == {0.0, 0.1}  # the modules set to 0 by hand, attention's dropout left at 0.1


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_lora_dropout_is_recomputed_with_the_forwards_masks(mode):
    """LoRA's adapter dropout (LoRAConfig.dropout) is no ModelConfig field: draws_random said False for a LoRA model
    without model dropout, and the recompute drew new masks (found 2026-12-07)."""
    from lmforge.adapt import LoRAConfig, apply_lora
    from lmforge.parallel.ac import draws_random

    torch.manual_seed(0)
    plain = apply_lora(Transformer(BASE), LoRAConfig(r=4, alpha=8, targets=("wq", "wv", "up"), dropout=0.3)).train()
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()  # (B = 0 at the start: the masks would not reach A's gradient)
    assert draws_random(plain) and not draws_random(apply_lora(Transformer(BASE), LoRAConfig(r=4)))
    checkpointed = apply_ac(copy.deepcopy(plain), mode)
    ids = torch.randint(0, 50, (2, 16))
    (loss, grads), (ac_loss, ac_grads) = _loss_and_grads(plain, ids), _loss_and_grads(checkpointed, ids)
    assert ac_loss == pytest.approx(loss, rel=1e-6)
    assert ((ac_grads - grads).norm() / grads.norm()).item() < 1e-5
