"""Post-training: objectives for the one Trainer (SFT, reward models, DPO and its family, distillation,
RL), the log-prob and masked-reduction utilities they share, and data builders (chat, preferences)."""
