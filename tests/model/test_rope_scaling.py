"""RoPE context extension: inverse frequencies and attention factors equal transformers' RoPE
initialisation functions for every kind; NTK-aware equals its closed form."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig, RopeScaling
from lmforge.model.layers.rope import RotaryEmbedding, scaled_inv_freq
from lmforge.model.transformer import Transformer

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HD, MAX = 64, 4096
CASES = {
    "linear": (dict(factor=4.0), RopeScaling(kind="linear", factor=4.0)),
    "llama3": (dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=512),
               RopeScaling(kind="llama3", factor=8.0, original_max_seq_len=512)),
    "yarn": (dict(factor=8.0, original_max_position_embeddings=512, beta_fast=32.0, beta_slow=1.0),
             RopeScaling(kind="yarn", factor=8.0, original_max_seq_len=512)),
    "yarn_untruncated": (dict(factor=8.0, original_max_position_embeddings=512, truncate=False),
                         RopeScaling(kind="yarn", factor=8.0, original_max_seq_len=512, yarn_truncate=False)),
    "yarn_deepseek": (dict(factor=40.0, original_max_position_embeddings=512, mscale=1.0, mscale_all_dim=0.8),
                      RopeScaling(kind="yarn", factor=40.0, original_max_seq_len=512, mscale=1.0, mscale_all_dim=0.8)),
}


def _hf(kind: str, params: dict, seq_len=None):
    rope_type = kind.split("_")[0]
    cfg = transformers.LlamaConfig(hidden_size=HD * 4, num_attention_heads=4, max_position_embeddings=MAX,
                                   rope_parameters=dict(rope_type=rope_type, rope_theta=10000.0, **params))
    inv, attn = ROPE_INIT_FUNCTIONS[rope_type](cfg, None, seq_len)
    return inv, float(attn)


@pytest.mark.parametrize("name", sorted(CASES))
def test_static_kinds_match_transformers(name):
    params, sc = CASES[name]
    want_inv, want_attn = _hf(name, params)
    inv, attn = scaled_inv_freq(HD, 10000.0, sc, MAX)
    torch.testing.assert_close(inv, want_inv, rtol=1e-6, atol=0)
    assert attn == pytest.approx(want_attn, rel=1e-9)


def test_yarn_ramp_interpolates_low_keeps_high_frequencies():
    _, sc = CASES["yarn"]
    inv, attn = scaled_inv_freq(HD, 10000.0, sc, MAX)
    base, _ = scaled_inv_freq(HD, 10000.0, None, MAX)
    assert inv[0] == base[0] and torch.allclose(inv[-1], base[-1] / 8)
    assert attn == pytest.approx(0.1 * math.log(8) + 1)


@pytest.mark.parametrize("seq_len", [100, 4096, 10000])
def test_dynamic_ntk_matches_transformers(seq_len):
    want_inv, _ = _hf("dynamic", dict(factor=4.0), seq_len)
    inv, _ = scaled_inv_freq(HD, 10000.0, RopeScaling(kind="dynamic", factor=4.0), MAX, seq_len)
    torch.testing.assert_close(inv, want_inv, rtol=1e-6, atol=0)
    rope = RotaryEmbedding(HD, 10000.0, scaling=RopeScaling(kind="dynamic", factor=4.0), max_seq_len=MAX)
    cos, _ = rope.cos_sin(torch.tensor([[seq_len - 1]]))
    torch.testing.assert_close(cos[0, 0], torch.cos((seq_len - 1) * want_inv), rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="original_max_seq_len is not used by kind='dynamic'"):
        RopeScaling(kind="dynamic", factor=4.0, original_max_seq_len=512)


@pytest.mark.parametrize("seq_len", [None, 513])
def test_longrope_short_long_switch_matches_transformers(seq_len):
    short, long = [1.0 + 0.1 * i for i in range(HD // 2)], [2.0 + 0.3 * i for i in range(HD // 2)]
    params = dict(short_factor=short, long_factor=long, original_max_position_embeddings=512)
    want_inv, want_attn = _hf("longrope", params, seq_len)  # no factor: transformers takes MAX / 512
    sc = RopeScaling(kind="longrope", factor=MAX / 512, original_max_seq_len=512, short_factor=tuple(short),
                     long_factor=tuple(long))
    inv, attn = scaled_inv_freq(HD, 10000.0, sc, MAX, seq_len)
    torch.testing.assert_close(inv, want_inv, rtol=1e-6, atol=0)
    assert attn == pytest.approx(want_attn) and attn == pytest.approx(math.sqrt(1 + math.log(8) / math.log(512)))


def test_ntk_aware_is_a_base_change():
    inv, attn = scaled_inv_freq(HD, 10000.0, RopeScaling(kind="ntk", factor=4.0), MAX)
    theta = 10000.0 * 4.0 ** (HD / (HD - 2))
    want = 1.0 / theta ** (torch.arange(0, HD, 2).double() / HD)
    torch.testing.assert_close(inv.double(), want, rtol=1e-6, atol=0)
    assert attn == 1.0 and torch.isclose(inv[0], torch.tensor(1.0))  # the highest frequency is untouched


def test_attention_factor_scales_cos_sin_in_the_model():
    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=1, n_heads=2, max_seq_len=64,
                      rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_max_seq_len=16))
    model = Transformer(cfg)
    cos, sin = model.rope.cos_sin(torch.arange(3)[None])
    assert model.rope.attention_scale == pytest.approx(0.1 * math.log(4) + 1)
    torch.testing.assert_close(cos[0, 0], torch.full((8,), model.rope.attention_scale))


def test_hf_config_rope_fields_old_and_new_format():
    from lmforge.model.hf_families import rope_from_hf, rope_to_hf

    old = {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    theta, sc = rope_from_hf(old)
    assert theta == 500000.0 and sc.kind == "llama3" and sc.factor == 8.0 and sc.original_max_seq_len == 8192
    new = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                               "original_max_position_embeddings": 32768}}
    theta, sc = rope_from_hf(new)
    cfg = ModelConfig(n_layers=1, rope_theta=theta, rope_scaling=sc)
    assert rope_to_hf(cfg)["rope_type"] == "yarn" and rope_to_hf(cfg)["factor"] == 4.0
    assert rope_from_hf({"rope_theta": 1e4}) == (1e4, None)
    with pytest.raises(Exception, match="rope_type='su'"):
        rope_from_hf({"rope_scaling": {"type": "su"}})



@pytest.mark.parametrize("scaling", [None, RopeScaling(kind="llama3", factor=4.0, original_max_seq_len=16),
                                     RopeScaling(kind="yarn", factor=4.0, original_max_seq_len=16),
                                     RopeScaling(kind="longrope", factor=4.0, original_max_seq_len=16,
                                                 short_factor=(1.0,) * 4, long_factor=(2.0,) * 4)])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_exported_config_says_its_rope_in_transformers_4s_fields_too(scaling, family):
    """transformers 4 reads rope_theta + rope_scaling and keeps rope_parameters unread: an export written in
    transformers 5's form alone loaded there as plain RoPE at theta 10000. Read through the old fields alone, the
    written config.json is the same model; LongRoPE's original context is at the top level, the only place
    transformers 4 reads it."""
    from lmforge.model.hf import config_from_hf, config_to_hf

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=64, rope_theta=50000.0,
                      rope_scaling=scaling, qk_norm=family == "qwen3")
    old = {k: v for k, v in config_to_hf(cfg, family).items() if k != "rope_parameters"}
    assert old["rope_theta"] == 50000.0
    back = config_from_hf(old)
    assert (back.rope_theta, back.rope_scaling) == (50000.0, scaling)
    if scaling is not None and scaling.kind == "longrope":
        assert old["original_max_position_embeddings"] == 16


def test_rope_scaling_beside_rope_parameters_wins_as_in_transformers_5():
    """A config.json with both tables (an lmforge export, its rope_scaling then edited, as docs/inference.md's YaRN
    recipe does): transformers 5 computes with rope_scaling, and lmforge read rope_parameters - other models."""
    from lmforge.model.hf_families import rope_from_hf

    d = {"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}, "rope_theta": 50000.0,
         "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    theirs = transformers.LlamaConfig(**d).rope_parameters
    assert (theirs["rope_type"], theirs["factor"], theirs["rope_theta"]) == ("linear", 2.0, 50000.0)
    theta, scaling = rope_from_hf(d)
    assert (theta, scaling.kind, scaling.factor) == (50000.0, "linear", 2.0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mixtral"])  # mixtral: a class default theta of 1e6
def test_rope_theta_is_transformers_in_every_combination_of_the_fields(family):
    """rope_theta as transformers 5's config classes read it, for every mix of a top-level rope_theta,
    rope_parameters (with or without its own) and rope_scaling (with or without its own): rope_scaling, where set,
    replaces rope_parameters whole, its theta its own, else the top-level one, else the class default. lmforge took
    rope_parameters' theta beside a rope_scaling (50000 where transformers computes with 10000: a config saved by
    transformers 5, rope_parameters only, to which rope_scaling was added)."""
    import itertools

    from lmforge.model.hf import config_from_hf

    core = dict(model_type=family, vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4)
    tops = [{}, {"rope_theta": 20000.0}]
    params = [{}, {"rope_parameters": {"rope_type": "default", "rope_theta": 50000.0}},
              {"rope_parameters": {"rope_type": "default"}},
              {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}}]
    scalings = [{}, {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
                {"rope_scaling": {"rope_type": "linear", "factor": 4.0, "rope_theta": 70000.0}}]
    cls = transformers.CONFIG_MAPPING[family]
    for top, param, scaling in itertools.product(tops, params, scalings):
        d = {**core, **top, **copy.deepcopy(param), **copy.deepcopy(scaling)}
        theirs = cls.from_dict(copy.deepcopy(d)).rope_parameters
        ours = config_from_hf(d)
        assert ours.rope_theta == theirs["rope_theta"], d
        assert (ours.rope_scaling.factor if ours.rope_scaling else None) == theirs.get("factor"), d


def test_a_null_rope_theta_is_refused_in_one_line():
    """(transformers keeps None and fails computing the frequencies; lmforge failed in float())"""
    from lmforge.model.hf_families import rope_from_hf

    with pytest.raises(ConfigError, match="rope_theta is None, not a positive number"):
        rope_from_hf({"rope_theta": None, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})


@pytest.mark.parametrize("scaling", [None, RopeScaling(kind="dynamic", factor=4.0)])
def test_every_buffer_is_written_after_to_empty_even_the_long_frequencies_only_longrope_reads(scaling):
    """inv_freq_long (LongRoPE's) was torch.empty for the other kinds and never written: leftover bits, at times a
    NaN, which torch.equal calls unequal to itself (a QLoRA test comparing every buffer failed 1 run in ~50). After
    reset_tables (construction, or to_empty()) it is inv_freq's copy."""
    rope = RotaryEmbedding(HD, 10000.0, scaling=scaling, max_seq_len=MAX)
    rope.inv_freq_long.fill_(float("nan"))
    rope.reset_tables()
    assert torch.equal(rope.inv_freq_long, rope.inv_freq)
    assert all(torch.isfinite(b).all() for b in rope.buffers())
