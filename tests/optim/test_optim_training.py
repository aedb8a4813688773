"""Every registered optimizer trains a tiny model down, and its state survives state_dict round trips."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lmforge.optim import OPTIMIZERS, build_optimizer, optimizer_state_bytes
from lmforge.optim.config import OptimConfig

V, D = 32, 32
# lr per optimizer for this problem (Lion ~10x below Adam; Muon/Dion at their usual ~0.02-0.05 scale)
LRS = {"adamw": 1e-2, "torch_adamw": 1e-2, "lion": 2e-3, "adafactor": 1e-2, "shampoo": 1e-2, "soap": 1e-2,
       "muon": 0.05, "dion": 0.05}


class TinyLM(torch.nn.Module):
    """embedding -> MLP -> norm -> lm_head: every parameter role appears once."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.up = torch.nn.Linear(D, 2 * D)
        self.down = torch.nn.Linear(2 * D, D)
        self.norm = torch.nn.LayerNorm(D)
        self.lm_head = torch.nn.Linear(D, V, bias=False)

    def forward(self, x):
        h = self.emb(x)
        h = h + self.down(torch.relu(self.up(h)))
        return self.lm_head(self.norm(h))


def _task(n: int = 256):
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(V, generator=g)
    x = torch.randint(0, V, (n,), generator=g)
    return x, perm[x]


def _train(name: str, steps: int, model=None, opt=None):
    torch.manual_seed(0)
    model = model or TinyLM()
    cfg = OptimConfig(name=name, lr=LRS[name], weight_decay=0.0, adam_lr=1e-2, rank=8,
                      precondition_frequency=5, block_size=64)
    opt = opt or build_optimizer(model, cfg)
    x, y = _task()
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_trains_tiny_model_down(name):
    _, _, losses = _train(name, 60)
    assert losses[0] == pytest.approx(math.log(V), abs=0.5)
    assert losses[-1] < 0.3 * losses[0], f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_continues_identically(name):
    model, opt, _ = _train(name, 6)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict shares tensors with the live state
    _, _, cont = _train(name, 7, model=model, opt=opt)  # reference: keep going
    fresh = TinyLM()
    fresh.load_state_dict(saved_model)
    cfg = OptimConfig(name=name, lr=LRS[name], weight_decay=0.0, adam_lr=1e-2, rank=8,
                      precondition_frequency=5, block_size=64)
    opt2 = build_optimizer(fresh, cfg)
    opt2.load_state_dict(saved_opt)
    _, _, resumed = _train(name, 7, model=fresh, opt=opt2)
    assert resumed == pytest.approx(cont, rel=1e-6, abs=1e-7)


def test_state_memory_per_parameter():
    counts = {}
    for name in ("adamw", "lion", "adafactor", "muon"):
        model, opt, _ = _train(name, 1)
        n = sum(p.numel() for p in model.parameters())
        counts[name] = optimizer_state_bytes(opt) / n
    assert counts["adamw"] == pytest.approx(8.0)  # two fp32 moments
    assert counts["lion"] == pytest.approx(4.0)  # one moment
    assert counts["adafactor"] < 5.0  # momentum + row/col factors, not a full second moment
    assert 4.0 < counts["muon"] < 8.0  # one buffer for matrices, two Adam moments for the rest


def test_adafactor_resumed_with_momentum_turned_on_starts_it_from_zero():
    """A resume that sets optim.betas[0] > 0 over an Adafactor state saved without momentum (the Trainer applies
    the new config's beta1 to the loaded groups) raised KeyError 'exp_avg' at its first step."""
    from lmforge.optim import Adafactor

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = Adafactor([w], lr=0.1, beta1=0.0)
    for _ in range(2):
        w.grad = torch.randn_like(w)
        opt.step()
    saved, w0, g = copy.deepcopy(opt.state_dict()), w.detach().clone(), torch.randn_like(w)
    moved = {}
    for beta1 in (0.0, 0.9):
        w.data.copy_(w0)
        resumed = Adafactor([w], lr=0.1, beta1=beta1)
        resumed.load_state_dict(copy.deepcopy(saved))  # restores the saved groups' beta1 = 0 ...
        resumed.param_groups[0]["beta1"] = beta1  # ... which the Trainer sets back to this run's config
        w.grad = g.clone()
        resumed.step()
        moved[beta1] = w0 - w.detach()
    assert moved[0.0].abs().min() > 0
    torch.testing.assert_close(moved[0.9], 0.1 * moved[0.0])  # m = 0.9 * 0 + 0.1 u: momentum from zero


@pytest.mark.parametrize("saved_rank, rank", [(2, 4), (4, 2)])
def test_dion_resumed_with_another_rank_steps_at_the_new_rank(saved_rank, rank):
    """optim.rank changed on resume (the Trainer sets the new config's rank on the loaded groups) was ignored: the
    saved Q kept the old rank, and every update stayed of rank saved_rank."""
    from lmforge.optim import Dion
    from lmforge.optim.dion import dion_update, initial_q

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 8, dtype=torch.float64))
    opt = Dion([w], lr=0.1, rank=saved_rank)
    for _ in range(2):
        w.grad = torch.randn_like(w)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    before, g = w.detach().clone(), torch.randn_like(w)
    resumed = Dion([w], lr=0.1, rank=rank)
    resumed.load_state_dict(copy.deepcopy(saved))
    resumed.param_groups[0]["rank"] = rank  # the Trainer's: this run's config over the checkpoint's groups
    w.grad = g.clone()
    resumed.step()
    assert torch.linalg.matrix_rank(w.detach() - before).item() == rank
    # the power iteration starts from the saved columns it still needs, and fresh ones for those it adds
    q = torch.cat([saved["state"][0]["q"][:, :rank], initial_q(w.shape, rank, 0).double()[:, saved_rank:]], dim=-1)
    update, _, _ = dion_update(saved["state"][0]["momentum_buffer"] + g, q, 0.95)
    torch.testing.assert_close(w.detach(), before - 0.1 * (12 / 8) ** 0.5 * update)
