"""The batched sampler against its per-row reference: the same tokens, bit for bit."""

from __future__ import annotations

import torch

from lmforge.infer.sampler import Row, draw, sample_rows
from lmforge.infer.sampling import SamplingParams


def _gens(seeds):
    return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]


def test_draw_equals_per_row_multinomial_with_each_rows_generator():
    torch.manual_seed(0)
    probs = torch.randn(6, 300).mul(3).softmax(-1)
    seeds = [1, None, 2, 3, None, 4]  # unseeded rows draw from the default stream, in row order
    torch.manual_seed(5)
    ref = torch.cat([torch.multinomial(probs[i:i + 1], 1, generator=g).view(1) for i, g in enumerate(_gens(seeds))])
    torch.manual_seed(5)
    assert torch.equal(draw(probs.clone(), _gens(seeds)), ref)


def test_draw_without_generators_equals_batched_multinomial():
    probs = torch.randn(8, 500).softmax(-1)
    torch.manual_seed(3)
    ref = torch.multinomial(probs, 1).squeeze(-1)
    torch.manual_seed(3)
    assert torch.equal(draw(probs.clone(), [None] * 8), ref)


def _row(params: SamplingParams, seed: int | None = None) -> Row:
    return Row(params, None if seed is None else torch.Generator().manual_seed(seed), [1, 2, 3], 3)


def test_seeded_rows_do_not_depend_on_their_batch_companions():
    torch.manual_seed(0)
    logits = torch.randn(5, 400) * 2
    plain = SamplingParams(temperature=0.9, top_p=0.9)
    alone = [sample_rows(logits[i:i + 1], [_row(plain, seed=10 + i)]).tokens.item() for i in range(5)]
    # the same rows among unseeded, greedy and differently processed companions, in another order
    others = [_row(SamplingParams(temperature=0)), _row(SamplingParams(top_k=3)), _row(plain)]
    order = [4, 0, 3, 1, 2]
    mixed_logits = torch.cat([torch.randn(3, 400), logits[order]])
    out = sample_rows(mixed_logits, others + [_row(plain, seed=10 + i) for i in order]).tokens.tolist()
    assert out[3:] == [alone[i] for i in order]
    assert out[0] == mixed_logits[0].argmax().item()


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(64, 1000)
    rows = [_row(SamplingParams(temperature=0)) for _ in range(64)]
    assert torch.equal(sample_rows(logits, rows).tokens, logits.argmax(-1))
