"""HF `transformers` model families <-> ModelConfig and parameter names (used by lmforge.model.hf).

Each family gives: cfg_from_hf(config.json dict) -> ModelConfig, cfg_to_hf(ModelConfig) -> dict, and
rules(cfg) -> [Rule]: which HF tensors make which lmforge tensors, with the conversion both ways
(transposes of GPT-2's Conv1D, fused q|k|v or gate|up, norm gains between offsets, stacked experts).
An lmforge name 'x#e' is slice e (dim 0) of a stacked parameter 'x'. The families here load into lmforge's
Transformer; a family of another model class (a Mamba) sets ModelConfig.arch to that class's registered name
(lmforge.model.registry), and the loader builds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig, RopeScaling

Fn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def _same(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return ts


@dataclass
class Rule:
    hf: tuple[str, ...]
    lm: tuple[str, ...]
    to_lm: Fn = _same
    to_hf: Fn = _same

    @property
    def plain(self) -> bool:
        """One whole tensor each way, stored as it is (no transpose, split, stacking or offset)."""
        return len(self.hf) == len(self.lm) == 1 and "#" not in self.lm[0] and self.to_hf is _same


def one(hf: str, lm: str, to_lm: Callable = None, to_hf: Callable = None) -> Rule:
    return Rule((hf,), (lm,), (lambda t: [to_lm(t[0])]) if to_lm else _same,
                (lambda t: [to_hf(t[0])]) if to_hf else _same)


def linear(hf: str, lm: str, bias: bool) -> list[Rule]:
    return [one(f"{hf}.weight", f"{lm}.weight")] + ([one(f"{hf}.bias", f"{lm}.bias")] if bias else [])


# ---------------------------------------------------------------------------------------------------
# config helpers
LAYER_TYPE = {"sliding_attention": "sliding", "full_attention": "full"}
# Llama-like MLPs are gated (act(gate) * up); GPT-2's is not. gelu_new is the tanh approximation.
HF_ACT = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu_tanh", "gelu": "geglu", "gelu_new": "geglu_tanh"}
HF_ACT_OUT = {"swiglu": "silu", "geglu_tanh": "gelu_pytorch_tanh", "geglu": "gelu"}
GPT2_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu", "silu": "silu"}
GPT2_ACT_OUT = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}
# families whose transformers class reads sliding_window (a Llama config.json may carry the field unused)
SLIDING = ("mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma2", "gpt_oss")
# families whose attention slides on every layer or none (no layer_types); an export with mixed types is refused
UNIFORM_WINDOW = ("mixtral", "qwen3_moe")
# families whose transformers classes read attention_bias (q/k/v/o biases) and mlp_bias (gate/up/down biases)
ATTENTION_BIAS = ("llama", "qwen3", "gemma", "gemma2", "qwen3_moe", "gpt_oss")
MLP_BIAS = ("llama",)
# families that read a config.json without layer_types as alternating windows, and need a sliding_window to run
ALTERNATING_DEFAULT = ("gemma2", "gpt_oss")
# transformers' config-class defaults, per family, of the fields that lmforge would otherwise fill with a generic
# fallback: a config.json that leaves one out means the family's value (a Gemma 2 config.json without
# attn_logit_softcapping soft-caps at 50 in transformers; a DeepSeek-V3 one without routed_scaling_factor scales by
# 2.5). Qwen's sliding_window applies only with use_sliding_window; Mixtral's is None. with_family_defaults merges
# them under a config.json.
FAMILY_DEFAULTS: dict[str, dict] = {
    "mistral": dict(max_position_embeddings=131072, num_key_value_heads=8, sliding_window=4096),
    "qwen2": dict(max_position_embeddings=32768, num_key_value_heads=32, sliding_window=4096, max_window_layers=28),
    "qwen3": dict(max_position_embeddings=32768, num_key_value_heads=32, head_dim=128, sliding_window=4096,
                  max_window_layers=28),
    "gemma": dict(max_position_embeddings=8192, num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh",
                  tie_word_embeddings=True),
    "gemma2": dict(max_position_embeddings=8192, num_key_value_heads=4, head_dim=256, sliding_window=4096,
                   hidden_activation="gelu_pytorch_tanh", attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "mixtral": dict(max_position_embeddings=131072, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1e6,
                    num_experts_per_tok=2),
    "qwen2_moe": dict(max_position_embeddings=32768, num_key_value_heads=16, sliding_window=4096,
                      max_window_layers=28, num_experts_per_tok=4, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=5632),
    "qwen3_moe": dict(max_position_embeddings=32768, num_key_value_heads=4, sliding_window=4096,
                      num_experts_per_tok=8, moe_intermediate_size=768),
    "deepseek_v2": dict(max_position_embeddings=2048, q_lora_rank=1536, moe_intermediate_size=1407,
                        n_shared_experts=2),
    "deepseek_v3": dict(max_position_embeddings=4096, q_lora_rank=1536, moe_intermediate_size=2048,
                        num_experts_per_tok=8, n_shared_experts=1, routed_scaling_factor=2.5, n_group=8,
                        topk_group=4, first_k_dense_replace=3, num_nextn_predict_layers=1),
    "gpt_oss": dict(max_position_embeddings=131072, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                    rope_theta=150000.0, sliding_window=128, attention_bias=True),
}

# transformers' config-class bos_token_id per family (None elsewhere): what a config.json that leaves it out means
FAMILY_BOS = {"gpt2": 50256, "llama": 1, "mistral": 1, "mixtral": 1, "gemma": 2, "gemma2": 2, "deepseek_v2": 1,
              "deepseek_v3": 0}


# transformers' attribute_map per family: the other names a config.json may give a field (alias -> field)
FAMILY_ALIASES: dict[str, dict[str, str]] = {
    "gpt2": dict(hidden_size="n_embd", max_position_embeddings="n_positions", num_attention_heads="n_head",
                 num_hidden_layers="n_layer"),
    "mixtral": dict(num_experts="num_local_experts"), "qwen3_moe": dict(num_experts="num_local_experts"),
    "gpt_oss": dict(num_experts="num_local_experts"), "deepseek_v2": dict(num_experts="n_routed_experts"),
    "deepseek_v3": dict(num_local_experts="n_routed_experts", num_mtp_layers="num_nextn_predict_layers"),
}


def with_family_defaults(d: dict, family: str) -> dict:
    """config.json `d` of `family` read as transformers reads it: fields given under an alias (FAMILY_ALIASES)
    renamed (the field's own name wins), the family's defaults (FAMILY_DEFAULTS) under them, its model_type set
    (a config.json recognised by its `architectures` alone reads as that family's)."""
    aliases = FAMILY_ALIASES.get(family, {})
    renamed = {aliases[k]: v for k, v in d.items() if k in aliases}
    return {**FAMILY_DEFAULTS.get(family, {}), **renamed, **{k: v for k, v in d.items() if k not in aliases},
            "model_type": family}


def rope_from_hf(d: dict, default_theta: float = 10000.0, default_max_len: int = 2048
                 ) -> tuple[float, RopeScaling | None]:
    """Read transformers-5 `rope_parameters` or the older `rope_theta` + `rope_scaling` fields; where a config
    holds both (an lmforge export writes both: rope_fields), `rope_scaling` wins, as in transformers 5
    (PreTrainedConfig.convert_rope_params_to_dict), whole: its theta is its own `rope_theta`, else the top-level
    one (an export writes it), else the family's default, never `rope_parameters`'s. A YaRN or LongRoPE factor
    left out is max_position_embeddings / original context (Phi-3), resolved here so that an export writes it (an
    explicit factor, 1.0 included, is kept as it is, as transformers does)."""
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    rp = dict(d.get("rope_scaling") or params)
    rp.setdefault("rope_theta", d.get("rope_theta", default_theta))
    nested = sorted(k for k, v in rp.items() if isinstance(v, dict))
    if nested:  # transformers-5's per-layer-type RoPE (Gemma 3): read flat, it would be plain RoPE at theta 10000
        raise ConfigError(f"config.json rope_parameters holds one RoPE per layer type ({nested}), which lmforge does "
                          "not support: every layer shares one RoPE")
    theta = rp["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ConfigError(f"config.json rope_theta is {theta!r}, not a positive number; set it to the model's RoPE "
                          "base (e.g. 10000.0), at the top level or in rope_parameters")
    theta = float(theta)
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind == "default":
        return theta, None
    names = {"linear": "linear", "dynamic": "dynamic", "yarn": "yarn", "longrope": "longrope", "llama3": "llama3"}
    if kind not in names:
        raise ConfigError(f"config.json rope_parameters.rope_type={kind!r} is not supported; "
                          f"supported: {sorted(names)}")
    max_len = d.get("max_position_embeddings") or default_max_len
    orig, factor = rp.get("original_max_position_embeddings"), rp.get("factor")
    if kind in ("yarn", "llama3", "longrope") and d.get("original_max_position_embeddings") is not None:
        orig = d["original_max_position_embeddings"]  # a top-level one (Phi-3) wins, as in transformers
    if factor is None and kind in ("yarn", "longrope"):
        factor = max_len / (orig or max_len)
    # dynamic NTK scales from max_position_embeddings alone: transformers ignores an original context there
    kw = dict(kind=names[kind], factor=float(factor or 1.0), original_max_seq_len=None if kind == "dynamic" else orig)
    for hf_key, key in (("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"), ("mscale", "mscale"),
                        ("mscale_all_dim", "mscale_all_dim"), ("attention_factor", "attention_factor"),
                        ("low_freq_factor", "low_freq_factor"), ("high_freq_factor", "high_freq_factor")):
        if rp.get(hf_key) is not None:
            kw[key] = float(rp[hf_key])
    if "truncate" in rp:
        kw["yarn_truncate"] = bool(rp["truncate"])
    for key in ("short_factor", "long_factor"):
        if rp.get(key) is not None:
            kw[key] = tuple(float(v) for v in rp[key])
    return theta, RopeScaling(**kw)


def rope_to_hf(cfg: ModelConfig) -> dict:
    rp: dict = {"rope_theta": cfg.rope_theta, "rope_type": "default"}
    sc = cfg.rope_scaling
    if sc is None:
        return rp
    rp.update(rope_type=sc.kind, factor=sc.factor)
    if sc.original_max_seq_len is not None:
        rp["original_max_position_embeddings"] = sc.original_max_seq_len
    if sc.kind == "yarn":
        rp.update(beta_fast=sc.beta_fast, beta_slow=sc.beta_slow, truncate=sc.yarn_truncate)
    for key in ("mscale", "mscale_all_dim"):  # mscale_all_dim scales MLA's softmax under any scaling kind
        if getattr(sc, key):
            rp[key] = getattr(sc, key)
    if sc.kind == "llama3":
        rp.update(low_freq_factor=sc.low_freq_factor, high_freq_factor=sc.high_freq_factor)
    if sc.kind == "longrope":
        rp.update(short_factor=list(sc.short_factor), long_factor=list(sc.long_factor))
    if sc.attention_factor is not None:
        rp["attention_factor"] = sc.attention_factor
    return rp


def rope_fields(cfg: ModelConfig) -> dict:
    """config.json's RoPE fields in both of transformers' forms: transformers 5's `rope_parameters` and the
    `rope_theta` + `rope_scaling` that transformers 4 reads (it keeps `rope_parameters` as an unread attribute:
    an export written in that form alone loads there as plain RoPE at theta 10000, a silently different model).
    transformers 5 reads `rope_scaling` first, the same table, its theta from `rope_theta`. LongRoPE's original
    context goes at the top level too, the only place transformers 4 reads it (Phi-3's layout; without it, it
    picks the short or long factors against max_position_embeddings)."""
    rp, sc = rope_to_hf(cfg), cfg.rope_scaling
    scaling = {k: v for k, v in rp.items() if k != "rope_theta"} if sc is not None else None
    top = {"original_max_position_embeddings": sc.original_max_seq_len} \
        if sc is not None and sc.kind == "longrope" and sc.original_max_seq_len is not None else {}
    return {"rope_parameters": rp, "rope_theta": cfg.rope_theta, "rope_scaling": scaling, **top}


def hf_activation(d: dict, key: str = "hidden_act", table: dict = HF_ACT, default: str = "silu") -> str:
    act = d.get(key, default)
    if act not in table:
        raise ConfigError(f"config.json {key}={act!r} is not supported; supported: {sorted(table)}")
    return table[act]


def _layer_types(d: dict, n_layers: int) -> tuple[int, tuple[str, ...] | None]:
    """(sliding_window, layer_types) as transformers fills them: explicit `layer_types`, else the family's
    default pattern (Gemma 2 / gpt-oss alternate from a sliding first layer; Qwen2 slides from
    max_window_layers on, Qwen2-MoE on its even-indexed layers below it; Mistral slides everywhere; a Mistral
    config.json with layer_types is read by AutoConfig as Ministral's, which follows them). Mixtral and
    Qwen3-MoE have no per-layer types: every layer slides (Qwen3-MoE only with use_sliding_window), whatever
    layer_types or max_window_layers say."""
    fam = d.get("model_type")
    window = (d.get("sliding_window") or 0) if fam in SLIDING else 0
    if fam in ("qwen2_moe", "qwen3_moe") and not d.get("use_sliding_window", False):
        window = 0  # their config classes drop the window
    if fam in UNIFORM_WINDOW:
        return int(window), None
    types = d.get("layer_types")
    if types is None and fam in ALTERNATING_DEFAULT:
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    if types is None and fam in ("qwen2", "qwen3"):
        use = d.get("use_sliding_window", False)
        types = ["sliding_attention" if use and i >= d["max_window_layers"] else "full_attention"
                 for i in range(n_layers)]
    if types is None and fam == "qwen2_moe":
        types = ["sliding_attention" if (i + 1) % 2 and i < d["max_window_layers"] else "full_attention"
                 for i in range(n_layers)]
    if types is None:
        return int(window), None
    types = tuple(LAYER_TYPE.get(t, t) for t in types)
    if not window or "sliding" not in types:
        return 0, None
    return int(window), types


def llama_cfg(d: dict, **extra) -> ModelConfig:
    """The Llama-like core shared by Llama, Mistral, Qwen2/3, Gemma 1/2, Mixtral, Qwen2/3-MoE, gpt-oss."""
    theta, scaling = rope_from_hf(d)
    window, types = _layer_types(d, d["num_hidden_layers"])
    # transformers' attention_bias puts biases on q, k, v and o (qkv_bias, o_bias), Llama's mlp_bias on gate, up
    # and down (bias); the families whose classes read no such field have none (Qwen2 sets its own in `extra`)
    fam = d.get("model_type")
    attn_bias = bool(d.get("attention_bias", False)) and fam in ATTENTION_BIAS
    mlp_bias = bool(d.get("mlp_bias", False)) and fam in MLP_BIAS
    kw = dict(vocab_size=d["vocab_size"], d_model=d["hidden_size"], n_layers=d["num_hidden_layers"],
              n_heads=d["num_attention_heads"], n_kv_heads=d.get("num_key_value_heads"),
              head_dim=d.get("head_dim"), d_ff=d.get("intermediate_size"),
              max_seq_len=d.get("max_position_embeddings", 2048), pos_emb="rope", rope_theta=theta,
              rope_scaling=scaling, norm="rmsnorm", norm_eps=d.get("rms_norm_eps", 1e-6),
              activation=hf_activation(d), tie_embeddings=bool(d.get("tie_word_embeddings", False)),
              bias=mlp_bias, qkv_bias=attn_bias, o_bias=attn_bias,
              sliding_window=window, layer_types=types, scaled_residual_init=False,
              init_std=d.get("initializer_range", 0.02))
    kw.update(extra)
    return ModelConfig(**kw)


def llama_cfg_to_hf(cfg: ModelConfig, family: str = "llama") -> dict:
    d = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
             num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads, head_dim=cfg.hd,
             intermediate_size=cfg.ff, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
             **rope_fields(cfg), tie_word_embeddings=cfg.tie_embeddings,
             attention_bias=cfg.has_qkv_bias, mlp_bias=cfg.bias,
             hidden_act=HF_ACT_OUT.get(cfg.activation, cfg.activation), initializer_range=cfg.init_std)
    if cfg.sliding_window:
        types = [cfg.layer_type(i) for i in range(cfg.n_layers)]
        d.update(sliding_window=cfg.sliding_window, layer_types=[f"{t}_attention" for t in types],
                 use_sliding_window=True, max_window_layers=0)  # the last two for Qwen2-style configs
    elif family in ALTERNATING_DEFAULT:  # every layer full, said explicitly; the window is a placeholder none uses
        d.update(sliding_window=cfg.max_seq_len, layer_types=["full_attention"] * cfg.n_layers)
    else:
        d["sliding_window"] = None
    return d


# ---------------------------------------------------------------------------------------------------
# parameter-name rules
def norm_rule(hf: str, lm: str, cfg: ModelConfig, hf_offset: float = 0.0) -> Rule:
    """A trunk norm's gain, hf_offset + w_hf in the family (Gemma's 1 + w) and cfg.norm_offset + w in lmforge
    (a model loaded from the family keeps its offset: the weights cross as they are; another one, as an lmforge
    Gemma checkpoint written before norm_offset with gains 1 + w stored whole, shifts by the difference)."""
    shift = hf_offset - cfg.norm_offset
    return one(hf, lm, lambda t: t + shift, lambda t: t - shift) if shift else one(hf, lm)


def embed_rules(cfg: ModelConfig, prefix: str = "model.", hf_norm_offset: float = 0.0) -> list[Rule]:
    rules = [one(f"{prefix}embed_tokens.weight", "tok_emb.weight"),
             norm_rule(f"{prefix}norm.weight", "final_norm.weight", cfg, hf_norm_offset)]
    if not cfg.tie_embeddings:
        rules.append(one("lm_head.weight", "lm_head.weight"))
    return rules


def attn_rules(cfg: ModelConfig, i: int) -> list[Rule]:
    hf, lm = f"model.layers.{i}.self_attn", f"blocks.{i}.attn"
    rules = []
    for h, l in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv")):
        rules += linear(f"{hf}.{h}", f"{lm}.{l}", cfg.has_qkv_bias)
    rules += linear(f"{hf}.o_proj", f"{lm}.wo", cfg.has_o_bias)
    if cfg.qk_norm:
        rules += [one(f"{hf}.q_norm.weight", f"{lm}.q_norm.weight"), one(f"{hf}.k_norm.weight", f"{lm}.k_norm.weight")]
    if cfg.attn_sinks:
        rules.append(one(f"{hf}.sinks", f"{lm}.sinks"))
    return rules


def mla_rules(cfg: ModelConfig, i: int) -> list[Rule]:
    hf, lm = f"model.layers.{i}.self_attn", f"blocks.{i}.attn"
    if cfg.mla_cfg.q_lora_rank > 0:
        rules = [one(f"{hf}.q_a_proj.weight", f"{lm}.wq_a.weight"), one(f"{hf}.q_b_proj.weight", f"{lm}.wq_b.weight"),
                 one(f"{hf}.q_a_layernorm.weight", f"{lm}.q_norm.weight")]
    else:
        rules = [one(f"{hf}.q_proj.weight", f"{lm}.wq.weight")]
    return rules + [one(f"{hf}.kv_a_proj_with_mqa.weight", f"{lm}.wkv_a.weight"),
                    one(f"{hf}.kv_a_layernorm.weight", f"{lm}.kv_norm.weight"),
                    one(f"{hf}.kv_b_proj.weight", f"{lm}.wkv_b.weight"),
                    one(f"{hf}.o_proj.weight", f"{lm}.wo.weight")]


def dense_mlp_rules(hf: str, lm: str, bias: bool = False) -> list[Rule]:
    return (linear(f"{hf}.gate_proj", f"{lm}.gate", bias) + linear(f"{hf}.up_proj", f"{lm}.up", bias)
            + linear(f"{hf}.down_proj", f"{lm}.down", bias))


def expert_rules(cfg: ModelConfig, hf: str, lm: str, names=("gate_proj", "up_proj", "down_proj")) -> list[Rule]:
    rules = []
    for e in range(cfg.moe_cfg.n_experts):
        for h, l in zip(names, ("w_gate", "w_up", "w_down")):
            rules.append(one(f"{hf}.experts.{e}.{h}.weight", f"{lm}.experts.{l}#{e}"))
    return rules


def norm_rules(cfg: ModelConfig, i: int, hf_offset: float = 0.0) -> list[Rule]:
    hf, lm = f"model.layers.{i}", f"blocks.{i}"
    pairs = [("input_layernorm", "norm1")]
    if cfg.norm_position == "sandwich":
        pairs += [("post_attention_layernorm", "post_attn_norm"), ("pre_feedforward_layernorm", "norm2"),
                  ("post_feedforward_layernorm", "post_mlp_norm")]
    else:
        pairs += [("post_attention_layernorm", "norm2")]
    return [norm_rule(f"{hf}.{h}.weight", f"{lm}.{l}.weight", cfg, hf_offset) for h, l in pairs]


def llama_rules(cfg: ModelConfig, hf_norm_offset: float = 0.0) -> list[Rule]:
    """Llama's names; hf_norm_offset = 1 for Gemma's (1 + w) norm gains."""
    rules = embed_rules(cfg, hf_norm_offset=hf_norm_offset)
    for i in range(cfg.n_layers):
        rules += attn_rules(cfg, i) + norm_rules(cfg, i, hf_norm_offset)
        rules += dense_mlp_rules(f"model.layers.{i}.mlp", f"blocks.{i}.mlp", cfg.bias)
    return rules


# ---------------------------------------------------------------------------------------------------
# GPT-2: Conv1D weights are stored (in, out); c_attn fuses q|k|v
def gpt2_cfg(d: dict) -> ModelConfig:
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if d.get(flag):
            raise ConfigError(f"config.json {flag}=true is not supported for GPT-2")
    if d.get("scale_attn_weights") is False:
        raise ConfigError("config.json scale_attn_weights=false is not supported for GPT-2")
    return ModelConfig(vocab_size=d["vocab_size"], d_model=d["n_embd"], n_layers=d["n_layer"], n_heads=d["n_head"],
                       d_ff=d.get("n_inner"), max_seq_len=d.get("n_positions", 1024), pos_emb="learned",
                       norm="layernorm", norm_eps=d.get("layer_norm_epsilon", 1e-5),
                       activation=hf_activation(d, "activation_function", GPT2_ACT, "gelu_new"), bias=True,
                       tie_embeddings=bool(d.get("tie_word_embeddings", True)),
                       init_std=d.get("initializer_range", 0.02))


def gpt2_cfg_to_hf(cfg: ModelConfig) -> dict:
    return dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                n_inner=cfg.ff, n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                activation_function=GPT2_ACT_OUT.get(cfg.activation, cfg.activation),
                tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std)


def gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    d = cfg.d_model
    T = lambda t: t.t().contiguous()  # noqa: E731  Conv1D (in, out) <-> Linear (out, in)
    rules = [one("transformer.wte.weight", "tok_emb.weight"), one("transformer.wpe.weight", "pos_emb.weight"),
             one("transformer.ln_f.weight", "final_norm.weight"), one("transformer.ln_f.bias", "final_norm.bias")]
    if not cfg.tie_embeddings:
        rules.append(one("lm_head.weight", "lm_head.weight"))
    for i in range(cfg.n_layers):
        hf, lm = f"transformer.h.{i}", f"blocks.{i}"
        qkv = tuple(f"{lm}.attn.{w}" for w in ("wq", "wk", "wv"))
        rules += [Rule((f"{hf}.attn.c_attn.weight",), tuple(f"{n}.weight" for n in qkv),
                       lambda t: [w.t().contiguous() for w in t[0].split(d, dim=1)],
                       lambda t: [torch.cat([w.t() for w in t], dim=1)]),
                  Rule((f"{hf}.attn.c_attn.bias",), tuple(f"{n}.bias" for n in qkv),
                       lambda t: list(t[0].split(d)), lambda t: [torch.cat(t)])]
        for h, l in (("attn.c_proj", "attn.wo"), ("mlp.c_fc", "mlp.up"), ("mlp.c_proj", "mlp.down")):
            rules += [one(f"{hf}.{h}.weight", f"{lm}.{l}.weight", T, T), one(f"{hf}.{h}.bias", f"{lm}.{l}.bias")]
        for h, l in (("ln_1", "norm1"), ("ln_2", "norm2")):
            rules += [one(f"{hf}.{h}.weight", f"{lm}.{l}.weight"), one(f"{hf}.{h}.bias", f"{lm}.{l}.bias")]
    return rules


# ---------------------------------------------------------------------------------------------------
def gemma_cfg(d: dict) -> ModelConfig:
    """Gemma (1): Llama's pre-norm blocks with Gemma's (1 + w) norm gains (norm_offset 1, llama_rules with
    hf_norm_offset 1), embeddings times sqrt(d_model), tanh-GELU (the official releases' hidden_act='gelu' meant
    it: transformers reads it so)."""
    act = "gelu_pytorch_tanh" if d.get("hidden_act") == "gelu" else d.get("hidden_act")
    return llama_cfg({**d, "hidden_act": act}, embed_scale=math.sqrt(d["hidden_size"]), norm_offset=1.0)


def gemma2_cfg(d: dict) -> ModelConfig:
    return llama_cfg(d, activation=hf_activation(d, "hidden_activation"),  # transformers' Gemma 2 reads no hidden_act
                     norm_position="sandwich", embed_scale=math.sqrt(d["hidden_size"]), norm_offset=1.0,
                     attn_scale=d.get("query_pre_attn_scalar", 256) ** -0.5,
                     attn_softcap=d.get("attn_logit_softcapping") or 0.0,
                     logit_softcap=d.get("final_logit_softcapping") or 0.0,
                     tie_embeddings=bool(d.get("tie_word_embeddings", True)))


def gemma2_cfg_to_hf(cfg: ModelConfig) -> dict:
    d = llama_cfg_to_hf(cfg, "gemma2")
    qpas = (cfg.attn_scale or cfg.hd ** -0.5) ** -2
    qpas = round(qpas) if abs(qpas - round(qpas)) < 1e-6 else qpas
    d.update(hidden_activation=d.pop("hidden_act"), query_pre_attn_scalar=qpas,
             attn_logit_softcapping=cfg.attn_softcap or None, final_logit_softcapping=cfg.logit_softcap or None)
    return d
