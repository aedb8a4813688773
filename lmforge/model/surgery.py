"""Module surgery: choosing a model's linear layers by name and putting another module in their place, from outside
the model (the model code knows nothing of adapters or quantization). LoRA's wrap and unwrap (lmforge.adapt.lora),
a checkpoint's quantized shells (lmforge.adapt.qlora.restore_base_layers) and a quantizer's packed Linears all go
through the same three seams:

    names = [n for n, m in outer_layers(model).items() if matches(n, ("wq", "mlp.*"))]   # which layers
    for name in names:
        replace_module(model, name, Int8Linear.from_linear(model.get_submodule(name)))  # swap, by dotted name
    register_base_layer("int8", Int8Linear)   # so save_checkpoint records them and load_model rebuilds them

Patterns are PEFT's target_modules: fnmatch on the dotted name, or on its tail after a "." (`wq` matches
`blocks.0.attn.wq`). outer_layers lists a replaced layer once, not its parts (an LLM.int8 layer's outlier
nn.Linear belongs to its forward), so a second pass (LoRA over a quantized base) wraps the whole layer.
"""

from __future__ import annotations

import difflib
from fnmatch import fnmatchcase

from torch import nn

from lmforge.config import claim
from lmforge.errors import ConfigError
from lmforge.model.transformer import linear_shape


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether the dotted module name matches a pattern, itself or as its tail after a '.' (PEFT's target_modules)."""
    return any(fnmatchcase(name, p) or fnmatchcase(name, "*." + p) for p in patterns)


def outer_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of `model` by name (an nn.Linear, or a layer standing for one with integer in_features and
    out_features: a quantized Linear, a LoRA layer; lmforge.model.transformer.linear_shape), less those inside
    another one: a quantized layer's own parts (LLM.int8's outlier nn.Linear, an inner quantized Linear) belong to
    its forward, which is called whole; a swap of one of them would change a piece of the layer, and a wrap of
    both the layer and its part would break the layer's forward (it reads its part's attributes)."""
    out, inside = {}, None
    for name, m in model.named_modules():  # depth-first: a layer's submodules come right after it
        if not name or (inside is not None and name.startswith(inside)):
            continue
        inside = None
        if linear_shape(m) is not None:
            out[name], inside = m, name + "."
    return out


def state_dict_name(name: str) -> str:
    """A module's, parameter's or buffer's name as named_modules / named_parameters give it, as the model's state_dict
    and the model load_model builds have it: an activation-checkpoint wrapper (lmforge.parallel.ac) gives its name
    to the module it wraps, and its `_checkpoint_wrapped_module.` part is dropped, as the wrapper's state_dict
    drops it. What a checkpoint records (a LoRA layer's name, a replaced layer's, what it leaves to its base) is
    named so."""
    return name.replace("._checkpoint_wrapped_module", "").replace("_checkpoint_wrapped_module.", "")


def unwrapped_modules(model: nn.Module) -> dict[str, nn.Module]:
    """model.named_modules() under their state_dict names (state_dict_name): a wrapper's name is its module's."""
    return {state_dict_name(name): m for name, m in model.named_modules()}


def module_at(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule of `model` at the dotted `name`, or None where there is none (no such attribute on the way,
    or one that is no module: a parameter, an optional layer left None)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """In place: `new` at the dotted `name` of `model` (as named_modules gives it), in the old module's place; returns
    the module it replaced. A module shared under several names is replaced under this one only, and a tied weight
    the old module held stays with its other owner (the embedding of a tied lm_head keeps its weight). Refuses the
    model itself ('') and a name that is no submodule: torch's set_submodule would add it beside the model's own
    layers, which would run unchanged."""
    if not isinstance(new, nn.Module):
        raise ConfigError(f"replace_module({name!r}): the replacement is a {type(new).__name__}, not an nn.Module")
    old = module_at(model, name) if name else None
    if old is None:
        names = [n for n, _ in model.named_modules() if n]
        near = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {near[0]!r}?" if near else "model.named_modules() lists the names"
        raise ConfigError(f"{name!r} is no submodule of {type(model).__name__}, so there is nothing to replace; {hint}")
    parent, _, child = name.rpartition(".")  # (not Module.set_submodule: torch >= 2.5, its strict= later still)
    setattr(model.get_submodule(parent) if parent else model, child, new)
    return old


BASE_LAYERS: dict[str, type] = {}
"""kind -> the class of a layer that replaced one of build_model's modules, which checkpoints name by that kind
(register_base_layer)"""

REGISTER = "lmforge.model.surgery.register_base_layer(KIND, cls)"


def register_base_layer(kind: str, cls: type) -> type:
    """Let checkpoints record modules of `cls` (put in place of build_model's modules: a quantized Linear) as `kind`,
    and load_model rebuild them. `cls` has a `settings` dict (JSON values) where it takes settings, and builds an
    empty layer for the checkpoint to fill with the classmethod `empty(**settings, dtype=, device=)` (in an
    nn.Linear's place `empty(in_features, out_features, bias, **settings, ...)`), or from_linear(linear,
    **settings) on a meta-device Linear (lmforge.adapt.qlora.base_shell has the rules). Returns cls."""
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"a base layer registers under a non-empty name (checkpoints record it), got {kind!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"register_base_layer({kind!r}, ...) takes an nn.Module class, got {cls!r}")
    if not callable(getattr(cls, "empty", None)) and not callable(getattr(cls, "from_linear", None)):
        raise ConfigError(f"{cls.__qualname__} has neither empty(**settings, dtype=, device=) nor "
                          "from_linear(linear, **settings): load_model builds a base layer with one of them; add a "
                          "classmethod empty (lmforge.model.surgery.register_base_layer)")
    return claim(BASE_LAYERS, kind, cls, "base layer kind")
