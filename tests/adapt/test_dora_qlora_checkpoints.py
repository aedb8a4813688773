"""DoRA layers (against PEFT's use_dora) and QLoRA-style models (LoRA over a quantized base) in checkpoints:
load_model gives back the model that was saved - full checkpoints, adapter-only ones over a plain or a
quantized base - with bit-equal logits; what it cannot rebuild is refused in one line naming the fix."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lmforge import checkpoint as ckpt
from lmforge.adapt.dora import DoRALinear
from lmforge.adapt.lora import LoRAConfig, LoRALinear, adapters_disabled, apply_lora, lora_layers, merge_lora
from lmforge.adapt.qlora import BASE_LAYERS
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.surgery import replace_module

from ..align.helpers import tiny_model
from .test_lora import Int8Linear, quantized

IDS = torch.randint(0, 41, (2, 9), generator=torch.Generator().manual_seed(1))
QUANTIZED = ("wq", "wk", "wv")


class RegisteredInt8(Int8Linear):
    """test_lora's stand-in quantized Linear with what a registered base layer has: from_linear and settings."""

    settings = {"bits": 8}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> "RegisteredInt8":
        assert bits == 8
        return cls(linear)


@pytest.fixture
def int8(monkeypatch):
    monkeypatch.setitem(BASE_LAYERS, "test-int8", RegisteredInt8)
    return RegisteredInt8


def trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Adapters as after training: every B, and DoRA's magnitudes, moved from their start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("lora_B", "magnitude")):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def quantize(model: nn.Module, cls=RegisteredInt8) -> nn.Module:
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and name.rsplit(".", 1)[-1] in QUANTIZED:
            replace_module(model, name, cls(m))
    return model


def same_logits(path, model, **kw) -> None:
    loaded, _ = ckpt.load_model(path, tokenizer=False, **kw)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), model.eval()(IDS), rtol=0, atol=0)


def test_dora_equals_peft_and_merges():
    """DoRA's magnitude starts at ||W||_row and its output equals PEFT's use_dora (fp32, 1e-6) at start and
    trained; merge_lora folds W' = m (W + sBA) / ||W + sBA|| into the weight; adapters off is the base."""
    peft = pytest.importorskip("peft")
    base = tiny_model(0).eval()
    lora = LoRAConfig(r=2, alpha=4, targets=("wq", "wo", "up"), dora=True)
    ours = apply_lora(copy.deepcopy(base), lora)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, use_dora=True,
                                                                       target_modules=["wq", "wo", "up"]))
    for name, layer in lora_layers(ours).items():
        assert isinstance(layer, DoRALinear)
        other = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.magnitude, other.lora_magnitude_vector["default"].weight)
    trained(ours)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            other = theirs.base_model.model.get_submodule(name)
            other.lora_A["default"].weight.copy_(layer.lora_A)
            other.lora_B["default"].weight.copy_(layer.lora_B)
            other.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
        want = ours(IDS)
        torch.testing.assert_close(theirs.eval()(IDS), want, rtol=0, atol=1e-6)
        assert (want - base(IDS)).abs().max() > 1e-2  # the adapters matter
        with adapters_disabled(ours):
            torch.testing.assert_close(ours(IDS), base(IDS), rtol=0, atol=0)
        torch.testing.assert_close(merge_lora(copy.deepcopy(ours))(IDS), want, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="DoRA adapts an nn.Linear's weight, not a Int8Linear"):
        apply_lora(quantized(tiny_model(0)), LoRAConfig(targets=("wq",), dora=True))


def test_a_dora_checkpoint_opens_as_saved(tmp_path):
    """A full and an adapter-only DoRA checkpoint record their layers as "dora"; load_model rebuilds DoRA
    layers (plain LoRA ones failed on the magnitudes) and gives the saved model's logits bit for bit."""
    base_ckpt = ckpt.save_checkpoint(tmp_path / "base", 0, tiny_model(0))
    model = trained(apply_lora(tiny_model(0), LoRAConfig(r=2, alpha=4, targets=("wq", "down"), dora=True)))
    full = ckpt.save_checkpoint(tmp_path / "full", 1, model)
    same_logits(full, model)
    adapters = ckpt.save_checkpoint(tmp_path / "adapters", 1, model, base=ckpt.base_record(base_ckpt))
    assert {n.rsplit(".", 1)[-1] for n in load_file(adapters / "model.safetensors")} == {"lora_A", "lora_B",
                                                                                          "magnitude"}
    same_logits(adapters, model)
    loaded, _ = ckpt.load_model(adapters, tokenizer=False)
    assert all(type(m) is DoRALinear for m in lora_layers(loaded).values())


def test_an_adapter_layer_lmforge_does_not_build_is_refused_in_one_line(tmp_path):
    """A LoRALinear subclass of the user's own is recorded by its class's path and refused at load by name
    (it was rebuilt as plain LoRA, which failed on its extra tensors)."""

    class Mine(LoRALinear):
        pass

    model = tiny_model(0)
    model.blocks[0].attn.wq = Mine(model.blocks[0].attn.wq, 2, 2.0)
    path = ckpt.save_checkpoint(tmp_path / "mine", 1, model)
    with pytest.raises(ConfigError) as e:
        ckpt.load_model(path)
    assert "blocks.0.attn.wq is a tests.adapt.test_dora_qlora_checkpoints." in str(e.value)
    assert "Mine, an adapter layer lmforge does not build" in str(e.value) and "\n" not in str(e.value)


def test_a_quantized_base_checkpoint_and_qlora_checkpoints_open_as_saved(tmp_path, int8):
    """QLoRA: a quantized base checkpoint records its layers' kind and settings and reopens quantized; adapters
    saved alone over it, a full QLoRA checkpoint, and adapters over a float base quantized after loading (its
    codes saved, since that base cannot give them back) all reopen to the trained model's logits bit for bit."""
    qbase = ckpt.save_checkpoint(tmp_path / "qbase", 0, quantize(tiny_model(0)))
    assert ckpt._verify(qbase)["base_layers"]["blocks.0.attn.wq"] == {"kind": "test-int8", "settings": {"bits": 8}}
    same_logits(qbase, quantize(tiny_model(0)))
    lora = LoRAConfig(r=2, alpha=4, targets=("wq", "wv", "up"))
    model = trained(apply_lora(quantize(tiny_model(0)), lora))
    with torch.no_grad():
        assert (model(IDS) - quantize(tiny_model(0))(IDS)).abs().max() > 1e-2  # the adapters matter
    over_q = ckpt.save_checkpoint(tmp_path / "over_q", 1, model, base=ckpt.base_record(qbase))
    assert all(".lora_" in n for n in load_file(over_q / "model.safetensors"))  # the codes are the base's
    same_logits(over_q, model)
    same_logits(ckpt.save_checkpoint(tmp_path / "full", 1, model), model)
    fbase = ckpt.save_checkpoint(tmp_path / "fbase", 0, tiny_model(0))
    over_f = ckpt.save_checkpoint(tmp_path / "over_f", 1, model, base=ckpt.base_record(fbase))
    assert "blocks.0.attn.wq.base.codes" in load_file(over_f / "model.safetensors")
    same_logits(over_f, model)
    loaded, _ = ckpt.load_model(over_f, tokenizer=False)
    assert type(loaded.blocks[0].attn.wq.base) is int8 and type(loaded.blocks[0].attn.wk) is int8


def test_an_unregistered_quantized_layer_is_refused_in_one_line(tmp_path):
    """A quantized layer whose class was not registered when the checkpoint was written cannot be rebuilt
    (its settings were not recorded): load_model names the layer, its class and the fix in one line (it
    failed with a list of missing and unexpected tensors)."""
    path = ckpt.save_checkpoint(tmp_path / "q", 0, apply_lora(quantize(tiny_model(0), Int8Linear),
                                                              LoRAConfig(targets=("wq",))))
    with pytest.raises(ConfigError) as e:
        ckpt.load_model(path)
    msg = str(e.value)
    assert "base layer blocks.0.attn.wq is tests.adapt.test_lora.Int8Linear, a kind load_model cannot rebuild" in msg
    assert "register_base_layer(KIND, cls)" in msg and "\n" not in msg


def test_a_kind_not_registered_in_the_loading_process_names_registering_it_there(tmp_path, int8, monkeypatch, capsys):
    """A checkpoint of a registered kind opened where the kind is not registered (a fresh process: the lmforge
    command, which imports no class of the user's) said 'register its class before saving', which it was (found
    2026-12-07): the error names the kind and registering it in the loading process, then calling the command."""
    from lmforge.cli import main

    path = ckpt.save_checkpoint(tmp_path / "q", 0, apply_lora(quantize(tiny_model(0)), LoRAConfig(targets=("wq",))))
    monkeypatch.delitem(BASE_LAYERS, "test-int8")
    with pytest.raises(ConfigError) as e:
        ckpt.load_model(path)
    msg = str(e.value)
    assert msg == (f"{path}: base layer blocks.0.attn.wq is a 'test-int8' layer, a kind not registered in this process "
                   f"(registered: {sorted(BASE_LAYERS) or 'none'}); register it before loading: "
                   "lmforge.model.surgery.register_base_layer('test-int8', cls) (the lmforge command imports no class "
                   "of yours: register it in Python, then call lmforge.cli.main([...]) there), or build the model "
                   "yourself and load_weights(model, path)")
    assert main(["sample", "--checkpoint", str(path), "--max-tokens", "1"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"lmforge sample: error: {msg}"


def test_a_reward_model_over_a_backbone_quantized_after_loading_opens_as_saved(tmp_path, int8):
    """A head on a QLoRA backbone (quantized after its float base was loaded), saved adapter-only: the
    backbone's codes are saved under the head's `backbone.` names, and load_model rebuilds the head's model."""
    from lmforge.align.reward import SequenceHead

    fbase = ckpt.save_checkpoint(tmp_path / "fbase", 0, tiny_model(0))
    backbone = trained(apply_lora(quantize(tiny_model(0)), LoRAConfig(r=2, alpha=4, targets=("wq", "up"))))
    model = SequenceHead(backbone, 1, train_backbone=False).eval()
    path = ckpt.save_checkpoint(tmp_path / "rm", 1, model, base=ckpt.base_record(fbase))
    assert "backbone.blocks.0.attn.wq.base.codes" in load_file(path / "model.safetensors")
    same_logits(path, model)


def test_a_setting_json_cannot_hold_is_refused_at_save_naming_it(tmp_path, int8, monkeypatch):
    """A registered layer whose settings hold a torch.dtype failed the checkpoint's write with a bare TypeError
    ("Object of type dtype is not JSON serializable", found 2026-12-07): the save names the layer, the setting
    and the fix in one line, and writes nothing."""
    monkeypatch.setattr(int8, "settings", {"bits": 8, "store": torch.int8})
    with pytest.raises(ConfigError) as e:
        ckpt.save_checkpoint(tmp_path / "q", 0, quantize(tiny_model(0)))
    assert str(e.value) == ("base layer blocks.0.attn.wq: RegisteredInt8.settings['store'] is torch.int8, which "
                            "config.json cannot hold (load_model passes the settings back to empty/from_linear); "
                            "give settings JSON values: strings, numbers, bools, lists, dicts (a dtype by its name, "
                            "e.g. 'int8')")
    assert not list((tmp_path / "q").rglob("model.safetensors"))


def _trainer(model: nn.Module, run_dir):
    """The one Trainer over `model` (LM loss, 4 steps, a checkpoint every 2)."""
    from lmforge.optim import build_optimizer
    from lmforge.optim.config import OptimConfig
    from lmforge.train.config import LoopConfig
    from lmforge.train.harness import FixedBatches
    from lmforge.train.loss import LMObjective
    from lmforge.train.trainer import Trainer

    ids = torch.randint(0, 41, (4, 9), generator=torch.Generator().manual_seed(1))
    data = FixedBatches([{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}] * 4)
    cfg = LoopConfig(optim=OptimConfig(lr=1e-2), run_dir=str(run_dir), max_steps=4, log_every=1, eval_every=100,
                     ckpt_every=2, device="cpu", dtype="fp32", progress=False, plot=False)
    return Trainer(model, build_optimizer(model, cfg.optim), data, LMObjective(), config=cfg)


def test_a_setting_a_checkpoint_cannot_record_is_refused_when_the_trainer_is_built(tmp_path, int8, monkeypatch):
    """A quantized layer's setting config.json cannot hold was refused only at the first checkpoint's write, after
    ckpt_every steps (maybe hours) of training: the Trainer refuses it when built, in the save's words."""
    monkeypatch.setattr(int8, "settings", {"bits": 8, "store": torch.int8})
    model = apply_lora(quantize(tiny_model(0)), LoRAConfig(r=2, alpha=4, targets=("wo",)))
    with pytest.raises(ConfigError, match=r"^base layer blocks.0.attn.wq: RegisteredInt8.settings\['store'\] is "
                                          r"torch.int8, which config.json cannot hold"):
        _trainer(model, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_settings_dict_with_int_keys_is_refused_as_config_json_would_change_it(tmp_path, int8, monkeypatch):
    """{0: 64} in a layer's settings was written as {"0": 64}, and load_model passed those other settings back
    (str keys, found 2026-12-07): refused at the Trainer's start and at a save, naming the key and what JSON makes of
    it; string keys, at any depth, come back exactly."""
    monkeypatch.setattr(int8, "settings", {"bits": 8, "groups": [{"rows": {0: 64}}]})
    want = ("base layer blocks.0.attn.wq: RegisteredInt8.settings['groups'] has the key 0, which config.json gives "
            "back as the string '0', so load_model would pass other settings to empty/from_linear; key its dicts by "
            "strings")
    with pytest.raises(ConfigError) as e:
        _trainer(quantize(tiny_model(0)), tmp_path / "run")
    assert str(e.value) == want
    with pytest.raises(ConfigError) as e:
        ckpt.save_checkpoint(tmp_path / "q", 0, quantize(tiny_model(0)))
    assert str(e.value) == want
    monkeypatch.setattr(int8, "settings", {8: "bits"})  # (a setting's name: a keyword argument of from_linear)
    with pytest.raises(ConfigError, match=r"^base layer blocks.0.attn.wq: RegisteredInt8.settings has the name 8: "
                                          r"load_model passes the settings back as keyword arguments; name them by "
                                          r"strings$"):
        _trainer(quantize(tiny_model(0)), tmp_path / "run")
    # a None key, which JSON writes as "null", at either level (it passed: None was "no such key found")
    monkeypatch.setattr(int8, "settings", {"bits": 8, "g": {None: 1}})
    with pytest.raises(ConfigError, match=r"^base layer blocks.0.attn.wq: RegisteredInt8.settings\['g'\] has the key "
                                          r"None, which config.json gives back as the string 'null', so load_model"):
        _trainer(quantize(tiny_model(0)), tmp_path / "run")
    monkeypatch.setattr(int8, "settings", {None: 1})
    with pytest.raises(ConfigError, match=r"^base layer blocks.0.attn.wq: RegisteredInt8.settings has the name None: "):
        _trainer(quantize(tiny_model(0)), tmp_path / "run")
    settings = {"bits": 8, "groups": [{"rows": {"0": 64}}]}

    def from_linear(cls, linear, bits, groups):
        layer = cls(linear)
        layer.settings = {"bits": bits, "groups": groups}
        return layer

    monkeypatch.setattr(int8, "settings", settings)
    monkeypatch.setattr(int8, "from_linear", classmethod(from_linear))
    path = ckpt.save_checkpoint(tmp_path / "ok", 0, quantize(tiny_model(0)))
    back = ckpt.load_model(path, tokenizer=False)[0]
    assert back.blocks[0].attn.wq.settings == settings


def test_a_quantized_checkpoint_loaded_into_a_float_model_names_load_model(tmp_path, int8):
    """load_weights of a quantized base checkpoint into a float model listed missing weights and unexpected codes
    and stopped there (found 2026-12-07): the error says the checkpoint holds quantized layers and names the fix."""
    path = ckpt.save_checkpoint(tmp_path / "q", 0, quantize(tiny_model(0)))
    with pytest.raises(CheckpointError) as e:
        ckpt.load_weights(tiny_model(0), path)
    assert str(e.value).endswith("; it holds quantized base layers (blocks.0.attn.wq: test-int8, 3 such) where the "
                                 "model has other modules: load_model(path) rebuilds them, or put layers of that kind "
                                 "there (lmforge.model.surgery.replace_module) before load_weights")
    ckpt.load_weights(quantize(tiny_model(1)), path)  # a model quantized the same way loads it


def test_a_setting_named_dtype_is_refused_at_save_and_an_old_checkpoint_keeps_its_own(tmp_path, int8, monkeypatch):
    """A setting named dtype (a 4-bit quantizer's {"dtype": "nf4"}) saved, then load_model's empty(**settings,
    dtype=...) failed with "got multiple values for keyword argument 'dtype'" (found 2026-12-07): the save refuses
    it naming the rename, and a layer built from a record that has one gets the recorded value."""
    from lmforge.adapt.qlora import base_shell

    class Typed(RegisteredInt8):
        @classmethod
        def empty(cls, in_features: int, out_features: int, bias: bool, dtype: str, device=None) -> "Typed":
            layer = cls(nn.Linear(in_features, out_features, bias=bias))
            layer.settings = {"dtype": dtype}
            return layer

    monkeypatch.setitem(BASE_LAYERS, "test-typed", Typed)
    monkeypatch.setattr(Typed, "settings", {"dtype": "int8"})
    with pytest.raises(ConfigError) as e:
        ckpt.save_checkpoint(tmp_path / "q", 0, quantize(tiny_model(0), Typed))
    assert str(e.value) == ("base layer blocks.0.attn.wq: Typed.settings has 'dtype', a name load_model passes to "
                            "empty() itself (the model's dtype); rename the setting (e.g. 'qdtype')")
    shell = base_shell(Typed, nn.Linear(16, 16, bias=False), {"dtype": "int8"}, "x", torch.float32)
    assert shell.settings == {"dtype": "int8"}


def test_a_setting_named_dtype_saves_and_loads_where_only_from_linear_builds_the_layer(tmp_path, monkeypatch):
    """load_model gives its own dtype/device to empty() only: a class built through from_linear alone may name a
    setting dtype (a quantizer's {"dtype": "int8"}), which saved and loaded before the refusal above took it too."""
    class Named(RegisteredInt8):
        settings = {"dtype": "int8"}

        @classmethod
        def from_linear(cls, linear: nn.Linear, dtype: str) -> "Named":
            assert dtype == "int8"
            return cls(linear)

    monkeypatch.setitem(BASE_LAYERS, "test-named", Named)
    model = quantize(tiny_model(0), Named)
    path = ckpt.save_checkpoint(tmp_path / "q", 0, model)
    back = ckpt.load_model(path, tokenizer=False)[0]
    ids = torch.arange(8).view(1, 8)
    assert torch.equal(model(ids)[0], back(ids)[0])


def test_exporting_adapters_over_a_quantized_base_checkpoint_names_the_route_that_works(tmp_path, int8, capsys):
    """Adapters saved over a quantized base checkpoint have no float base recorded for PEFT, and --base takes only
    the same base moved: the error said the float model was needed but not how to give it (found 2026-12-07). It
    names onto_float_base + save_checkpoint, and that route exports."""
    from lmforge.adapt.qlora import onto_float_base
    from lmforge.cli import main

    fbase = ckpt.save_checkpoint(tmp_path / "fbase", 0, tiny_model(0))
    qbase = ckpt.save_checkpoint(tmp_path / "qbase", 0, quantize(tiny_model(0)))
    model = trained(apply_lora(quantize(tiny_model(0)), LoRAConfig(r=2, alpha=4, targets=("wq", "up"))))
    path = ckpt.save_checkpoint(tmp_path / "q", 1, model, base=ckpt.base_record(qbase))
    assert main(["export", str(path), str(tmp_path / "peft"), "--adapter"]) == 2
    err = capsys.readouterr().err.splitlines()[0]
    assert err.endswith("the adapters need the full-precision model it was quantized from; in Python, move them onto "
                        "the float model the base was quantized from (lmforge.adapt.qlora.onto_float_base(model, "
                        "float_model)), save that (save_checkpoint(DIR, step, float_model, base=base_record(FLOAT))) "
                        "and export DIR")
    floats = onto_float_base(ckpt.load_model(path, tokenizer=False)[0], ckpt.load_model(fbase, tokenizer=False)[0])
    moved = ckpt.save_checkpoint(tmp_path / "moved", 1, floats, base=ckpt.base_record(fbase))
    assert main(["export", str(moved), str(tmp_path / "peft"), "--adapter"]) == 0
