"""PolicyAndCritic's aux losses are those of the trunks its last forward ran: a MoE critic's balancing and
router losses reach the objective (ModelAux) beside the policy's, and a forward of one trunk never returns the
other's from an earlier forward (whose graph a backward freed)."""

import torch

from lmforge.align.logprobs import ModelAux
from lmforge.align.value import PolicyAndCritic, PolicyWithValue, ValueModel
from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.model.transformer import Transformer


def moe(seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, mlp="moe",
                                   moe=MoEConfig(n_experts=4, top_k=2, aux_loss=0.01, z_loss=1e-3)))


def test_a_moe_critics_aux_losses_reach_the_loss_and_none_are_stale():
    pc = PolicyAndCritic(moe(0), ValueModel(moe(1))).train()
    ids = torch.randint(0, 32, (2, 8))
    aux = ModelAux(pc)
    logits, values = pc.policy_and_values(ids)
    aux.read()
    want = pc.backbone.aux_loss() + pc.critic.aux_loss()
    assert float(pc.critic.aux_loss().detach()) > 0 and torch.equal(pc.aux_loss(), want)
    loss, metrics = aux.add(logits.mean() + values.mean(), {})
    torch.testing.assert_close(metrics["aux_loss"], want.detach())
    loss.backward()  # frees both forwards' graphs
    assert pc.critic.backbone.blocks[0].mlp.router.weight.grad.abs().sum() > 0  # the critic's router learns
    pc.values(ids)  # the critic alone: the policy's aux losses are the last step's, not this forward's
    torch.testing.assert_close(pc.aux_loss(), pc.critic.aux_loss())
    pc.aux_loss().backward()
    pc(ids)  # the policy alone
    torch.testing.assert_close(pc.aux_loss(), pc.backbone.aux_loss())
    frozen = PolicyAndCritic(moe(0), ValueModel(moe(1), train_backbone=False)).train()
    frozen.policy_and_values(ids)
    torch.testing.assert_close(frozen.aux_loss(), frozen.backbone.aux_loss())  # a frozen critic has none
    assert frozen.values(ids) is not None and frozen.aux_loss() is None
    shared = PolicyWithValue(moe(0)).train()
    shared.policy_and_values(ids)
    torch.testing.assert_close(shared.aux_loss(), shared.backbone.aux_loss())  # one trunk: its own


def test_a_shared_trunks_values_alone_bring_no_stale_mtp_loss():
    """PolicyWithValue.values runs the trunk without the LM head and the MTP heads: its aux losses are the trunk's
    MoE ones, not the MTP loss an earlier policy forward kept (backward through it again raised)."""
    from lmforge.model.config import MTPConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, max_seq_len=16, mtp=MTPConfig(depth=1))
    ac = PolicyWithValue(Transformer(cfg)).train()
    ids = torch.randint(0, 32, (2, 8))
    logits = ac(ids)
    assert float(ac.aux_loss().detach()) > 0  # the policy forward's MTP loss
    (logits.mean() + ac.aux_loss()).backward()
    values = ac.values(ids)
    assert ac.aux_loss() is None  # no MoE in the trunk, and the MTP heads did not run
    values.mean().backward()
    ac.policy_and_values(ids)
    assert float(ac.aux_loss().detach()) > 0  # the LM head ran: the MTP loss counts again
    moe_ac = PolicyWithValue(moe(0)).train()
    moe_ac.values(ids)
    torch.testing.assert_close(moe_ac.aux_loss(), moe_ac.backbone.aux_loss())  # the trunk's MoE losses stay


def test_a_policy_forward_then_a_values_forward_add_what_one_policy_and_values_forward_adds():
    """ModelAux averages repeat reads of one trunk (chosen and rejected rows) but sums different trunks': an
    objective reading model_logits then values_of of a PolicyAndCritic adds policy + critic, not their mean."""
    from lmforge.align.logprobs import model_logits
    from lmforge.align.value import values_of

    pc = PolicyAndCritic(moe(0), ValueModel(moe(1))).train()
    batch = {"input_ids": torch.randint(0, 32, (2, 8)), "targets": torch.randint(0, 32, (2, 8))}
    one = ModelAux(pc)
    pc.policy_and_values(batch["input_ids"])
    one.read()
    _, want = one.add(torch.zeros(()), {})
    two = ModelAux(pc)
    model_logits(pc, batch, aux=two)
    policy = pc.backbone.aux_loss().detach()
    values_of(pc, batch, aux=two)
    critic = pc.critic.aux_loss().detach()
    _, got = two.add(torch.zeros(()), {})
    assert float(critic) > 0 and float(policy) > 0
    torch.testing.assert_close(got["aux_loss"], want["aux_loss"])
    torch.testing.assert_close(got["aux_loss"], (policy + critic).float())
    model_logits(pc, {k: v.flip(0) for k, v in batch.items()}, aux=two)  # the policy read again: its two average
    again = pc.backbone.aux_loss().detach()
    _, got = two.add(torch.zeros(()), {})
    torch.testing.assert_close(got["aux_loss"], ((policy + again) / 2 + critic).float())
