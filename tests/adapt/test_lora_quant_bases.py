"""LoRA and DoRA over bases a quantizer leaves: an nn.Linear whose weight is a tensor subclass (torchao) is not a
plain Linear, so its adapter wraps it whole, merge_lora refuses it before changing any layer and DoRA refuses it;
trainable_parameters counts a layer holding packed codes in Parameters (bitsandbytes' Params4bit) as its in x out
weights, Transformer.num_params' rule."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge.adapt.lora import LoRAConfig, apply_lora, lora_layers, merge_lora, trainable_parameters
from lmforge.errors import ConfigError

from ..align.helpers import tiny_model
from ..model.test_quant_seams import PackedParam4bit, linear4bit, packed

IDS = torch.randint(0, 41, (2, 7), generator=torch.Generator().manual_seed(1))


def torchao_model(names=("wq", "wk", "wv", "wo", "gate", "up", "down")) -> nn.Module:
    """tiny_model with the named Linears' weights replaced by torchao's Int8Tensor (weight-only int8)."""
    quantization = pytest.importorskip("torchao.quantization")
    model = tiny_model(0, n_layers=2).eval()
    quantization.quantize_(model, quantization.Int8WeightOnlyConfig(),
                           filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.rsplit(".", 1)[-1] in names)
    return model


def test_merge_lora_refuses_a_torchao_base_before_changing_any_layer():
    """Was a NotImplementedError from Int8Tensor.add_ after the plain layers before it had merged (half-merged)."""
    model = apply_lora(torchao_model(names=("wv",)), LoRAConfig(r=2, targets=("wq", "wv")))
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.normal_()
    layers = lora_layers(model)
    assert layers["blocks.0.attn.wq"].base is None  # a plain nn.Linear: its weight is shared, mergeable
    assert layers["blocks.0.attn.wv"].base is not None and layers["blocks.0.attn.wv"].weight is None
    before = {n: t.clone() for n, t in model.state_dict().items()}
    want = model(IDS)
    with pytest.raises(ConfigError, match=r"blocks\.0\.attn\.wv wraps a Linear of Int8Tensor"):
        merge_lora(model)
    assert lora_layers(model).keys() == layers.keys()
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items() if type(t) is torch.Tensor)
    torch.testing.assert_close(model(IDS), want, rtol=0, atol=0)


def test_lora_over_a_torchao_base_calls_it_and_dora_refuses_it():
    base = torchao_model()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=2, targets=("wq", "down")))
    torch.testing.assert_close(model(IDS), base(IDS), rtol=0, atol=0)  # B = 0: the quantized base's function
    with pytest.raises(ConfigError, match=r"DoRA adapts an nn.Linear's weight, not a Linear of Int8Tensor"):
        apply_lora(base, LoRAConfig(r=2, targets=("wq",), dora=True))
    assert not lora_layers(base)


def test_trainable_parameters_counts_codes_held_in_parameters_as_the_weights_they_pack():
    """Was 'of 31,968' (Params4bit's packed codes counted as the weights) for a model of 47,328."""
    cfg = LoRAConfig(r=2, targets=("wq",))
    plain = trainable_parameters(apply_lora(tiny_model(0), cfg))
    quantized = trainable_parameters(apply_lora(packed(tiny_model(0), PackedParam4bit), cfg))
    assert quantized.total == plain.total == tiny_model(0).num_params() + plain.trainable
    assert quantized.trainable == plain.trainable == 2 * 16 + 16 * 2  # A (2, d), B (d, 2), d = 16


def test_trainable_parameters_with_bitsandbytes_linear4bit():
    model = apply_lora(packed(tiny_model(0), linear4bit), LoRAConfig(r=2, targets=("wq",)))
    assert model.blocks[0].attn.wq.base.weight.dtype == torch.uint8
    assert trainable_parameters(model).total == model.num_params() == tiny_model(0).num_params() + 2 * 16 + 16 * 2
