"""QLoRA's quantized base in checkpoints (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized
LLMs"): LoRA trains over any linear-like base layer (lmforge.adapt.lora.linear_like), so a model whose
Linears were replaced by quantized ones, then given adapters, is QLoRA. For load_model to give back what
was trained, a checkpoint records each layer of the Transformer that is no longer a plain nn.Linear:

    config.json  "base_layers": {"blocks.0.attn.wq": {"kind": "int8", "settings": {"group": 64}}, ...}

and load_model rebuilds it without building the float weights it replaced (QLoRA's point is a base that
never exists in full precision; a GPTQ-style layer cannot be made from random weights anyway): the
Transformer is built on the meta device, each recorded Linear becomes an empty shell of its kind's class
(base_shell), the rest is allocated, and the saved tensors (codes, scales) are loaded into it. The record
names the layer where the Transformer has it (`blocks.0.attn.wq`, also when a LoRA layer wraps it).

Kinds are registered by name (register_base_layer), so config.json stays plain strings and nothing is
imported by a name read from a file. A registered class has `from_linear(linear: nn.Linear, **settings)` and,
where it takes settings, a `settings` dict (JSON values) that gives them back. load_model builds its shell with
the optional classmethod `empty(in_features, out_features, bias, **settings)` (tensors allocated, uninitialised:
the checkpoint fills them; non-persistent buffers such as a code book computed), else with `from_linear` on an
nn.Linear on the meta device, whose tensors are then allocated empty - which works for a layer whose
from_linear is plain tensor arithmetic and which has no non-persistent buffers; otherwise load_model refuses
the layer, naming `empty` as the fix. A layer of a class not registered when the checkpoint was written is
recorded by its class's path and refused at load, naming the fix.
"""

from __future__ import annotations

import torch
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
    from lmforge.adapt.lora import LoRALinear, outer_layers

    if not isinstance(model, nn.Module):
        return dict(getattr(model, "base_layers", {}))

    kinds = {cls: kind for kind, cls in BASE_LAYERS.items()}
    out = {}
    for name, m in outer_layers(model).items():  # (a quantized layer's own parts are rebuilt with it)
        layer = m.base if isinstance(m, LoRALinear) else m
        if layer is None or type(layer) is nn.Linear:
            continue
        kind = kinds.get(type(layer))
        out[name] = {"kind": kind, "settings": dict(getattr(layer, "settings", None) or {})} if kind else \
            {"class": _path(type(layer))}
    return out


def restore_base_layers(model: nn.Module, record: dict[str, dict], where: str) -> None:
    """In place: each plain nn.Linear `record` names replaced by an empty shell of its recorded kind
    (base_shell: its tensors are the checkpoint's to fill); a layer already of that kind, from a quantized base
    checkpoint, is left. `where` (the checkpoint) names the problem in errors."""
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
        setattr(owner, child, base_shell(cls, layer, entry.get("settings", {}), f"{where}: base layer {name}"))


def base_shell(cls: type, linear: nn.Linear, settings: dict, what: str) -> nn.Module:
    """A `cls` layer in `linear`'s place whose saved tensors are yet to be loaded, built without reading
    `linear`'s weight: cls.empty(in_features, out_features, bias, **settings), else cls.from_linear on a meta
    Linear of that shape (its tensors stay on meta for load_model to allocate). Refuses a class that has
    neither way: its from_linear needs real weights, or its layer holds non-persistent buffers that meta
    tensors would leave uncomputed."""
    shape = (linear.in_features, linear.out_features, linear.bias is not None)
    if callable(getattr(cls, "empty", None)):
        return cls.empty(*shape, **settings)
    fix = (f"give {cls.__qualname__} a classmethod empty(in_features, out_features, bias, **settings) that builds "
           "the layer with its saved tensors allocated (lmforge.adapt.qlora)")
    try:
        layer = cls.from_linear(nn.Linear(*shape, device="meta"), **settings)
    except Exception as e:  # whatever a quantizer raises on a weight without data
        raise ConfigError(f"{what}: {cls.__qualname__}.from_linear cannot build it from a meta-device Linear "
                          f"({type(e).__name__}: {e}), and load_model does not build float weights to quantize "
                          f"only to overwrite them; {fix}") from None
    computed = [f"{n}.{b}" if n else b for n, m in layer.named_modules() for b in m._non_persistent_buffers_set]
    if computed:
        raise ConfigError(f"{what}: {cls.__qualname__} has the non-persistent buffer {computed[0]}, which a "
                          f"checkpoint does not hold and from_linear on a meta-device Linear leaves uncomputed; {fix}")
    return layer


def materialize(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """In place: every parameter and buffer of `model` still on the meta device allocated (uninitialised) on
    `device`, a tensor that several modules share (tied weights) once; tensors already allocated (a shell
    built by `empty`) are left. Returns the model."""
    done: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for table in (m._parameters, m._buffers):
            for k, t in table.items():
                if t is None or not t.is_meta:
                    continue
                if id(t) not in done:
                    new = torch.empty_like(t, device=device)
                    done[id(t)] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
                table[k] = done[id(t)]
    return model


@torch.no_grad()
def onto_float_base(model: nn.Module, float_model: nn.Module) -> nn.Module:
    """In place on `float_model` (the model `model`'s quantized layers were made from: the same architecture with
    plain nn.Linears there): `model`'s LoRA layers and every tensor of `model` but its quantized layers' own
    (codes, scales), so float_model + adapters is what `model` computes, less the quantization error. What PEFT
    adapters of a QLoRA run are written over (lmforge export --adapter). Returns float_model."""
    from lmforge.adapt.lora import lora_record, restore_lora

    quantized = base_layer_record(model)
    if not quantized:
        raise ConfigError(f"{type(model).__name__} has no quantized base layers; its adapters need no float base")
    theirs = base_layer_record(float_model)
    both = [n for n in quantized if n in theirs]
    if both:
        raise ConfigError(f"base layer {both[0]} is quantized in the float base too ({theirs[both[0]]}): the "
                          "adapters need the full-precision model it was quantized from")
    restore_lora(float_model, lora_record(model))
    own = float_model.state_dict()
    inside = tuple(f"{n}." for n in quantized)
    state = {}
    for name, t in model.state_dict().items():
        if name not in own and name.startswith(inside):  # a quantized layer's codes: the float weight replaces them
            continue
        if name not in own or own[name].shape != t.shape:
            raise ConfigError(f"the float base has no tensor {name} of shape {tuple(t.shape)}: it is not the model "
                              "the quantized layers were made from")
        state[name] = t
    float_model.load_state_dict(state, strict=False)
    return float_model
