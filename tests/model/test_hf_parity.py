"""HF checkpoint parity: a tiny random `transformers` model of each family, saved, loaded into lmforge,
gives the same fp32 logits (<= 1e-4); lmforge's export loads back into `transformers` with the same logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.model.transformer import Transformer  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_linear": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=2.0))),
    # biases on every projection (attention_bias: q, k, v, o; mlp_bias: gate, up, down)
    "llama_bias": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, attention_bias=True, mlp_bias=True)),
    # attention and MLP biases independently (model.qkv_bias and o_bias vs model.bias; refused before)
    "llama_attention_bias": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, attention_bias=True, mlp_bias=False)),
    "llama_mlp_bias": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, attention_bias=False, mlp_bias=True)),
    "qwen3_attention_bias": ("Qwen3Config", "Qwen3ForCausalLM", dict(COMMON, head_dim=16, attention_bias=True)),
    # a sliding_window field Llama does not read (transformers' Llama attends to everything)
    "llama_window_field": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, sliding_window=4)),
    "gpt2_gelu": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                        activation_function="gelu")),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(COMMON, sliding_window=4, head_dim=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(COMMON, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(COMMON, head_dim=16)),
    # Gemma (1): pre-norm blocks with (1 + w) gains, embeddings times sqrt(d_model), tanh-GELU, tied head
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(COMMON, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(COMMON, head_dim=8, sliding_window=4,
                                                        query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                                                        final_logit_softcapping=3.0)),
    # Gemma 2 with exact GELU (hidden_activation): exported with it (every Gemma 2 was written as tanh-GELU)
    "gemma2_gelu": ("Gemma2Config", "Gemma2ForCausalLM", dict(COMMON, head_dim=8, sliding_window=4,
                                                             hidden_activation="gelu", query_pre_attn_scalar=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(COMMON, num_local_experts=4, num_experts_per_tok=2)),
    # Qwen2-MoE: q/k/v biases, softmax top-k (not renormalised) beside a shared expert 2 experts wide whose output
    # a per-token sigmoid gate scales
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(COMMON, num_experts=4, num_experts_per_tok=2,
                                                              moe_intermediate_size=16,
                                                              shared_expert_intermediate_size=32)),
    # renormalised top-k, sliding windows on its even-indexed layers below max_window_layers
    "qwen2_moe_window": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        COMMON, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, norm_topk_prob=True, use_sliding_window=True, sliding_window=4,
        max_window_layers=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(COMMON, num_experts=4, num_experts_per_tok=2,
                                                              moe_intermediate_size=16, norm_topk_prob=False)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(**
        COMMON | dict(num_key_value_heads=4), n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1, n_group=4, topk_group=2,
        n_shared_experts=1, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0,
                                                 mscale_all_dim=0.707, original_max_position_embeddings=16))),
    # the latent norms' eps is fixed at 1e-6 in transformers, whatever rms_norm_eps says
    "deepseek_v3_eps": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(**
        COMMON | dict(num_key_value_heads=4), rms_norm_eps=1e-2, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=16, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, qk_nope_head_dim=8,
        v_head_dim=8, first_k_dense_replace=1, n_group=4, topk_group=2, n_shared_experts=1)),
    # an activation other than SiLU reaches the experts and the dense layers (it was read as SwiGLU whatever it said)
    "deepseek_v3_gelu": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(**
        COMMON | dict(num_key_value_heads=4), hidden_act="gelu_pytorch_tanh", n_routed_experts=4,
        num_experts_per_tok=1, moe_intermediate_size=8, kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4,
        qk_nope_head_dim=4, v_head_dim=4, first_k_dense_replace=1, n_group=2, topk_group=1, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=False)),
    # DeepSeek-V2: softmax routing, greedy top-k never renormalised, scaled by routed_scaling_factor; complex
    # (interleaved) RoPE with YaRN's softmax scale (V2-Lite: full-rank queries, q_lora_rank null)
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(**
        COMMON | dict(num_key_value_heads=4), n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
        first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=1.5, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=0.707,
            original_max_position_embeddings=16))),
    # group-limited routing (DeepSeek-V2 §2.1.3): the 2 of 4 groups with the best single expert, then the top 2
    "deepseek_v2_group_limited": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(**
        COMMON | dict(num_key_value_heads=4), n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
        kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, n_shared_experts=1,
        first_k_dense_replace=0, topk_method="group_limited_greedy", n_group=4, topk_group=2)),
    "deepseek_v2_q_lora": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(**
        COMMON | dict(num_key_value_heads=4), n_routed_experts=4, num_experts_per_tok=1, moe_intermediate_size=8,
        kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4, n_shared_experts=2,
        topk_method="group_limited_greedy", n_group=1, topk_group=1)),
    # no shared experts: transformers writes zero-width shared-expert tensors, which hold nothing to load
    "deepseek_v3_no_shared": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(**
        COMMON | dict(num_key_value_heads=4), n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
        n_group=1, topk_group=1, n_shared_experts=0)),
    # LongRoPE without a factor: transformers takes max_position_embeddings / original (here 4), and an export
    # must write it; an explicit factor of 1.0 stays 1.0 (attention factor 1)
    "llama_longrope": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.2, 1.5, 2.0], long_factor=[2.0, 3.0, 4.0, 5.0],
        original_max_position_embeddings=16))),
    "llama_longrope_factor_1": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, factor=1.0, short_factor=[1.0, 1.2, 1.5, 2.0],
        long_factor=[2.0, 3.0, 4.0, 5.0], original_max_position_embeddings=16))),
    # dynamic NTK scales past max_position_embeddings only: an original context (16) must not start it earlier
    "llama_dynamic_original": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0, original_max_position_embeddings=16))),
    # Qwen3-MoE slides on every layer when use_sliding_window, whatever max_window_layers says
    "qwen3_moe_window": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, use_sliding_window=True,
        sliding_window=4, max_window_layers=1)),
    # Mixtral has no layer_types: every layer slides
    "mixtral_layer_types": ("MixtralConfig", "MixtralForCausalLM", dict(
        COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])),
    # mscale_all_dim scales MLA's softmax under any RoPE scaling, not only YaRN
    "deepseek_v3_linear_mscale": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(**
        COMMON | dict(num_key_value_heads=4), n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        kv_lora_rank=8, q_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
        n_group=1, topk_group=1, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0,
                                                      mscale_all_dim=1.0))),
    # no sliding layer: the export must say so (a config.json without layer_types means alternating windows)
    "gemma2_no_window": ("Gemma2Config", "Gemma2ForCausalLM", dict(COMMON, head_dim=8, sliding_window=4,
                                                                  layer_types=["full_attention"] * 2)),
    "gpt_oss_no_window": ("GptOssConfig", "GptOssForCausalLM", dict(
        COMMON, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["full_attention"] * 2)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        COMMON, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4, rope_parameters=dict(
            rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=16))),
}
SEQ_LEN = {"llama_dynamic_original": 40}  # past the original context (16), within max_position_embeddings


def _hf_model(name: str):
    cfg_cls, model_cls, kw = FAMILIES[name]
    cfg = getattr(transformers, cfg_cls)(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():  # perturb everything (norm gains, biases, sinks, router biases) so no mapping hides
        for n, t in model.state_dict().items():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * (0.02 if t.dim() > 1 else 0.2))
    return model


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hf_round_trip(name, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 96, (2, SEQ_LEN.get(name, 12)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        ours = Transformer.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        got = ours(ids)
    assert (got - want).abs().max().item() <= 1e-4
    ours.fuse_projections()  # same function; export must still write the unfused HF names
    with torch.no_grad():
        assert (ours(ids) - want).abs().max().item() <= 1e-4
    ours.save_pretrained(tmp_path / "lm")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm", attn_implementation="eager")
    back = back.float().eval()
    with torch.no_grad():
        assert (back(ids).logits - want).abs().max().item() <= 1e-4
