"""Pretraining: TrainConfig, the Trainer loop, token-file batches, checkpoints and metrics."""
