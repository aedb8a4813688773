"""Tiny models and preference batches shared by the objective tests."""

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer

TINY = ModelConfig(vocab_size=41, d_model=16, n_layers=1, n_heads=2, max_seq_len=32)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = TINY if not overrides else ModelConfig(**{**TINY.__dict__, **overrides})
    return Transformer(cfg)


def sequences(B: int, T: int, V: int, prompt_lens, seed: int, prefix: str = "") -> dict:
    """Rows of random tokens: targets are the next tokens, loss only after each row's prompt and
    before its (random) end of padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    targets = ids[:, 1:].clone()
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, p in enumerate(prompt_lens):
        end = T - int(torch.randint(0, 3, (1,), generator=g))
        mask[b, p - 1:end] = True
    targets[~mask] = -100
    return {f"{prefix}input_ids": ids[:, :-1], f"{prefix}targets": targets, f"{prefix}loss_mask": mask}


def pair_batch(B: int = 3, T: int = 10, V: int = 41, seed: int = 0) -> dict:
    return {**sequences(B, T, V, [2, 3, 4][:B], seed, "chosen_"),
            **sequences(B, T, V, [2, 3, 4][:B], seed + 1, "rejected_")}


def grads(model) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out
