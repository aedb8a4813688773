"""Reward model and classifier heads: Bradley-Terry loss vs its equation and TRL's RewardTrainer (loss,
metrics, gradients); the head reads the intended position; head-only training leaves the trunk alone."""

import math

import pytest
import torch

from lmforge.align.losses import bradley_terry_loss
from lmforge.align.reward import ClassificationObjective, RewardConfig, RewardObjective, SequenceHead
from lmforge.errors import ConfigError

from .helpers import grads, pair_batch, tiny_model
from .trl_ref import trl_reward


def test_bradley_terry_equation():
    got = bradley_terry_loss(torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5]), torch.tensor([0.5, 0.0]))
    want = [-math.log(1 / (1 + math.exp(-(1.0 - 0.5)))), -math.log(1 / (1 + math.exp(1.0)))]
    torch.testing.assert_close(got, torch.tensor(want))


@pytest.mark.parametrize("margin,center", [(False, None), (True, 0.01)])
def test_reward_objective_matches_trl(margin, center):
    torch.manual_seed(0)
    model = SequenceHead(tiny_model(0))
    batch = pair_batch(B=3)
    if margin:
        batch["margin"] = torch.tensor([0.5, 0.0, 1.0])
    obj = RewardObjective(RewardConfig(center_rewards_coefficient=center or 0.0))
    loss, metrics = obj.loss(model, batch)
    loss.backward()
    g_ours = grads(model)
    idx = {p: batch[f"{p}loss_mask"].shape[1] - 1 - batch[f"{p}loss_mask"].flip(-1).int().argmax(-1)
           for p in ("chosen_", "rejected_")}
    r = {p: model(batch[f"{p}input_ids"], idx[p]).squeeze(-1) for p in idx}
    t_loss, t_metrics = trl_reward(r["chosen_"], r["rejected_"], batch.get("margin"), center)
    t_loss.backward()
    torch.testing.assert_close(loss, t_loss)
    for a, b in zip(g_ours, grads(model)):
        torch.testing.assert_close(a, b)
    for k in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert metrics[k].item() == pytest.approx(t_metrics[k], abs=1e-6), k


def test_head_reads_last_counted_position_and_head_only_freezes_trunk():
    lm = tiny_model(0)
    clf = SequenceHead(lm, out_dim=3, train_backbone=False)
    ids = torch.randint(0, 41, (2, 7))
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 2:5], mask[1, 1:7] = True, True
    h = lm.final_norm(lm.hidden(ids)[0])
    want = clf.head(torch.stack([h[0, 4], h[1, 6]]))
    batch = {"input_ids": ids, "loss_mask": mask, "label": torch.tensor([2, 0])}
    loss, metrics = ClassificationObjective().loss(clf, batch)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(want, batch["label"]))
    loss.backward()
    assert all(p.grad is None for p in lm.parameters()) and clf.head.weight.grad is not None
    full = SequenceHead(tiny_model(0), out_dim=3)
    ClassificationObjective().loss(full, batch)[0].backward()
    assert all(p.grad is not None for p in full.backbone.blocks.parameters())  # the trunk trains


def test_scores_are_fp32_under_bf16_autocast():
    """The head ran under the trainer's bf16 autocast (the default on a GPU): scores, the Bradley-Terry loss,
    margins and accuracy came out rounded to bf16 (a reward of 6 to steps of 1/32; a margin to a tie). As
    read_values does for value heads, the head computes in its own dtype outside autocast."""
    rm = SequenceHead(tiny_model(0), out_dim=1)
    with torch.no_grad():
        rm.head.bias.fill_(6.0)
        rm.head.weight.mul_(3)
    ids = torch.randint(0, 41, (4, 7))
    want = rm(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = rm.backbone.final_norm(rm.backbone.hidden(ids)[0])[:, -1]
        got = rm(ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, rm.head(h.float()), rtol=1e-6, atol=1e-6)  # the bf16 trunk, an fp32 head
    assert (got - want).abs().max() < 0.1 and not torch.equal(got, got.bfloat16().float())


def test_errors_name_the_fix():
    with pytest.raises(ConfigError, match="SequenceHead"):
        RewardObjective().loss(tiny_model(0), pair_batch())
    batch = pair_batch()
    batch["chosen_loss_mask"][1] = False
    with pytest.raises(ConfigError, match="row 1 of chosen_loss_mask"):
        RewardObjective().loss(SequenceHead(tiny_model(0)), batch)


def test_reward_scores_read_where_training_reads():
    """reward_scores encodes (prompt, completion) pairs and message lists as the training data was and reads
    the head where RewardObjective does (the last trained token), not at the text's last token."""
    from lmforge.align import data as D
    from lmforge.align.reward import reward_scores, score_index
    from lmforge.tokenizer.byte import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer()
    rm = SequenceHead(tiny_model(0, vocab_size=257))
    pairs = [("2+2=", " 4"), ("name a colour:", " red"), ("hi", " there, friend")]
    chat = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    got = reward_scores(rm, tok, pairs + chat, template="plain")
    enc = D.Encoder(tok, "plain")
    batch = D.pair_batch([(enc.prompt_completion(p, c, "x"), enc.prompt_completion(p, "no", "x")) for p, c in pairs])
    with torch.no_grad():
        want = rm(batch["chosen_input_ids"], score_index(batch, "chosen_"))[:, 0].tolist()
        one = D.pad_batch([enc.chat(chat[0], "x")])  # as an SFT-style row of the training data
        want.append(rm(one["input_ids"], score_index(one))[0, 0].item())
        at_end = rm(torch.tensor([enc.chat(chat[0], "x")[0]]))[0, 0].item()  # the whole text's last token
    assert got == pytest.approx(want, abs=1e-6) and got[-1] != pytest.approx(at_end, abs=1e-4)
    with pytest.raises(ConfigError, match="item 0 must be a \\(prompt, completion\\) tuple or a list of messages"):
        reward_scores(rm, tok, ["just text"])


def test_a_records_margin_reaches_the_loss(tmp_path):
    """`lmforge rm` data: a preference record's "margin" field travels through load_records and pair_batch
    into RewardObjective's Bradley-Terry loss, -log sigmoid(r_c - r_r - margin) (Llama 2; TRL's collator)."""
    import json

    from lmforge.align import data as D
    from lmforge.align.reward import score_index
    from lmforge.tokenizer.byte import ByteTokenizer

    f = tmp_path / "m.jsonl"
    recs = [{"prompt": "2+2=", "chosen": " 4", "rejected": " 5", "margin": 3.0},
            {"prompt": "hi", "chosen": " hello", "rejected": " go", "margin": 0.5}]
    f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    items, _ = D.load_records((str(f),), D.Encoder(ByteTokenizer(), "plain"), "preference", 64, "raise")
    batch = D.pair_batch(items)
    torch.manual_seed(0)
    rm = SequenceHead(tiny_model(0, vocab_size=257))
    loss, _ = RewardObjective().loss(rm, batch)
    with torch.no_grad():
        r_c, r_r = (rm(batch[f"{p}input_ids"], score_index(batch, p))[:, 0] for p in ("chosen_", "rejected_"))
    want = -torch.nn.functional.logsigmoid(r_c - r_r - torch.tensor([3.0, 0.5])).mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert loss.item() > -torch.nn.functional.logsigmoid(r_c - r_r).mean().item() + 0.5  # the margins count


def test_lora_on_a_reward_model_or_critic_keeps_its_task_head_trainable():
    """apply_lora on a SequenceHead froze its head unless trainable=("head",) was given: a run continuing a reward
    model with [lora] trained adapters under a fixed, untrained-for-them head. A head is new, task-specific weights
    (PEFT's SEQ_CLS task adds the score head to modules_to_save): it trains in full, and the adapter checkpoint
    holds it; a task head named as a LoRA target gets its adapter instead, its base weight frozen."""
    from lmforge.adapt.lora import LoRAConfig, LoRALinear, apply_lora, lora_state_dict
    from lmforge.align.value import PolicyAndCritic, PolicyWithValue, ValueModel

    cfg = LoRAConfig(r=2, targets=("wq", "wv"))
    rm = apply_lora(SequenceHead(tiny_model(0)), cfg)
    trained = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trained
    assert trained - {"head.weight", "head.bias"} == {n for n in trained if n.endswith(("lora_A", "lora_B"))}
    assert {"head.weight", "head.bias"} <= set(lora_state_dict(rm, cfg))
    rm.train()
    RewardObjective().loss(rm, pair_batch(B=3))[0].backward()
    assert rm.head.weight.grad is not None and rm.head.weight.grad.abs().sum() > 0
    targeted = apply_lora(SequenceHead(tiny_model(0)), LoRAConfig(r=1, targets=("wq", "head")))
    assert isinstance(targeted.head, LoRALinear) and not targeted.head.weight.requires_grad
    for model, head in [(ValueModel(tiny_model(0)), "value_head"), (PolicyWithValue(tiny_model(0)), "value_head"),
                        (PolicyAndCritic(tiny_model(0), ValueModel(tiny_model(1))), "critic.value_head")]:
        apply_lora(model, cfg)
        assert all(p.requires_grad for p in model.get_submodule(head).parameters()), type(model).__name__
