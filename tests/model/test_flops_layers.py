"""Transformer.flops_per_token and num_params read linear layers by shape: a LoRA-wrapped or quantized Linear
(a module with in_features / out_features and no weight Parameter) counts as its base, MoE experts by their
MoE's shapes whatever module holds them, so an adapter or quantized run reports the same model FLOPs (MFU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lmforge.adapt.lora import LoRAConfig, apply_lora
from lmforge.model.config import MLAConfig, ModelConfig, MoEConfig, MTPConfig
from lmforge.model.layers.mlp import ACT, glu
from lmforge.model.layers.moe import MoE
from lmforge.model.transformer import Transformer

from ..int8_linear import Int8Linear

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
CONFIGS = {
    "llama": dict(n_kv_heads=2),
    "gpt2_tied": dict(pos_emb="learned", norm="layernorm", activation="gelu", bias=True, tie_embeddings=True),
    "moe_mtp": dict(mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, d_expert=16, n_shared=1), mtp=MTPConfig(depth=2)),
    "mla": dict(attention="mla", rope_layout="interleaved",
                mla=MLAConfig(kv_lora_rank=16, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)),
}


class Int8Experts(nn.Module):
    """Stand-in for quantized MoE experts (the MoE.experts forward contract, stacked int8 codes)."""

    def __init__(self, experts):
        super().__init__()
        self.activation, self.gated = experts.activation, experts.gated
        for name in ("w_up", "w_gate", "w_down"):
            w = getattr(experts, name)
            if w is not None:
                scale = w.detach().abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
                self.register_buffer(f"q_{name}", torch.round(w.detach() / scale).to(torch.int8))
                self.register_buffer(f"s_{name}", scale)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, **_) -> torch.Tensor:
        w = {n: getattr(self, f"q_{n}") * getattr(self, f"s_{n}") for n in ("w_up", "w_gate", "w_down")
             if hasattr(self, f"q_{n}")}
        out = []
        for e, xe in enumerate(x.split(counts.tolist())):
            up = xe @ w["w_up"][e].T
            h = glu(self.activation, xe @ w["w_gate"][e].T, up) if self.gated else ACT[self.activation](up)
            out.append(h @ w["w_down"][e].T)
        return torch.cat(out)


def _quantize(model: Transformer) -> Transformer:
    """Every nn.Linear (the head, routers and MTP projections too) -> Int8Linear; MoE experts -> Int8Experts."""
    for name, m in list(model.named_modules()):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if type(m) is nn.Linear:
            setattr(owner, child, Int8Linear(m))
        elif isinstance(m, MoE):
            m.experts = Int8Experts(m.experts)
    return model


def _model(name: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(BASE, **CONFIGS[name]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flops_per_token_are_the_models_after_lora_and_quantization(name):
    model = _model(name)
    want = [model.flops_per_token(16, training) for training in (True, False)]
    linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if type(m) is nn.Linear}
                     - ({"lm_head"} if model.cfg.tie_embeddings else set()))  # (LoRA refuses a tied head)
    lora = apply_lora(_model(name), LoRAConfig(r=4, targets=tuple(linears)))
    assert [lora.flops_per_token(16, training) for training in (True, False)] == want
    quantized = _quantize(_model(name))
    assert not any(type(m) is nn.Linear for m in quantized.modules())
    ids = torch.randint(0, 64, (2, 8))  # the stand-ins compute the model (up to int8 rounding)
    torch.testing.assert_close(quantized.eval()(ids), model.eval()(ids), rtol=0.05, atol=0.05)
    assert [quantized.flops_per_token(16, training) for training in (True, False)] == want
    qlora = apply_lora(_quantize(_model(name)), LoRAConfig(r=4, targets=tuple(linears)))
    assert [qlora.flops_per_token(16, training) for training in (True, False)] == want


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "gpt2_tied"])
def test_num_params_counts_the_weights_a_quantized_layer_packs(name):
    """(A tied head is left out: quantized, it is a second copy of the embedding.)"""
    model = _model(name)
    quantized = _quantize(_model(name))
    assert quantized.num_params() == model.num_params()
    assert quantized.num_params(exclude_embeddings=True) == model.num_params(exclude_embeddings=True)
    # LoRA over either: the base's weights plus the same adapter matrices
    lora_cfg = LoRAConfig(r=4, targets=("wo",))
    assert apply_lora(quantized, lora_cfg).num_params() == apply_lora(model, lora_cfg).num_params()
