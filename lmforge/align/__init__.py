"""Post-training: objectives for the one Trainer (SFT, reward models, DPO and its family, distillation,
RL), the log-prob and masked-reduction utilities they share, and data builders (chat, preferences).

  config.py     the post-training configs (objectives' options, [data], the run, OBJECTIVES) without torch
  logprobs.py   chunked fp32 token log-probs, entropy, masked reductions, batch_logps over prefixed rows
  losses.py     DPO / cDPO / IPO / SimPO / KTO / ORPO / Bradley-Terry as pure functions of log-probs
  frozen.py     Frozen: reference and teacher models (eval, no grad, other device, identity, cache);
                BaseReference: a LoRA policy with its adapters off as its own reference (no copy)
  dpo.py        DPOObjective (sigmoid, ipo, simpo)      kto.py   KTOObjective     orpo.py  ORPOObjective
  reward.py     SequenceHead, RewardObjective, ClassificationObjective
  distill.py    DistillObjective (forward KL, reverse KL, generalised JSD)
  sampled.py    data by sampling + verifying: sequence-level / verified distillation, preference pairs
  cai.py        Constitutional AI: critique -> revise (SL-CAI), AI preference labels (RL-CAI)
  value.py      per-token value heads: ValueModel (a separate critic), PolicyWithValue (one trunk: logits and
                values in one forward, the engine still sees the policy), PolicyAndCritic (policy + a separate
                critic as one trained, checkpointed module)
  advantages.py GAE, masked whitening, GRPO group and RLOO leave-one-out advantages, outcome rewards, the
                per-token KL penalty to a reference (k1/k2/k3)
  prm.py        process reward models: step formatting, ProcessRewardObjective (per-step BCE), prm_scores
"""
