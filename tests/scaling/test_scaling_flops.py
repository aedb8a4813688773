"""FLOP accounting: the config-only count equals the model's own, and both relate to 6N as expected."""

from __future__ import annotations

import pytest

from lmforge.model.config import PRESETS, ModelConfig, MTPConfig
from lmforge.errors import ConfigError
from lmforge.scaling.flops import dense_flops_per_token, flops_6nd, flops_per_token, num_params, tokens_for_budget


@pytest.mark.parametrize("cfg", [ModelConfig.from_depth(2, vocab_size=257, max_seq_len=128),
                                 ModelConfig.preset("gpt2-small"), ModelConfig.preset("llama-tiny")])
def test_dense_count_matches_model(cfg):
    assert dense_flops_per_token(cfg, 128) == flops_per_token(cfg, 128)
    assert dense_flops_per_token(cfg, 128, training=False) * 3 == dense_flops_per_token(cfg, 128)


def test_exact_count_approaches_6n_when_context_is_short():
    cfg = ModelConfig.preset("gpt2-small")
    # gpt2-small: 12 layers x 12 d^2 (attn 4 d^2 + mlp 8 d^2) + head d V; attention term -> 0 as T -> 0
    d, v = 768, 50257
    matmul_params = 12 * 12 * d * d + d * v
    assert dense_flops_per_token(cfg, 0) == pytest.approx(6 * matmul_params)
    assert dense_flops_per_token(cfg, 1024) == pytest.approx(6 * matmul_params + 3 * 4 * 12 * d * 1024)
    assert num_params(cfg) == pytest.approx(124.4e6, rel=0.01)  # the known GPT-2 small count (tied head)


def test_6nd_and_budget_tokens():
    assert flops_6nd(1e9, 2e10) == 1.2e20
    assert tokens_for_budget(1.2e20, 1e9) == pytest.approx(2e10)
    with pytest.raises(ConfigError, match="positive"):
        flops_6nd(0, 1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_dense_count_refuses_what_it_does_not_count(name):
    """The config-only count covers dense decoders; for MoE and MLA it returned a dense count silently."""
    cfg = ModelConfig.preset(name)
    if cfg.mlp == "dense" and cfg.attention == "mha" and cfg.mtp is None:
        assert dense_flops_per_token(cfg, 128) == flops_per_token(cfg, 128)
    else:
        with pytest.raises(ConfigError, match=r"dense decoders only.*use flops_per_token\(cfg, seq_len\)"):
            dense_flops_per_token(cfg, 128)


def test_dense_count_refuses_mtp_in_training_only():
    cfg = ModelConfig.preset("llama-tiny", mtp=MTPConfig(depth=2))
    with pytest.raises(ConfigError, match=r"has mtp heads \(training\); use flops_per_token"):
        dense_flops_per_token(cfg, 128)
    assert dense_flops_per_token(cfg, 128, training=False) == flops_per_token(cfg, 128, training=False)


def test_a_sliding_layer_counts_its_window_of_keys():
    """Attention FLOPs of a sliding layer are over min(window, seq_len) keys (nanochat counts the same); they
    were over seq_len, so a Mistral/Gemma-style model's MFU and scaling budgets were overstated."""
    from dataclasses import replace

    base = ModelConfig.from_depth(2, vocab_size=64, max_seq_len=64)
    mixed = replace(base, sliding_window=4, layer_types=("sliding", "full"))
    per_key = 4 * base.n_heads * base.hd  # QK^T and AV per token per key, forward
    for seq_len in (16, 3):
        drop = per_key * (seq_len - min(4, seq_len))  # the sliding layer's keys past its window
        assert flops_per_token(mixed, seq_len, training=False) == flops_per_token(base, seq_len, training=False) - drop
        assert dense_flops_per_token(mixed, seq_len) == flops_per_token(mixed, seq_len)
