"""Regressions: group-limited routing masks the discarded groups with -inf; the MTP loss keeps out what the
main loss keeps out (ignored targets) and respects packed documents; aux_loss() after a forward that skipped
an MTP depth; upcycling keeps the dense function (biases, shared experts) or says why it does not."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig, MoEConfig, MTPConfig
from lmforge.model.layers.moe import MoE
from lmforge.model.meta import AttnMetadata, packed_positions
from lmforge.model.transformer import Transformer
from lmforge.model.upcycle import upcycle

TINY = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)


# group-limited routing ---------------------------------------------------------------------------------
def test_group_limited_routing_never_picks_a_discarded_groups_expert():
    """Sigmoid scores 0.5 and a negative aux-loss-free bias: group 0 (experts 0, 1) has the better top-2 sum
    (-0.6 against -3.0) and is the one kept, so its experts are chosen although every choice score is < 0."""
    cfg = dataclasses.replace(TINY, d_model=8, mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, d_expert=8,
                                                                        score="sigmoid", n_groups=2, topk_groups=1))
    m = MoE(cfg, 0)
    with torch.no_grad():
        m.router.weight.zero_()
        m.e_bias.copy_(torch.tensor([-0.8, -0.8, -2.0, -2.0]))
    idx, w, _, _ = m.route(torch.randn(3, 8))
    assert idx.sort(-1).values.tolist() == [[0, 1]] * 3
    torch.testing.assert_close(w, torch.full((3, 2), 0.5))  # the scores (not the bias) weigh, renormalised


def test_group_limited_routing_refuses_more_choices_than_kept_experts():
    # refused by the config, before any model is built
    with pytest.raises(ConfigError, match="top_k=3 exceeds the 2 experts of the topk_groups=1 groups"):
        MoE(dataclasses.replace(TINY, mlp="moe", moe=MoEConfig(n_experts=8, top_k=3, n_groups=4, topk_groups=1)), 0)


# MTP: ignored targets and packed documents -------------------------------------------------------------
def _mtp_model(kind: str = "sequential", depth: int = 2, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(TINY, mtp=MTPConfig(kind=kind, depth=depth, loss_weight=0.5), **kw))


def _depth_nll(extra: list[torch.Tensor], ids: torch.Tensor, n_real: int) -> list[tuple[torch.Tensor, int]]:
    """(summed NLL, count) per depth of one row whose first n_real tokens are real: depth k at position i
    predicts ids[i+k+1], counted where that token is real."""
    out = []
    for k, lg in enumerate(extra, start=1):
        n = max(n_real - k - 1, 0)
        out.append((F.cross_entropy(lg[0, :n], ids[0, k + 1: k + 1 + n], reduction="sum"), n))
    return out


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_mtp_loss_skips_ignored_targets(kind):
    """A right-padded row (targets -100 on the padding): the MTP loss is the mean over depths of the
    cross-entropy over real targets only, whatever the padding id."""
    model = _mtp_model(kind).train()
    real = torch.randint(1, 50, (1, 7))
    targets = torch.cat([real[:, 1:], torch.full((1, 5), -100)], 1)
    losses = []
    for pad in (0, 7):
        ids = torch.cat([real, torch.full((1, 4), pad)], 1)
        model(ids, targets=targets)
        losses.append(model.aux_loss())
    with torch.no_grad():
        _, extra = model.forward_mtp(ids)
    want = 0.5 * sum(s / n for s, n in _depth_nll(extra, ids, 7)) / 2
    torch.testing.assert_close(losses[0], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses[1], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_mtp_on_packed_rows_equals_the_documents_alone(kind):
    """Two documents packed in one row (doc_ids, positions restarting at 0): the MTP heads' hidden states of
    each document equal those of the document run alone, and the MTP loss is the per-depth token mean over
    both documents' own targets (none crosses the boundary)."""
    model = _mtp_model(kind).train()
    a, b = torch.randint(0, 50, (1, 7)), torch.randint(0, 50, (1, 6))
    packed, doc = torch.cat([a, b], 1), torch.tensor([[0] * 7 + [1] * 6])
    pos = packed_positions(doc)
    meta = AttnMetadata.packed(doc)
    with torch.no_grad():
        h, rope = model.hidden(packed, pos, None, meta)
        heads = model.mtp.heads(h, packed, model.embed, rope, doc)
        hb, rb = model.hidden(b)
        alone = model.mtp.heads(hb, b, model.embed, rb)
    for k, (hp, ha) in enumerate(zip(heads, alone), start=1):
        n = 6 - k if kind == "sequential" else 6  # doc b's positions at depth k
        torch.testing.assert_close(hp[:, 7: 7 + n], ha[:, :n], rtol=1e-5, atol=1e-5)
    model(packed, positions=pos, meta=meta)
    got = model.aux_loss()
    with torch.no_grad():
        per_doc = [_depth_nll(model.forward_mtp(x)[1], x, x.shape[1]) for x in (a, b)]
    want = 0.5 * sum((sa + sb) / (na + nb) for (sa, na), (sb, nb) in zip(*per_doc)) / 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_mtp_default_targets_are_the_shifted_input_ids():
    """Without targets (and one document per row) the MTP loss is the documented one: depth k at position i
    against input_ids[i+k+1], every depth with targets weighing the same; a depth with none is left out."""
    model = _mtp_model(depth=3).train()
    ids = torch.randint(0, 50, (2, 4))  # depth 3 has no target inside the row (it would need t_{i+4})
    model(ids)
    with torch.no_grad():
        _, extra = model.forward_mtp(ids)
    ce = [F.cross_entropy(e[:, : 4 - k - 1].reshape(-1, 50), ids[:, k + 1:].reshape(-1))
          for k, e in enumerate(extra[:2], start=1)]
    torch.testing.assert_close(model.aux_loss(), 0.5 * (ce[0] + ce[1]) / 2, rtol=1e-5, atol=1e-6)


# aux_loss after a forward that skipped an MTP depth -------------------------------------------------------
def test_aux_loss_forgets_the_mtp_moe_of_an_earlier_forward():
    """An MoE model with MTP depth 2: a row of 2 tokens skips depth 2, whose MoE layer ran (and was
    backpropagated) in the previous step; aux_loss() must hold only this forward's terms."""
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(TINY, mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, aux_loss=0.01),
                                            mtp=MTPConfig(depth=2))).train()
    ids = torch.randint(0, 50, (2, 8))
    model(ids)
    model.aux_loss().backward()
    ids = torch.randint(0, 50, (2, 2))
    model(ids)
    skipped = model.mtp.modules_[1].block.mlp
    assert skipped.last_aux is None and skipped.last_stats == {}
    ran = [m.last_aux for m in model.modules() if isinstance(m, MoE) and m is not skipped]
    assert len(ran) == 3  # two blocks and MTP depth 1
    loss = model.aux_loss()
    torch.testing.assert_close(loss, torch.stack(ran).sum() + model._mtp_loss)
    loss.backward()


# upcycling ------------------------------------------------------------------------------------------------
def _dense_with_biases() -> Transformer:
    torch.manual_seed(0)
    dense = Transformer(dataclasses.replace(TINY, bias=True))
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)  # trained, non-zero biases
    return dense.eval()


@pytest.mark.parametrize("kw", [dict(expert_bias=True), dict(expert_bias=True, n_shared=1),
                                dict(expert_bias=True, n_shared=2, score="sigmoid")])
def test_upcycled_model_computes_the_dense_function(kw):
    dense = _dense_with_biases()
    moe = upcycle(dense, MoEConfig(n_experts=4, top_k=2, **kw)).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids), dense(ids), rtol=1e-5, atol=1e-5)


def test_upcycling_refuses_to_drop_the_dense_biases():
    with pytest.raises(ConfigError, match="set model.moe.expert_bias=true"):
        upcycle(_dense_with_biases(), MoEConfig(n_experts=4, top_k=2))


@pytest.mark.parametrize("kw, why", [(dict(routed_scale=2.5), "routed_scale=2.5"),
                                     (dict(norm_topk=False), "norm_topk=false")])
def test_upcycling_warns_where_the_function_changes(kw, why):
    dense = _dense_with_biases()
    with pytest.warns(UserWarning, match=f"upcycle with model.moe {why}: the MoE model starts from a different"):
        moe = upcycle(dense, MoEConfig(n_experts=4, top_k=2, expert_bias=True, **kw)).eval()
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert (moe(ids) - dense(ids)).abs().max() > 1e-3  # the warning is about a real difference
