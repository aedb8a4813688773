"""The spine Transformer: config validation, parameter and FLOP counts, cache == recompute, variants."""

import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmforge.errors import ConfigError
from lmforge.model.cache import KVCache
from lmforge.model.config import MLAConfig, ModelConfig, MoEConfig, RopeScaling
from lmforge.model.transformer import Transformer

TINY = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=30, n_heads=4), "model.d_model=30"),
    (dict(n_heads=4, n_kv_heads=3), "model.n_kv_heads=3"),
    (dict(dropout=1.5), "model.dropout"),
    (dict(vocab_size=0), "model.vocab_size"),
    (dict(activation="tanh"), "model.activation"),
    # a parallel block has one shared pre-norm: post / sandwich placement was once silently ignored
    (dict(block="parallel", norm_position="post"), "model.norm_position='post'"),
    (dict(block="parallel", norm_position="sandwich"), "model.norm_position='sandwich'"),
])
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kind, orig", [("llama3", -5), ("yarn", 0), ("longrope", 1)])
def test_rope_scaling_original_context_must_be_a_length(kind, orig):
    # once accepted: 0 fell back to max_seq_len (`or`), -5 gave llama3 negative wavelengths (finite nonsense),
    # 1 a ZeroDivisionError building longrope's attention factor sqrt(1 + ln s / ln L)
    extra = dict(short_factor=(1.0,) * 4, long_factor=(2.0,) * 4) if kind == "longrope" else {}
    with pytest.raises(ConfigError, match=rf"model\.rope_scaling\.original_max_seq_len must be >= 2, got {orig}"):
        RopeScaling(kind=kind, factor=2.0, original_max_seq_len=orig, **extra)


@pytest.mark.parametrize("fast, slow", [(1.0, 32.0), (32.0, 0.0)])
def test_yarn_betas_must_bound_a_ramp(fast, slow):
    # once accepted: beta_fast < beta_slow inverted YaRN's ramp (high frequencies interpolated, low ones kept),
    # beta_slow = 0 raised a math domain error building the model
    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.beta_fast"):
        RopeScaling(kind="yarn", factor=2.0, beta_fast=fast, beta_slow=slow)
    RopeScaling(kind="linear", factor=2.0, beta_fast=fast, beta_slow=slow)  # other kinds never read them


LONG = dict(short_factor=(1.0,) * 4, long_factor=(2.0,) * 4)


@pytest.mark.parametrize("kwargs, field", [
    (dict(kind="llama3", low_freq_factor=0.0), "low_freq_factor"),  # was a ZeroDivisionError building the model
    (dict(kind="yarn", attention_factor=-1.0), "attention_factor"),  # was cos/sin with their signs flipped
    (dict(kind="longrope", factor=-2.0, **LONG), "factor"),
    (dict(kind="longrope", factor=2.0, short_factor=(0.0,) * 4, long_factor=(2.0,) * 4), "short_factor"),
])
def test_rope_scaling_factors_must_be_positive(kwargs, field):
    with pytest.raises(ConfigError, match=rf"model\.rope_scaling\.{field}"):
        RopeScaling(**{"factor": 2.0, **kwargs})


def test_mla_norm_eps_must_be_positive():
    # once accepted: a negative eps made the latent RMSNorms' rsqrt NaN in every forward
    with pytest.raises(ConfigError, match=r"model\.mla\.norm_eps must be > 0, got -1\.0"):
        MLAConfig(norm_eps=-1.0)
    assert MLAConfig(norm_eps=None).norm_eps is None


@pytest.mark.parametrize("scale", [0.0, -2.5])
def test_moe_routed_scale_must_be_positive(scale):
    # once accepted: 0 silently switched the routed experts off, a negative scale subtracted their output
    with pytest.raises(ConfigError, match=rf"model\.moe\.routed_scale must be > 0, got {scale}"):
        MoEConfig(routed_scale=scale)


def test_gpt2_small_has_124m_parameters():
    # OpenAI GPT-2 small: 124,439,808 parameters (tied head, 1024 learned positions)
    assert Transformer(ModelConfig.preset("gpt2-small")).num_params() == 124_439_808


def test_glu_width_and_depth_dial():
    assert ModelConfig(d_model=768, activation="swiglu").ff == 2048  # 8/3·768 = 2048
    assert ModelConfig(d_model=1000, n_heads=10, activation="swiglu").ff == 2688  # 2666.7 -> multiple of 64
    c = ModelConfig.from_depth(6)
    assert (c.d_model, c.n_layers, c.n_heads, c.hd) == (384, 6, 3, 128)
    c = ModelConfig.from_depth(5)  # 320 is not a multiple of 128: 64-wide heads
    assert (c.d_model, c.n_heads, c.hd) == (320, 5, 64)


@pytest.mark.parametrize("cfg", [
    TINY,
    dataclasses.replace(TINY, pos_emb="learned", norm="layernorm", activation="gelu_tanh", bias=True,
                        tie_embeddings=True, n_kv_heads=None),
    dataclasses.replace(TINY, pos_emb="sinusoidal", norm_position="post", final_norm=False, n_kv_heads=1),
    dataclasses.replace(TINY, rope_layout="interleaved", qk_norm=True, attn_softcap=20.0, logit_softcap=5.0),
])
def test_cached_decode_equals_full_recompute(cfg):
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    full = model(ids)
    cache = KVCache.for_model(model, batch_size=2, max_len=16)
    parts = [model(ids[:, :7], cache=cache)] + [model(ids[:, t: t + 1], cache=cache) for t in range(7, 10)]
    parts.append(model(ids[:, 10:], cache=cache))  # a 2-token chunk after cached keys
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    if cfg.logit_softcap:
        assert full.abs().max() <= cfg.logit_softcap


def test_sdpa_and_math_paths_agree():
    a = Transformer(TINY).eval()
    b = Transformer(dataclasses.replace(TINY, attn_impl="math")).eval()
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 97, (3, 20))
    torch.testing.assert_close(a(ids), b(ids), rtol=1e-5, atol=1e-5)


def test_flops_per_token_matches_torch_flop_counter():
    cfg = dataclasses.replace(TINY, attn_impl="math", tie_embeddings=True)
    model = Transformer(cfg)
    B, T = 2, 10
    with FlopCounterMode(display=False) as fc:
        model(torch.randint(0, 97, (B, T)))
    assert fc.get_total_flops() == model.flops_per_token(T, training=False) * B * T
    assert model.flops_per_token(T) == 3 * model.flops_per_token(T, training=False)


def test_init_and_tying():
    cfg = dataclasses.replace(TINY, d_model=256, n_heads=4, n_kv_heads=None, n_layers=8, tie_embeddings=True)
    m = Transformer(cfg)
    assert m.lm_head.weight is m.tok_emb.weight
    assert m.blocks[0].attn.wq.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].attn.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # / sqrt(2·8)
    roles = m.param_roles()
    assert roles["tok_emb.weight"] == "embedding" and roles["blocks.0.norm1.weight"] == "vector"
    assert roles["blocks.0.mlp.up.weight"] == "matrix"


def test_positions_argument_shifts_rope():
    m = Transformer(TINY).eval()
    ids = torch.randint(0, 97, (1, 5))
    same = m(ids, positions=torch.arange(5))
    torch.testing.assert_close(same, m(ids))
    # RoPE is relative: shifting every position leaves the logits unchanged
    torch.testing.assert_close(m(ids, positions=torch.arange(100, 105)), same, rtol=1e-4, atol=1e-4)


def test_a_meta_build_fills_no_tensor(monkeypatch):
    """Every checkpoint save compares the model with a meta-device build; normal_ on meta tensors was most of
    that build's time (0.73 -> 0.19 s at 80 layers). A real build still initialises every matrix."""
    import torch.nn as nn

    from lmforge.model.config import ModelConfig

    calls = []
    real = nn.init.normal_
    def normal_(*a, **k):
        calls.append((a[0] if a else k["tensor"]).is_meta)
        return real(*a, **k)

    monkeypatch.setattr(nn.init, "normal_", normal_)
    cfg = ModelConfig.from_depth(2, vocab_size=64, max_seq_len=16)
    with torch.device("meta"):
        model = Transformer(cfg)
    calls.clear()  # (nn.Embedding's own constructor fills its weight)
    model.reset_parameters()
    assert calls == []
    Transformer(cfg)
    assert calls and not any(calls)


def test_transformer_has_its_own_docstring_whose_example_runs():
    """help(Transformer) showed its parent's text ("The front of the trunk..."): the class says what it is, and the
    two lines of its example that need no files run as written."""
    import lmforge.model.transformer as T

    doc = T.Transformer.__doc__
    assert doc and doc != T.TrunkFront.__doc__ and doc.startswith("The decoder-only LM")
    model = T.Transformer(T.ModelConfig.from_depth(2, vocab_size=257))
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 257)


def test_from_depth_refuses_a_depth_of_another_type_in_one_line():
    """from_depth("2") compared the string with 1 first: a bare TypeError, not the one-line error."""
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match="depth must be an int, got '2'"):
        ModelConfig.from_depth("2")
