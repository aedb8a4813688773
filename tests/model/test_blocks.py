"""Attention variants and block variants against plain formulas: sliding windows (and over a KV cache),
attention sinks, parallel and sandwich blocks, config validation naming the field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.cache import KVCache
from lmforge.model.config import ModelConfig
from lmforge.model.layers.attention import attention, math_attention
from lmforge.model.transformer import Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)


def _reference(q, k, v, allowed, scale, sinks=None):
    """Loop over heads and queries: softmax over allowed keys (plus an optional sink logit)."""
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.shape[-1])
    rep = H // k.shape[1]
    for h in range(H):
        for i in range(T):
            s = torch.einsum("bd,bsd->bs", q[:, h, i], k[:, h // rep]) * scale
            s = s.masked_fill(~allowed[i], float("-inf"))
            if sinks is not None:
                s = torch.cat((s, sinks[h].expand(B, 1)), -1)
            p = s.softmax(-1)[:, : k.shape[2]]
            out[:, h, i] = torch.einsum("bs,bsd->bd", p, v[:, h // rep])
    return out


def test_sliding_window_and_sinks_match_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    from lmforge.model.layers.attention import window_mask

    mask = window_mask("causal", 7, 7, 3, "cpu")
    i, j = torch.arange(7)[:, None], torch.arange(7)[None]
    allowed = (j <= i) & (i - j < 3)
    assert torch.equal(mask, allowed)
    torch.testing.assert_close(attention(q, k, v, mask, scale=0.3), _reference(q, k, v, allowed, 0.3), rtol=1e-5, atol=1e-5)
    sinks = torch.randn(4)
    got = math_attention(q, k, v, mask, scale=0.3, sinks=sinks)
    torch.testing.assert_close(got, _reference(q, k, v, allowed, 0.3, sinks), rtol=1e-5, atol=1e-5)
    very_negative = math_attention(q, k, v, mask, scale=0.3, sinks=torch.full((4,), -1e4))
    torch.testing.assert_close(very_negative, attention(q, k, v, mask, scale=0.3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("types", [None, ("sliding", "full")])
def test_sliding_window_model_with_kv_cache_equals_full_forward(types):
    cfg = dataclasses.replace(CFG, sliding_window=3, layer_types=types, attn_sinks=True)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 2, 16)
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(4, 10)]
        no_window = Transformer(dataclasses.replace(cfg, sliding_window=0, layer_types=None)).eval()
        no_window.load_state_dict(model.state_dict())
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_window(ids)[:, :3], full[:, :3], rtol=1e-5, atol=1e-5)  # windows start to matter at t=3
    assert not torch.allclose(no_window(ids)[:, 5:], full[:, 5:])
    assert [b.attn.window for b in model.blocks] == ([3, 3] if types is None else [3, 0])


def _block_parts(model, x):
    b = model.blocks[0]
    return b, (lambda h: b.attn(h, model.rope.cos_sin(torch.arange(x.shape[1]).expand(x.shape[0], -1)), "causal"))


def test_parallel_and_sandwich_blocks_follow_their_formulas():
    x = torch.randn(2, 5, 32)
    par = Transformer(dataclasses.replace(CFG, block="parallel"))
    b, attn = _block_parts(par, x)
    assert b.norm2 is None
    rope = par.rope.cos_sin(torch.arange(5).expand(2, -1))
    torch.testing.assert_close(b(x, rope, "causal"), x + attn(b.norm1(x)) + b.mlp(b.norm1(x)))
    sw = Transformer(dataclasses.replace(CFG, norm_position="sandwich"))
    b, attn = _block_parts(sw, x)
    with torch.no_grad():
        b.post_attn_norm.weight.fill_(0.5)
        b.post_mlp_norm.weight.fill_(2.0)
    h = x + b.post_attn_norm(attn(b.norm1(x)))
    torch.testing.assert_close(b(x, rope, "causal"), h + b.post_mlp_norm(b.mlp(b.norm2(h))))


@pytest.mark.parametrize("kw, field", [
    (dict(layer_types=("full",)), "model.layer_types"),
    (dict(layer_types=("sliding", "global")), "model.layer_types"),
    (dict(layer_types=("sliding", "full")), "model.sliding_window"),
    (dict(sliding_window=-1), "model.sliding_window"),
    (dict(attn_scale=0.0), "model.attn_scale"),
])
def test_bad_configs_name_the_field(kw, field):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(CFG, **kw)


def test_default_behaviour_unchanged():
    model = Transformer(CFG)
    assert all(b.attn.window == 0 and b.attn.sinks is None and b.kind == "pre" for b in model.blocks)
    assert model.aux_loss() is None and model.moe_stats() == {}


@pytest.mark.parametrize("name", ["mixtral-tiny", "deepseek-tiny", "gemma2-tiny"])
def test_architecture_presets_run(name):
    model = Transformer(ModelConfig.preset(name, vocab_size=64))
    logits = model(torch.randint(0, 64, (1, 6)))
    assert logits.shape == (1, 6, 64) and torch.isfinite(logits).all()
    assert (model.aux_loss() is None) == (name == "gemma2-tiny")


@pytest.mark.parametrize("types", [None, ("sliding", "full")])
def test_rolling_sliding_window_cache_is_exact_and_bounded(types):
    from lmforge.model.layers.sliding import SlidingWindowCache

    model = Transformer(dataclasses.replace(CFG, sliding_window=3, layer_types=types)).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = SlidingWindowCache.for_model(model)
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.stored_tokens(0) == 2 and cache.stored_tokens(1) == (2 if types is None else 12)
