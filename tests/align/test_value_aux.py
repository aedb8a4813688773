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
