"""Regressions of the LM objective: accumulated micro-batches that train different numbers of tokens give
the gradient of one big batch (batch_weight), and an MTP model's auxiliary loss skips ignored targets; and of
its evaluation: bits per byte leaves the byte-less end-of-text token out of its nats as out of its bytes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig, MTPConfig
from lmforge.model.transformer import Transformer
from lmforge.optim.config import OptimConfig
from lmforge.train.config import LoopConfig
from lmforge.train.harness import FixedBatches
from lmforge.train.loss import LMObjective
from lmforge.train.trainer import Trainer


def _update(batches, grad_accum: int, run_dir) -> torch.Tensor:
    """The parameter change of one Trainer step with SGD at lr 1 (= minus the step's gradient)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, d_model=32, n_layers=1, n_heads=2, max_seq_len=32))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    for g in opt.param_groups:
        g["base_lr"] = 1.0
    before = [p.detach().clone() for p in model.parameters()]
    cfg = LoopConfig(optim=OptimConfig(lr=1.0, warmup_steps=0, grad_clip=0.0, schedule="constant"),
                     run_dir=str(run_dir), max_steps=1, grad_accum=grad_accum, device="cpu", progress=False,
                     log_every=1, eval_every=1000, ckpt_every=1000)
    Trainer(model, opt, FixedBatches(batches), LMObjective(), config=cfg).train_step()
    return torch.cat([(a - p.detach()).flatten() for a, p in zip(before, model.parameters())])


def test_grad_accum_over_unequal_trained_tokens_equals_one_batch(tmp_path):
    """Rows 0-1 train 16 tokens each, rows 2-3 only 3 (targets -100 after): two micro-batches of 2 rows
    must give the update of one batch of 4, the mean over all 38 trained tokens (0.97 apart without
    batch_weight: each micro-batch's mean weighed 1/2)."""
    torch.manual_seed(1)
    ids, tgt = torch.randint(0, 40, (4, 16)), torch.randint(0, 40, (4, 16))
    tgt[2:, 3:] = -100
    halves = [{"input_ids": ids[:2], "targets": tgt[:2]}, {"input_ids": ids[2:], "targets": tgt[2:]}]
    assert [LMObjective().batch_weight(b) for b in halves] == [32, 6]
    big = _update([{"input_ids": ids, "targets": tgt}], 1, tmp_path / "big")
    acc = _update(halves, 2, tmp_path / "acc")
    assert ((acc - big).norm() / big.norm()).item() < 1e-5


def test_fused_objective_weighs_micro_batches_alike():
    from lmforge.kernels.fused_ce import FusedLMObjective

    tgt = torch.tensor([[1, 2, -100], [-100, -100, 3]])
    assert FusedLMObjective().batch_weight({"targets": tgt}) == LMObjective().batch_weight({"targets": tgt}) == 3


def test_lm_objective_keeps_padding_out_of_the_mtp_loss():
    """A right-padded row: the MTP auxiliary loss is the cross-entropy over real targets only (depth 1 at
    position i predicts t_{i+2}), the same for any padding id."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                                    mtp=MTPConfig(depth=1, loss_weight=1.0))).train()
    real = torch.randint(1, 50, (1, 6))
    tgt = torch.cat([real[:, 1:], torch.full((1, 5), -100)], 1)
    aux = []
    for pad in (0, 7):
        ids = torch.cat([real, torch.full((1, 4), pad)], 1)
        _, metrics = LMObjective().loss(model, {"input_ids": ids, "targets": tgt})
        aux.append(metrics["aux_loss"])
    with torch.no_grad():
        _, extra = model.forward_mtp(ids)
    want = F.cross_entropy(extra[0][0, :4], real[0, 2:6])
    torch.testing.assert_close(aux[0], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux[1], want, rtol=1e-5, atol=1e-6)


def test_val_bpb_counts_the_nats_of_the_tokens_whose_bytes_it_counts():
    """Targets 'A', 'B', <|endoftext|>, 'C' of the byte tokenizer (the separator stands for 0 bytes) under logits
    giving the separator 3x the weight of each of the 256 bytes: each byte costs ln 259 nats, the separator
    ln(259/3). Bits per byte is 3 ln 259 / (3 ln 2) = log2 259 (nanochat's evaluate_bpb: special tokens count
    neither bytes nor loss); it was (3 ln 259 + ln(259/3)) / (3 ln 2), the separator's loss spread over the
    text's bytes. val_loss still averages all four tokens."""
    import math

    from lmforge.tokenizer.byte import ByteTokenizer
    from lmforge.train.pretrain import LMEvaluator, token_byte_lengths

    tok = ByteTokenizer()

    class Fixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))  # (the evaluator finds the device through it)

        def forward(self, x):
            logits = torch.zeros(*x.shape, 257)
            logits[..., tok.eot_id] = math.log(3)
            return logits

    y = torch.tensor([[65, 66, tok.eot_id, 67]])
    with torch.no_grad():
        out = LMEvaluator([(torch.zeros_like(y), y)], token_byte_lengths(tok, 257))(Fixed())
    assert out["val_bpb"] == pytest.approx(math.log2(259), rel=1e-6)
    assert out["val_loss"] == pytest.approx((3 * math.log(259) + math.log(259 / 3)) / 4, rel=1e-6)
