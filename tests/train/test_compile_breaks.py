"""What torch.compile traces as one graph: the z-loss over counted positions and learned / sinusoidal
positions broke the graph (a boolean-mask gather of data-dependent shape, a read of the largest position),
each break a device->host sync per forward on a GPU. Values unchanged."""

from __future__ import annotations

import torch

from lmforge.model.layers.position import LearnedPositions, SinusoidalPositions
from lmforge.train.loss import lm_loss


def test_z_loss_is_the_mean_over_counted_positions_in_one_graph():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g) * 3
    targets = torch.randint(0, 11, (2, 5), generator=g)
    targets[0, 1:3] = -100
    loss, ce = lm_loss(logits, targets, z_loss=1e-2)
    keep = targets.reshape(-1) != -100
    lse = torch.logsumexp(logits.reshape(-1, 11)[keep], -1)
    torch.testing.assert_close(loss - ce, 1e-2 * lse.square().mean())
    assert torch._dynamo.explain(lm_loss)(logits, targets, 1e-2).graph_break_count == 0


def test_positions_trace_as_one_graph():
    pos = torch.arange(6).expand(2, 6)
    for module in (LearnedPositions(8, 4), SinusoidalPositions(8, 4)):
        assert torch._dynamo.explain(module)(pos).graph_break_count == 0
        torch.testing.assert_close(torch.compile(module)(pos), module(pos))
