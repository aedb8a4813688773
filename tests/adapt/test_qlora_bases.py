"""QLoRA-style bases: LoRA over quantized layers that hold parts of their own (an LLM.int8-style outlier
nn.Linear) adapts the layer whole; a refused apply_lora leaves the model as it was; load_model rebuilds
recorded quantized layers without building their float weights."""

import copy

import pytest
import torch
from torch import nn

from lmforge import checkpoint as ckpt
from lmforge.adapt.lora import LoRAConfig, LoRALinear, apply_lora, lora_layers
from lmforge.adapt.qlora import BASE_LAYERS, base_layer_record, onto_float_base, restore_base_layers
from lmforge.errors import ConfigError

from ..align.helpers import tiny_model
from .test_lora import Int8Linear

IDS = torch.randint(0, 41, (2, 9), generator=torch.Generator().manual_seed(1))


class OutlierInt8(nn.Module):
    """LLM.int8()-style (Dettmers et al. 2022, section 3.2): the two largest input columns in a float
    nn.Linear of their own, the rest as int8 codes (test_lora's Int8Linear, itself linear-like)."""

    def __init__(self, lin: nn.Linear, n_outliers: int = 2):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        w = lin.weight.detach()
        cols = w.abs().amax(0).topk(n_outliers).indices
        self.register_buffer("cols", cols)
        self.outlier = nn.Linear(n_outliers, self.out_features, bias=False)
        self.outlier.weight.data = w[:, cols].clone()
        rest = nn.Linear(self.in_features, self.out_features, bias=False)
        rest.weight.data = w.clone().index_fill_(1, cols, 0.0)
        self.inner = Int8Linear(rest)

    def forward(self, x):
        return self.inner(x) + self.outlier(x[..., self.cols])


def with_outliers(model: nn.Module, names=("wq", "wv")) -> nn.Module:
    for block in model.blocks:
        for n in names:
            setattr(block.attn, n, OutlierInt8(getattr(block.attn, n)))
    return model


@pytest.mark.parametrize("targets", [("attn.*",), ("*",)])
def test_lora_adapts_a_quantized_layer_whole_not_its_inner_linear(targets):
    """A broad pattern matched both the quantized layer and its inner Linears: the inner one was wrapped first
    and the layer's forward then failed ('LoRALinear' object has no attribute 'outlier'), partway through,
    leaving the model half-wrapped. Only the outer layer is adapted now, and its record names it alone."""
    base = with_outliers(tiny_model(0)).eval()
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=2, targets=targets))
    layers = lora_layers(model)
    assert "blocks.0.attn.wq" in layers and type(layers["blocks.0.attn.wq"].base) is OutlierInt8
    assert not any(".outlier" in n or ".inner" in n for n in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), base(IDS), rtol=0, atol=0)  # B = 0: the base's function
    assert not any(".inner" in n or ".outlier" in n for n in base_layer_record(model))


def test_a_refused_apply_lora_leaves_the_model_as_it_was():
    """DoRA cannot wrap a quantized layer: the refusal came after the layers before it were wrapped and the
    whole model frozen. Now nothing changes: no LoRA layer, every parameter trainable as before."""
    model = with_outliers(tiny_model(0), names=("wv",))
    before = {n: (p, p.requires_grad) for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    with pytest.raises(ConfigError, match="DoRA adapts an nn.Linear's weight"):
        apply_lora(model, LoRAConfig(r=2, targets=("wq", "wv"), dora=True))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert dict(model.named_modules()) == modules
    assert {n: (p, p.requires_grad) for n, p in model.named_parameters()} == before


QUANTIZED = ("wq", "wv")


class SpiedInt8(Int8Linear):
    """A registered stand-in quantized Linear; `built` records the Linears from_linear is given."""

    built: list = []

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "SpiedInt8":
        cls.built.append(linear)
        return cls(linear)


class EmptyInt8(SpiedInt8):
    """One with the optional `empty` shell: codes and scales allocated, for the checkpoint to fill."""

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool) -> "EmptyInt8":
        assert not bias
        return cls(nn.Linear(in_features, out_features, bias=False))


class DataInt8(SpiedInt8):
    """A quantizer that reads its weight's values (GPTQ-style: it needs the real weights)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "DataInt8":
        assert float(linear.weight.detach().abs().max()) > 0
        return cls(linear)


def quantize(model: nn.Module, cls) -> nn.Module:
    for block in model.blocks:
        for n in QUANTIZED:
            setattr(block.attn, n, cls(getattr(block.attn, n)))
    return model


def trained(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("cls", [SpiedInt8, EmptyInt8])
def test_load_model_rebuilds_quantized_layers_without_their_float_weights(tmp_path, monkeypatch, cls):
    """load_model built and randomly initialised the whole float model, then quantized random weights: the
    float model's memory at its peak (what QLoRA avoids) and a layer that needs real weights (GPTQ) could not
    be rebuilt. Now the float weights of recorded layers are never allocated: from_linear only sees meta-device
    Linears (never, given `empty`); the reopened QLoRA model, full or over a float base, is bit-exact."""
    monkeypatch.setitem(BASE_LAYERS, "test-spied", cls)
    fbase = ckpt.save_checkpoint(tmp_path / "fbase", 0, tiny_model(0))
    model = trained(apply_lora(quantize(tiny_model(0), cls), LoRAConfig(r=2, alpha=4, targets=("wq", "up"))))
    for path in (ckpt.save_checkpoint(tmp_path / "full", 1, model),
                 ckpt.save_checkpoint(tmp_path / "over_f", 1, model, base=ckpt.base_record(fbase))):
        cls.built = []
        loaded, _ = ckpt.load_model(path, tokenizer=False)
        assert all(lin.weight.is_meta for lin in cls.built)
        assert len(cls.built) == (0 if cls is EmptyInt8 else len(QUANTIZED) * len(model.blocks))
        assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
        assert type(loaded.blocks[-1].attn.wq.base) is cls and type(loaded.blocks[-1].attn.wv) is cls
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=0)


def test_a_layer_load_model_cannot_build_empty_is_refused_naming_empty(tmp_path, monkeypatch):
    """A from_linear that needs the weight's values, and a layer whose non-persistent buffer a meta build
    would leave uncomputed, are refused in one line naming the layer and the `empty` classmethod to add."""
    monkeypatch.setitem(BASE_LAYERS, "test-data", DataInt8)
    path = ckpt.save_checkpoint(tmp_path / "data", 0, quantize(tiny_model(0), DataInt8))
    with pytest.raises(ConfigError) as e:
        ckpt.load_model(path)
    msg = str(e.value)
    assert "base layer blocks.0.attn.wq: DataInt8.from_linear cannot build it from a meta-device Linear" in msg
    assert "classmethod empty(in_features, out_features, bias, **settings)" in msg and "\n" not in msg

    class Table(SpiedInt8):
        def __init__(self, lin):
            super().__init__(lin)
            self.register_buffer("book", torch.linspace(-1, 1, 16), persistent=False)

    monkeypatch.setitem(BASE_LAYERS, "test-table", Table)
    path = ckpt.save_checkpoint(tmp_path / "table", 0, quantize(tiny_model(0), Table))
    with pytest.raises(ConfigError, match="Table has the non-persistent buffer book, which a checkpoint"):
        ckpt.load_model(path)


def test_a_sharded_runs_checkpoint_records_its_quantized_layers(tmp_path, monkeypatch):
    """The stand-in an FSDP run saves through (distributed.Gathered: the gathered weights) carried the LoRA
    record but not the quantized layers', so a QLoRA run under FSDP wrote a checkpoint that failed to load
    (missing tensors). It records them as the model itself does, and the checkpoint reopens bit-exact."""
    from lmforge.train.distributed import Gathered

    monkeypatch.setitem(BASE_LAYERS, "test-empty", EmptyInt8)
    fbase = ckpt.save_checkpoint(tmp_path / "fbase", 0, tiny_model(0))
    model = trained(apply_lora(quantize(tiny_model(0), EmptyInt8), LoRAConfig(r=2, alpha=4, targets=("wq", "up"))))
    gathered = Gathered(model, {n: t.clone() for n, t in model.state_dict().items()})
    assert gathered.base_layers == base_layer_record(model) != {}
    for path in (ckpt.save_checkpoint(tmp_path / "full", 1, gathered),
                 ckpt.save_checkpoint(tmp_path / "over_f", 1, gathered, base=ckpt.base_record(fbase))):
        loaded, _ = ckpt.load_model(path, tokenizer=False)
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS), model(IDS), rtol=0, atol=0)


def test_a_record_naming_a_layer_the_model_lacks_is_refused_in_one_line(monkeypatch):
    """Adapters or quantized layers recorded on a layer the model lacks (a float base of fewer layers given to
    `lmforge export --adapter --base`: onto_float_base) raised torch's AttributeError ('ModuleList has no attribute
    `1`') from the hand-written swap, a traceback the export's own message never wrapped. Both swaps go through
    lmforge.model.surgery now and refuse it naming the layer."""
    monkeypatch.setitem(BASE_LAYERS, "test-spied", SpiedInt8)
    model = apply_lora(quantize(tiny_model(0, n_layers=2), SpiedInt8), LoRAConfig(r=2, targets=("wq", "up")))
    with pytest.raises(ConfigError, match="LoRA adapter on blocks.1.attn.wq, which is not a Linear layer of "
                                          "Transformer$"):
        onto_float_base(model, tiny_model(0))
    with pytest.raises(ConfigError, match="^ckpt: base layer blocks.1.attn.wq was a test-spied layer, but the model "
                                          "it loads onto has no module there; give the base it was trained on$"):
        restore_base_layers(tiny_model(0), base_layer_record(model), "ckpt")
