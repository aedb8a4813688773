"""Token-level distillation: divergences against their definitions in fp64 and TRL's GKD generalised JSD
(loss and gradients); the objective's masking and teacher handling."""

import pytest
import torch

from lmforge.align.distill import DistillConfig, DistillObjective, token_divergence
from lmforge.align.logprobs import masked_mean
from lmforge.errors import ConfigError

from .helpers import grads, sequences, tiny_model
from .trl_ref import trl_gkd


def _defs(s, t, beta, tau):
    ps, pt = (s.double() / tau).softmax(-1), (t.double() / tau).softmax(-1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1)  # noqa: E731
    m = beta * pt + (1 - beta) * ps
    return {"forward_kl": kl(pt, ps), "reverse_kl": kl(ps, pt), "jsd": beta * kl(pt, m) + (1 - beta) * kl(ps, m)}


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("beta,tau", [(0.5, 1.0), (0.2, 2.0)])
def test_divergences_match_definitions(kind, beta, tau):
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11) * 2, torch.randn(2, 3, 11) * 2
    got = token_divergence(s, t, kind=kind, beta=beta, temperature=tau)
    torch.testing.assert_close(got.double(), _defs(s, t, beta, tau)[kind], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5), ("jsd", 0.9)])
def test_masked_mean_matches_trl_gkd(kind, beta):
    """TRL's GKDTrainer.generalized_jsd_loss (beta 0 = forward KL, 1 = reverse KL), averaged over labelled
    tokens; equal loss and gradients for the student logits."""
    torch.manual_seed(1)
    s = (torch.randn(2, 5, 13) * 2).requires_grad_()
    t = torch.randn(2, 5, 13) * 2
    labels = torch.randint(0, 13, (2, 5))
    labels[0, :2] = -100
    mask = labels != -100
    div = token_divergence(s, t, kind=kind, beta=beta if kind == "jsd" else 0.5, temperature=1.5)
    ours = (div * mask).sum() / mask.sum()
    theirs = trl_gkd(s, t, labels, beta, 1.5)
    g1, = torch.autograd.grad(ours, s)
    g2, = torch.autograd.grad(theirs, s)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g1, g2)


def test_minus_inf_logits_of_a_top_k_teacher_give_finite_divergences_and_gradients():
    """0 log 0 = 0: a -inf logit (a top-k teacher's, or the student's) adds nothing, instead of 0 * -inf = NaN;
    the gradient of forward KL stays p_S - p_T, and -inf logits at a masked position leave the mean finite."""
    inf = float("inf")
    s = torch.tensor([[[2.0, 1.0, 0.0, -1.0], [-inf, 1.0, 2.0, -inf]]], requires_grad=True)
    t = torch.tensor([[[3.0, 1.0, -inf, -inf], [-inf, 0.0, 1.0, -inf]]])
    ps, pt = s.detach().double().softmax(-1), t.double().softmax(-1)
    kl = lambda p, q: (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)  # noqa: E731  (0 log 0 = 0)
    m = 0.5 * pt + 0.5 * ps
    refs = {"forward_kl": kl(pt, ps), "reverse_kl": kl(ps, pt), "jsd": 0.5 * kl(pt, m) + 0.5 * kl(ps, m)}
    assert refs["forward_kl"][0, 0].item() == pytest.approx(0.194059, abs=1e-6)
    assert refs["jsd"][0, 0].item() == pytest.approx(0.060459, abs=1e-6)
    for kind, ref in refs.items():
        got = token_divergence(s, t, kind=kind)
        g, = torch.autograd.grad(got[0, 1] if kind == "reverse_kl" else got.sum(), s)
        assert torch.isfinite(g).all() and g[0, 1, 0] == g[0, 1, 3] == 0
        if kind == "reverse_kl":  # KL(p_S || p_T) is infinite where p_T rules out a token the student keeps
            assert got[0, 0] > 1e30 and got[0, 1].item() == pytest.approx(ref[0, 1].item(), abs=1e-6)
            continue
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=0)
        if kind == "forward_kl":
            torch.testing.assert_close(g.double(), ps - pt, atol=1e-6, rtol=0)
    mask = torch.tensor([[True, False]])
    t_masked = torch.tensor([[[3.0, 1.0, -inf, -inf], [-inf, -inf, 0.0, -inf]]])  # one token left at position 1
    s_masked = torch.tensor([[[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, -inf, 0.0]]])  # ... which the student rules out
    div = masked_mean(token_divergence(s_masked, t_masked, kind="forward_kl"), mask)
    assert div.item() == pytest.approx(0.194059, abs=1e-6)


def test_objective_uses_teacher_on_counted_tokens_and_checks_vocab():
    student, teacher = tiny_model(0), tiny_model(3, d_model=32)
    batch = sequences(2, 8, 41, [2, 4], 0)
    obj = DistillObjective(DistillConfig(temperature=2.0, sft_weight=0.5), teacher=teacher)
    loss, metrics = obj.loss(student, batch)
    loss.backward()
    g = grads(student)
    m = batch["loss_mask"] & (batch["targets"] >= 0)
    s = student(batch["input_ids"])
    with torch.no_grad():
        t = teacher(batch["input_ids"])
    kl = _defs(s.detach(), t, 0.5, 2.0)["forward_kl"]
    ce = torch.nn.functional.cross_entropy(s.flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    assert metrics["distill/divergence"].item() == pytest.approx(kl[m].mean().item(), abs=1e-7)
    div = token_divergence(s, t, temperature=2.0)
    ((div * m).sum() / m.sum() + 0.5 * ce).backward()
    for a, b in zip(g, grads(student)):
        torch.testing.assert_close(a, b)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ConfigError, match="teacher vocab_size=50"):
        DistillObjective(teacher=tiny_model(1, vocab_size=50)).loss(student, batch)
    with pytest.raises(ConfigError, match="beta"):
        DistillConfig(divergence="jsd", beta=1.0)


def test_accumulated_micro_batches_distil_like_one_big_batch(tmp_path):
    """batch_weight = the response tokens: two micro-batches with unequal token counts give the update of
    their concatenation (TRL normalises over the step's tokens)."""
    from lmforge.optim.config import OptimConfig
    from lmforge.train.config import LoopConfig
    from lmforge.train.trainer import Trainer

    from .test_sft import _Batches

    small, big = sequences(2, 8, 41, [2, 6], 0), sequences(3, 8, 41, [1, 2, 3], 1)
    assert small["loss_mask"].sum() != big["loss_mask"].sum()
    whole = {k: torch.cat([small[k], big[k]]) for k in small}
    params = []
    for run, batches in (("one", [whole]), ("two", [small, big])):
        student = tiny_model(0)
        cfg = LoopConfig(run_dir=str(tmp_path / run), max_steps=1, grad_accum=len(batches), device="cpu",
                         progress=False, plot=False, optim=OptimConfig(grad_clip=0.0, warmup_steps=0))
        obj = DistillObjective(DistillConfig(sft_weight=0.5), teacher=tiny_model(3))
        Trainer(student, torch.optim.SGD(student.parameters(), lr=1.0), _Batches(batches), obj, config=cfg).train_step()
        params.append([p.detach().clone() for p in student.parameters()])
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
