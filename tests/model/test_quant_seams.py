"""The seams a quantizer plugs into (lmforge/quant: GPTQ, AWQ, packed Linears), each against the plain model:
fold_scale refuses layers whose .weight is not their whole function and folds AWQ's v -> o and up -> down scales
into the producing Linear; num_params counts a layer whose codes sit in a Parameter as its in x out weights;
shared_copy shares tensors held inside a layer's own records; block_inputs is the trunk's front that hidden()
itself runs, so running the blocks by hand from it is hidden()."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.adapt.lora import LoRAConfig, apply_lora
from lmforge.errors import LmforgeError
from lmforge.model.config import MLAConfig, ModelConfig
from lmforge.model.layers.fused import fused_copy, shared_copy
from lmforge.model.structure import fold_scale, linear_groups
from lmforge.model.transformer import Transformer

from ..int8_linear import Int8Linear


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                init_std=0.1), **kw})
    model = Transformer(cfg).double().eval()
    with torch.no_grad():  # norms and biases away from ones and zeros, so a fold that misses one shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def group(model: Transformer, linear: str):
    return next(g for g in linear_groups(model) if linear in g.linears)


def states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# item 3: fold_scale over layers whose .weight is not their whole function ----------------------------------------

class DequantizingWeight(Int8Linear):
    """A quantized layer exposing its dequantized weight as `.weight` (a common compatibility shim): a copy."""

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized()


def test_fold_scale_refuses_an_unmerged_lora_layer_and_changes_nothing():
    """Was accepted: W's columns took s, lora_A's did not, and the output moved by ~1."""
    model = apply_lora(tiny(), LoRAConfig(r=2, targets=("wq",)))
    with torch.no_grad():
        model.blocks[0].attn.wq.lora_B.normal_()
    before, want = states(model), model(IDS)
    with pytest.raises(LmforgeError, match=r"blocks\.0\.attn\.wq is a LoRALinear.*before quantizing or adapting"):
        fold_scale(model, group(model, "blocks.0.attn.wq"), torch.rand(32, dtype=torch.float64) + 0.5)
    torch.testing.assert_close(states(model), before, rtol=0, atol=0)
    torch.testing.assert_close(model(IDS), want, rtol=0, atol=0)


def test_fold_scale_refuses_a_quantized_layer_with_a_dequantizing_weight_property():
    """Was accepted: the norm took 1/s, the scale multiplied a temporary, and the output moved by ~0.8."""
    model = tiny()
    attn = model.blocks[0].attn
    for n in ("wq", "wk", "wv"):
        setattr(attn, n, DequantizingWeight(getattr(attn, n)))
    before, want = states(model), model(IDS)
    with pytest.raises(LmforgeError, match=r"blocks\.0\.attn\.wq is a DequantizingWeight"):
        fold_scale(model, group(model, "blocks.0.attn.wq"), torch.rand(32, dtype=torch.float64) + 0.5)
    torch.testing.assert_close(states(model), before, rtol=0, atol=0)
    torch.testing.assert_close(model(IDS), want, rtol=0, atol=0)


# item 7: AWQ's folds into the previous Linear (v -> o, up -> down) --------------------------------------------

def per_kv_group(g, width: int) -> torch.Tensor:
    """A random positive scale, equal across the query heads that read one value head (g.repeat)."""
    r, d = g.repeat or (1, width)
    s = torch.rand(width // r, dtype=torch.float64) + 0.5
    return s.view(-1, 1, d).expand(-1, r, d).flatten()


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=4), dict(n_kv_heads=1, bias=True),
                                dict(activation="geglu_tanh", qk_norm=True, attn_sinks=True)],
                         ids=["llama-gqa", "mha", "mqa-bias", "geglu-qknorm-sinks"])
def test_v_to_o_and_up_to_down_folds_keep_the_function(kw):
    model = tiny(**kw)
    want = model(IDS)
    for i in range(2):
        wo, down = group(model, f"blocks.{i}.attn.wo"), group(model, f"blocks.{i}.mlp.down")
        assert wo.producers == (f"blocks.{i}.attn.wv",) and wo.foldable and "no-norm" not in wo.notes
        assert wo.repeat == (4 // model.cfg.kv_heads, 8)
        assert down.producers == (f"blocks.{i}.mlp.up",) and down.foldable and down.repeat is None
        v_rows = model.blocks[i].attn.wv.weight[:, 0].clone()
        s = per_kv_group(wo, 32)
        fold_scale(model, wo, s)
        torch.testing.assert_close(model.blocks[i].attn.wv.weight[:, 0], v_rows / s.view(-1, wo.repeat[0], 8)[:, 0]
                                   .flatten(), rtol=1e-12, atol=0)
        fold_scale(model, down, torch.rand(model.blocks[i].mlp.down.in_features, dtype=torch.float64) + 0.5)
    torch.testing.assert_close(model(IDS), want, rtol=1e-6, atol=1e-6)


def test_a_scale_differing_across_the_query_heads_of_one_kv_group_is_refused_before_any_change():
    model = tiny()  # 4 query heads over 2 value heads
    wo = group(model, "blocks.0.attn.wo")
    before = states(model)
    s = per_kv_group(wo, 32)
    s[8:16] *= 2  # query head 1 reads value head 0 with query head 0, at another scale
    with pytest.raises(LmforgeError, match="differs across the 2 query heads"):
        fold_scale(model, wo, s)
    torch.testing.assert_close(states(model), before, rtol=0, atol=0)


@pytest.mark.parametrize("kw, linear", [
    (dict(activation="gelu"), "blocks.0.mlp.down"),  # act(up(x)): not linear in up
    (dict(activation="swiglu_oss"), "blocks.0.mlp.down"),  # clamp(up): not linear in up
    (dict(fused_proj=True), "blocks.0.mlp.down"),  # gate_up: up is half the rows of a stacked weight
    (dict(fused_proj=True), "blocks.0.attn.wo"),  # wqkv
    (dict(attention="mla", rope_layout="interleaved", n_kv_heads=None,
          mla=MLAConfig(kv_lora_rank=12, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)),
     "blocks.0.attn.wo"),  # values come out of wkv_b beside the keys
])
def test_no_producer_where_the_fold_would_not_be_exact(kw, linear):
    model = tiny(**kw)
    g = group(model, linear)
    assert g.producers == () and "no-norm" in g.notes and not g.foldable
    with pytest.raises(LmforgeError, match="cannot fold"):
        fold_scale(model, g, torch.rand(model.get_submodule(linear).in_features, dtype=torch.float64) + 0.5)


def test_producer_fold_refuses_a_quantized_producer():
    model = tiny()
    model.blocks[0].mlp.up = Int8Linear(model.blocks[0].mlp.up)
    down = group(model, "blocks.0.mlp.down")
    before = states(model)
    with pytest.raises(LmforgeError, match=r"blocks\.0\.mlp\.up is a Int8Linear"):
        fold_scale(model, down, torch.rand(model.blocks[0].mlp.down.in_features, dtype=torch.float64) + 0.5)
    torch.testing.assert_close(states(model), before, rtol=0, atol=0)


# item 5: one counting rule for layers holding codes in Parameters ------------------------------------------------

class PackedParam4bit(nn.Module):
    """bitsandbytes Linear4bit's layout without bitsandbytes: two 4-bit codes a byte in a frozen uint8 `weight`
    Parameter of (in·out/2, 1), one absmax per output row in a buffer, a float bias Parameter."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        absmax = w.abs().amax(1, keepdim=True).clamp_min(1e-8)
        codes = (torch.round(w / absmax * 7) + 8).to(torch.uint8).flatten()
        self.weight = nn.Parameter((codes[0::2] | codes[1::2] << 4)[:, None], requires_grad=False)
        self.register_buffer("absmax", absmax)
        self.bias = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.weight[:, 0]
        codes = torch.stack((b & 15, b >> 4), -1).flatten().view(self.out_features, self.in_features)
        w = (codes.to(self.absmax.dtype) - 8) / 7 * self.absmax
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def packed(model: Transformer, make=PackedParam4bit) -> Transformer:
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(m))
    return model


@pytest.mark.parametrize("kw", [dict(), dict(bias=True)], ids=["llama", "bias"])
def test_num_params_counts_codes_held_in_parameters_as_the_weights_they_pack(kw):
    """Was 62,688 for Linear4bit layers (the packed codes and the in x out they stand for, both counted)."""
    want = tiny(**kw).num_params()
    model = packed(tiny(**kw))
    assert model.blocks[0].attn.wq.weight.numel() == 32 * 32 // 2 and model(IDS).isfinite().all()
    assert model.num_params() == want
    assert model.num_params(exclude_embeddings=True) == tiny(**kw).num_params(exclude_embeddings=True)


def linear4bit(lin: nn.Linear) -> nn.Module:
    """bitsandbytes' NF4 Linear4bit of `lin`'s weights (skips the test without bitsandbytes)."""
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type="nf4",
                          compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(lin.weight.data.float().clone(), requires_grad=False, quant_type="nf4")
    return q.to("cpu")  # quantizes: the weight Parameter holds the packed codes, (in·out/2, 1) uint8


def test_num_params_with_bitsandbytes_linear4bit():
    model = packed(tiny().float(), linear4bit)
    assert model.blocks[0].attn.wq.weight.dtype == torch.uint8
    assert model.num_params() == tiny().num_params()


# item 9: shared_copy shares tensors held inside a layer's own records --------------------------------------------

@dataclasses.dataclass
class QState:
    absmax: torch.Tensor
    code: torch.Tensor


class Record:
    def __init__(self, table: torch.Tensor):
        self.tables = {"nf4": [table]}


class StateInt8Linear(Int8Linear):
    """Quantization state kept in a dataclass and in a plain object's nested containers (as bitsandbytes'
    QuantState), not as buffers."""

    def __init__(self, lin: nn.Linear):
        super().__init__(lin)
        self.qstate = [QState(torch.ones(self.out_features, dtype=torch.float64), torch.linspace(-1, 1, 16))]
        self.record = Record(torch.zeros(self.out_features, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.qstate[0].absmax + self.record.tables["nf4"][0]


@pytest.mark.parametrize("copier", [shared_copy, fused_copy])
def test_shared_copy_shares_tensors_inside_dataclasses_and_objects(copier):
    model = tiny()
    model.blocks[0].attn.wq = StateInt8Linear(model.blocks[0].attn.wq)
    view = copier(model)
    layer, copied = model.blocks[0].attn.wq, view.blocks[0].attn.wq
    assert copied is not layer and copied.qstate[0] is not layer.qstate[0]  # the records are copies ...
    assert copied.qstate[0].absmax is layer.qstate[0].absmax  # ... holding the model's tensors
    assert copied.record.tables["nf4"][0] is layer.record.tables["nf4"][0]
    layer.qstate[0].absmax.mul_(2)
    layer.record.tables["nf4"][0].add_(0.5)
    torch.testing.assert_close(view(IDS), model(IDS), rtol=1e-12, atol=1e-12)


# seam: block_inputs, the trunk's front for sequential calibration ------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(pos_emb="learned", norm="layernorm", activation="gelu", bias=True,
                                             embed_scale=2.0)], ids=["rope", "learned-positions"])
def test_running_the_blocks_by_hand_from_block_inputs_is_hidden(kw):
    model = tiny(**kw)
    positions = torch.arange(3, 12)
    for pos in (None, positions):
        x, rope = model.block_inputs(IDS, pos)
        inputs = [x]
        for block in model.blocks:  # as GPTQ / AWQ do, block by block, each on the previous one's output
            inputs.append(block(inputs[-1], rope, None, None, None))
        want, _ = model.hidden(IDS, pos)
        torch.testing.assert_close(inputs[-1], want, rtol=0, atol=0)
    assert (rope is None) == (model.rope is None)
    # offset (hidden passes its cache's length) = positions offset + arange(T)
    at, shifted = model.block_inputs(IDS, positions), model.block_inputs(IDS, offset=3)
    plain = model.block_inputs(IDS)
    changed = 1 if model.rope is not None else 0  # rope tables, or the learned positions added to x
    torch.testing.assert_close(shifted, at, rtol=0, atol=0)
    assert not torch.equal(torch.as_tensor(plain[changed][0]), torch.as_tensor(shifted[changed][0]))


def test_block_inputs_is_what_hidden_runs():
    """hidden() starts from block_inputs (no second copy of the trunk's front): a change to it reaches hidden."""
    model = tiny()
    seen = []
    original = model.block_inputs

    def spy(*args, **kw):
        seen.append(kw)
        return original(*args, **kw)

    model.block_inputs = spy
    model(IDS)
    assert seen == [dict(offset=0)]
