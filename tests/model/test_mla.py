"""MLA: the naive path equals the paper's equations written out per head; the absorbed latent-cache
path gives the same logits (prefill and token-by-token decode); cache size vs MHA/GQA."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.config import MLAConfig, ModelConfig
from lmforge.model.layers.mla import MLA, MLACache
from lmforge.model.layers.rope import RotaryEmbedding, apply_rope
from lmforge.model.transformer import Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, attention="mla",
                  mla=MLAConfig(kv_lora_rank=12, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6))


def _randomise(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_naive_path_matches_equations_per_head():
    torch.manual_seed(0)
    layer = _randomise(MLA(CFG, 0)).eval()
    rope = RotaryEmbedding(4, 10000.0)
    x, T = torch.randn(2, 6, 32), 6
    cs = rope.cos_sin(torch.arange(T).expand(2, T))
    got = layer(x, cs, "causal")
    # DeepSeek-V2 eq. 9-19, one head at a time
    c_q = layer.q_norm(x @ layer.wq_a.weight.T)
    q_all = (c_q @ layer.wq_b.weight.T).view(2, T, 4, 12)
    a = x @ layer.wkv_a.weight.T
    c_kv, k_r = layer.kv_norm(a[..., :12]), apply_rope(a[:, None, :, 12:], *cs)[:, 0]  # (B, T, d_r) shared key
    kv = (c_kv @ layer.wkv_b.weight.T).view(2, T, 4, 14)
    outs = []
    for h in range(4):
        q_n, q_r = q_all[:, :, h, :8], apply_rope(q_all[:, None, :, h, 8:], *cs)[:, 0]
        k_n, v = kv[:, :, h, :8], kv[:, :, h, 8:]
        s = (q_n @ k_n.transpose(1, 2) + q_r @ k_r.transpose(1, 2)) / math.sqrt(12)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        outs.append(s.softmax(-1) @ v)
    want = torch.cat(outs, -1) @ layer.wo.weight.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_absorbed_cache_path_equals_naive_logits():
    for q_rank in (0, 8):
        torch.manual_seed(0)
        cfg = dataclasses.replace(CFG, mla=dataclasses.replace(CFG.mla, q_lora_rank=q_rank))
        model = _randomise(Transformer(cfg)).eval()
        ids = torch.randint(0, 64, (2, 11))
        with torch.no_grad():
            naive = model(ids)
            cache = MLACache.for_model(model, 2, 16)
            prefill = model(ids[:, :7], cache=cache)
            steps = [model(ids[:, t:t + 1], cache=cache) for t in range(7, 11)]
            whole = model(ids, cache=MLACache.for_model(model, 2, 16))  # naive prefill over cached latents
            for block in model.blocks:
                block.attn.absorb_max_tokens = 64
            absorbed_prefill = model(ids, cache=MLACache.for_model(model, 2, 16))
        torch.testing.assert_close(absorbed_prefill, naive, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([prefill, *steps], 1), naive, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(whole, naive, rtol=1e-5, atol=1e-5)
        assert cache.length == 11 and cache.c.shape[-1] == 12 and cache.k_rope.shape[-1] == 4


def test_sliding_window_mla_absorbed_equals_naive():
    cfg = dataclasses.replace(CFG, sliding_window=3)
    model = _randomise(Transformer(cfg)).eval()
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        naive = model(ids)
        cache = MLACache.for_model(model, 1, 16)
        steps = [model(ids[:, t:t + 1], cache=cache) for t in range(9)]
    torch.testing.assert_close(torch.cat(steps, 1), naive, rtol=1e-5, atol=1e-5)


def test_cache_bytes_per_token_vs_mha_and_gqa():
    # DeepSeek-V2 sizes: d=5120, 128 heads of 128, r=512, rope 64 -> 576 numbers per layer and token
    cfg = ModelConfig(d_model=5120, n_heads=128, n_layers=60, attention="mla",
                      mla=MLAConfig(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128))
    mla = MLACache.bytes_per_token(cfg, 2)
    mha = 60 * 2 * 128 * 128 * 2
    gqa8 = 60 * 2 * 8 * 128 * 2
    assert mla == 60 * 576 * 2
    assert 1 - mla / mha > 0.98 and mla < gqa8 / 3  # far below the paper's 93.3% vs its (smaller) MHA baseline


def test_mla_flops_and_roles():
    model = Transformer(CFG)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.flops_per_token(10, training=False) == 2 * linear + 2 * (2 * 4 * (8 + 4 + 6) * 10)
    assert set(model.param_roles().values()) <= {"embedding", "head", "matrix", "vector"}


def test_absorbed_decode_with_a_lora_adapter_on_wkv_b_equals_the_full_forward():
    """Absorbing W_uk / W_uv needs wkv_b's whole matrix: with a LoRA adapter on it (B A non-zero) the decode
    steps must still include the update (read off the module: W + s·B A), as the full forward does."""
    from lmforge.adapt.lora import LoRAConfig, LoRALinear, apply_lora

    torch.manual_seed(0)
    model = _randomise(Transformer(CFG)).eval()
    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=("wkv_b",)))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.5)
        ids = torch.randint(0, 64, (2, 9))
        want = model(ids)
        cache = MLACache.for_model(model, 2, 16)
        prefill = model(ids[:, :5], cache=cache)
        got = torch.cat([prefill] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 9)], 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_n_kv_heads_other_than_n_heads_is_refused_with_mla():
    """MLA ignored n_kv_heads (a GQA config switched to attention='mla' kept n_kv_heads=2 and built full-head
    keys): refused in one line naming the field. None, or n_heads as HF DeepSeek configs' num_key_value_heads, is
    MLA itself."""
    for kv in (1, 2, 3):
        with pytest.raises(ConfigError, match=rf"model.n_kv_heads={kv} has no meaning with model.attention='mla'.*"
                                              "leave n_kv_heads out"):
            dataclasses.replace(CFG, n_kv_heads=kv)
    same = dataclasses.replace(CFG, n_kv_heads=4)
    torch.manual_seed(0)
    a = Transformer(same)
    torch.manual_seed(0)
    b = Transformer(CFG)
    ids = torch.arange(10).unsqueeze(0)
    torch.testing.assert_close(a(ids), b(ids), rtol=0, atol=0)
