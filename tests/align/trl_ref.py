"""Run TRL's own loss code on given log-probs: its trainers' loss methods are called with a stand-in
`self` (the attributes they read) and a stand-in model whose outputs are our per-token log-probs, so
TRL's reductions (sums, length normalisation, means) are exercised exactly as in TRL."""

import os
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _trl():
    """Skip only the TRL comparisons (not the equation tests beside them) when trl is not installed."""
    return pytest.importorskip("trl")


class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


def _self(**kw):
    base = dict(model=SimpleNamespace(training=True), accelerator=_Acc(), aux_loss_enabled=False,
                _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
                _tp_size=1, ld_alpha=None, use_weighting=False, f_divergence_type="reverse_kl",
                label_smoothing=0.0, args=SimpleNamespace(gradient_checkpointing_kwargs=None), alpha=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


def _outputs(log_probs):
    shape = log_probs.shape
    return SimpleNamespace(log_probs=log_probs, entropy=torch.zeros(shape), mean_logits=torch.zeros(shape),
                           is_top1=torch.zeros(shape, dtype=torch.bool))


def trl_dpo(loss_type, beta, tok_c, tok_r, mask_c, mask_r, ref_c, ref_r):
    """TRL DPOTrainer._compute_loss; tok_*/mask_* (B, T) per-token log-probs of the completions."""
    _trl()
    from trl.trainer.dpo_trainer import DPOTrainer

    B, T = tok_c.shape
    completion = torch.zeros(2 * B, T + 1, dtype=torch.long)  # TRL shifts: mask[:, 1:] is per target
    completion[:, 1:] = torch.cat([mask_c, mask_r]).long()
    lp = torch.cat([tok_c * mask_c, tok_r * mask_r])
    inputs = {"input_ids": torch.zeros(2 * B, T + 1, dtype=torch.long), "completion_mask": completion,
              "attention_mask": torch.ones(2 * B, T + 1, dtype=torch.long),
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    me = _self(beta=beta, loss_types=[loss_type], loss_weights=[1.0], precompute_ref_logps=True, ref_model=None)
    loss = DPOTrainer._compute_loss(me, lambda **kw: _outputs(lp), inputs, False)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}


def trl_kto(beta, tok, mask, label, ref, kl_logps, ref_kl_logps, w_d=1.0, w_u=1.0):
    """TRL KTOTrainer._compute_loss with precomputed reference and KL log-probs."""
    _trl()
    from trl.trainer.kto_trainer import KTOTrainer

    B, T = tok.shape
    completion = torch.zeros(B, T + 1, dtype=torch.long)
    completion[:, 1:] = mask.long()
    inputs = {"input_ids": torch.zeros(B, T + 1, dtype=torch.long), "completion_mask": completion,
              "attention_mask": torch.ones(B, T + 1, dtype=torch.long), "label": label,
              "ref_logps": ref, "ref_KL_logps": ref_kl_logps}
    me = _self(beta=beta, loss_type="kto", precompute_ref_logps=True, calculate_KL=True, ref_model=None,
               desirable_weight=w_d, undesirable_weight=w_u)
    me._compute_kl_logps = lambda model, batch: kl_logps
    loss = KTOTrainer._compute_loss(me, lambda **kw: _outputs(tok * mask), inputs, False)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}


def trl_cpo(loss_type, beta, avg_c, avg_r, gamma=0.5, label_smoothing=0.0):
    _trl()
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    me = _self(beta=beta, loss_type=loss_type, simpo_gamma=gamma, label_smoothing=label_smoothing)
    return CPOTrainer.cpo_loss(me, avg_c, avg_r)


def trl_orpo_ratio(lam, avg_c, avg_r):
    _trl()
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    return ORPOTrainer.odds_ratio_loss(_self(beta=lam), avg_c, avg_r)


def trl_gkd(student_logits, teacher_logits, labels, beta, temperature):
    _trl()
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels=labels, beta=beta,
                                           temperature=temperature)


def trl_reward(r_c, r_r, margin=None, center=None):
    """TRL RewardTrainer.compute_loss on given rewards (the model's logits are [chosen; rejected])."""
    _trl()
    from trl.trainer.reward_trainer import RewardTrainer

    logits = torch.cat([r_c, r_r])[:, None]
    inputs = {"attention_mask": torch.ones(len(logits), 2, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin
    me = _self(args=SimpleNamespace(center_rewards_coefficient=center))
    loss = RewardTrainer.compute_loss(me, lambda **kw: SimpleNamespace(logits=logits), inputs)
    return loss, {k: v[-1] for k, v in me._metrics["train"].items()}
