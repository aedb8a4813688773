"""ModelConfig: every architectural choice of the Transformer as one frozen, validated dataclass.

Presets (`ModelConfig.preset(name)`) and a single depth dial (`ModelConfig.from_depth(d)`, as in
nanochat: width 64·d, 128-wide heads when the width allows, else 64) cover the common shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lmforge.config import check, coerce_fields, names_field

GLU_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh", "swiglu_oss")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "relu2", *GLU_ACTIVATIONS)
ROPE_SCALINGS = ("linear", "ntk", "dynamic", "yarn", "longrope", "llama3")
LAYER_TYPES = ("full", "sliding")


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Context extension of RoPE (lmforge.model.layers.rope). `factor` = new context / original context."""

    kind: Literal["linear", "ntk", "dynamic", "yarn", "longrope", "llama3"] = "linear"
    """how positions beyond the pretraining context are reached: linear (position interpolation), ntk, dynamic
    (NTK once the context passes model.max_seq_len), yarn, longrope or llama3"""
    factor: float = 1.0
    """new context / original context"""
    original_max_seq_len: int | None = None
    """pretraining context (YaRN, LongRoPE, Llama-3); None means model.max_seq_len. Dynamic NTK takes none: it
    scales once the context passes model.max_seq_len, as transformers does"""
    beta_fast: float = 32.0
    """YaRN: frequencies making more rotations than this per original context keep their value"""
    beta_slow: float = 1.0
    """YaRN: frequencies making fewer rotations than this per original context are divided by factor"""
    yarn_truncate: bool = True
    """YaRN: round the ramp's bounds to whole dimensions (transformers' truncate)"""
    mscale: float = 0.0
    """DeepSeek's YaRN temperature variant: the numerator's mscale (see mscale_all_dim); 0 = plain YaRN"""
    mscale_all_dim: float = 0.0
    """DeepSeek's YaRN temperature variant: attention factor mscale(factor, mscale)/mscale(factor, all_dim); MLA
    also multiplies its softmax scale by mscale(factor, all_dim)² under every kind, as transformers does"""
    attention_factor: float | None = None
    """cos/sin temperature; None derives it from factor (YaRN: 0.1 ln s + 1; LongRoPE: sqrt(1 + ln s/ln L))"""
    low_freq_factor: float = 1.0
    """Llama 3: frequencies of wavelength above original context / low_freq_factor are divided by factor"""
    high_freq_factor: float = 4.0
    """Llama 3: frequencies of wavelength below original context / high_freq_factor are kept"""
    short_factor: tuple[float, ...] | None = None
    """LongRoPE per-frequency rescale factors within the original context (head_dim/2 of them)"""
    long_factor: tuple[float, ...] | None = None
    """LongRoPE per-frequency rescale factors (head_dim/2 each)"""

    def __post_init__(self) -> None:
        coerce_fields(self, "model.rope_scaling")  # each field's type, named when wrong
        check(self.kind in ROPE_SCALINGS, f"model.rope_scaling.kind={self.kind!r}; choose one of {ROPE_SCALINGS}")
        check(self.factor >= 1.0 or self.kind == "longrope",
              f"model.rope_scaling.factor must be >= 1, got {self.factor}")
        check(self.original_max_seq_len is None or self.original_max_seq_len >= 2,
              f"model.rope_scaling.original_max_seq_len must be >= 2, got {self.original_max_seq_len}: the pretraining "
              "context in tokens (leave it out for model.max_seq_len)")
        check(self.kind != "dynamic" or self.original_max_seq_len is None,
              "model.rope_scaling.original_max_seq_len is not used by kind='dynamic', which scales once the context "
              "passes model.max_seq_len; set model.max_seq_len to the pretraining context instead")
        check(self.kind != "longrope" or (self.short_factor is not None and self.long_factor is not None),
              "model.rope_scaling.short_factor and long_factor are required for kind='longrope'")
        check(self.kind != "yarn" or 0 < self.beta_slow < self.beta_fast,
              f"model.rope_scaling.beta_fast={self.beta_fast} must exceed beta_slow={self.beta_slow} > 0: YaRN keeps "
              "frequencies above beta_fast rotations and interpolates those below beta_slow (defaults 32 and 1)")
        check(self.factor > 0, f"model.rope_scaling.factor must be > 0, got {self.factor}")
        check(self.attention_factor is None or self.attention_factor > 0,
              f"model.rope_scaling.attention_factor must be > 0 (None derives it from factor), got "
              f"{self.attention_factor}")
        check(self.kind != "llama3" or self.low_freq_factor > 0,
              f"model.rope_scaling.low_freq_factor must be > 0, got {self.low_freq_factor}")
        for name in ("short_factor", "long_factor") if self.kind == "longrope" else ():
            check(all(f > 0 for f in getattr(self, name)),
                  f"model.rope_scaling.{name} must hold rescale factors > 0, got {getattr(self, name)}")
        check(self.high_freq_factor > self.low_freq_factor,
              "model.rope_scaling.high_freq_factor must be > low_freq_factor")


@dataclass(frozen=True, kw_only=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2 §2.1): keys/values from a shared low-rank latent."""

    kv_lora_rank: int = 512
    """width of the compressed key/value latent, the one vector per token the cache holds"""
    q_lora_rank: int = 0
    """0 = full-rank query projection (DeepSeek-V2-Lite); > 0 compresses the query too"""
    qk_nope_head_dim: int = 128
    """the part of each query/key head without RoPE, up-projected from the latent"""
    qk_rope_head_dim: int = 64
    """the decoupled RoPE part of each query head and the single shared RoPE key"""
    v_head_dim: int = 128
    """width of each value head"""
    norm_eps: float | None = None
    """eps of the latent RMSNorms; None = model.norm_eps (DeepSeek-V2/V3 fix them at 1e-6 whatever their
    rms_norm_eps, as transformers does)"""

    def __post_init__(self) -> None:
        coerce_fields(self, "model.mla")  # each field's type, named when wrong
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            check(getattr(self, name) > 0, f"model.mla.{name} must be > 0, got {getattr(self, name)}")
        check(self.q_lora_rank >= 0, f"model.mla.q_lora_rank must be >= 0, got {self.q_lora_rank}")
        check(self.qk_rope_head_dim % 2 == 0, "model.mla.qk_rope_head_dim must be even")
        check(self.norm_eps is None or self.norm_eps > 0, f"model.mla.norm_eps must be > 0, got {self.norm_eps}")


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """Token-choice top-k mixture of experts (lmforge.model.layers.moe)."""

    n_experts: int = 8
    """routed experts per MoE layer"""
    top_k: int = 2
    """experts each token is routed to"""
    d_expert: int | None = None
    """hidden width of each routed expert; None means model.d_ff"""
    n_shared: int = 0
    """always-on shared experts (DeepSeekMoE), fused into one MLP of width n_shared·d_expert"""
    shared_gate: bool = False
    """scale the shared experts' output per token by σ(x·w), a learned one-logit gate (Qwen2-MoE)"""
    score: Literal["softmax", "sigmoid"] = "softmax"
    """router scores: softmax over experts (Mixtral) or per-expert sigmoid (DeepSeek-V3)"""
    norm_topk: bool = True
    """renormalise the selected k weights to sum to 1 (Mixtral). At top_k=1 the one weight is then exactly 1, as in
    transformers' Mixtral and Qwen-MoE, and the router learns only from aux_loss/z_loss/seq_aux_loss, not from the
    LM loss (a training run's config warns: TrainConfig); false at top_k=1 gates by the score itself (the Switch
    Transformer's softmax probability)"""
    routed_scale: float = 1.0
    """multiplier of the routed output (DeepSeek-V3 routed_scaling_factor)"""
    n_groups: int = 1
    """expert groups for node-limited routing (1 = routing over all experts)"""
    topk_groups: int = 1
    """node-limited routing: keep the best topk_groups of n_groups expert groups (DeepSeek-V2/V3)"""
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    """a group's rank in node-limited routing: its two best experts' scores summed (DeepSeek-V3) or its best
    one's (DeepSeek-V2's group_limited_greedy)"""
    noisy: bool = False
    """noisy top-k gating (Shazeer et al. 2017): trainable per-expert Gaussian noise while training"""
    router_bias: bool = False
    """bias on the router's linear layer"""
    expert_bias: bool = False
    """biases on the experts' linear layers (gpt-oss)"""
    aux_loss: float = 0.0
    """Switch/GShard load-balancing loss weight: E·Σ_i f_i·P_i"""
    z_loss: float = 0.0
    """router z-loss weight (ST-MoE): mean logsumexp(router logits)²"""
    seq_aux_loss: float = 0.0
    """DeepSeek-V3 sequence-wise balance loss weight"""
    bias_update_rate: float = 0.0
    """DeepSeek-V3 aux-loss-free balancing (§2.1.2): per-expert selection bias += rate·sign(mean load - load), once
    per optimizer step, the load being the step's whole batch (every micro-batch, summed over the ranks): the
    Trainer calls lmforge.model.layers.moe.update_expert_biases after each update (a loop of your own calls it
    after optimizer.step())"""
    capacity_factor: float = 0.0
    """> 0: in a training forward each expert takes at most ceil(cf·tokens·k/E) tokens, the rest are dropped
    (evaluation and generation run dropless); 0 = dropless"""
    dispatch: Literal["grouped", "loop"] = "grouped"
    """'grouped': tokens sorted by expert, one grouped matmul; 'loop': experts one by one (the reference)"""
    gemm: Literal["auto", "torch", "triton", "loop"] = "auto"
    """the grouped dispatch's expert matmuls: 'torch' = torch._grouped_mm, 'triton' = lmforge.kernels.moe,
    'loop' = one matmul per expert (the reference); 'auto' picks per device and dtype (lmforge.model.layers.moe)"""
    dense_layers: int = 0
    """the first `dense_layers` blocks keep a dense MLP (DeepSeek-V3 first_k_dense_replace)"""

    def __post_init__(self) -> None:
        coerce_fields(self, "model.moe")  # each field's type, named when wrong
        check(self.n_experts >= 1, f"model.moe.n_experts must be >= 1, got {self.n_experts}")
        check(1 <= self.top_k <= self.n_experts,
              f"model.moe.top_k must lie in [1, n_experts={self.n_experts}], got {self.top_k}")
        check(self.d_expert is None or self.d_expert > 0, f"model.moe.d_expert must be > 0, got {self.d_expert}")
        check(self.n_shared >= 0, f"model.moe.n_shared must be >= 0, got {self.n_shared}")
        check(self.routed_scale > 0, f"model.moe.routed_scale must be > 0, got {self.routed_scale}")
        check(not self.shared_gate or self.n_shared > 0, "model.moe.shared_gate gates the shared experts: it needs "
                                                         "model.moe.n_shared > 0")
        check(self.n_groups >= 1 and self.n_experts % self.n_groups == 0,
              f"model.moe.n_groups={self.n_groups} must divide n_experts={self.n_experts}")
        check(self.group_score in ("top2_sum", "max"),
              f"model.moe.group_score={self.group_score!r}; choose top2_sum (DeepSeek-V3) or max (DeepSeek-V2)")
        check(1 <= self.topk_groups <= self.n_groups,
              f"model.moe.topk_groups must lie in [1, n_groups], got {self.topk_groups}")
        kept = self.topk_groups * (self.n_experts // self.n_groups)  # experts of the groups routing keeps
        check(self.top_k <= kept, f"model.moe.top_k={self.top_k} exceeds the {kept} experts of the topk_groups="
                                  f"{self.topk_groups} groups routing keeps: raise topk_groups or lower top_k")
        for name in ("aux_loss", "z_loss", "seq_aux_loss", "bias_update_rate", "capacity_factor"):
            check(getattr(self, name) >= 0, f"model.moe.{name} must be >= 0, got {getattr(self, name)}")
        check(self.dense_layers >= 0, f"model.moe.dense_layers must be >= 0, got {self.dense_layers}")
        check(self.gemm in ("auto", "torch", "triton", "loop"),
              f"model.moe.gemm={self.gemm!r}; choose auto, torch, triton or loop")


@dataclass(frozen=True, kw_only=True)
class MTPConfig:
    """Multi-token prediction: predict tokens t+2..t+1+depth besides t+1."""

    kind: Literal["sequential", "parallel"] = "sequential"
    """'sequential': DeepSeek-V3 MTP modules (one block per depth, shared embedding/head);
    'parallel': Gloeckle et al. 2024 independent heads on the shared trunk"""
    depth: int = 1
    """extra future tokens predicted (t+2 .. t+1+depth)"""
    loss_weight: float = 0.3
    """λ: the mean of the depths' losses, times this, is added to the next-token loss (DeepSeek-V3 eq. 25)"""

    def __post_init__(self) -> None:
        coerce_fields(self, "model.mtp")  # each field's type, named when wrong
        check(self.kind in ("sequential", "parallel"), f"model.mtp.kind={self.kind!r}")
        check(self.depth >= 1, f"model.mtp.depth must be >= 1, got {self.depth}")
        check(self.loss_weight >= 0, f"model.mtp.loss_weight must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    arch: str | None = None
    """the model class built from this config, by its name in lmforge.model.registry.MODELS; None = 'transformer'
    (lmforge's Transformer; None, not the name, so that checkpoints written before the field resume as equal)"""
    vocab_size: int = 50304
    """rows of the token embedding and the output head (at least the tokenizer's vocabulary)"""
    d_model: int = 768
    """width of the residual stream"""
    n_layers: int = 12
    """transformer blocks"""
    n_heads: int = 12
    """attention query heads (each of head_dim)"""
    n_kv_heads: int | None = None
    """key/value heads: n_heads = MHA, 1 = MQA, between = GQA (None means n_heads; with attention='mla' None
    or n_heads, MLA having one shared latent instead)"""
    head_dim: int | None = None
    """None means d_model // n_heads"""
    d_ff: int | None = None
    """MLP hidden width; None means 4*d_model, or about 8/3*d_model rounded up to 64 for GLU MLPs"""
    max_seq_len: int = 1024
    """longest context the model serves (and the learned position table's size)"""
    # positions
    pos_emb: Literal["rope", "learned", "sinusoidal", "none"] = "rope"
    """'rope' (Su et al. 2021), 'learned' (GPT-2), 'sinusoidal' (Vaswani et al. 2017) or 'none' (NoPE)"""
    rope_theta: float = 10000.0
    """RoPE base frequency (10000 in the paper; Llama 3 uses 500000)"""
    rope_layout: Literal["half", "interleaved"] = "half"
    """'half': rotate pairs (i, i + hd/2) as Llama/NeoX; 'interleaved': pairs (2i, 2i+1) as RoFormer/GPT-J"""
    rope_scaling: RopeScaling | None = None
    # norms
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """'rmsnorm' (Zhang & Sennrich 2019; Llama) or 'layernorm' (GPT-2)"""
    norm_eps: float = 1e-5
    """epsilon inside the norm's square root"""
    norm_offset: float = 0.0
    """RMSNorm gains parametrised as offset + w (the blocks', the final and MTP's norms): w is stored, the sum taken
    in fp32. Gemma's (1 + w) norms load with 1, so bf16 weights keep w's precision, as in transformers"""
    norm_position: Literal["pre", "post", "sandwich"] = "pre"
    """'sandwich': pre-norm plus a norm on each sublayer's output before the residual add (Gemma 2)"""
    block: Literal["sequential", "parallel"] = "sequential"
    """'parallel': x + attn(norm(x)) + mlp(norm(x)) from one shared pre-norm (GPT-J, PaLM; norm_position 'pre')"""
    final_norm: bool = True
    """a norm after the last block, before the output head"""
    # attention
    attention: Literal["mha", "mla"] = "mha"
    """'mha' (multi-, grouped- or multi-query by n_kv_heads) or 'mla' (DeepSeek-V2 latent attention)"""
    mla: MLAConfig | None = None
    """MLA sizes (attention='mla'); None means MLAConfig() defaults"""
    qk_norm: bool = False
    """RMSNorm on each query and key head before RoPE and attention (OLMo 2, Qwen3)"""
    qkv_bias: bool | None = None
    """bias on the q/k/v projections (Qwen2: there only); None means model.bias"""
    o_bias: bool | None = None
    """bias on attention's output projection; None means model.bias (a Llama config.json's attention_bias=true with
    mlp_bias=false: qkv_bias and o_bias true, bias false)"""
    attn_scale: float | None = None
    """softmax scale; None means 1/sqrt(head_dim) (Gemma 2 uses query_pre_attn_scalar^-0.5)"""
    attn_softcap: float = 0.0
    """attention-logit soft-capping c·tanh(s/c) (Gemma 2); 0 disables"""
    sliding_window: int = 0
    """keys further back than this many positions (query included) are masked on 'sliding' layers"""
    layer_types: tuple[str, ...] | None = names_field(None)
    """per-layer 'full' | 'sliding' (on the command line apart or comma-separated); None means all 'sliding' when
    sliding_window > 0 (Mistral), else all 'full'; alternate them for Gemma 2 / gpt-oss"""
    attn_sinks: bool = False
    """a learned per-head sink logit in every softmax denominator (gpt-oss)"""
    attn_impl: Literal["sdpa", "math", "triton"] = "sdpa"
    """'sdpa' = torch scaled_dot_product_attention (flash/efficient kernels); 'math' = plain reference;
    'triton' = lmforge.kernels.flash_attention (FlashAttention-2 in Triton) for training and full forwards
    (sliding windows, soft-caps and packed documents included; a one-line warning and SDPA where it cannot run)"""
    fused_proj: bool = False
    """compute q/k/v (and a GLU's gate/up) with one matmul each; same function and checkpoint names
    (matrix optimizers such as Muon or Shampoo then see one stacked matrix per group)"""
    # MLP
    activation: Literal["relu", "gelu", "gelu_tanh", "silu", "relu2", "swiglu", "geglu", "geglu_tanh",
                        "swiglu_oss"] = "swiglu"
    """MLP activation; the *glu ones are gated MLPs (Shazeer 2020)"""
    mlp: Literal["dense", "moe"] = "dense"
    """'moe': mixture-of-experts MLPs, sized by the moe section (flags --model.moe.FIELD, e.g.
    --model.moe.n_experts 8; --model.mla.FIELD and --model.mtp.FIELD likewise open theirs)"""
    moe: MoEConfig | None = None
    """MoE sizes and routing (mlp='moe'); None means MoEConfig() defaults"""
    mtp: MTPConfig | None = None
    """multi-token prediction heads; None disables"""
    # embeddings, output, regularisation
    tie_embeddings: bool = False
    """the output head reuses the token-embedding matrix (GPT-2)"""
    embed_scale: float = 1.0
    """token embeddings are multiplied by this (Gemma: sqrt(d_model))"""
    bias: bool = False
    """biases on the linear layers and norms (GPT-2); qkv_bias and o_bias, when set, override it in
    attention's projections"""
    dropout: float = 0.0
    """dropout probability on the embeddings, attention weights and sublayer outputs while training"""
    logit_softcap: float = 0.0
    """output-logit soft-capping; 0 disables"""
    z_loss: float = 0.0
    """weight of the z-loss term z·logsumexp(logits)^2 (PaLM) added to the training loss"""
    # initialisation
    init_std: float = 0.02
    """std of the normal initialisation of weight matrices and embeddings"""
    scaled_residual_init: bool = True
    """divide the std of residual output projections by sqrt(2·n_layers) (GPT-2)"""

    def __post_init__(self) -> None:
        coerce_fields(self, "model")  # each field's type, named when wrong
        check(self.arch != "", "model.arch='' names no model class; leave it out for the Transformer")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            check(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}")
        check(self.head_dim is not None or self.d_model % self.n_heads == 0,
              f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads} "
              f"(or set model.head_dim)")
        check(self.n_kv_heads is None or self.n_kv_heads > 0, f"model.n_kv_heads must be > 0, got {self.n_kv_heads}")
        # MLA's keys and values come, per query head, from one latent (its cache: model.mla.kv_lora_rank); HF's
        # DeepSeek configs carry num_key_value_heads = num_attention_heads, which the importer leaves out
        check(self.attention != "mla" or self.n_kv_heads in (None, self.n_heads),
              f"model.n_kv_heads={self.n_kv_heads} has no meaning with model.attention='mla' (every head's keys and "
              "values come from one shared latent, sized by model.mla.kv_lora_rank): leave n_kv_heads out")
        check(self.n_heads % self.kv_heads == 0,
              f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}")
        check(self.head_dim is None or self.head_dim > 0, f"model.head_dim must be > 0, got {self.head_dim}")
        check(self.pos_emb != "rope" or self.attention == "mla" or self.hd % 2 == 0,
              f"RoPE needs an even head dimension, got {self.hd} (model.head_dim)")
        check(self.d_ff is None or self.d_ff > 0, f"model.d_ff must be > 0, got {self.d_ff}")
        check(self.activation in ACTIVATIONS, f"model.activation={self.activation!r}; choose one of {ACTIVATIONS}")
        check(0 <= self.dropout < 1, f"model.dropout must lie in [0, 1), got {self.dropout}")
        for name in ("attn_softcap", "logit_softcap"):
            check(getattr(self, name) >= 0, f"model.{name} must be >= 0 (0 = no capping), got {getattr(self, name)}")
        check(self.z_loss >= 0, f"model.z_loss must be >= 0, got {self.z_loss}")
        check(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        check(self.norm_eps > 0, f"model.norm_eps must be > 0, got {self.norm_eps}")
        check(self.norm_offset == 0 or self.norm == "rmsnorm",
              f"model.norm_offset={self.norm_offset} parametrises RMSNorm gains; model.norm={self.norm!r} takes none")
        check(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std}")
        self._check_architecture()

    def _check_architecture(self) -> None:
        check(self.sliding_window >= 0, f"model.sliding_window must be >= 0, got {self.sliding_window}")
        if self.layer_types is not None:
            check(len(self.layer_types) == self.n_layers,
                  f"model.layer_types has {len(self.layer_types)} entries; model.n_layers={self.n_layers}")
            bad = [t for t in self.layer_types if t not in LAYER_TYPES and self.arch in (None, "transformer")]
            check(not bad, f"model.layer_types entry {bad[:1]} is not one of {LAYER_TYPES} (another model.arch "
                  "checks its own: a hybrid's recurrent layers)")
            check("sliding" not in self.layer_types or self.sliding_window > 0,
                  "model.layer_types has 'sliding' layers but model.sliding_window is 0")
        check(self.block != "parallel" or self.norm_position == "pre",
              f"model.norm_position={self.norm_position!r} is not supported with model.block='parallel', whose "
              "attention and MLP share one pre-norm: leave norm_position 'pre' or set block='sequential'")
        check(self.attn_scale is None or self.attn_scale > 0, f"model.attn_scale must be > 0, got {self.attn_scale}")
        check(self.embed_scale > 0, f"model.embed_scale must be > 0, got {self.embed_scale}")
        check(self.attention != "mla" or self.pos_emb in ("rope", "none", "learned", "sinusoidal"),
              "model.attention='mla' needs a known pos_emb")
        check(self.attention != "mla" or self.mla_cfg.q_lora_rank > 0 or not self.qk_norm,
              "model.qk_norm is not supported with attention='mla'")
        check(not (self.attention == "mla" and self.attn_sinks), "model.attn_sinks is not supported with MLA")
        check(self.mlp == "dense" or self.moe_cfg.dense_layers <= self.n_layers,
              f"model.moe.dense_layers={self.moe_cfg.dense_layers} exceeds model.n_layers={self.n_layers}")
        check(self.rope_scaling is None or self.pos_emb == "rope",
              "model.rope_scaling needs model.pos_emb='rope'")
        sc = self.rope_scaling
        for name in ("short_factor", "long_factor") if sc is not None and sc.kind == "longrope" else ():
            check(len(getattr(sc, name)) == self.rope_dim // 2,
                  f"model.rope_scaling.{name} has {len(getattr(sc, name))} entries; the rotated head width "
                  f"{self.rope_dim} needs rope_dim/2 = {self.rope_dim // 2}")

    def ignored_sections(self) -> list[str]:
        """Sections set for a part this model does not have (model.moe with mlp='dense', model.mla with
        attention='mha'): allowed (a dense twin of an MoE config keeps its section), but a command line that
        sets one means the other switch; `lmforge train` says so."""
        return (["model.moe is set but model.mlp='dense' ignores it: set model.mlp='moe'"] if self.moe is not None
                and self.mlp != "moe" else []) + \
            ([f"model.mla is set but model.attention={self.attention!r} ignores it: set model.attention='mla'"]
             if self.mla is not None and self.attention != "mla" else [])

    # derived sizes -------------------------------------------------------------------------------
    @property
    def mla_cfg(self) -> MLAConfig:
        return self.mla if self.mla is not None else MLAConfig()

    @property
    def moe_cfg(self) -> MoEConfig:
        return self.moe if self.moe is not None else MoEConfig()

    def layer_type(self, i: int) -> str:
        """'full' or 'sliding' for layer i."""
        if self.layer_types is not None:
            return self.layer_types[i]
        return "sliding" if self.sliding_window > 0 else "full"

    def is_moe_layer(self, i: int) -> bool:
        return self.mlp == "moe" and i >= self.moe_cfg.dense_layers

    @property
    def rope_dim(self) -> int:
        """the rotated width of each head: head_dim, or MLA's decoupled rope part"""
        return self.mla_cfg.qk_rope_head_dim if self.attention == "mla" else self.hd

    @property
    def has_qkv_bias(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    @property
    def has_o_bias(self) -> bool:
        return self.bias if self.o_bias is None else self.o_bias

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def hd(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def is_glu(self) -> bool:
        return self.activation in GLU_ACTIVATIONS

    @property
    def ff(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.is_glu:  # keep GLU's 3 matrices at the parameter count of a 4d two-matrix MLP
            return -(-int(8 * self.d_model / 3) // 64) * 64
        return 4 * self.d_model

    # constructors ---------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            from lmforge.errors import ConfigError

            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_depth(cls, depth: int, **overrides) -> "ModelConfig":
        """nanochat's single dial: d_model = 64·depth, Llama-style blocks with ReLU² and QK-norm.
        Heads are 128 wide when the width allows (even depth), else 64: on Hopper GPUs flash
        attention runs markedly faster with 128-wide heads."""
        check(isinstance(depth, int) and not isinstance(depth, bool), f"depth must be an int, got {depth!r}")
        check(depth >= 1, f"depth must be >= 1, got {depth}")
        width = overrides.get("d_model", 64 * depth)  # heads follow a d_model / head_dim given with the depth
        hd = overrides.get("head_dim") or (128 if width % 128 == 0 else 64)
        base = dict(d_model=64 * depth, n_layers=depth, n_heads=max(1, width // hd), head_dim=hd, activation="relu2",
                    d_ff=4 * 64 * depth, pos_emb="rope", norm="rmsnorm", qk_norm=True, tie_embeddings=False)
        base.update(overrides)
        return cls(**base)


_GPT2 = dict(vocab_size=50257, max_seq_len=1024, pos_emb="learned", norm="layernorm", activation="gelu_tanh",
             bias=True, tie_embeddings=True, rope_layout="half")
_LLAMA = dict(pos_emb="rope", norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False)

PRESETS: dict[str, ModelConfig] = {
    "gpt2-small": ModelConfig(**_GPT2, d_model=768, n_layers=12, n_heads=12),
    "gpt2-medium": ModelConfig(**_GPT2, d_model=1024, n_layers=24, n_heads=16),
    "llama-tiny": ModelConfig(**_LLAMA, vocab_size=32000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                              max_seq_len=512),
    "llama-small": ModelConfig(**_LLAMA, vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4,
                               max_seq_len=2048),
    # small versions of the issue-4 architectures, for CPU experiments
    "mixtral-tiny": ModelConfig(**_LLAMA, vocab_size=32000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2,
                                max_seq_len=512, sliding_window=256, mlp="moe",
                                moe=MoEConfig(n_experts=8, top_k=2, d_expert=512, aux_loss=0.01)),
    "deepseek-tiny": ModelConfig(**_LLAMA, vocab_size=32000, d_model=256, n_layers=4, n_heads=4, max_seq_len=512,
                                 attention="mla", rope_layout="interleaved",
                                 mla=MLAConfig(kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32,
                                               qk_rope_head_dim=16, v_head_dim=32, norm_eps=1e-6),
                                 mlp="moe", moe=MoEConfig(n_experts=16, top_k=4, d_expert=128, n_shared=1,
                                                          score="sigmoid", routed_scale=2.5, n_groups=4, topk_groups=2,
                                                          bias_update_rate=1e-3, seq_aux_loss=1e-4, dense_layers=1),
                                 mtp=MTPConfig(depth=1, loss_weight=0.3)),
    "gemma2-tiny": ModelConfig(vocab_size=32000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64,
                               max_seq_len=512, activation="geglu_tanh", norm_position="sandwich", tie_embeddings=True,
                               embed_scale=16.0, attn_softcap=50.0, logit_softcap=30.0, sliding_window=128,
                               layer_types=("sliding", "full") * 2),
}
