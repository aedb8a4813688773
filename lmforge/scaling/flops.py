"""FLOP accounting for scaling laws.

Two conventions:
  * C = 6 N D (Kaplan et al. 2020, section 2.1): 2 FLOPs per multiply-add per parameter forward, twice
    that backward, with D the training tokens and N the parameter count. Kaplan et al. count non-embedding
    parameters; lmforge's sweep and `lmforge scaling flops` use the total count, `num_params(cfg)`
    (embeddings included: 7-72% of it at a CPU sweep's sizes); `flops_6nd` takes whichever N it is given.
    The N of 6ND is the parameters a token's forward multiplies by (Kaplan's C_forward = 2N): for a mixture of
    experts that is the active count, `active_params` (each token runs top_k of an MoE layer's E routed experts),
    as routed-model scaling laws count compute (Clark et al. 2022) and DeepSeek-V2/V3 report "activated"
    parameters; the total would overstate the compute by up to E / top_k in the expert layers.
  * The exact per-architecture count: 2 FLOPs per multiply-add of every matrix (attention projections,
    MLP, output head) plus the attention scores and their weighted sum, 2 * 2 * H * hd * T per token per
    layer at context T (Chinchilla appendix F's "KQ logits" and "softmax @ query reduction", PaLM appendix B's
    12 L H Q T for training; Kaplan's Table 1 counts half of it, 2 n_layer n_ctx d_attn), times 3 for
    training. Chinchilla also counts the embedding lookup as a matmul and the softmax (3 H T per token per
    layer); this count leaves both out, as PaLM's and nanochat's do. At small widths the head and attention
    terms make this differ from 6N a lot, which is why Chinchilla's Table A4 and this module keep both.
`dense_flops_per_token` derives the exact count from a ModelConfig alone (dense decoders only: it refuses
MoE, MLA and, in training, MTP); `flops_per_token` asks the model (`Transformer.flops_per_token`), which
covers them all.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from lmforge.errors import ConfigError

if TYPE_CHECKING:
    import torch


def flops_6nd(n_params: float, tokens: float) -> float:
    """Training FLOPs C = 6 N D."""
    if not (0 < n_params < math.inf and 0 < tokens < math.inf):  # (NaN fails too)
        raise ConfigError(f"6ND needs positive N and D, got N={n_params}, D={tokens}")
    return 6.0 * n_params * tokens


def dense_flops_per_token(cfg, seq_len: int, training: bool = True) -> float:
    """Exact matmul FLOPs per token of a dense decoder (lmforge ModelConfig) at context seq_len (a sliding layer
    attends min(window, seq_len) keys)."""
    parts = [part for part, has in (("mlp='moe'", cfg.mlp == "moe"), ("attention='mla'", cfg.attention == "mla"),
                                    ("mtp heads (training)", cfg.mtp is not None and training)) if has]
    if parts:
        raise ConfigError(f"dense_flops_per_token counts dense decoders only, and this config has {', '.join(parts)}; "
                          "use flops_per_token(cfg, seq_len), the model's own count")
    d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.hd
    attn_proj = d * h * hd + 2 * d * kv * hd + h * hd * d  # W_q, W_k, W_v, W_o
    mlp = (3 if cfg.is_glu else 2) * d * cfg.ff
    keys = [min(cfg.sliding_window, seq_len) if cfg.layer_type(i) == "sliding" else seq_len  # a window's keys
            for i in range(cfg.n_layers)]
    attn = sum(4 * h * hd * k for k in keys)  # QK^T and AV
    forward = cfg.n_layers * 2 * (attn_proj + mlp) + attn + 2 * d * cfg.vocab_size  # + output head
    return float(3 * forward if training else forward)


def build_meta_model(cfg) -> torch.nn.Module:
    """The model `cfg` describes (lmforge's Transformer unless cfg.arch names another registered class:
    lmforge.model.registry) on the meta device: exact shapes, no memory, no init cost."""
    import torch

    from lmforge.model.registry import build_model

    with torch.device("meta"):
        return build_model(cfg)


def flops_per_token(cfg, seq_len: int, training: bool = True) -> float:
    """The model's own exact count (covers MoE/MLA); training FLOPs = this x tokens."""
    return build_meta_model(cfg).flops_per_token(seq_len, training=training)


def num_params(cfg, exclude_embeddings: bool = False) -> int:
    return build_meta_model(cfg).num_params(exclude_embeddings=exclude_embeddings)


def active_params(cfg) -> int:
    """Parameters one token passes through: num_params less, in every MoE layer, the E - top_k routed experts it
    does not run (an expert's weights and biases: its experts module's parameters / E). num_params for a dense
    model. The N of 6ND for an MoE (module docstring). Only lmforge's MoE layers (lmforge.model.layers.moe.MoE)
    are seen: a model registered through cfg.arch (lmforge.model.registry) with an MoE class of its own is counted
    at its total, as a dense model would be (the registry reports no active count)."""
    return model_active_params(build_meta_model(cfg))


def model_active_params(model: torch.nn.Module) -> int:
    """active_params of a built model (a meta one: build_meta_model), for a caller that counts it other ways too."""
    from lmforge.model.layers.moe import MoE
    from lmforge.model.transformer import parameter_count

    skipped = sum((m.E - m.k) * (parameter_count(m.experts) // m.E) for m in model.modules() if isinstance(m, MoE))
    return model.num_params() - skipped


DEPTH_WIDTH = 16
"""channels per layer of depth of `depth_model`, the default of `lmforge scaling sweep --width` (`lmforge scaling
flops --width 16` counts the same models): 16 gives finer steps in N for CPU-sized grids than nanochat's 64,
ModelConfig.from_depth's (N differs from it at 64 by the QK-norm gains of its 128-wide heads)"""


def depth_model(depth: int, *, width: int = DEPTH_WIDTH, vocab_size: int, max_seq_len: int):
    """The depth dial's model of the scaling sweeps: ModelConfig.from_depth(depth) with d_model = width·depth,
    `depth` heads of `width` and d_ff = 4·d_model."""
    from lmforge.model.config import ModelConfig

    return ModelConfig.from_depth(depth, vocab_size=vocab_size, max_seq_len=max_seq_len, d_model=width * depth,
                                  head_dim=width, d_ff=4 * width * depth)


def tokens_for_budget(flops: float, n_params: float) -> float:
    """D = C / (6 N): the tokens a FLOP budget buys a model of N parameters under 6ND."""
    return flops / (6.0 * n_params)
