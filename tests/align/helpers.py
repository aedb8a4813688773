"""Tiny models and preference batches shared by the objective tests."""

import dataclasses
import json
from pathlib import Path

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


def post_base(tmp: Path) -> Path:
    """`tmp` with a tiny byte-level model pretrained for a few steps (tmp/base) and chat / preference / unpaired
    JSONL files (chat.jsonl, pairs.jsonl, unpaired.jsonl): 48 'reverse WORD' records."""
    from lmforge.train.trainer import train

    from ..train.helpers import make_shard, tiny_config

    shard = make_shard(tmp / "t.bin")
    base_cfg = tiny_config(shard, tmp / "base", max_steps=4, ckpt_every=4, eval_every=4)
    train(dataclasses.replace(base_cfg, model=dataclasses.replace(base_cfg.model, max_seq_len=64)))
    words = ["cat", "dog", "mat", "sun", "red", "tree", "river", "house"]
    chat, pairs = [], []
    for i in range(48):
        w = words[i % 8] + words[(i * 3) % 8]
        chat.append({"messages": [{"role": "user", "content": f"reverse {w}"},
                                  {"role": "assistant", "content": w[::-1]}]})
        pairs.append({"prompt": f"reverse {w}\n", "chosen": w[::-1], "rejected": w})
    (tmp / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (tmp / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    unpaired = [{"prompt": p["prompt"], "completion": p["chosen" if i % 3 else "rejected"], "label": bool(i % 3)}
                for i, p in enumerate(pairs)]
    (tmp / "unpaired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    return tmp
