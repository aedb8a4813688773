"""ModelConfig: every architectural choice of the Transformer as one frozen, validated dataclass.

Presets (`ModelConfig.preset(name)`) and a single depth dial (`ModelConfig.from_depth(d)`, as in
nanochat: width 64·d, one 64-wide head per layer of depth) cover the common shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from lmforge.config import check

GLU_ACTIVATIONS = ("swiglu", "geglu")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "relu2", *GLU_ACTIVATIONS)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = 50304
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None
    """key/value heads: n_heads = MHA, 1 = MQA, between = GQA (None means n_heads)"""
    head_dim: int | None = None
    """None means d_model // n_heads"""
    d_ff: int | None = None
    """MLP hidden width; None means 4*d_model, or about 8/3*d_model rounded up to 64 for GLU MLPs"""
    max_seq_len: int = 1024
    # positions
    pos_emb: Literal["rope", "learned", "sinusoidal", "none"] = "rope"
    rope_theta: float = 10000.0
    rope_layout: Literal["half", "interleaved"] = "half"
    """'half': rotate pairs (i, i + hd/2) as Llama/NeoX; 'interleaved': pairs (2i, 2i+1) as RoFormer/GPT-J"""
    # norms
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: Literal["pre", "post"] = "pre"
    final_norm: bool = True
    # attention
    qk_norm: bool = False
    attn_softcap: float = 0.0
    """attention-logit soft-capping c·tanh(s/c) (Gemma 2); 0 disables"""
    attn_impl: Literal["sdpa", "math"] = "sdpa"
    """'sdpa' = torch scaled_dot_product_attention (flash/efficient kernels); 'math' = plain reference"""
    # MLP
    activation: Literal["relu", "gelu", "gelu_tanh", "silu", "relu2", "swiglu", "geglu"] = "swiglu"
    # embeddings, output, regularisation
    tie_embeddings: bool = False
    bias: bool = False
    dropout: float = 0.0
    logit_softcap: float = 0.0
    """output-logit soft-capping; 0 disables"""
    z_loss: float = 0.0
    """weight of the z-loss term z·logsumexp(logits)^2 (PaLM) added to the training loss"""
    # initialisation
    init_std: float = 0.02
    scaled_residual_init: bool = True
    """divide the std of residual output projections by sqrt(2·n_layers) (GPT-2)"""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            check(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}")
        check(self.head_dim is not None or self.d_model % self.n_heads == 0,
              f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads} "
              f"(or set model.head_dim)")
        check(self.kv_heads > 0 and self.n_heads % self.kv_heads == 0,
              f"model.n_heads={self.n_heads} must be divisible by model.n_kv_heads={self.n_kv_heads}")
        check(self.head_dim is None or self.head_dim > 0, f"model.head_dim must be > 0, got {self.head_dim}")
        check(self.pos_emb != "rope" or self.hd % 2 == 0,
              f"RoPE needs an even head dimension, got {self.hd} (model.head_dim)")
        check(self.d_ff is None or self.d_ff > 0, f"model.d_ff must be > 0, got {self.d_ff}")
        check(self.activation in ACTIVATIONS, f"model.activation={self.activation!r}; choose one of {ACTIVATIONS}")
        check(0 <= self.dropout < 1, f"model.dropout must lie in [0, 1), got {self.dropout}")
        check(self.attn_softcap >= 0 and self.logit_softcap >= 0, "soft-caps must be >= 0 (0 disables)")
        check(self.z_loss >= 0, f"model.z_loss must be >= 0, got {self.z_loss}")
        check(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        check(self.norm_eps > 0, f"model.norm_eps must be > 0, got {self.norm_eps}")
        check(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std}")

    # derived sizes -------------------------------------------------------------------------------
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
        """nanochat's single dial: d_model = 64·depth, depth heads of 64, Llama-style blocks with ReLU²."""
        check(depth >= 1, f"depth must be >= 1, got {depth}")
        base = dict(d_model=64 * depth, n_layers=depth, n_heads=depth, head_dim=64, activation="relu2",
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
}
