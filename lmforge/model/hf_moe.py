"""HF mixture-of-experts families <-> ModelConfig and parameter names: Mixtral, Qwen2-MoE (a sigmoid-gated shared
expert), Qwen3-MoE,
DeepSeek-V3 (MLA + sigmoid group-limited routing + shared experts), DeepSeek-V2 (MLA + softmax greedy routing +
shared experts) and gpt-oss (sinks, alternating sliding windows, YaRN, fused biased experts). Companion of
hf_families.py."""

from __future__ import annotations

import dataclasses

import torch

from lmforge.errors import ConfigError
from lmforge.model.config import MLAConfig, ModelConfig, MoEConfig, MTPConfig
from lmforge.model.hf_families import (HF_ACT_OUT, Rule, attn_rules, dense_mlp_rules, embed_rules, expert_rules,
                                       hf_activation, llama_cfg, llama_cfg_to_hf, mla_rules, norm_rule, norm_rules, one,
                                       rope_fields, rope_from_hf)


def mixtral_cfg(d: dict) -> ModelConfig:
    moe = MoEConfig(n_experts=d["num_local_experts"], top_k=d["num_experts_per_tok"], d_expert=d["intermediate_size"],
                    norm_topk=True, aux_loss=0.0)
    return llama_cfg(d, mlp="moe", moe=moe)


def mixtral_cfg_to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe_cfg
    return {**llama_cfg_to_hf(cfg), "num_local_experts": m.n_experts, "num_experts_per_tok": m.top_k,
            "intermediate_size": m.d_expert or cfg.ff}


def mixtral_rules(cfg: ModelConfig) -> list[Rule]:
    rules = embed_rules(cfg)
    for i in range(cfg.n_layers):
        hf = f"model.layers.{i}.block_sparse_moe"
        rules += attn_rules(cfg, i) + norm_rules(cfg, i) + [one(f"{hf}.gate.weight", f"blocks.{i}.mlp.router.weight")]
        rules += expert_rules(cfg, hf, f"blocks.{i}.mlp", ("w1", "w3", "w2"))
    return rules


def _every_layer_moe(d: dict) -> None:
    if d.get("mlp_only_layers") or d.get("decoder_sparse_step", 1) != 1:
        raise ConfigError("config.json mlp_only_layers / decoder_sparse_step != 1 are not supported "
                          "(lmforge supports dense layers only as a prefix: model.moe.dense_layers)")


def qwen2_moe_cfg(d: dict) -> ModelConfig:
    """Qwen2's attention (q/k/v biases) with softmax top-k experts beside one shared expert, sized
    shared_expert_intermediate_size (n_shared = that / moe_intermediate_size) and gated per token by
    σ(shared_expert_gate(x))."""
    _every_layer_moe(d)
    d_expert, shared = d["moe_intermediate_size"], d["shared_expert_intermediate_size"]
    if shared <= 0 or shared % d_expert:
        raise ConfigError(f"config.json shared_expert_intermediate_size={shared} is not supported: lmforge's shared "
                          f"expert is a whole number of experts wide (moe_intermediate_size={d_expert})")
    moe = MoEConfig(n_experts=d["num_experts"], top_k=d["num_experts_per_tok"], d_expert=d_expert,
                    n_shared=shared // d_expert, shared_gate=True,
                    norm_topk=bool(d.get("norm_topk_prob", False)))
    return llama_cfg(d, mlp="moe", moe=moe, qkv_bias=bool(d.get("qkv_bias", True)), o_bias=False,
                     bias=False)


def qwen2_moe_cfg_to_hf(cfg: ModelConfig) -> dict:
    d = qwen3_moe_cfg_to_hf(cfg)
    return {**d, "shared_expert_intermediate_size": cfg.moe_cfg.n_shared * d["moe_intermediate_size"],
            "qkv_bias": bool(cfg.qkv_bias)}


def qwen2_moe_rules(cfg: ModelConfig) -> list[Rule]:
    rules = qwen3_moe_rules(cfg)
    for i in range(cfg.n_layers):
        hf, lm = f"model.layers.{i}.mlp", f"blocks.{i}.mlp"
        rules += dense_mlp_rules(f"{hf}.shared_expert", f"{lm}.shared")
        rules.append(one(f"{hf}.shared_expert_gate.weight", f"{lm}.shared.out_gate.weight"))
    return rules


def qwen3_moe_cfg(d: dict) -> ModelConfig:
    _every_layer_moe(d)
    moe = MoEConfig(n_experts=d["num_local_experts"], top_k=d["num_experts_per_tok"],
                    d_expert=d["moe_intermediate_size"],
                    norm_topk=bool(d.get("norm_topk_prob", False)))
    return llama_cfg(d, mlp="moe", moe=moe, qk_norm=True)


def qwen3_moe_cfg_to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe_cfg
    return {**llama_cfg_to_hf(cfg), "num_experts": m.n_experts, "num_experts_per_tok": m.top_k,
            "moe_intermediate_size": m.d_expert or cfg.ff, "norm_topk_prob": m.norm_topk,
            "decoder_sparse_step": 1, "mlp_only_layers": []}


def qwen3_moe_rules(cfg: ModelConfig) -> list[Rule]:
    rules = embed_rules(cfg)
    for i in range(cfg.n_layers):
        hf = f"model.layers.{i}.mlp"
        rules += attn_rules(cfg, i) + norm_rules(cfg, i) + [one(f"{hf}.gate.weight", f"blocks.{i}.mlp.router.weight")]
        rules += expert_rules(cfg, hf, f"blocks.{i}.mlp")
    return rules


# DeepSeek-V2 / V3 ---------------------------------------------------------------------------------
def _deepseek_cfg(d: dict, name: str, routing: dict, **extra) -> ModelConfig:
    """The DeepSeek-V2/V3 trunk: MLA, dense MLPs for the first first_k_dense_replace layers, then MoE layers of
    routed experts (routed by `routing`'s MoEConfig fields) beside shared ones."""
    if d.get("attention_bias"):
        raise ConfigError(f"config.json attention_bias=true is not supported for {name} (lmforge's MLA has none)")
    theta, scaling = rope_from_hf(d)
    mla = MLAConfig(kv_lora_rank=d["kv_lora_rank"], q_lora_rank=d.get("q_lora_rank") or 0,
                    qk_nope_head_dim=d["qk_nope_head_dim"], qk_rope_head_dim=d["qk_rope_head_dim"],
                    v_head_dim=d["v_head_dim"], norm_eps=1e-6)  # transformers' latent norms: eps fixed at 1e-6
    moe = MoEConfig(n_experts=d["n_routed_experts"], top_k=d["num_experts_per_tok"],
                    d_expert=d["moe_intermediate_size"], n_shared=d.get("n_shared_experts") or 0,
                    routed_scale=float(d.get("routed_scaling_factor", 1.0)),
                    # layers from first_k_dense_replace on are MoE: none when it is past the last one
                    dense_layers=min(d.get("first_k_dense_replace", 0), d["num_hidden_layers"]), **routing)
    return ModelConfig(vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=d["num_hidden_layers"],
                       n_heads=d["num_attention_heads"], head_dim=d["qk_nope_head_dim"] + d["qk_rope_head_dim"],
                       d_ff=d["intermediate_size"], max_seq_len=d["max_position_embeddings"],
                       rope_theta=theta, rope_scaling=scaling, norm_eps=d.get("rms_norm_eps", 1e-6),
                       activation=hf_activation(d), attention="mla", mla=mla, mlp="moe", moe=moe, bias=False,
                       qkv_bias=None, tie_embeddings=bool(d.get("tie_word_embeddings", False)),
                       scaled_residual_init=False, **extra)


def deepseek_v3_cfg(d: dict) -> ModelConfig:
    if d.get("topk_method", "noaux_tc") != "noaux_tc" or d.get("scoring_func", "sigmoid") != "sigmoid":
        raise ConfigError("config.json topk_method/scoring_func: only DeepSeek-V3's noaux_tc + sigmoid are supported")
    routing = dict(score="sigmoid", norm_topk=bool(d.get("norm_topk_prob", True)), n_groups=d.get("n_group") or 1,
                   topk_groups=d.get("topk_group") or 1)
    return _deepseek_cfg(d, "DeepSeek-V3", routing,
                         rope_layout="interleaved" if d.get("rope_interleave", True) else "half",
                         mtp=MTPConfig(depth=d["num_nextn_predict_layers"]) if d.get("num_nextn_predict_layers")
                         else None)


def deepseek_v2_cfg(d: dict) -> ModelConfig:
    """Softmax scores, the top k taken as they are (transformers' DeepseekV2TopkRouter: no renormalisation) and
    scaled by routed_scaling_factor; RoPE on interleaved pairs (its complex rotation). topk_method
    'group_limited_greedy' (DeepSeek-V2 §2.1.3, device-limited routing) keeps the topk_group of n_group expert
    groups with the best single expert score; 'greedy' routes over all experts, whatever n_group says."""
    method = d.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"config.json topk_method={method!r} is not supported for DeepSeek-V2; choose 'greedy' "
                          "or 'group_limited_greedy'")
    limited = method == "group_limited_greedy" and (d.get("n_group") or 1) > 1  # one group: greedy routing
    groups = dict(n_groups=d["n_group"], topk_groups=d.get("topk_group") or 1, group_score="max") if limited else {}
    if d.get("norm_topk_prob"):
        raise ConfigError("config.json norm_topk_prob=true is not supported for DeepSeek-V2: transformers' "
                          "DeepSeek-V2 never renormalises the top-k weights while DeepSeek's own code would")
    return _deepseek_cfg(d, "DeepSeek-V2", dict(score="softmax", norm_topk=False, **groups), rope_layout="interleaved")


def deepseek_v3_cfg_to_hf(cfg: ModelConfig) -> dict:
    m, a = cfg.moe_cfg, cfg.mla_cfg
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads, intermediate_size=cfg.ff,
                moe_intermediate_size=m.d_expert or cfg.ff, n_routed_experts=m.n_experts, num_experts_per_tok=m.top_k,
                n_shared_experts=m.n_shared, routed_scaling_factor=m.routed_scale, n_group=m.n_groups,
                topk_group=m.topk_groups, norm_topk_prob=m.norm_topk, first_k_dense_replace=m.dense_layers,
                kv_lora_rank=a.kv_lora_rank, q_lora_rank=a.q_lora_rank or None, qk_nope_head_dim=a.qk_nope_head_dim,
                qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim, head_dim=a.qk_rope_head_dim,
                rope_interleave=cfg.rope_layout == "interleaved", **rope_fields(cfg),
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, attention_bias=cfg.bias,
                tie_word_embeddings=cfg.tie_embeddings, hidden_act=HF_ACT_OUT.get(cfg.activation, cfg.activation),
                num_nextn_predict_layers=cfg.mtp.depth if cfg.mtp is not None else 0)


def deepseek_v2_cfg_to_hf(cfg: ModelConfig) -> dict:
    d = deepseek_v3_cfg_to_hf(cfg)
    for key in ("rope_interleave", "num_nextn_predict_layers"):  # V3's only
        d.pop(key)
    return {**d, "topk_method": "group_limited_greedy" if cfg.moe_cfg.n_groups > 1 else "greedy"}


def _deepseek_mtp_rules(cfg: ModelConfig) -> list[Rule]:
    """MTP module k is stored as model.layers.{n_layers + k}: a full decoder layer plus enorm, hnorm,
    eh_proj (input [emb; h], the reverse of our [h; emb] order: halves swapped) and shared_head.norm.
    Its embed_tokens / shared_head.head copies of the shared tensors are not read."""
    last = cfg.n_layers - 1
    layer = [r for r in deepseek_v3_rules(dataclasses.replace(cfg, mtp=None))
             if any(n.startswith(f"model.layers.{last}.") for n in r.hf)]
    d, rules = cfg.d_model, []
    swap = lambda t: torch.cat((t[:, d:], t[:, :d]), dim=1)  # noqa: E731
    for k in range(cfg.mtp.depth):
        hf, lm = f"model.layers.{cfg.n_layers + k}", f"mtp.modules_.{k}"
        rules += [Rule(tuple(n.replace(f"model.layers.{last}.", f"{hf}.") for n in r.hf),
                       tuple(n.replace(f"blocks.{last}.", f"{lm}.block.") for n in r.lm), r.to_lm, r.to_hf)
                  for r in layer]
        rules += [one(f"{hf}.enorm.weight", f"{lm}.e_norm.weight"), one(f"{hf}.hnorm.weight", f"{lm}.h_norm.weight"),
                  one(f"{hf}.eh_proj.weight", f"{lm}.proj.weight", swap, swap),
                  norm_rule(f"{hf}.shared_head.norm.weight", f"mtp.norms.{k}.weight", cfg)]
    return rules


def deepseek_v2_rules(cfg: ModelConfig) -> list[Rule]:
    """DeepSeek-V3's names without the routing bias (V2 balances with auxiliary losses only)."""
    return [r for r in deepseek_v3_rules(cfg) if not r.hf[0].endswith(".gate.e_score_correction_bias")]


def deepseek_v3_rules(cfg: ModelConfig) -> list[Rule]:
    rules = embed_rules(cfg)
    rules += _deepseek_mtp_rules(cfg) if cfg.mtp is not None else []
    for i in range(cfg.n_layers):
        hf, lm = f"model.layers.{i}.mlp", f"blocks.{i}.mlp"
        rules += mla_rules(cfg, i) + norm_rules(cfg, i)
        if not cfg.is_moe_layer(i):
            rules += dense_mlp_rules(hf, lm)
            continue
        rules += [one(f"{hf}.gate.weight", f"{lm}.router.weight"),
                  one(f"{hf}.gate.e_score_correction_bias", f"{lm}.e_bias")]
        rules += expert_rules(cfg, hf, lm)
        if cfg.moe_cfg.n_shared:
            rules += dense_mlp_rules(f"{hf}.shared_experts", f"{lm}.shared")
    return rules


# gpt-oss ------------------------------------------------------------------------------------------
def gpt_oss_cfg(d: dict) -> ModelConfig:
    for key, value in (("swiglu_limit", 7.0), ("swiglu_alpha", 1.702)):  # lmforge's swiglu_oss has them fixed
        if key in d and d[key] is not None and abs(float(d[key]) - value) > 1e-9:
            raise ConfigError(f"config.json {key}={d[key]} is not supported: gpt-oss's clamped SwiGLU is "
                              f"implemented with {key}={value}")
    moe = MoEConfig(n_experts=d["num_local_experts"], top_k=d.get("num_experts_per_tok", 4),
                    d_expert=d["intermediate_size"], norm_topk=True, router_bias=True, expert_bias=True)
    if not (d.get("rope_parameters") or d.get("rope_scaling")):  # GptOssConfig's default RoPE: YaRN x32
        d = {**d, "rope_parameters": dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                                          original_max_position_embeddings=4096)}
    return llama_cfg(d, mlp="moe", moe=moe, activation="swiglu_oss", attn_sinks=True,
                     qkv_bias=bool(d.get("attention_bias", True)), bias=bool(d.get("attention_bias", True)))


def gpt_oss_cfg_to_hf(cfg: ModelConfig) -> dict:
    m = cfg.moe_cfg
    d = llama_cfg_to_hf(cfg, "gpt_oss")
    d.pop("hidden_act")
    return {**d, "num_local_experts": m.n_experts, "num_experts_per_tok": m.top_k,
            "intermediate_size": m.d_expert or cfg.ff, "attention_bias": cfg.bias, "swiglu_limit": 7.0}


def gpt_oss_rules(cfg: ModelConfig) -> list[Rule]:
    """Experts are fused: gate_up_proj (E, d, 2·ff) with gate/up interleaved on the last dim, down_proj (E, ff, d)."""
    rules = embed_rules(cfg)
    for i in range(cfg.n_layers):
        hf, lm = f"model.layers.{i}.mlp", f"blocks.{i}.mlp"
        rules += attn_rules(cfg, i) + norm_rules(cfg, i)
        rules += [one(f"{hf}.router.weight", f"{lm}.router.weight"), one(f"{hf}.router.bias", f"{lm}.router.bias"),
                  Rule((f"{hf}.experts.gate_up_proj",), (f"{lm}.experts.w_gate", f"{lm}.experts.w_up"),
                       lambda t: [t[0][..., 0::2].transpose(1, 2).contiguous(),
                                  t[0][..., 1::2].transpose(1, 2).contiguous()],
                       lambda t: [torch.stack((t[0], t[1]), dim=2).flatten(1, 2).transpose(1, 2).contiguous()]),
                  Rule((f"{hf}.experts.gate_up_proj_bias",), (f"{lm}.experts.b_gate", f"{lm}.experts.b_up"),
                       lambda t: [t[0][..., 0::2].contiguous(), t[0][..., 1::2].contiguous()],
                       lambda t: [torch.stack((t[0], t[1]), dim=-1).flatten(-2)]),
                  one(f"{hf}.experts.down_proj", f"{lm}.experts.w_down", lambda t: t.transpose(1, 2).contiguous(),
                      lambda t: t.transpose(1, 2).contiguous()),
                  one(f"{hf}.experts.down_proj_bias", f"{lm}.experts.b_down")]
    return rules
