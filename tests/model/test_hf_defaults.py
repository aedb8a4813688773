"""A config.json that leaves a field out means what transformers' config class of that family fills in (Gemma 2's
soft-caps, Mixtral's rope_theta, DeepSeek-V3's routed_scaling_factor, gpt-oss's YaRN), not lmforge's generic
fallback: read otherwise, the logits differ silently (found 2026-12-06)."""

from __future__ import annotations

import pytest

from lmforge.model.hf import _math_view, config_from_hf

CORE = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
MINIMAL = {  # what each family's reader requires; everything else left to the defaults
    "llama": {}, "mistral": dict(num_key_value_heads=2), "gemma": dict(num_key_value_heads=2), "gemma2": {},
    # Qwen slides from max_window_layers (28 when left out) on: no layer of these two-layer models
    "qwen2": dict(num_key_value_heads=2, use_sliding_window=True),
    "qwen3": dict(num_key_value_heads=2, use_sliding_window=True),
    "mixtral": dict(num_local_experts=4, num_key_value_heads=2),
    "qwen2_moe": dict(num_experts=4, num_key_value_heads=2, use_sliding_window=True),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    "gpt_oss": dict(num_local_experts=4, num_key_value_heads=2),
    "deepseek_v2": dict(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=8,
                        num_experts_per_tok=2),
    "deepseek_v3": dict(kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=8,
                        num_experts_per_tok=2, moe_intermediate_size=8),
}


@pytest.mark.parametrize("family", sorted(MINIMAL))
def test_a_config_json_without_optional_fields_reads_as_transformers_fills_it(family):
    transformers = pytest.importorskip("transformers")
    d = dict(CORE, model_type=family, **MINIMAL[family])
    filled = transformers.AutoConfig.for_model(**d).to_dict()  # every field, the class's defaults included
    assert _math_view(config_from_hf(d)) == _math_view(config_from_hf(filled))


def test_family_defaults_that_change_the_logits():
    legacy = config_from_hf(dict(CORE, model_type="gemma", hidden_act="gelu", num_key_value_heads=1))
    assert (legacy.activation, legacy.tie_embeddings, legacy.hd) == ("geglu_tanh", True, 256)  # Gemma 1's tanh-GELU
    gemma = config_from_hf(dict(CORE, model_type="gemma2"))
    assert (gemma.attn_softcap, gemma.logit_softcap, gemma.activation, gemma.hd) == (50.0, 30.0, "geglu_tanh", 256)
    mixtral = config_from_hf(dict(CORE, model_type="mixtral", num_local_experts=4, num_key_value_heads=2))
    assert (mixtral.rope_theta, mixtral.norm_eps, mixtral.moe.top_k) == (1e6, 1e-5, 2)
    ds = config_from_hf(dict(CORE, model_type="deepseek_v3", **MINIMAL["deepseek_v3"], n_group=2, topk_group=1))
    assert (ds.moe.routed_scale, ds.moe.n_shared, ds.mla.q_lora_rank) == (2.5, 1, 1536)
    assert ds.moe.dense_layers == 2  # first_k_dense_replace=3 is past the last layer: all dense, as in transformers
    oss = config_from_hf(dict(CORE, model_type="gpt_oss", num_local_experts=4, num_key_value_heads=2))
    assert (oss.rope_theta, oss.rope_scaling.kind, oss.rope_scaling.factor, oss.sliding_window) == (150000.0, "yarn",
                                                                                                    32.0, 128)
    old_format = config_from_hf(dict(CORE, model_type="gpt_oss", num_local_experts=4, num_key_value_heads=2,
                                     rope_scaling=dict(rope_type="linear", factor=2.0)))
    assert old_format.rope_scaling.kind == "linear"  # the checkpoint's own RoPE replaces the default


def test_a_config_json_recognised_by_its_architectures_reads_as_that_family():
    """No model_type, architectures naming Mistral: its sliding window is read (it was dropped as no family's)."""
    cfg = config_from_hf(dict(CORE, architectures=["MistralForCausalLM"], num_key_value_heads=2, sliding_window=4))
    assert cfg.sliding_window == 4 and cfg.layer_type(0) == "sliding"


def test_per_layer_type_rope_parameters_are_refused():
    """transformers-5 nests rope_parameters by layer type (Gemma 3's local and global RoPE); read as one flat table,
    they were silently plain RoPE at theta 10000."""
    from lmforge.errors import ConfigError

    nested = {"full_attention": dict(rope_type="linear", factor=8.0, rope_theta=1e6),
              "sliding_attention": dict(rope_type="default", rope_theta=1e4)}
    with pytest.raises(ConfigError, match=r"one RoPE per layer type \(\['full_attention', 'sliding_attention'\]\)"):
        config_from_hf(dict(CORE, model_type="gemma2", rope_parameters=nested))


def test_fields_given_under_transformers_aliases_are_read():
    """transformers' attribute_map names: Mixtral's num_experts, DeepSeek-V3's num_local_experts / num_mtp_layers,
    GPT-2's hidden_size (a config.json giving them failed as 'lacks the field', or dropped the MTP layer)."""
    mixtral = config_from_hf(dict(CORE, model_type="mixtral", num_experts=4, num_key_value_heads=2))
    assert mixtral.moe.n_experts == 4
    ds = dict(CORE, model_type="deepseek_v3", **MINIMAL["deepseek_v3"], n_group=2, topk_group=1)
    ds.pop("n_routed_experts")
    v3 = config_from_hf(dict(ds, num_local_experts=6, num_mtp_layers=2))
    assert (v3.moe.n_experts, v3.mtp.depth) == (6, 2)
    gpt2 = config_from_hf(dict(model_type="gpt2", vocab_size=64, hidden_size=32, num_attention_heads=4,
                               num_hidden_layers=2, max_position_embeddings=16))
    assert (gpt2.d_model, gpt2.n_heads, gpt2.n_layers, gpt2.max_seq_len) == (32, 4, 2, 16)
    both = config_from_hf(dict(CORE, model_type="mixtral", num_experts=4, num_local_experts=8, num_key_value_heads=2))
    assert both.moe.n_experts == 8  # the field's own name wins
