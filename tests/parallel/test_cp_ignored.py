"""Context parallelism with ignored targets (-100): the load-balanced chunks give the cp ranks unequal numbers of
trained tokens, and the loss and gradients must still be the rows' token mean, as on one process (they were the
mean of the ranks' means: 4.1787 against 4.1721 and a gradient norm of 1.63 against 1.39)."""

from __future__ import annotations

import pytest
import torch

from lmforge.parallel.launch import run_local
from tests.parallel import layouts as L
from tests.parallel.workers import batches, loss_of


def masked(empty_rank: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The layouts' batches with the last two of 8 targets ignored (all of cp rank 0's late chunk) and a few more;
    `empty_rank`: positions 2-5 ignored, every target cp rank 1 holds (its mean is over nothing)."""
    out = []
    for x, y in batches(2):
        y = y.clone()
        if empty_rank:
            y[:, 2:6] = -100
        else:
            y[:, 6:] = -100
            y[0, :3] = -100
        out.append((x, y))
    return out


def reference(empty_rank: bool) -> list[tuple[float, float]]:
    m = L.model()
    out = []
    for x, y in masked(empty_rank):
        loss = loss_of(m, x, y)
        loss.backward()
        out.append((float(loss.detach()), float(torch.nn.utils.clip_grad_norm_(m.parameters(), 0))))
        m.zero_grad(set_to_none=True)
    return out


def cp_worker(rank: int, world: int, empty_rank: bool) -> list[tuple[float, float]]:
    r = L.Run(dict(cp=2), world).runner
    out = []
    for x, y in masked(empty_rank):
        loss = r.forward_backward(x, y)
        out.append((float(r.global_loss(loss)), float(r.clip_grad_norm_(0))))
        r.model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("empty_rank", [False, True])
def test_context_parallel_loss_is_the_token_mean_over_the_whole_rows(empty_rank):
    got = run_local(cp_worker, 2, empty_rank, timeout=120, start_method="fork")[0]
    want = reference(empty_rank)
    assert [l for l, _ in got] == pytest.approx([l for l, _ in want], abs=1e-5)
    assert [n for _, n in got] == pytest.approx([n for _, n in want], rel=1e-5)
