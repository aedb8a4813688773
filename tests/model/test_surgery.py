"""lmforge.model.surgery, the seam LoRA and quantizers swap layers through: replace_module refuses what torch's
set_submodule would do silently (add a misspelt name beside the model's layers), keeps a tied embedding's weight
when its head is replaced (through a checkpoint too), and the adapter modules' old names are the same objects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge import checkpoint as ckpt
from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig
from lmforge.model.surgery import BASE_LAYERS, matches, outer_layers, replace_module
from lmforge.model.transformer import Transformer

from ..int8_linear import Int8Linear

IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, **kw)).eval()


def test_replace_module_refuses_a_name_that_is_no_module_in_one_line():
    """torch's set_submodule (strict=False, its default) adds a misspelt name as a new module and leaves the model's
    own layer running: a quantizer would report success over an unchanged model. replace_module refuses it, naming
    the nearest module, as it refuses the model itself, a parameter and a replacement that is no module."""
    model = tiny()
    before = dict(model.named_modules())
    torch_way = tiny()
    torch_way.set_submodule("blocks.0.attn.wqq", nn.Identity())
    assert isinstance(torch_way.blocks[0].attn.wq, nn.Linear) and hasattr(torch_way.blocks[0].attn, "wqq")
    with pytest.raises(ConfigError) as e:
        replace_module(model, "blocks.0.attn.wqq", nn.Identity())
    msg = str(e.value)
    assert "'blocks.0.attn.wqq' is no submodule of Transformer" in msg and "did you mean 'blocks.0.attn.wq'?" in msg
    assert "\n" not in msg
    for name, new, why in [("", nn.Identity(), "'' is no submodule"),
                           ("blocks.0.attn.wq.weight", nn.Identity(), "did you mean 'blocks.0.attn.wq'"),
                           ("blocks.7.attn.wq", nn.Identity(), "'blocks.7.attn.wq' is no submodule"),
                           ("blocks.0.attn.wq", torch.zeros(3), "the replacement is a Tensor, not an nn.Module")]:
        with pytest.raises(ConfigError, match=why):
            replace_module(model, name, new)
    assert dict(model.named_modules()) == before


def test_replace_module_returns_the_old_layer_and_the_model_computes_the_new_one():
    model = tiny()
    want = model(IDS)
    old = model.blocks[1].mlp.down
    ref = nn.Linear(old.in_features, old.out_features, bias=False)
    ref.weight.data = Int8Linear(old).dequantized()
    assert replace_module(model, "blocks.1.mlp.down", Int8Linear(old)) is old
    assert isinstance(model.blocks[1].mlp.down, Int8Linear) and "blocks.1.mlp.down" in outer_layers(model)
    got = model(IDS)
    assert not torch.equal(got, want)  # (the rounding is real)
    replace_module(model, "blocks.1.mlp.down", ref)
    torch.testing.assert_close(model(IDS), got, rtol=0, atol=0)


def test_replacing_a_tied_lm_head_leaves_the_embedding_its_weight_through_a_checkpoint(tmp_path, monkeypatch):
    """GPT-2's lm_head shares tok_emb's weight: the replaced head's quantized copy is the head's alone, the
    embedding keeps the float Parameter, and the checkpoint (recorded kind, built tied then replaced) reopens it."""
    model = tiny(tie_embeddings=True)
    emb = model.tok_emb.weight
    kept = emb.detach().clone()
    old = replace_module(model, "lm_head", Int8Linear(model.lm_head))
    assert old.weight is emb and model.tok_emb.weight is emb and torch.equal(emb, kept)
    ref = tiny(tie_embeddings=True)
    ref.lm_head = nn.Linear(16, 64, bias=False)  # untied: the head's dequantized weight, the embedding's float one
    ref.lm_head.weight.data = model.lm_head.dequantized()
    want = model(IDS)
    torch.testing.assert_close(want, ref(IDS), rtol=0, atol=0)

    class Recorded(Int8Linear):
        @classmethod
        def from_linear(cls, linear: nn.Linear) -> "Recorded":
            return cls(linear)

    model.lm_head = Recorded(old)
    monkeypatch.setitem(BASE_LAYERS, "test-surgery-int8", Recorded)
    loaded, _ = ckpt.load_model(ckpt.save_checkpoint(tmp_path / "c", 0, model), tokenizer=False)
    assert isinstance(loaded.lm_head, Recorded) and torch.equal(loaded.tok_emb.weight, kept)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), want, rtol=0, atol=0)


def test_matches_is_peft_target_modules_and_the_adapter_names_are_the_same_objects():
    import lmforge.adapt as adapt
    import lmforge.adapt.lora as lora
    import lmforge.adapt.qlora as qlora
    from lmforge.model import surgery

    assert matches("blocks.0.attn.wq", ("wq",)) and matches("blocks.0.attn.wq", ("attn.*",))
    assert not matches("blocks.0.attn.wqkv", ("wq",)) and not matches("lm_head", ("head",))
    assert lora.matches is surgery.matches and lora.outer_layers is surgery.outer_layers
    assert qlora.register_base_layer is adapt.register_base_layer is surgery.register_base_layer
    assert qlora.BASE_LAYERS is surgery.BASE_LAYERS


def test_replace_module_needs_no_set_submodule_and_restore_lora_reads_a_wrapped_runs_names(monkeypatch):
    """nn.Module.set_submodule came in torch 2.5 (its strict= later), and the project allows torch 2.4: every LoRA
    wrap went through it. A LoRA record written by an activation-checkpointed run before records took state_dict
    names holds the wrapper's part ('blocks.0._checkpoint_wrapped_module.attn.wq'): it names the model's layer."""
    from lmforge.adapt.lora import LoRALinear, restore_lora

    monkeypatch.delattr(nn.Module, "set_submodule", raising=False)
    model = tiny()
    old = model.blocks[0].attn.wq
    assert replace_module(model, "blocks.0.attn.wq", nn.Identity()) is old
    assert isinstance(model.blocks[0].attn.wq, nn.Identity)
    restore_lora(model, {"blocks.1._checkpoint_wrapped_module.attn.wq": [4, 2.0]})
    assert isinstance(model.blocks[1].attn.wq, LoRALinear) and model.blocks[1].attn.wq.lora_A.shape[0] == 4


def test_register_base_layer_refuses_a_bad_name_or_class_in_one_line():
    """register_base_layer(None, cls) registered a kind checkpoints record as null; a class that is no class
    (register_base_layer('x', 3)) was an AttributeError traceback."""
    from lmforge.model.surgery import register_base_layer

    for kind, cls, message in ((None, Int8Linear, "a non-empty name"), ("", Int8Linear, "a non-empty name"),
                               ("x", 3, "an nn.Module class, got 3"), ("x", int, "an nn.Module class")):
        with pytest.raises(ConfigError, match=message) as e:
            register_base_layer(kind, cls)
        assert "\n" not in str(e.value) and kind not in BASE_LAYERS
