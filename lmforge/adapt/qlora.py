"""QLoRA's quantized base in checkpoints (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized
LLMs"): LoRA trains over any linear-like base layer (lmforge.adapt.lora.linear_like), so a model whose
Linears were replaced by quantized ones, then given adapters, is QLoRA. For load_model to give back what
was trained, a checkpoint records each layer of the Transformer that is no longer a plain nn.Linear:

    config.json  "base_layers": {"blocks.0.attn.wq": {"kind": "int8", "settings": {"group": 64}}, ...}

and load_model rebuilds it: each recorded Linear becomes `cls.from_linear(linear, **settings)` of the kind's
class (under a LoRA layer, as its base), and the saved tensors (codes, scales) are loaded over it. The
record names the layer where the Transformer has it (`blocks.0.attn.wq`, also when a LoRA layer wraps it).

Kinds are registered by name (register_base_layer), so config.json stays plain strings and nothing is
imported by a name read from a file. A registered class has `from_linear(linear: nn.Linear, **settings)` and,
where it takes settings, a `settings` dict (JSON values) that gives them back. A layer of a class not
registered when the checkpoint was written is recorded by its class's path and refused at load, naming the fix.
"""

from __future__ import annotations

from torch import nn

from lmforge.errors import ConfigError

BASE_LAYERS: dict[str, type] = {}
"""kind -> the base layer class checkpoints name by it (register_base_layer)"""


def register_base_layer(kind: str, cls: type) -> type:
    """Let checkpoints record layers of `cls` as `kind` and load_model rebuild them. Returns cls."""
    if not callable(getattr(cls, "from_linear", None)):
        raise ConfigError(f"{cls.__qualname__} has no from_linear(linear, **settings): load_model builds a base "
                          "layer from the nn.Linear it replaced; add that classmethod")
    if BASE_LAYERS.get(kind, cls) is not cls:
        raise ConfigError(f"base layer kind {kind!r} is already {BASE_LAYERS[kind].__qualname__}; choose another name")
    BASE_LAYERS[kind] = cls
    return cls


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def base_layer_record(model: nn.Module) -> dict[str, dict]:
    """{name: {"kind", "settings"}} of every linear-like layer of `model` that is not a plain nn.Linear (a
    LoRA layer's base under the LoRA layer's name); an unregistered class as {"class": its path}. A stand-in for
    a model (a sharded model's gathered weights) gives its `base_layers` attribute, if any."""
    from lmforge.adapt.lora import LoRALinear, linear_like

    if not isinstance(model, nn.Module):
        return dict(getattr(model, "base_layers", {}))

    kinds = {cls: kind for kind, cls in BASE_LAYERS.items()}
    modules = dict(model.named_modules())
    out = {}
    for name, m in modules.items():
        parent = modules.get(name.rpartition(".")[0]) if name else None
        if isinstance(parent, LoRALinear) and m is parent.base:  # recorded under the LoRA layer's name
            continue
        layer = m.base if isinstance(m, LoRALinear) else m
        if layer is None or type(layer) is nn.Linear or not linear_like(layer):
            continue
        kind = kinds.get(type(layer))
        out[name] = {"kind": kind, "settings": dict(getattr(layer, "settings", None) or {})} if kind else \
            {"class": _path(type(layer))}
    return out


def restore_base_layers(model: nn.Module, record: dict[str, dict], where: str) -> None:
    """In place: each plain nn.Linear `record` names rebuilt as its recorded kind (a layer already of that
    kind, from a quantized base checkpoint, is left). `where` (the checkpoint) names the problem in errors."""
    from lmforge.adapt.lora import LoRALinear

    for name, entry in record.items():
        cls = BASE_LAYERS.get(entry.get("kind"))
        if cls is None:
            what = entry.get("class") or f"a {entry.get('kind')!r} layer"
            raise ConfigError(f"{where}: base layer {name} is {what}, a kind load_model cannot rebuild (registered: "
                              f"{sorted(BASE_LAYERS) or 'none'}); register its class before saving "
                              "(lmforge.adapt.qlora.register_base_layer(KIND, cls)), or build the model yourself and "
                              "load_weights(model, path)")
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        layer = getattr(owner, child, None)
        inner = layer.base if isinstance(layer, LoRALinear) else layer
        if type(inner) is cls:
            continue
        if type(layer) is not nn.Linear:
            raise ConfigError(f"{where}: base layer {name} was a {entry['kind']} layer, but the model it loads onto "
                              f"has a {type(inner).__name__} there; give the base it was trained on")
        setattr(owner, child, cls.from_linear(layer, **entry.get("settings", {})))
