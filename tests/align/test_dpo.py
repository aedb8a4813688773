"""DPO / cDPO / IPO / SimPO: the paper equations on fixed numbers, TRL on the same log-probs (loss and
gradients), and the objective end to end on a tiny model against TRL fed that model's log-probs."""

import math

import pytest
import torch

from lmforge.align.dpo import DPOConfig, DPOObjective
from lmforge.align.logprobs import token_logprobs
from lmforge.align.losses import dpo_loss, ipo_loss, simpo_loss
from lmforge.errors import ConfigError

from .helpers import grads, pair_batch, tiny_model
from .trl_ref import trl_cpo, trl_dpo

PI_C, PI_R = torch.tensor([-5.0, -7.5]), torch.tensor([-6.0, -7.0])
REF_C, REF_R = torch.tensor([-5.5, -7.0]), torch.tensor([-5.5, -7.2])


def _sig(x):
    return 1 / (1 + math.exp(-x))


def test_equations_on_fixed_numbers():
    # d = (pi_c - ref_c) - (pi_r - ref_r) = [0.5 - (-0.5), -0.5 - 0.2] = [1.0, -0.7]
    beta, eps = 0.5, 0.1
    d = [1.0, -0.7]
    want = [-(1 - eps) * math.log(_sig(beta * x)) - eps * math.log(_sig(-beta * x)) for x in d]
    torch.testing.assert_close(dpo_loss(PI_C, PI_R, REF_C, REF_R, beta=beta, label_smoothing=eps),
                               torch.tensor(want))
    torch.testing.assert_close(ipo_loss(PI_C, PI_R, REF_C, REF_R, beta=beta), torch.tensor([(x - 1.0) ** 2 for x in d]))
    # SimPO: -log sigmoid(beta (avg_c - avg_r) - gamma) with avg = the given means
    want = [-math.log(_sig(2.0 * (c - r) - 0.3)) for c, r in zip(PI_C.tolist(), PI_R.tolist())]
    torch.testing.assert_close(simpo_loss(PI_C, PI_R, beta=2.0, gamma=0.3), torch.tensor(want))


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("simpo", 0.0),
                                           ("simpo", 0.1)])
def test_pure_losses_match_trl_cpo_forms(loss_type, eps):
    """cDPO's label smoothing, IPO and SimPO against CPOTrainer.cpo_loss (which takes a log-ratio margin)."""
    torch.manual_seed(0)
    c, r = (torch.randn(6) * 2 - 8).requires_grad_(), (torch.randn(6) * 2 - 8).requires_grad_()
    beta = 0.3
    if loss_type == "simpo":
        ours = simpo_loss(c, r, beta=beta, gamma=0.7, label_smoothing=eps)
        theirs = trl_cpo("simpo", beta, c, r, gamma=0.7, label_smoothing=eps)[0]
    else:  # with a zero reference, DPO's margin is CPO's
        zero = torch.zeros(6)
        ours = (dpo_loss(c, r, zero, zero, beta=beta, label_smoothing=eps) if loss_type == "sigmoid"
                else ipo_loss(c, r, zero, zero, beta=beta))
        theirs = trl_cpo(loss_type, beta, c, r, label_smoothing=eps)[0]
    g_ours = torch.autograd.grad(ours.sum(), (c, r))
    g_theirs = torch.autograd.grad(theirs.sum(), (c, r))
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_objective_matches_trl_dpo_trainer(loss_type):
    """Same model, same batch: our objective vs TRL's DPOTrainer loss on our model's token log-probs;
    equal loss, metrics and parameter gradients."""
    model, ref = tiny_model(0), tiny_model(1)
    batch = pair_batch()
    obj = DPOObjective(DPOConfig(beta=0.2, loss_type=loss_type), reference=ref)
    loss, metrics = obj.loss(model, batch)
    loss.backward()
    g_ours = grads(model)

    with torch.no_grad():
        ref_c, ref_r = ((token_logprobs(ref(batch[f"{p}input_ids"]), batch[f"{p}targets"])
                         * batch[f"{p}loss_mask"]).sum(-1) for p in ("chosen_", "rejected_"))
    tok_c, tok_r = (token_logprobs(model(batch[f"{p}input_ids"]), batch[f"{p}targets"])
                    for p in ("chosen_", "rejected_"))
    t_loss, t_metrics = trl_dpo(loss_type, 0.2, tok_c, tok_r, batch["chosen_loss_mask"], batch["rejected_loss_mask"],
                                ref_c, ref_r)
    t_loss.backward()
    torch.testing.assert_close(loss, t_loss)
    for a, b in zip(g_ours, grads(model)):
        torch.testing.assert_close(a, b)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected"):
        assert metrics[k].item() == pytest.approx(t_metrics[k], abs=1e-5), k


def test_precomputed_reference_and_cache_match_live_reference():
    model, ref = tiny_model(0), tiny_model(1)
    batch = pair_batch()
    live = DPOObjective(DPOConfig(), reference=ref).loss(model, batch)[0]
    with torch.no_grad():
        pre = {f"ref_{p}logps": (token_logprobs(ref(batch[f"{p}input_ids"]), batch[f"{p}targets"])
                                 * batch[f"{p}loss_mask"]).sum(-1) for p in ("chosen_", "rejected_")}
    assert torch.allclose(DPOObjective(DPOConfig()).loss(model, {**batch, **pre})[0], live)
    cached = DPOObjective(DPOConfig(reference_cache=4), reference=ref)
    first = cached.loss(model, batch)[0]
    with torch.no_grad():  # a changed reference is not consulted again for a batch it has seen
        next(ref.parameters()).add_(1.0)
    assert torch.equal(cached.loss(model, batch)[0], first) and torch.allclose(first, live)


def test_reference_is_frozen_and_state_holds_identity_not_weights():
    ref = tiny_model(1)
    obj = DPOObjective(DPOConfig(), reference=ref, reference_path="runs/sft")
    assert ref.training and all(p.requires_grad for p in ref.parameters())  # untouched until its first use
    obj.loss(tiny_model(0), pair_batch())
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    state = obj.state_dict()
    assert state["reference"]["path"] == "runs/sft" and len(state["reference"]["checksum"]) == 16
    assert not any(isinstance(v, torch.Tensor) for v in state["reference"].values())
    obj.load_state_dict(state)
    other = DPOObjective(DPOConfig(), reference=tiny_model(2))
    with pytest.raises(Exception, match="checksum"):
        other.load_state_dict(state)


def test_bad_config_and_vocab_mismatch():
    with pytest.raises(ConfigError, match="beta"):
        DPOConfig(beta=0.0)
    with pytest.raises(ConfigError, match="loss_type"):
        DPOConfig(loss_type="kto")
    same = tiny_model(0)
    with pytest.raises(ConfigError, match="separate copy"):
        DPOObjective(DPOConfig(), reference=same).loss(same, pair_batch())
    obj = DPOObjective(DPOConfig(), reference=tiny_model(1, vocab_size=50))
    with pytest.raises(ConfigError, match="vocab_size=50"):
        obj.loss(tiny_model(0), pair_batch())


def test_loss_png_names_the_objectives_loss(tmp_path, monkeypatch):
    """loss.png labelled every run's loss 'cross-entropy (nats/token)', a DPO, KTO or reward model's too."""
    from lmforge.optim import build_optimizer
    from lmforge.optim.config import OptimConfig
    from lmforge.train import trainer as T
    from lmforge.train.config import LoopConfig
    from lmforge.train.harness import FixedBatches
    from lmforge.train.loss import LMObjective

    labels = []
    monkeypatch.setattr(T, "plot_losses", lambda run_dir, ylabel="cross-entropy (nats/token)": labels.append(ylabel))
    policy, batch = tiny_model(0), pair_batch()
    cfg = LoopConfig(optim=OptimConfig(lr=1e-3), run_dir=str(tmp_path / "dpo"), max_steps=1, device="cpu",
                     progress=False, plot=True)
    T.Trainer(policy, build_optimizer(policy, cfg.optim), FixedBatches([batch]),
              DPOObjective(reference=tiny_model(1)), config=cfg).fit()
    assert labels == ["loss (DPOObjective)"]
    assert T.loss_label(LMObjective()) == "cross-entropy (nats/token)"


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_objective_matches_trl_cpo_on_the_models_mean_log_probs(eps):
    """SimPO end to end (TRL's CPOTrainer with loss_type='simpo', cpo_alpha=0): the objective's per-token means over
    each completion, fed to TRL's cpo_loss, give the same loss, rewards and parameter gradients; no reference runs."""
    model = tiny_model(0)
    batch = pair_batch()
    obj = DPOObjective(DPOConfig(beta=2.0, loss_type="simpo", simpo_gamma=0.7, label_smoothing=eps))
    assert obj.ref is None
    loss, metrics = obj.loss(model, batch)
    loss.backward()
    g_ours = grads(model)
    avg_c, avg_r = ((token_logprobs(model(batch[f"{p}input_ids"]), batch[f"{p}targets"]) * batch[f"{p}loss_mask"]
                     ).sum(-1) / batch[f"{p}loss_mask"].sum(-1) for p in ("chosen_", "rejected_"))
    t_losses, t_rc, t_rr = trl_cpo("simpo", 2.0, avg_c, avg_r, gamma=0.7, label_smoothing=eps)
    t_losses.mean().backward()
    torch.testing.assert_close(loss, t_losses.mean())
    for a, b in zip(g_ours, grads(model)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(metrics["rewards/chosen"], t_rc.mean())
    torch.testing.assert_close(metrics["rewards/margins"], (t_rc - t_rr).mean())
