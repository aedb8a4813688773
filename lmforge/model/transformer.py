"""The decoder-only Transformer LM: GPT-2- and Llama-style models from one ModelConfig.

    input_ids (B, T) -> token embedding [+ absolute positions] -> n_layers x Block -> final norm
    -> lm_head -> logits (B, T, V)

Blocks (pre/post/sandwich norm, parallel) live in layers/block.py; attention is MHA/GQA/MQA with
optional sliding windows and sinks, or MLA; the MLP is dense or a mixture of experts; optional
multi-token-prediction heads (layers/mtp.py). HF checkpoints: from_pretrained / save_pretrained (hf.py).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.cache import CacheSpec, LayerCacheSpec
from lmforge.model.config import ModelConfig
from lmforge.model.layers.block import ATTENTION, MLPS, Block  # noqa: F401  (registries re-exported)
from lmforge.model.layers.mla import MLA
from lmforge.model.layers.mlp import GATED
from lmforge.model.layers.moe import MoE
from lmforge.model.layers.mtp import MTP, next_token_targets
from lmforge.model.layers.norm import RMSNorm, model_norm
from lmforge.model.layers.position import LearnedPositions, SinusoidalPositions
from lmforge.model.layers.rope import RotaryEmbedding
from lmforge.model.meta import AttnMetadata
from lmforge.utils import compute_dtype

RESIDUAL_OUTPUTS = ("attn.wo.weight", "mlp.down.weight", "mlp.experts.w_down", "mlp.shared.down.weight")


def tap_layers(return_hidden, n_layers: int) -> tuple[int, ...]:
    """The block indices a return_hidden value asks for (() for True / False), checked against n_layers."""
    if isinstance(return_hidden, bool):
        return ()
    layers = tuple(return_hidden) if isinstance(return_hidden, (tuple, list)) else None
    if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers for i in layers):
        raise ConfigError(f"return_hidden must be True or a non-empty tuple of block indices in [0, {n_layers}) "
                          f"(EAGLE-3 style layer features), got {return_hidden!r}")
    return layers


def attention_cache_spec(cfg: ModelConfig, i: int) -> LayerCacheSpec:
    """What attention layer i of a model with this ModelConfig keeps per token: MLA latents, or K/V over a
    sliding window or the full context. A hybrid model (attention + recurrent layers, lmforge.infer.kv.state)
    builds its attention layers' entries here and its recurrent layers' as kind 'state'."""
    window = cfg.sliding_window if cfg.layer_type(i) == "sliding" else 0
    if cfg.attention == "mla":
        m = cfg.mla_cfg
        return LayerCacheSpec(kind="latent", window=window, latent_rank=m.kv_lora_rank, rope_dim=m.qk_rope_head_dim)
    return LayerCacheSpec(kind="sliding" if window else "full", window=window, kv_heads=cfg.kv_heads,
                          query_heads=cfg.n_heads, head_dim=cfg.hd)


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer that maps (..., in) -> (..., out) through one in x out weight: an nn.Linear, or a
    layer standing for one that says so with integer in_features and out_features (a quantized Linear, a LoRA
    layer over its base: the layers lmforge.model.surgery.outer_layers lists); None for any other module."""
    i, o = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (i, o) if isinstance(i, int) and isinstance(o, int) and not isinstance(i, bool) else None


def _layers(module: nn.Module, seen: set[int] | None = None) -> Iterator[tuple[nn.Module, str]]:
    """The outermost linear layers and the MoE layers under `module`, each once (a shared module as
    named_modules lists it), as (layer, 'linear' | 'moe'). Neither a linear layer's submodules (a LoRA layer's
    base) nor an MoE's experts module are walked into: the layer counts as a whole, whatever replaced or wrapped
    its insides."""
    seen = set() if seen is None else seen
    if id(module) in seen:
        return
    seen.add(id(module))
    if linear_shape(module) is not None:
        yield module, "linear"
        return
    if isinstance(module, MoE):
        yield module, "moe"
    for name, child in module.named_children():
        if child is not None and not (isinstance(module, MoE) and name == "experts"):
            yield from _layers(child, seen)


def _routed_weights(moe: MoE) -> int:
    """Weights of one routed expert's MLP (up, down and a gated MLP's gate): d_model x d_expert each."""
    return (2 + (moe.activation in GATED)) * moe.d_model * moe.d_expert


def matmul_macs(model: nn.Module) -> int:
    """Multiply-adds per token of every linear layer in `model` from the layers' shapes (in·out each), the
    routed experts by their MoE's shapes (top_k experts run per token); a linear layer counts once, as its base
    (a LoRA layer's rank-r matmuls are left out: the model's FLOPs, not the adapter's)."""
    total = 0
    for m, kind in _layers(model):
        if kind == "moe":
            total += m.k * _routed_weights(m)
        else:
            i, o = linear_shape(m)
            total += i * o
    return total


def parameter_count(model: nn.Module) -> int:
    """Parameters of `model`, each tensor once (a tied head once), with every layer standing for a weight counted
    as that weight: an outermost linear layer (an nn.Linear, or what replaced or wrapped one: a quantized or LoRA
    layer; `_layers`) as in·out, an MoE's experts as their E experts' weights, however they hold them (packed
    codes in a Parameter as bitsandbytes' Params4bit, buffers, a tensor subclass). Their own parameters are that
    weight and are left out of the sum, except biases (leaf name 'bias', an experts module's STACKED_VECTORS) and
    a layer's `adapter_params` (LoRA's A and B, DoRA's magnitude), which count as themselves. A layer whose
    weight Parameters were all counted already (shared with an earlier layer) counts once.
    Transformer.num_params and lmforge.adapt.lora.trainable_parameters both count this way."""
    weights, held = 0, set()
    for m, kind in _layers(model):
        holder = m.experts if kind == "moe" else m
        if holder is None:
            continue
        keep = set(getattr(holder, "STACKED_VECTORS", ())) | set(getattr(holder, "adapter_params", ()))
        own = {id(p) for name, p in holder.named_parameters() if name.rsplit(".", 1)[-1] != "bias" and name not in keep}
        if own and own <= held:
            continue
        held |= own
        weights += m.E * _routed_weights(m) if kind == "moe" else math.prod(linear_shape(m))
    return weights + sum(p.numel() for p in model.parameters() if id(p) not in held)


def embed_scales(scale: float) -> dict[torch.dtype, float]:
    """`scale` rounded to each float dtype the embeddings may have, as Gemma's reference code and transformers
    round it: bf16 embeddings of width 3072 are multiplied by 55.5, not sqrt(3072) = 55.43 (plain floats, read in
    forward without a tensor op: no host copy, no torch.compile graph break); {} for 1."""
    return {dt: torch.tensor(scale, dtype=dt, device="cpu").item()
            for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16) if scale != 1.0}


class TrunkFront:
    """The front of the trunk, up to block 0's input: token embedding, absolute positions, dropout, the residual
    dtype, and the RoPE tables every block takes. Shared by the Transformer and a pipeline stage
    (lmforge.parallel.pp.StageModule), which hold the same modules under the same names: cfg, tok_emb (None on
    a later pipeline stage), pos_emb, drop, rope, residual_dtype and _embed_scales (embed_scales(cfg.embed_scale))."""

    residual_dtype: torch.dtype | None = None
    """the residual stream's dtype under autocast when set (TrainConfig.bf16_residual): the embedding's output
    is cast once and every block's add keeps it; None, or autocast off = the embedding's dtype"""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(input_ids)
        if self.cfg.embed_scale == 1.0:
            return x
        return x * self._embed_scales.get(x.dtype, self.cfg.embed_scale)

    def block_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                     meta: AttnMetadata | None = None, *, offset: int = 0, length: int | None = None
                     ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Block 0's input and the rope tables: (B, T) ids -> x (B, T, d) (token embedding, absolute positions,
        dropout, the residual dtype) and (cos, sin) or None, which every block takes as `block(x, rope, None,
        cache, meta)`. The calibration seam: sequential per-block quantizers (GPTQ, AWQ) run block i on block
        i-1's output from here without copying the front of the trunk; hidden() and every pipeline stage start
        here too. positions (B, T) or (T,) default to meta.positions, else offset + arange(T) (hidden passes its
        cache's length). Without a token embedding (a later pipeline stage) input_ids are the previous stage's
        hidden states (B, T', d), returned as they are; length: the sequence's T where they hold part of it (a
        sequence-parallel shard)."""
        B, T = input_ids.shape[0], length or input_ids.shape[1]
        n_positions = None  # host-side bound on the positions, when known without reading them
        if positions is None and meta is not None and meta.positions is not None:
            positions = meta.positions
        if positions is None:
            positions = torch.arange(offset, offset + T, device=input_ids.device).expand(B, T)
            n_positions = offset + T
        elif positions.dim() == 1:
            positions = positions.expand(B, T)
        lengths = meta.rope_lengths if meta is not None else None  # (length-dependent RoPE scaling only)
        rope = self.rope.cos_sin(positions, n_positions, lengths) if self.rope is not None else None
        if self.tok_emb is None:
            return input_ids, rope
        x = self.embed(input_ids)
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions).to(x.dtype)
        x = self.drop(x)
        if self.residual_dtype is not None and torch.is_autocast_enabled(x.device.type):
            x = x.to(self.residual_dtype)  # outside autocast (eval, generation in fp32) the weights' dtype
        return x, rope


class Transformer(TrunkFront, nn.Module):
    """The decoder-only LM of one ModelConfig (GPT-2 and Llama styles, MLA, MoE, sliding windows, MTP heads).

        model = Transformer(ModelConfig.from_depth(2, vocab_size=257))
        logits = model(torch.tensor([[1, 2, 3]]))            # (B, T, vocab_size)
        model = Transformer.from_pretrained("path/to/hf_dir")  # a HF checkpoint (hf.py)

    forward(input_ids, positions=None, cache=None, meta=None) returns logits (see forward); num_params() counts
    the weights; the engine (lmforge.infer) serves it through its cache seam (cache_spec)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ConfigError(f"Transformer needs a ModelConfig, got {type(cfg).__name__}")
        if cfg.arch not in (None, "transformer"):
            raise ConfigError(f"model.arch={cfg.arch!r} names another model class; build it with "
                              "lmforge.model.registry.build_model(cfg)")
        self.cfg = cfg
        # token ids that end generation besides the tokenizer's end-of-text (a HF checkpoint's eos_token_id;
        # set by from_pretrained, kept by lmforge checkpoints, written by save_pretrained, read by the engine)
        self.eos_token_ids: tuple[int, ...] = ()
        # the id a prompt begins with, config.json's bos_token_id (None: none): a HF checkpoint's, an lmforge
        # checkpoint's recorded one (checkpoint.bos_record: its tokenizer's BOS, its first prefix token, else the
        # model's); written by save_pretrained
        self.bos_token_id: int | None = None
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self._embed_scales = embed_scales(cfg.embed_scale)
        self.pos_emb = {"learned": LearnedPositions, "sinusoidal": SinusoidalPositions}.get(cfg.pos_emb)
        self.pos_emb = self.pos_emb(cfg.max_seq_len, cfg.d_model) if self.pos_emb else None
        self.rope = (RotaryEmbedding(cfg.rope_dim, cfg.rope_theta, cfg.rope_layout, cfg.rope_scaling, cfg.max_seq_len)
                     if cfg.pos_emb == "rope" else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = model_norm(cfg) if cfg.final_norm else None
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.mtp = MTP(cfg) if cfg.mtp is not None else None
        self._mtp_moes = [m for m in self.mtp.modules() if isinstance(m, MoE)] if self.mtp is not None else []
        self._mtp_loss: torch.Tensor | None = None
        self.reset_parameters()
        if cfg.fused_proj:  # after init: a fused model starts from the same weights as an unfused one
            self.fuse_projections()

    def fuse_projections(self) -> "Transformer":
        """Stack q/k/v and gate/up weights so each group is one matmul (layers/fused.py); in place.
        The function, the parameter count and the state_dict keys do not change."""
        for m in self.modules():
            if m is not self and hasattr(m, "fuse"):
                m.fuse()
        return self

    # --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) for matrices; residual output projections (attn.wo, mlp.down) get
        init_std / sqrt(2·n_layers) so the residual stream's variance does not grow with depth (GPT-2)."""
        cfg = self.cfg
        resid_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_residual_init else cfg.init_std
        offsets = {id(m.weight): m.offset for m in self.modules() if isinstance(m, RMSNorm)}  # gain = offset + w
        for name, p in self.named_parameters():
            if p.is_meta:  # nothing to fill (a shapes-only build: checkpoint checks, meta-device init); the meta
                continue   # path of normal_ costs milliseconds a tensor: most of an 80-layer model's build
            if name.endswith("mlp.noise.weight"):
                nn.init.zeros_(p)  # noise std starts at softplus(0) for every token (Shazeer et al. 2017)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, resid_std if name.endswith(RESIDUAL_OUTPUTS) else cfg.init_std)
            elif name.endswith(("bias", "sinks", "b_up", "b_gate", "b_down")):
                nn.init.zeros_(p)
            else:
                nn.init.constant_(p, 1.0 - offsets.get(id(p), 0.0))  # gains of 1
        for m in self.modules():
            if isinstance(m, MoE):
                m.e_bias.zero_()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
                meta: AttnMetadata | None = None, *, return_hidden: bool | tuple[int, ...] = False,
                targets: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) -> logits (B, T, V). positions (B, T) or (T,) default to meta.positions, else
        cache.length + arange(T); `cache` (lmforge.model.cache, lmforge.infer.kv) is written in place;
        `meta` (lmforge.model.meta) describes the token layout (packed documents, the engine's varlen
        row); with meta.logits_indices only those flat positions get logits: (1, M, V).
        return_hidden: also return hidden states, (B, T, D), or (1, H, D) at meta.hidden_indices when set,
        else at the logits positions. True: the final hidden state AFTER the final norm, D = d_model: the LM
        head's input (logits = lm_head(hidden), soft-cap aside), what EAGLE-1/2's draft head reads (its code
        takes the base model's last_hidden_state, which HF computes after the final norm; the paper's
        "second-to-top-layer feature", Li et al. 2024 §3) and Medusa's heads too. A tuple of block indices
        (i, j, ...): those blocks' outputs (the residual stream right after block i, no final norm) concatenated
        in that order, D = len(tuple) * d_model: EAGLE-3's low, middle and high features (Li et al. 2025 §3).
        In training with multi-token prediction, the MTP loss of this batch is kept for aux_loss(): its targets
        follow `targets` (B, T), the main loss's next-token targets (-100 = none: padding stays out of the MTP
        loss too), by default input_ids shifted by one; packed rows' documents (meta.doc_ids) stay apart."""
        layers = tap_layers(return_hidden, len(self.blocks))
        taps = dict.fromkeys(layers) if layers else None
        h, rope = self.hidden(input_ids, positions, cache, meta, taps)
        self._mtp_loss = None
        self._clear_mtp_aux()
        if self.mtp is not None and self.training and cache is None:
            doc_ids = meta.doc_ids if meta is not None else None
            extra = [self.logits(x) for x in self.mtp.heads(h, input_ids, self.embed, rope, doc_ids)]
            targets = next_token_targets(input_ids, doc_ids) if targets is None else targets
            self._mtp_loss = self.mtp.loss(extra, targets, doc_ids) if extra else None
        at = meta.logits_indices if meta is not None else None
        out = self._final(h.flatten(0, 1)[at][None] if at is not None else h)
        logits = self.logits(out)
        if not return_hidden:
            return logits
        where = meta.hidden_indices if meta is not None and meta.hidden_indices is not None else at
        if layers:  # the blocks' raw outputs: no final norm
            states = torch.cat([taps[i] for i in layers], dim=-1)
            return logits, states.flatten(0, 1)[where][None] if where is not None else states
        return logits, out if where is at else self._final(h.flatten(0, 1)[where][None])

    def _clear_mtp_aux(self) -> None:
        """Forget the MTP modules' MoE losses and loads of an earlier forward: a forward that skips a depth (rows
        of at most k tokens, or eval) would leave aux_loss() a loss whose graph backward has freed. The trunk's
        MoE layers run in every forward and overwrite theirs; the MTP ones are listed once, at construction."""
        for m in self._mtp_moes:
            m.last_aux, m.last_stats = None, {}

    def _final(self, h: torch.Tensor) -> torch.Tensor:
        return self.final_norm(h) if self.final_norm is not None else h

    def key_rotation(self):
        """A function turning cached keys by position deltas, f(keys (M, ..., rope width), delta (M,)) (MLA: its
        rope keys), for a KV policy that re-assigns positions within the cache; None where keys carry no plain
        RoPE (learned or no position embeddings; a scaling that depends on the sequence length)."""
        import functools

        from lmforge.model.layers.rope import rotate_by

        if self.rope is None or self.rope.length_dependent:
            return None
        return functools.partial(rotate_by, inv_freq=self.rope.inv_freq, layout=self.rope.layout)

    def cache_spec(self) -> CacheSpec:
        """What a KV cache must hold for this model, per layer (engines read this, never cfg)."""
        cfg = self.cfg
        layers = tuple(attention_cache_spec(cfg, i) for i in range(cfg.n_layers))
        return CacheSpec(layers=layers, dtype=compute_dtype(self), max_seq_len=cfg.max_seq_len,
                         vocab_size=cfg.vocab_size)

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None,
               meta: AttnMetadata | None = None, taps: dict[int, torch.Tensor | None] | None = None):
        """The trunk: (B, T) ids -> last hidden states (B, T, d) before the final norm, and the rope tables.
        taps: block index -> filled with that block's output (B, T, d) (forward's return_hidden tuple)."""
        if meta is not None and meta.doc_ids is not None and cache is not None:
            raise ConfigError("packed documents (meta.doc_ids) are a training layout; run them without a cache")
        x, rope = self.block_inputs(input_ids, positions, meta, offset=getattr(cache, "length", 0))
        for i, block in enumerate(self.blocks):
            x = block(x, rope, None, cache, meta)
            if taps is not None and i in taps:
                taps[i] = x
        if cache is not None and hasattr(cache, "advance"):
            cache.advance(input_ids.shape[1])
        return x, rope

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h)
        if self.cfg.logit_softcap > 0:
            c = self.cfg.logit_softcap
            logits = c * torch.tanh(logits / c)
        return logits

    def forward_mtp(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Main logits (B, T, V) and the MTP heads' logits, depth k predicting token t+1+k (for
        speculative drafts: the last position of each gives k extra draft tokens)."""
        if self.mtp is None:
            raise ConfigError("forward_mtp needs model.mtp to be set")
        h, rope = self.hidden(input_ids)
        self._clear_mtp_aux()
        main = self.logits(self.final_norm(h) if self.final_norm is not None else h)
        return main, [self.logits(x) for x in self.mtp.heads(h, input_ids, self.embed, rope)]

    # auxiliary losses and statistics ---------------------------------------------------------------
    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the last forward's auxiliary losses (MoE balancing/z-losses, MTP); None if there are none."""
        terms = [m.last_aux for m in self.modules() if isinstance(m, MoE) and m.last_aux is not None]
        if self._mtp_loss is not None:
            terms.append(self._mtp_loss)
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    def moe_stats(self) -> dict[str, torch.Tensor]:
        """Per-expert load of the last forward, averaged over MoE layers, as 0-d tensors on the device (the
        LM objective logs them with its metrics; no host sync): moe/load_e{i} (fraction of assignments),
        moe/load_max_over_mean, moe/dropped_frac, moe/aux_loss (the balancing losses alone, without MTP's)."""
        layers = [m for m in self.modules() if isinstance(m, MoE) and m.last_stats]
        if not layers:
            return {}
        load = torch.stack([m.last_stats["load"] for m in layers]).float().detach()  # (L, E)
        stats = {f"moe/load_e{i}": v for i, v in enumerate(load.mean(0))}
        stats["moe/load_max_over_mean"] = (load.max(-1).values * load.shape[-1]).mean()
        stats["moe/dropped_frac"] = torch.stack([m.last_stats["dropped"] for m in layers]).float().mean().detach()
        aux = [m.last_aux.detach().float() for m in layers if m.last_aux is not None]
        stats["moe/aux_loss"] = torch.stack(aux).sum() if aux else torch.zeros((), device=load.device)
        return stats

    # accounting ----------------------------------------------------------------------------------
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once); optionally without token/position embeddings. A layer
        holding its weight as packed codes (a quantized Linear or MoE experts, in buffers or in Parameters) counts
        the weights it stands for (in·out, `parameter_count`), not its codes and scales."""
        n = parameter_count(self)
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if isinstance(self.pos_emb, LearnedPositions):
                n -= self.pos_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Matmul FLOPs per token at context `seq_len`: 2 per multiply-add of every linear layer (lm_head
        included, tied or not; read from the layers' shapes, `matmul_macs`: a quantized or LoRA-wrapped Linear
        counts as its base, the adapter's own rank-r matmuls not, so an adapter or quantized run reports the
        model's FLOPs as the full run does) plus attention scores and their weighted sum, 2·2·H·hd·keys per
        layer (the full, un-halved causal count of PaLM's appendix B and nanochat: keys = seq_len, or a sliding
        layer's window when it is shorter). Training = 3x forward
        (backward costs twice the forward). Norms, biases and softmax are ignored (< 1%)."""
        linear = matmul_macs(self)
        attn_blocks = list(self.blocks) + ([getattr(mod, "block", mod) for mod in self.mtp.modules_]
                                           if self.mtp is not None and training else [])
        if self.mtp is not None and not training:
            linear -= matmul_macs(self.mtp)
        elif self.mtp is not None:  # each depth runs the shared output head once more
            linear += self.mtp.depth * matmul_macs(self.lm_head)
        attn = sum(self._attn_flops(b.attn, seq_len) for b in attn_blocks)
        forward = 2 * linear + attn
        return float(3 * forward if training else forward)

    @staticmethod
    def _attn_flops(attn: nn.Module, seq_len: int) -> int:
        keys = min(attn.window, seq_len) if getattr(attn, "window", 0) else seq_len
        if isinstance(attn, MLA):  # scores over d_nope + d_rope, weighted sum over d_v
            return 2 * attn.H * (attn.d_nope + attn.d_rope + attn.d_v) * keys
        return 4 * attn.n_heads * attn.hd * keys

    def param_roles(self) -> dict[str, str]:
        """name -> 'embedding' | 'head' | 'matrix' | 'vector', for optimizers' parameter-group rules. A module's
        STACKED_VECTORS (MoE's per-expert biases, (E, d)) are vectors whatever their shape."""
        stacked = {f"{prefix}.{name}" if prefix else name for prefix, m in self.named_modules()
                   for name in getattr(m, "STACKED_VECTORS", ())}
        roles = {}
        for name, p in self.named_parameters():
            if name.startswith(("tok_emb.", "pos_emb.")):
                roles[name] = "embedding"
            elif name.startswith("lm_head."):
                roles[name] = "head"
            else:
                roles[name] = "matrix" if p.dim() >= 2 and name not in stacked else "vector"
        return roles

    # HF checkpoints (lmforge.model.hf) -----------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | str | None = None, device=None) -> "Transformer":
        """Load a HF-format directory (config.json + safetensors) of a supported family."""
        from lmforge.model.hf import load_pretrained

        return load_pretrained(path, dtype=dtype, device=device)

    def save_pretrained(self, path, *, dtype: torch.dtype | str | None = None, family: str | None = None,
                        max_shard_bytes: int = 5 * 2**30) -> None:
        """Write a HF-format directory that `transformers` loads (config.json + model.safetensors, or shards of at
        most max_shard_bytes with their index); family: the HF family to write (default: the one the config
        matches)."""
        from lmforge.model.hf import save_pretrained

        save_pretrained(self, path, dtype=dtype, family=family, max_shard_bytes=max_shard_bytes)
