"""Schedules, parameter roles and config validation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.optim import build_optimizer, lr_multiplier, param_roles, schedules
from lmforge.optim.config import OptimConfig


@pytest.mark.parametrize("fn", [schedules.constant, schedules.linear, schedules.cosine, schedules.wsd,
                                schedules.inverse_sqrt])
def test_every_schedule_warms_up_linearly(fn):
    assert [fn(s, 100, 4, 0.1, 0.2) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_and_linear_end_at_min_ratio():
    assert schedules.cosine(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert schedules.cosine(55, 100, 10, 0.0) == pytest.approx(0.5)
    assert schedules.linear(55, 100, 10, 0.0) == pytest.approx(0.5)


@pytest.mark.parametrize("shape,mid", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5)),
                                       ("exp", 1e-3**0.5)])
def test_wsd_decay_shapes(shape, mid):
    # 100 steps, last 20 decay: stable until 80, halfway through the decay at 90, floor at 100
    assert schedules.wsd(79, 100, 0, 0.0, 0.2, shape) == 1.0
    assert schedules.wsd(90, 100, 0, 0.0, 0.2, shape) == pytest.approx(mid)
    assert schedules.wsd(100, 100, 0, 0.1, 0.2, shape) == pytest.approx(0.1)


def test_inverse_sqrt():
    assert schedules.inverse_sqrt(99, 1000, 100) == pytest.approx(1.0)
    assert schedules.inverse_sqrt(399, 1000, 100) == pytest.approx(0.5)
    assert schedules.inverse_sqrt(10**6, 1000, 100, min_ratio=0.05) == pytest.approx(0.05)


def test_lr_multiplier_uses_config_decay_shape():
    cfg = OptimConfig(schedule="wsd", decay_shape="1-sqrt", min_lr_ratio=0.0, decay_fraction=0.5)
    assert lr_multiplier(cfg, 75, 100) == pytest.approx(1 - math.sqrt(0.5))


class _Named(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(10, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)


def test_fallback_roles_and_groups():
    m = _Named()
    assert param_roles(m) == {"wte.weight": "embedding", "proj.weight": "matrix", "proj.bias": "vector",
                              "lm_head.weight": "head"}
    cfg = OptimConfig(name="muon", lr=0.02, adam_lr=3e-3, head_lr=1e-3, weight_decay=0.1)
    opt = build_optimizer(m, cfg)
    by_role = {g["role"]: g for g in opt.param_groups}
    assert by_role["matrix"]["use_muon"] and not by_role["head"]["use_muon"]
    assert (by_role["matrix"]["base_lr"], by_role["embedding"]["lr"], by_role["head"]["lr"]) == (0.02, 3e-3, 1e-3)
    assert by_role["vector"]["weight_decay"] == 0.0 and by_role["embedding"]["weight_decay"] == 0.1


def test_model_param_roles_take_precedence():
    m = _Named()
    m.param_roles = lambda: {"wte.weight": "embedding", "proj.weight": "vector", "proj.bias": "vector",
                             "lm_head.weight": "head"}
    assert {g["role"] for g in build_optimizer(m, OptimConfig()).param_groups} == {"embedding", "vector", "head"}
    m.param_roles = lambda: {"wte.weight": "bogus"}
    with pytest.raises(ConfigError, match="bogus"):
        build_optimizer(m, OptimConfig())


def test_a_compiled_model_keeps_its_declared_roles():
    """torch.compile's wrapper names every parameter "_orig_mod.<name>" but forwards param_roles() to the model,
    whose names lack the prefix: no name matched, so every role fell back to dim >= 2 -> "matrix" (Muon on the
    embedding and head, embed_lr / head_lr ignored; here a declared 2-D "vector" decayed)."""
    class Declared(_Named):
        def param_roles(self):
            return {"wte.weight": "embedding", "proj.weight": "vector", "proj.bias": "vector",
                    "lm_head.weight": "head"}

    m = Declared()
    compiled = torch.compile(m)  # compiles at its first call only
    assert param_roles(compiled) == {"_orig_mod.wte.weight": "embedding", "_orig_mod.proj.weight": "vector",
                                     "_orig_mod.proj.bias": "vector", "_orig_mod.lm_head.weight": "head"}
    cfg = OptimConfig(name="muon", lr=0.02, embed_lr=1e-3, weight_decay=0.1)
    groups = {g["role"]: g for g in build_optimizer(compiled, cfg).param_groups}
    assert set(groups) == {"embedding", "vector", "head"}
    assert groups["embedding"]["params"] == [m.wte.weight] and groups["embedding"]["lr"] == 1e-3
    assert groups["vector"]["weight_decay"] == 0.0 and not groups["head"]["use_muon"]


@pytest.mark.parametrize("field,value", [("ns_steps", 0), ("decay_shape", "sqrt"), ("rank", 0),
                                         ("precondition_frequency", 0), ("graft", "sgd"), ("name", "sgdd"),
                                         ("momentum", 1.0), ("schedule", "step")])
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(OptimConfig(), **{field: value})


@pytest.mark.parametrize("name", ["muon", "dion", "shampoo", "soap", "adamw"])
def test_stacked_expert_biases_are_vectors(name):
    """MoE's (E, d) expert biases are one bias per expert: role "vector" (no weight decay, AdamW's step under
    Muon / Dion, Adam's under Shampoo / SOAP), while the (E, out, in) expert weights stay matrices."""
    from lmforge.model.config import ModelConfig, MoEConfig
    from lmforge.model.transformer import Transformer

    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, mlp="moe",
                                    moe=MoEConfig(n_experts=4, top_k=2, expert_bias=True)))
    roles = param_roles(model)
    biases = [n for n in roles if n.split(".")[-1] in ("b_up", "b_gate", "b_down")]
    assert len(biases) == 3 and {roles[n] for n in biases} == {"vector"}
    assert roles["blocks.0.mlp.experts.w_up"] == "matrix"
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.1, lr=0.01))
    params = dict(model.named_parameters())
    bias = params[biases[0]]
    group = next(g for g in opt.param_groups if any(p is bias for p in g["params"]))
    assert group["role"] == "vector" and group["weight_decay"] == 0.0
    # one step from a zero momentum: Adam's first step moves every element by lr (sign of its gradient)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = bias.detach().clone()
    opt.step()
    torch.testing.assert_close((bias.detach() - before).abs(), torch.full_like(before, 0.01), atol=1e-5, rtol=1e-3)
