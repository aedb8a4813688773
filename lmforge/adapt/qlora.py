"""QLoRA's quantized base in checkpoints (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized
LLMs"): LoRA trains over any linear-like base layer (lmforge.adapt.lora.linear_like), so a model whose
Linears were replaced by quantized ones, then given adapters, is QLoRA. For load_model to give back what
was trained, a checkpoint records each module of the model that is not what build_model(cfg) puts at its name
(the outermost such module: a quantized Linear, a quantized MoE `Experts`, a quantized token embedding; an
nn.Linear whose weight is a tensor subclass, such as torchao's, is not the plain Linear either):

    config.json  "base_layers": {"blocks.0.attn.wq": {"kind": "int8", "settings": {"group": 64}}, ...}

and load_model rebuilds it without building the float weights it replaced (QLoRA's point is a base that
never exists in full precision; a GPTQ-style layer cannot be made from random weights anyway): the
Transformer is built on the meta device, each recorded module becomes an empty shell of its kind's class
(base_shell), the rest is allocated, and the saved tensors (codes, scales) are loaded into it. The record
names the module where the Transformer has it (`blocks.0.attn.wq`, also when a LoRA layer wraps it).

Kinds are registered by name (lmforge.model.surgery.register_base_layer: the registry is the model's, for any
replaced layer, adapted or not), so config.json stays plain strings and nothing is imported by a name read from a
file. A registered class has, where it takes settings, a `settings` dict (JSON values) that gives them back, and
builds its shell with the classmethod `empty(**settings, dtype=, device=)` (tensors allocated, uninitialised: the
checkpoint fills them; non-persistent buffers such as a code book computed; `dtype` the model's float compute dtype,
which the class may keep its scales above; dtype= and device= are passed where its signature takes them). A layer
that replaces an nn.Linear is called as `empty(in_features, out_features, bias, **settings, dtype=, device=)` (the
Linear's shape, bias a bool), and may instead have only `from_linear(linear: nn.Linear, **settings)`: load_model
then calls it on an nn.Linear on the meta device, whose tensors are then allocated empty - which works for a layer
whose from_linear is plain tensor arithmetic and which has no non-persistent buffers; otherwise load_model refuses
the layer, naming `empty` as the fix. A module of a class not registered when the checkpoint was written is recorded
by its class's path, warned about at save and refused at load, naming the fix.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections import OrderedDict

import torch
from torch import nn

from lmforge.errors import ConfigError, warn_caller
from lmforge.model.surgery import BASE_LAYERS, REGISTER, module_at, replace_module, unwrapped_modules
from lmforge.model.surgery import register_base_layer  # noqa: F401  (re-exported: the registry is the model's)


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _own_class(module: nn.Module) -> type:
    """The module's class as a single process has it: FSDP2 swaps in FSDP<Name>(FSDPModule, Name)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _bare(t: torch.Tensor | None) -> bool:
    """No tensor subclass that changes what the tensor holds: a DTensor (FSDP's shard) is judged by its shard."""
    t = getattr(t, "_local_tensor", t)
    return t is None or type(t) in (torch.Tensor, nn.Parameter)


def _altered(module: nn.Module, built: type, twin: nn.Module | None = None) -> bool:
    """Whether `module` computes other than a module of the class build_model puts at its name: another class
    holding other state (a quantized layer's codes and scales), or that class holding a tensor subclass (torchao's
    quantized weight on an nn.Linear: fused.plain_linear). twin: the built module (on the meta device); a module
    of another class holding the same floating-point tensors under the same names and shapes is a kernel swap
    (lmforge.kernels' FusedRMSNorm from fused_kernels), not a replacement: a checkpoint loads it as built."""
    from lmforge.model.layers.fused import plain_linear

    if _own_class(module) is not built:
        return twin is None or not _same_state(module, twin)
    if built is nn.Linear:  # (FSDP's DTensor shards of a plain Linear are plain)
        sharded = all(_bare(t) for t in (module.weight, module.bias)) and module.weight.is_floating_point()
        return not (plain_linear(module) or sharded)
    return not all(_bare(t) for t in (*module._parameters.values(), *module._buffers.values()))


def _same_state(module: nn.Module, twin: nn.Module) -> bool:
    """module's state_dict has twin's names and shapes, every tensor a bare floating-point one."""
    mine, theirs = module.state_dict(keep_vars=True), twin.state_dict(keep_vars=True)
    return mine.keys() == theirs.keys() and all(
        _bare(t) and t.is_floating_point() and tuple(t.shape) == tuple(theirs[k].shape) for k, t in mine.items())


_META_MODELS: OrderedDict[tuple, nn.Module] = OrderedDict()
"""meta_model's builds, the most recently used last (a few: a run saves one model, maybe beside its reference)"""
_META_KEEP = 4
_META_LOCK = threading.Lock()


def meta_model(cfg) -> nn.Module:
    """build_model(cfg) on the meta device (no memory), built once per config and shared: read it, never change
    it. Every checkpoint save compares the model with it (0.7-2 s for an 80-layer model, mostly initialising meta
    tensors), once more for an adapter-only one. Keyed on the config's JSON form, not the object (a config may be
    a mutable dataclass, or hold a dict), with the class its arch names now and the default dtype the build
    uses."""
    from lmforge.config import to_dict
    from lmforge.model.registry import MODELS, build_model

    key = (type(cfg), json.dumps(to_dict(cfg), sort_keys=True, default=repr), MODELS.get(cfg.arch or "transformer"),
           torch.get_default_dtype())
    with _META_LOCK:  # (threads saving at once: each finds the table whole)
        built = _META_MODELS.pop(key, None)
    if built is None:
        with torch.device("meta"):
            built = build_model(cfg)
    with _META_LOCK:
        _META_MODELS[key] = built
        while len(_META_MODELS) > _META_KEEP:
            _META_MODELS.popitem(last=False)
    return built


def built_modules(model: nn.Module) -> dict[str, nn.Module] | None:
    """{name: module} of what build_model(model.cfg) makes (on the meta device: meta_model), None for a model it
    does not build (no lmforge ModelConfig, or a class of the user's own)."""
    from lmforge.model.config import ModelConfig

    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        return None
    built = meta_model(cfg)
    return dict(built.named_modules()) if type(built) is _own_class(model) else None


def replaced_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the outermost modules of `model` that are not what build_model(model.cfg) puts at their
    names (a LoRA layer's base under the LoRA layer's name; modules the built model lacks are not its business).
    For a model build_model does not make: its linear-like layers that are not a plain nn.Linear."""
    from lmforge.adapt.lora import LoRALinear, linear_like

    built = built_modules(model)
    out, inside = {}, None
    for name, m in unwrapped_modules(model).items():  # depth-first: a module's submodules come right after it
        if not name or (inside is not None and name.startswith(inside)):
            continue
        inside = None
        layer = m.base if isinstance(m, LoRALinear) else m
        if isinstance(m, LoRALinear):
            inside = name + "."  # (its base and adapters are the LoRA layer's)
            if layer is None:  # it holds its Linear's weight and bias itself
                if not all(_bare(t) for t in (m.weight, m.bias)):
                    out[name] = m
                continue
        if built is None:
            want, twin = (nn.Linear if linear_like(layer) else None), None
        else:
            twin = built.get(name)
            want = type(twin) if twin is not None else None
        if want is not None and _altered(layer, want, twin):
            out[name], inside = layer, name + "."
    return out


def base_layer_record(model: nn.Module) -> dict[str, dict]:
    """{name: {"kind", "settings"}} of every module replaced_modules finds; an unregistered class as {"class": its
    path} (an nn.Linear holding a tensor subclass: the class and the weight's). A stand-in for a model (a sharded
    model's gathered weights) gives its `base_layers` attribute, if any."""
    if not isinstance(model, nn.Module):
        return dict(getattr(model, "base_layers", {}))
    kinds = {cls: kind for kind, cls in BASE_LAYERS.items()}
    out = {}
    for name, layer in replaced_modules(model).items():
        cls = _own_class(layer)
        kind = kinds.get(cls)
        if kind:
            out[name] = {"kind": kind, "settings": _json_settings(name, layer)}
        else:
            weight = getattr(getattr(layer, "weight", None), "_local_tensor", getattr(layer, "weight", None))
            ours = cls.__module__.startswith(("torch.nn.", "lmforge.")) and isinstance(weight, torch.Tensor)
            held = f" holding a {_path(type(weight))}" if ours and not _bare(weight) else ""  # (torchao's)
            out[name] = {"class": _path(cls) + held}
    return out


def check_base_layers(model: nn.Module) -> None:
    """At a run's start: what every checkpoint will record of the model's registered base layers (base_layer_record:
    their settings, refused in one line where config.json cannot hold them), checked now rather than at the first
    save, maybe hours into training. Nothing to do (no meta-model build) for a model without such a layer."""
    kinds = tuple(BASE_LAYERS.values())
    if kinds and isinstance(model, nn.Module) and any(isinstance(m, kinds) for m in model.modules()):
        base_layer_record(model)


def _json_settings(name: str, layer: nn.Module) -> dict:
    """The layer's `settings` as config.json will hold them, refusing what would fail later with a bare TypeError: a
    value JSON cannot hold (a torch.dtype: the checkpoint's write, maybe after hours of training), a dict key other
    than a string (JSON writes {0: 64} as {"0": 64}, so load_model would pass back other settings) and a setting named
    dtype or device where the class's empty() takes that name (load_model passes the model's own there); a class
    built through from_linear alone may name a setting so."""
    settings = dict(getattr(layer, "settings", None) or {})
    empty = getattr(type(layer), "empty", None)
    where = f"base layer {name}: {type(layer).__name__}.settings"
    named = [k for k in settings if not isinstance(k, str)]
    if named:
        raise ConfigError(f"{where} has the name {named[0]!r}: load_model passes the settings back as keyword "
                          "arguments; name them by strings")
    for key, value in settings.items():
        if key in ("dtype", "device") and callable(empty) and _takes(empty, key):  # (load_model's own, to empty())
            raise ConfigError(f"{where} has {key!r}, a name load_model passes to empty() itself (the model's {key}); "
                              f"rename the setting (e.g. 'q{key}')")
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}[{key!r}] is {value!r}, which config.json cannot hold (load_model passes the "
                              "settings back to empty/from_linear); give settings JSON values: strings, numbers, "
                              "bools, lists, dicts (a dtype by its name, e.g. 'int8')") from None
        found = _non_string_key(value)
        if found:
            bad, = found
            back = next(iter(json.loads(json.dumps({bad: 0}))))
            raise ConfigError(f"{where}[{key!r}] has the key {bad!r}, which config.json gives back as the string "
                              f"{back!r}, so load_model would pass other settings to empty/from_linear; key its "
                              "dicts by strings")
    return settings


def _non_string_key(value) -> tuple:
    """(the first dict key in `value`, a JSON value, at any depth, that is not a string,), else (): a tuple, as the
    key may itself be None (which JSON writes as "null")."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                return (k,)
            found = _non_string_key(v)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for v in value:
            found = _non_string_key(v)
            if found:
                return found
    return ()


def warn_unregistered(record: dict[str, dict]) -> None:
    """Warn, at save, of a recorded module load_model will refuse (its class is not registered)."""
    bad = [(n, e["class"]) for n, e in record.items() if "class" in e]
    if bad:
        warn_caller(f"base layer {bad[0][0]} is a {bad[0][1]}, which load_model cannot rebuild ({len(bad)} such "
                    f"module(s)): the checkpoint loads only onto a model you build (load_weights); register its "
                    f"class before saving ({REGISTER}), or dequantize it first")


def restore_base_layers(model: nn.Module, record: dict[str, dict], where: str, *,
                        dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> None:
    """In place: each module `record` names, as build_model made it, replaced by an empty shell of its recorded
    kind (base_shell: its tensors are the checkpoint's to fill; float ones in `dtype`, default the model's
    compute dtype, on `device`); a module already of that kind, from a quantized base checkpoint, is left.
    `where` (the checkpoint) names the problem in errors."""
    from lmforge.adapt.lora import LoRALinear
    from lmforge.utils import compute_dtype

    dtype = dtype or compute_dtype(model)
    kinds = tuple(BASE_LAYERS.values())
    for name, entry in record.items():
        cls = BASE_LAYERS.get(entry.get("kind"))
        if cls is None and "kind" in entry:  # registered where it was saved, not (yet) in this process
            kind = entry["kind"]
            raise ConfigError(f"{where}: base layer {name} is a {kind!r} layer, a kind not registered in this process "
                              f"(registered: {sorted(BASE_LAYERS) or 'none'}); register it before loading: "
                              f"{REGISTER.replace('KIND', repr(kind))} (the lmforge command imports no class of yours: "
                              "register it in Python, then call lmforge.cli.main([...]) there), or build the model "
                              "yourself and load_weights(model, path)")
        if cls is None:
            raise ConfigError(f"{where}: base layer {name} is {entry.get('class')}, a kind load_model cannot rebuild "
                              f"(registered: {sorted(BASE_LAYERS) or 'none'}); register its class before saving "
                              f"({REGISTER}), or build the model yourself and load_weights(model, path)")
        layer = module_at(model, name)
        inner = layer.base if isinstance(layer, LoRALinear) else layer
        if type(inner) is cls:
            continue
        if layer is None or isinstance(layer, (LoRALinear, *kinds)):
            raise ConfigError(f"{where}: base layer {name} was a {entry['kind']} layer, but the model it loads onto "
                              f"has {f'a {type(inner).__name__}' if layer is not None else 'no module'} there; give "
                              "the base it was trained on")
        shell = base_shell(cls, layer, entry.get("settings", {}), f"{where}: base layer {name}", dtype, device)
        replace_module(model, name, shell)


def _call(fn, args: tuple, kwargs: dict, optional: dict):
    """fn(*args, **kwargs, **those of `optional` its signature takes and kwargs lacks: a checkpoint saved before
    settings named dtype/device were refused keeps its own)."""
    return fn(*args, **kwargs, **{k: v for k, v in optional.items() if _takes(fn, k) and k not in kwargs})


def _takes(fn, name: str) -> bool:
    """Whether `fn` takes a keyword argument `name` (by name or through **kwargs)."""
    params = inspect.signature(fn).parameters.values()
    return any(p.kind is p.VAR_KEYWORD for p in params) or name in {p.name for p in params}


def base_shell(cls: type, built: nn.Module, settings: dict, what: str, dtype: torch.dtype | None = None,
               device: torch.device | str = "cpu") -> nn.Module:
    """A `cls` module in the place of `built` (what build_model made there) whose saved tensors are yet to be
    loaded, built without reading `built`'s weights: cls.empty(**settings, dtype=, device=) (in the place of an
    nn.Linear: cls.empty(in_features, out_features, bias, **settings, dtype=, device=)), else, for an nn.Linear,
    cls.from_linear on a meta Linear of that shape (its tensors stay on meta for load_model to allocate). Refuses a
    class that has neither way: its from_linear needs real weights, or its layer holds non-persistent buffers that
    meta tensors would leave uncomputed."""
    linear = isinstance(built, nn.Linear)
    shape = (built.in_features, built.out_features, built.bias is not None) if linear else ()
    dtype = dtype or torch.get_default_dtype()
    if callable(getattr(cls, "empty", None)):
        return _call(cls.empty, shape, settings, {"dtype": dtype, "device": torch.device(device)})
    shape_args = "in_features, out_features, bias, " if linear else ""
    fix = (f"give {cls.__qualname__} a classmethod empty({shape_args}**settings) (dtype= and device= too, where it "
           "can) that builds the layer with its saved tensors allocated (lmforge.adapt.qlora)")
    if not linear:
        raise ConfigError(f"{what}: {cls.__qualname__} has no empty(), and load_model builds a layer from "
                          f"from_linear only in an nn.Linear's place (this is a {type(built).__name__}); {fix}")
    try:
        layer = cls.from_linear(nn.Linear(*shape, device="meta", dtype=dtype), **settings)
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
