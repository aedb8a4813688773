"""Saving a checkpoint compares the model with what build_model(cfg) makes, built on the meta device
(lmforge.adapt.qlora.meta_model): built once per config, not at every save (0.7-2 s for an 80-layer model) and
not twice for an adapter-only one, and keyed on the config's value, so a different config gets its own build."""

import dataclasses
from collections import OrderedDict

import torch

from lmforge import checkpoint as ckpt
from lmforge.adapt import qlora
from lmforge.adapt.lora import LoRAConfig, apply_lora
from lmforge.model import registry

from ..align.helpers import tiny_model

IDS = torch.tensor([[5, 9, 2, 7, 1]])


def _count_meta_builds(monkeypatch) -> list:
    """The configs build_model is called with on the meta device, from now on (an empty meta_model cache)."""
    monkeypatch.setattr(qlora, "_META_MODELS", OrderedDict(), raising=False)
    built, build = [], registry.build_model

    def counting(cfg):
        if torch.empty(0).is_meta:  # (inside `with torch.device("meta")`)
            built.append(cfg)
        return build(cfg)

    monkeypatch.setattr(registry, "build_model", counting)
    return built


def test_saves_build_the_meta_model_once_per_config(tmp_path, monkeypatch):
    meta_builds = _count_meta_builds(monkeypatch)
    model = tiny_model(seed=1)
    base = ckpt.save_checkpoint(tmp_path / "base", 1, model)
    ckpt.save_checkpoint(tmp_path / "base", 2, model)
    tuned, _ = ckpt.load_model(base, tokenizer=False)
    apply_lora(tuned, LoRAConfig(r=2, alpha=4.0, targets=("wq",)))
    with torch.no_grad():
        for m in tuned.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_()
    record = ckpt.base_record(base)
    for step in (1, 2):  # adapter-only: frozen_names' check against the built model reads the same build
        adapters = ckpt.save_checkpoint(tmp_path / "tuned", step, tuned, base=record)
    assert len(meta_builds) == 1
    loaded, _ = ckpt.load_model(adapters, tokenizer=False)
    assert torch.equal(loaded(IDS), tuned.eval()(IDS))

    # an equal config (another object) is the same build; a different one gets its own
    same = tiny_model(seed=2)
    same.cfg = dataclasses.replace(model.cfg)
    assert qlora.built_modules(same).keys() == dict(model.named_modules()).keys() and len(meta_builds) == 1
    deeper = tiny_model(seed=1, n_layers=model.cfg.n_layers + 1)
    assert qlora.built_modules(deeper).keys() == dict(deeper.named_modules()).keys()
    assert len(meta_builds) == 2 and meta_builds[1].n_layers == model.cfg.n_layers + 1
