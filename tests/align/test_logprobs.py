"""token_logprobs / entropy / masked reductions against the plain fp64 formulas."""

import math

import pytest
import torch

from lmforge.align.logprobs import masked_mean, masked_sum, sequence_logprobs, token_entropy, token_logprobs


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
