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


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_an_all_minus_inf_teacher_row_at_a_masked_position_leaves_loss_and_gradients_finite(kind):
    """A position outside the loss mask where the teacher gives nothing (all -inf, e.g. a prompt token of a
    top-k teacher's batch): its NaN softmax would poison the masked mean (NaN * 0 = NaN) and every gradient."""
    torch.manual_seed(0)
    s = torch.randn(1, 3, 6, requires_grad=True)
    t = torch.randn(1, 3, 6)
    t[0, 0] = float("-inf")
    mask = torch.tensor([[False, True, True]])
    loss = masked_mean(token_divergence(s, t, kind=kind, mask=mask), mask)
    g, = torch.autograd.grad(loss, s)
    want = masked_mean(token_divergence(s[:, 1:], t[:, 1:], kind=kind), mask[:, 1:])
    assert loss.item() == pytest.approx(want.item(), rel=1e-6) and torch.isfinite(g).all()
    assert g[0, 0].abs().max() == 0
    student = tiny_model(0)  # through the objective: the loss mask reaches the divergence
    batch = sequences(2, 8, 41, [2, 4], 0)
    keep = batch["loss_mask"] & (batch["targets"] >= 0)
    with torch.no_grad():
        t = tiny_model(3, d_model=32)(batch["input_ids"])
    loss, _ = DistillObjective(DistillConfig(divergence=kind)).loss(
        student, {**batch, "teacher_logits": t.masked_fill(~keep.unsqueeze(-1), float("-inf"))})
    loss.backward()
    with torch.no_grad():
        want = masked_mean(token_divergence(student(batch["input_ids"]), t, kind=kind), keep)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_objective_with_a_top_k_teacher_over_its_support():
    """Dense top-k teacher logits (-inf outside k tokens, -inf rows on the prompt): reverse KL over the teacher's
    support (teacher_support) = KL(q_S || p_T) with q_S the student renormalised over those tokens."""
    student = tiny_model(0)
    batch = sequences(2, 8, 41, [2, 4], 0)
    mask = batch["loss_mask"] & (batch["targets"] >= 0)
    torch.manual_seed(5)
    t = torch.randn(2, 8, 41)
    t[t < 0.5] = float("-inf")  # about 30% of the tokens kept per position
    t[~mask] = float("-inf")
    batch = {**batch, "teacher_logits": t}
    plain = DistillObjective(DistillConfig(divergence="reverse_kl")).loss(student, batch)[0]
    assert plain.item() > 1e30 or not torch.isfinite(plain)  # the student's mass off the support: infinite
    loss, _ = DistillObjective(DistillConfig(divergence="reverse_kl", teacher_support=True)).loss(student, batch)
    with torch.no_grad():
        s = student(batch["input_ids"]).double()
    keep = torch.isfinite(t)
    q = s.masked_fill(~keep, float("-inf")).log_softmax(-1)
    p = t.double().log_softmax(-1)
    ref = torch.where(keep, q.exp() * (q - p), torch.zeros(())).sum(-1)[mask].mean()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_sampled_reverse_kl_is_an_unbiased_estimate_of_the_reverse_kl_and_its_gradient():
    """Over every token x of a small vocabulary weighted by p_S(x): E[k] = KL(p_S || p_T), and E[grad of the
    surrogate] = grad KL(p_S || p_T) (the score-function identity), for logits s of one position."""
    from lmforge.align.distill import sampled_reverse_kl

    torch.manual_seed(0)
    s = torch.randn(7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, dtype=torch.float64)
    log_s, log_t = s.log_softmax(-1), t.log_softmax(-1)
    exact = (log_s.exp() * (log_s - log_t)).sum()
    g_exact, = torch.autograd.grad(exact, s, retain_graph=True)
    p = log_s.exp().detach()
    est = sum(p[x] * sampled_reverse_kl(log_s[x], log_t[x]) for x in range(7))
    g_est = sum(p[x] * torch.autograd.grad(sampled_reverse_kl(log_s[x], log_t[x]), s, retain_graph=True)[0]
                for x in range(7))
    assert est.item() == pytest.approx(exact.item(), rel=1e-10)
    torch.testing.assert_close(g_est, g_exact)


def test_objective_sampled_reverse_kl_reads_teacher_logps_or_the_teacher():
    """teacher_logps in the batch (the engine's prompt log-probs of the sampled tokens) or the teacher model
    give the same loss: the mean of log p_S(x) - log p_T(x) over the counted tokens; other positions are
    ignored whatever they hold."""
    from lmforge.align.logprobs import token_logprobs

    student, teacher = tiny_model(0), tiny_model(3, d_model=32)
    batch = sequences(2, 8, 41, [2, 4], 0)
    mask = batch["loss_mask"] & (batch["targets"] >= 0)
    with torch.no_grad():
        lp_t = token_logprobs(teacher(batch["input_ids"]), batch["targets"])
        lp_s = token_logprobs(student(batch["input_ids"]), batch["targets"])
    cfg = DistillConfig(divergence="sampled_reverse_kl")
    with_model, _ = DistillObjective(cfg, teacher=teacher).loss(student, batch)
    given = {**batch, "teacher_logps": lp_t.masked_fill(~mask, float("nan"))}
    from_batch, _ = DistillObjective(cfg).loss(student, given)
    want = (lp_s - lp_t)[mask].mean()
    assert with_model.item() == pytest.approx(want.item(), rel=1e-5)
    assert from_batch.item() == pytest.approx(want.item(), rel=1e-5)
    from_batch.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    with pytest.raises(ConfigError, match="temperature"):
        DistillConfig(divergence="sampled_reverse_kl", temperature=2.0)


def test_lmforge_distill_refuses_sampled_reverse_kl_on_its_fixed_data(tmp_path):
    """`lmforge distill` trains on data.train's fixed completions, not the student's samples: the on-policy
    estimator is refused there with the fix; the exact divergences stay accepted."""
    from lmforge.train import posttrain as PT

    cls = PT.config_class("distill")
    with pytest.raises(ConfigError, match="sampled_reverse_kl.*on-policy.*use reverse_kl"):
        cls(init="x", teacher="t", run_dir=str(tmp_path), distill=DistillConfig(divergence="sampled_reverse_kl"))
    assert cls(init="x", teacher="t", run_dir=str(tmp_path),
               distill=DistillConfig(divergence="reverse_kl")).distill.divergence == "reverse_kl"


def test_a_teacher_padded_beyond_the_tokenizer_distils_over_its_ids():
    """One tokenizer of 41 ids, the teacher's embedding padded to 64 rows (as Qwen2.5-7B's 152064 vs 0.5B's
    151936): with vocab_size the logits are compared over the 41 ids; without it, refused with the fix."""
    student, teacher = tiny_model(0), tiny_model(3, vocab_size=64)
    batch = sequences(2, 8, 41, [2, 4], 0)
    mask = batch["loss_mask"] & (batch["targets"] >= 0)
    loss, _ = DistillObjective(teacher=teacher, vocab_size=41).loss(student, batch)
    with torch.no_grad():
        want = masked_mean(token_divergence(student(batch["input_ids"]), teacher(batch["input_ids"])[..., :41]), mask)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="vocab_size=64 differs.*vocab_size="):
        DistillObjective(teacher=tiny_model(3, vocab_size=64)).loss(student, batch)
    with pytest.raises(ConfigError, match="cover the tokenizer's 48 ids"):
        DistillObjective(teacher=tiny_model(3, vocab_size=64), vocab_size=48).loss(student, batch)


@pytest.mark.parametrize("objective,option", [("distill", "teacher_device"), ("dpo", "reference_device"),
                                              ("kto", "reference_device")])
def test_frozen_models_are_loaded_onto_their_own_device(monkeypatch, tmp_path, objective, option):
    """teacher_device / reference_device: the frozen model is built there, not on the run's device first (a
    teacher moved off the GPU only at its first forward has filled the GPU already); the run's tokenizer size
    reaches the distillation objective."""
    import dataclasses

    from lmforge import checkpoint
    from lmforge.align import frozen
    from lmforge.tokenizer.load import load_tokenizer
    from lmforge.train import posttrain as PT

    calls = []

    def load_model(path, device="cpu", **kw):
        calls.append((path, str(device)))
        return tiny_model(3), None
    monkeypatch.setattr(checkpoint, "load_model", load_model)
    monkeypatch.setattr(frozen, "pick_device", lambda name, **kw: name)  # (meta stands for a GPU: the check passes it)
    cls = PT.config_class(objective)
    options = dataclasses.replace(cls.__dataclass_fields__[objective].default_factory(), **{option: "meta"})
    cfg = cls(init="init", teacher="teacher" if objective == "distill" else "", run_dir=str(tmp_path), device="cpu",
              **{objective: options})
    tok = load_tokenizer("byte")
    obj = PT.build_objective(cfg, "init", "cuda:0", tok=tok)
    assert calls == [("teacher" if objective == "distill" else "init", "meta")]
    if objective == "distill":
        assert obj.vocab_size == tok.vocab_size == 257


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_a_chunked_divergence_equals_the_whole_one(kind):
    """chunk: the same per-position values and student gradients, with a masked all -inf row and a top-k
    teacher over its support, for a chunk that does not divide T; through the objective too."""
    torch.manual_seed(0)
    s = torch.randn(2, 7, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 7, 11, dtype=torch.float64)
    t[t < -0.5] = float("-inf")
    mask = torch.rand(2, 7) > 0.3
    t[~mask] = float("-inf")
    outs = []
    for chunk in (0, 3):
        d = token_divergence(s, t, kind=kind, mask=mask, teacher_support=True, chunk=chunk)
        outs.append((d, torch.autograd.grad(masked_mean(d, mask), s)[0]))
    torch.testing.assert_close(outs[0][0][mask], outs[1][0][mask])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    kept = {}  # new memory the forward keeps for the backward: the fp32 (.., V) intermediates, or none of them
    big_s, big_t = torch.randn(2, 64, 50, requires_grad=True), torch.randn(2, 64, 50)
    given = {big_s.untyped_storage().data_ptr(), big_t.untyped_storage().data_ptr()}
    for chunk in (0, 16):
        sizes = []

        def pack(x):
            sizes.append(0 if x.untyped_storage().data_ptr() in given else x.numel())
            return x
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            token_divergence(big_s, big_t, kind=kind, chunk=chunk)
        kept[chunk] = sum(sizes)
    assert kept[0] >= 2 * big_s.numel() and kept[16] * 4 < kept[0]
    student = tiny_model(0)
    batch = sequences(2, 8, 41, [2, 4], 0)
    losses = [DistillObjective(DistillConfig(divergence=kind, chunk=c), teacher=tiny_model(3)).loss(student, batch)[0]
              for c in (0, 3)]
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)


def test_a_sparse_top_k_teacher_equals_its_dense_logits():
    """teacher_topk_ids / teacher_topk_logprobs (B, T, K): the loss of the dense logits that are -inf off the k
    tokens; a short row padded with a repeated id and -inf keeps its real entries."""
    student = tiny_model(0)
    batch = sequences(2, 8, 41, [2, 4], 0)
    torch.manual_seed(1)
    lps, ids = torch.randn(2, 8, 41).log_softmax(-1).topk(4, -1)
    ids[0, 3, 3], lps[0, 3, 3] = ids[0, 3, 0], float("-inf")  # a row with 3 tokens, padded
    dense = torch.full((2, 8, 41), float("-inf"))
    for (b, t, k), lp in zip(torch.cartesian_prod(*map(torch.arange, ids.shape)).tolist(), lps.flatten().tolist()):
        if lp > float("-inf"):
            dense[b, t, ids[b, t, k]] = lp
    assert torch.isfinite(dense).sum() == 2 * 8 * 4 - 1
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        cfg = DistillConfig(divergence=kind, teacher_support=True)
        sparse = DistillObjective(cfg).loss(student, {**batch, "teacher_topk_ids": ids, "teacher_topk_logprobs": lps})
        want = DistillObjective(cfg).loss(student, {**batch, "teacher_logits": dense})
        assert torch.isfinite(sparse[0]) and sparse[0].item() == pytest.approx(want[0].item(), rel=1e-6)
