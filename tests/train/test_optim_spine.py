"""AdamW from scratch vs torch.optim.AdamW, and the schedules' shapes."""

import math

import pytest
import torch

from lmforge.optim import lr_multiplier
from lmforge.optim.adamw import AdamW
from lmforge.optim.config import OptimConfig


def test_adamw_matches_torch_over_100_steps():
    torch.manual_seed(0)
    shapes = [(16, 8), (8,), (3, 4, 5)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    o1 = AdamW([{"params": ours[:2], "weight_decay": 0.1}, {"params": ours[2:], "weight_decay": 0.0}],
               lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    o2 = torch.optim.AdamW([{"params": ref[:2], "weight_decay": 0.1}, {"params": ref[2:], "weight_decay": 0.0}],
                           lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    for step in range(100):
        for a, b in zip(ours, ref):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        for g1, g2 in zip(o1.param_groups, o2.param_groups):
            g1["lr"] = g2["lr"] = 3e-3 * (1 - step / 200)
        o1.step()
        o2.step()
    for a, b in zip(ours, ref):
        assert (a - b).abs().max().item() < 1e-6


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_counts_steps_per_parameter_like_torch(fused):
    """Parameters of one group that miss gradients on some steps (an expert no token reached, a layer
    unfrozen later) are bias-corrected with their own step counts, as torch's AdamW does (the foreach path
    used the group's first parameter's count for all)."""
    gen = torch.Generator().manual_seed(2)
    ours = [torch.nn.Parameter(torch.randn(4, 3, generator=gen)) for _ in range(3)]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    o1 = AdamW(ours, lr=0.1, betas=(0.9, 0.99), weight_decay=0.05, fused=fused)
    o2 = torch.optim.AdamW(ref, lr=0.1, betas=(0.9, 0.99), weight_decay=0.05, foreach=False)
    for step in range(12):
        for i, (a, b) in enumerate(zip(ours, ref)):
            live = (step + i) % 3 != 0 or (i == 0 and step > 6)  # each skips some steps, the first one later
            g = torch.randn(a.shape, generator=gen) if live else None
            a.grad, b.grad = (g.clone(), g.clone()) if live else (None, None)
        o1.step()
        o2.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_fused_adamw_matches_foreach_path():
    torch.manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(32, 16)), torch.nn.Parameter(torch.randn(16))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    o1 = AdamW(a, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=False)
    o2 = AdamW(b, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    for _ in range(100):
        for x, y in zip(a, b):
            g = torch.randn_like(x)
            x.grad, y.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    for x, y in zip(a, b):
        assert (x - y).abs().max().item() < 1e-5
    o3 = AdamW([torch.nn.Parameter(b[0].detach().clone())], lr=1e-2, fused=True)
    o3.load_state_dict({"state": {0: o2.state_dict()["state"][0]}, "param_groups": [
        {**o2.state_dict()["param_groups"][0], "params": [0]}]})
    assert float(o3.state[o3.param_groups[0]["params"][0]]["step"]) == 100


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "wsd"])
def test_schedules(schedule):
    cfg = OptimConfig(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1, decay_fraction=0.2)
    f = [lr_multiplier(cfg, s, 100) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup
    if schedule == "constant":
        assert f[50] == f[100] == 1.0
    elif schedule == "linear":
        assert f[55] == pytest.approx(1 - 0.9 * 0.5) and f[100] == pytest.approx(0.1)
    elif schedule == "cosine":
        assert f[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
        assert f[100] == pytest.approx(0.1)
    else:  # WSD: flat until the last 20%, then linear to 0.1
        assert f[79] == 1.0 and f[90] == pytest.approx(0.55) and f[100] == pytest.approx(0.1)
