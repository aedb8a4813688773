"""token_logprobs / entropy / masked reductions against the plain fp64 formulas; every objective adds the trained
model's auxiliary losses (MoE balancing, MTP) of its own forwards, not a reference's, and not in evaluation."""

import copy
import math

import pytest
import torch

from lmforge.adapt.lora import LoRAConfig, apply_lora
from lmforge.align.distill import DistillObjective
from lmforge.align.dpo import DPOObjective
from lmforge.align.frozen import BaseReference
from lmforge.align.kto import KTOObjective
from lmforge.align.logprobs import (batch_logps, masked_mean, masked_sum, response_mask, sequence_logprobs,
                                    token_entropy, token_logprobs)
from lmforge.align.orpo import ORPOObjective
from lmforge.align.prm import ProcessRewardObjective
from lmforge.align.reward import RewardObjective, SequenceHead, scores
from lmforge.align.sft import SFTObjective
from lmforge.align.value import ValueModel, values_of
from lmforge.model.config import MoEConfig, MTPConfig

from ..adapt.test_lora import randomise_b
from .helpers import pair_batch, sequences, tiny_model


@pytest.mark.parametrize("dtype,chunk", [(torch.float32, 7), (torch.bfloat16, 16), (torch.float32, 4096)])
def test_token_logprobs_value_and_grad(dtype, chunk):
    torch.manual_seed(0)
    logits = (torch.randn(2, 5, 37) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 37, (2, 5))
    w = torch.randn(2, 5)
    got = token_logprobs(logits, targets, chunk=chunk)
    (got * w).sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref = ref_logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    (ref * w.double()).sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=tol, rtol=tol)


def test_entropy_and_sequence_sums():
    torch.manual_seed(1)
    logits = torch.randn(3, 4, 11)
    p = logits.double().softmax(-1)
    torch.testing.assert_close(token_entropy(logits, chunk=3).double(), -(p * p.log()).sum(-1), atol=1e-5, rtol=1e-5)
    targets = torch.randint(0, 11, (3, 4))
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    lp = logits.double().log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    s = sequence_logprobs(logits, targets, mask)
    torch.testing.assert_close(s.double(), (lp * mask).sum(-1), atol=1e-5, rtol=1e-5)
    m = sequence_logprobs(logits, targets, mask, average=True)
    torch.testing.assert_close(m.double(), (lp * mask).sum(-1) / mask.sum(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 2, 8192])
def test_masked_logits_keep_logprobs_grads_and_entropy_finite(chunk):
    """-inf logits (a vocabulary limit, a constrained token) at the start of the vocabulary, where a whole first
    chunk may be masked: log-probs, gradients and entropy equal log_softmax's (they were NaN)."""
    logits = torch.tensor([[[-math.inf, 0.0, 1.0, 2.0], [-math.inf, -math.inf, 0.5, -1.0]]], requires_grad=True)
    targets = torch.tensor([[3, 2]])
    got = token_logprobs(logits, targets, chunk=chunk)
    got.sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref_lp = ref_logits.log_softmax(-1)
    ref_lp.gather(-1, targets[..., None]).sum().backward()
    torch.testing.assert_close(got.double(), ref_lp.gather(-1, targets[..., None]).squeeze(-1).detach())
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad)
    p = ref_lp.detach().exp()
    want = -(p * ref_lp.detach().masked_fill(p == 0, 0.0)).sum(-1)
    torch.testing.assert_close(token_entropy(logits.detach(), chunk=chunk).double(), want)


def test_masked_reductions_empty_mask():
    v = torch.tensor([1.0, 2.0, 3.0])
    none = torch.zeros(3, dtype=torch.bool)
    assert float(masked_sum(v, none)) == 0.0
    assert math.isnan(float(masked_mean(v, none)))
    assert float(masked_mean(v, torch.tensor([True, False, True]))) == 2.0


def test_batch_logps_one_forward_equals_separate_and_packed_rows():
    """chosen+rejected in one concatenated forward = one forward each; a packed row (doc_ids, positions
    restarting) gives each document the log-probs it has alone."""
    from lmforge.align.logprobs import batch_logps
    from lmforge.model.meta import packed_positions

    from .helpers import pair_batch, tiny_model

    model = tiny_model(0)
    batch = pair_batch()
    (c, r), _, _ = batch_logps(model, batch, ("chosen_", "rejected_"))
    alone = [batch_logps(model, batch, (p,))[0][0] for p in ("chosen_", "rejected_")]
    torch.testing.assert_close(torch.stack([c, r]), torch.stack(alone))
    keys = ("input_ids", "targets", "loss_mask")
    shorter = {**batch, **{f"rejected_{k}": batch[f"rejected_{k}"][:, :7] for k in keys}}
    (c2, r2), (_, tr), _ = batch_logps(model, shorter, ("chosen_", "rejected_"))  # padded to one forward
    r_alone = batch_logps(model, shorter, ("rejected_",))[0][0]
    assert tr.shape == (3, 7)
    torch.testing.assert_close(torch.stack([c2, r2]), torch.stack([c, r_alone]))
    # pack row 0 of chosen and row 0 of rejected into one row of twice the length
    doc = torch.tensor([[0] * 10 + [1] * 10])
    packed = {k: torch.cat([batch[f"chosen_{k}"][:1], batch[f"rejected_{k}"][:1]], 1)
              for k in ("input_ids", "targets", "loss_mask")}
    packed.update(doc_ids=doc, positions=packed_positions(doc))
    _, (tok,), (mask,) = batch_logps(model, packed)
    row = (tok * mask)[0]
    got = torch.stack([row[:10].sum(), row[10:].sum()])
    torch.testing.assert_close(got, torch.stack([c[0], r[0]]))


# ---------------------------------------------------------------------------------------------------
# The trained model's auxiliary losses (MoE balancing, MTP) in every post-training objective (ModelAux)

MOE = {"mlp": "moe", "moe": MoEConfig(n_experts=4, top_k=2, aux_loss=0.5)}


def _kto_batch() -> dict:
    B, T, V = 4, 10, 41
    return {**sequences(B, T, V, [2, 3, 2, 4], 3), "label": torch.tensor([True, False, True, False])}


def _setup(name: str):
    """(objective, trained model, batch, the aux losses of the trained model's own forwards of that batch)."""
    model = tiny_model(**MOE).train()
    if name == "dpo_base_reference":  # a LoRA policy whose reference reruns the same MoE layers, adapters off
        apply_lora(model, LoRAConfig(targets=("wq", "wv")))
        randomise_b(model)  # (trained adapters: the policy is not its base)
        obj = DPOObjective(reference=BaseReference(model))
    elif name in ("dpo", "dpo_separate_forwards"):
        obj = DPOObjective(reference=copy.deepcopy(model))
    elif name == "kto":
        obj = KTOObjective(reference=copy.deepcopy(model))
    elif name == "distill":  # an MoE teacher of its own: its aux losses are not the student's
        obj = DistillObjective(teacher=tiny_model(seed=1, **MOE))
    else:
        obj = {"sft": SFTObjective, "orpo": ORPOObjective, "rm": RewardObjective, "prm": ProcessRewardObjective}[name]()
    if name == "rm":
        model = SequenceHead(model).train()
    if name == "prm":
        model = ValueModel(model).train()
    pairs = ("dpo", "dpo_base_reference", "dpo_separate_forwards", "orpo", "rm")
    batch = _kto_batch() if name == "kto" else pair_batch() if name in pairs else sequences(3, 10, 41, [2, 3, 4], 5)
    if name == "dpo_separate_forwards":  # rows with positions (packed layouts): one forward per side
        batch = {**batch, **{f"{p}positions": torch.arange(10).expand(3, 10) for p in ("chosen_", "rejected_")}}
    if name == "prm":
        batch = {"input_ids": batch["input_ids"], "step_labels": torch.where(batch["loss_mask"], batch["targets"] % 2,
                                                                              -100)}

    def own_aux():  # the policy's forwards as the objective runs them, read right after each
        if name in ("rm", "dpo_separate_forwards"):  # two forwards: the mean of theirs
            terms = []
            for p in ("chosen_", "rejected_"):
                scores(model, batch, p) if name == "rm" else batch_logps(model, batch, (p,))
                terms.append(model.aux_loss())
            return torch.stack(terms).mean()
        if name == "prm":
            values_of(model, batch)
        elif name in ("sft", "distill", "kto"):
            batch_logps(model, batch)
        else:
            batch_logps(model, batch, ("chosen_", "rejected_"))
        return model.aux_loss()
    return obj, model, batch, own_aux


@pytest.mark.parametrize("name", ["sft", "dpo", "dpo_base_reference", "dpo_separate_forwards", "kto", "orpo",
                                  "distill", "rm", "prm"])
def test_every_objective_adds_the_trained_models_aux_losses_as_pretraining(name):
    obj, model, batch, own_aux = _setup(name)
    loss, metrics = obj.loss(model, batch)
    after = model.aux_loss()  # the last forward's: a reference's or KTO's no-grad reference-point rows'
    with torch.no_grad():
        expect = own_aux()
    assert expect > 0
    torch.testing.assert_close(metrics["aux_loss"], expect, rtol=1e-6, atol=0)
    # the optimised loss is the objective's own (the `loss` metric, as pretraining's) plus the aux losses
    assert torch.equal(loss.detach(), metrics["loss"] + metrics["aux_loss"])
    if name in ("dpo_base_reference", "kto"):  # a later forward of the same layers is not what is added
        assert not torch.allclose(after, expect)
    if name not in ("rm", "prm"):  # heads report the balancing loss; language models also their expert loads
        assert "moe/load_max_over_mean" in metrics
    # a training forward without gradients (the Trainer's micro-batch with nothing to train): the same metrics
    with torch.no_grad():
        assert list(obj.loss(model, batch)[1]) == list(metrics)
    # evaluation (the Trainer's: eval mode, no gradients): the objective's own loss alone, as pretraining's val_loss
    model.eval()
    with torch.no_grad():
        val_loss, val_metrics = obj.loss(model, batch)
    assert "aux_loss" not in val_metrics
    torch.testing.assert_close(val_loss, metrics["loss"], rtol=1e-6, atol=1e-7)


def test_the_aux_loss_trains_the_router_and_an_mtp_loss_skips_prompts_and_padding():
    model = tiny_model(**MOE).train()
    batch = sequences(3, 10, 41, [2, 3, 4], 5)
    router = next(p for n, p in model.named_parameters() if "router" in n or "gate" in n)
    loss, _ = SFTObjective().loss(model, batch)
    got = torch.autograd.grad(loss, router)[0]
    mask = response_mask(batch)
    expect_loss = -masked_mean(token_logprobs(model(batch["input_ids"]), batch["targets"]), mask) + model.aux_loss()
    torch.testing.assert_close(got, torch.autograd.grad(expect_loss, router)[0])

    mtp = tiny_model(mtp=MTPConfig(depth=1)).train()
    _, metrics = SFTObjective().loss(mtp, batch)
    mtp(batch["input_ids"], targets=batch["targets"].masked_fill(~mask, -100))
    torch.testing.assert_close(metrics["aux_loss"], mtp.aux_loss().detach())
    mtp(batch["input_ids"])  # (the default: every next token, prompt and padding too)
    assert not torch.allclose(metrics["aux_loss"], mtp.aux_loss().detach())


def test_a_model_without_aux_losses_gets_the_objectives_loss_and_metrics_unchanged():
    model = tiny_model().train()
    batch = sequences(3, 10, 41, [2, 3, 4], 5)
    loss, metrics = SFTObjective().loss(model, batch)
    assert set(metrics) == {"loss", "mean_token_accuracy", "num_tokens"}
    expect = -masked_mean(token_logprobs(model(batch["input_ids"]), batch["targets"]), response_mask(batch))
    assert torch.equal(loss, expect)
    loss, metrics = DPOObjective(reference=copy.deepcopy(model)).loss(model, pair_batch())
    assert "aux_loss" not in metrics and "loss" not in metrics
