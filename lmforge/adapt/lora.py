"""LoRA: low-rank adapters on a frozen model (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large
Language Models").

A Linear layer y = x W^T + b (W: (out, in)) is fine-tuned as

    y = x W^T + b + scale · dropout(x) A^T B^T          A: (r, in), B: (out, r), r << min(in, out)

with W and b frozen (eq. 3 of the paper: ΔW = BA). A starts Kaiming-uniform and B at zero, so the adapted
model starts as the base model; scale = alpha / r (section 4.1), or alpha / sqrt(r) with rsLoRA (Kalajdzievski
2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA"), which keeps the update's size
independent of r. Initialisation, scale and forward are PEFT's (`peft.LoraConfig`), tested equal.

    lora_cfg = LoRAConfig(r=8, alpha=16, targets=("wq", "wk", "wv", "wo"), trainable=("head",))
    apply_lora(model, lora_cfg)          # in place: matching Linears -> LoRALinear, everything else frozen
    print(trainable_parameters(model))   # trainable 12,288 of 1,234,567 (1.00%)
    ... train with the one Trainer (only requires_grad parameters reach the optimizer) ...
    state = lora_state_dict(model, lora_cfg)   # adapters + the modules kept trainable: a small checkpoint
    load_lora(model, state)                    # into a model given the same apply_lora
    merge_lora(model)                          # W += scale·BA, LoRALinear -> nn.Linear: a plain model again
    with adapters_disabled(model): ...         # the base model again, without a second copy of its weights

`adapters_disabled` is what a LoRA run's reference is made of (lmforge.align.frozen.BaseReference): DPO's
and KTO's pi_ref, or the KL anchor of RL, is the starting model, and with adapters off the policy computes
exactly that function from the weights it already holds.

Targets are module-name patterns (fnmatch): a pattern matches a module whose dotted name it matches, or
whose name ends with "." + pattern, as PEFT's target_modules list. lmforge's Transformer names its Linears
attn.wq / wk / wv / wo, mlp.gate / up / down and lm_head (HF checkpoints load into the same names). A model
built with fused_proj=true has attn.wqkv and mlp.gate_up instead; LoRA on those adapts the stacked
projection with one A, a different (smaller) adapter than one per part. Choosing the layers and swapping them
in are the model's neutral seams, which quantizers share (lmforge.model.surgery: matches, outer_layers,
replace_module).

LoRALinear keeps the base layer's `weight` and `bias` under their own names, so a LoRA model's state_dict
is the base model's plus `*.lora_A` / `*.lora_B`: the layer's `adapter_params`, which a subclass with an adapter
parameter of its own (DoRA's magnitude) extends; `adapter_names(model)` lists them for every reader (adapter
checkpoints, BaseReference, lmforge.checkpoint.frozen_names). The paths that read a projection's `.weight` alone do
not take an unmerged adapter silently: the engine's batch-1 kernel step stays off (kernel_step=True is
refused), the fused linear + cross-entropy loss refuses an adapted lm_head, and MLA's absorbed decode falls
back to its naive path for an adapted wkv_b (all through lmforge.model.layers.fused.plain_linear), and
save_pretrained refuses state its HF layout would drop. Merge (merge_lora) to serve at full speed.

QLoRA (Dettmers et al. 2023): the frozen base may be any linear-like layer other than a plain nn.Linear of float
weights (lmforge.model.layers.fused.plain_linear) - a quantized Linear (integer in_features / out_features, forward
(..., in) -> (..., out)), an nn.Linear subclass with its own forward, or an nn.Linear holding a tensor subclass
(torchao's quantized weights, whose arithmetic is not a float matrix's). LoRALinear then keeps it whole as the
submodule `base` and calls it (its state_dict keys gain `base.`: `wq.base.qweight`; named_parameters and
named_buffers agree, so adapter-only checkpoints still leave its frozen parameters and buffers, the quantized codes,
out), and the update cannot be merged into it (merge_lora refuses; remove_lora puts it back). A quantized layer's
own parts (an LLM.int8-style outlier nn.Linear inside it) are never targets: the layer is adapted whole
(outer_layers). Checkpoints record the quantized layers by a registered kind (register_base_layer in
lmforge.model.surgery; lmforge.adapt.qlora records them), so load_model rebuilds them under the adapters.

DoRA (LoRAConfig(dora=True); lmforge.adapt.dora.DoRALinear) is a LoRALinear with a trained magnitude; each layer's
`kind` is what a checkpoint records (lora_record), so load_model builds the same layer class back; a subclass
lmforge does not know is recorded by its class's path and refused there by name.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.adapt.config import LoRAConfig
from lmforge.errors import ConfigError
from lmforge.model.layers.fused import bare_tensor, plain_linear
from lmforge.model.surgery import (matches, module_at, outer_layers,  # (the neutral seams: re-exported)
                                   replace_module, state_dict_name, unwrapped_modules)
from lmforge.model.transformer import linear_shape


def linear_like(module: nn.Module) -> bool:
    """A layer LoRA can adapt: an nn.Linear, or a layer with integer in_features and out_features whose forward
    maps (..., in) -> (..., out) - a quantized Linear (QLoRA's frozen 4-bit base), an nn.Linear subclass."""
    return linear_shape(module) is not None and not isinstance(module, LoRALinear)


class LoRALinear(nn.Module):
    """A frozen Linear (the base layer's own weight and bias Parameters) plus scale · B A; with `enabled`
    False (adapters_disabled) the plain Linear, bit for bit. Over any other linear-like base (a quantized
    Linear, an nn.Linear subclass or one holding torchao's quantized weight: see the module docstring) the base
    is kept whole as `self.base` and called; `weight` and `bias` are then None.

    `adapter_params` names the layer's own adapter parameters (what the base layer lacks: trained, saved in
    adapter checkpoints, left out of BaseReference's checksum); a subclass adding one (DoRA's magnitude vector)
    extends it, and every reader (adapter_names) follows."""

    adapter_params: tuple[str, ...] = ("lora_A", "lora_B")
    kind = "lora"
    """the name a checkpoint records the layer under (lora_record; layer_kinds() maps it back to the class)"""

    def __init__(self, base: nn.Module, r: int, scale: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        if plain_linear(base):  # its .weight and .bias are its whole function (not a torchao tensor subclass)
            self.base = None
            self.weight, self.bias = base.weight, base.bias  # (out, in), (out,) | None: shared, frozen
        else:  # reading its .weight would drop what its forward does (dequantization, scales, ...)
            self.base, self.weight, self.bias = base, None, None
        (base if self.base is not None else self).requires_grad_(False)
        like = next((t for t in (*base.parameters(), *base.buffers()) if t.is_floating_point()), None)
        device = like.device if like is not None else next(base.buffers(), torch.empty(0)).device
        # adapters in fp32 over a half-precision base, as PEFT (autocast_adapter_dtype)
        dtype = like.dtype if like is not None and like.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default, as LoRA's and PEFT's code
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.train(base.training)  # in an eval-mode model (load_model's), no adapter dropout until model.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x) if self.base is not None else F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        delta = F.linear(F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A), self.lora_B)  # (..., out)
        return (out + delta * self.scale).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale · B A, (out, in), in the adapters' dtype (fp32 over a half-precision base): added in place,
        `weight.add_(delta)` rounds the sum once, as PEFT's merge; cast first, it would round twice."""
        return self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.lora_A.shape[0]}, scale={self.scale:g}"

    def unwrapped(self) -> nn.Module:
        """The base layer without the update: the wrapped module, or an nn.Linear of the same weight and bias."""
        if self.base is not None:
            return self.base
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight, plain.bias = self.weight, self.bias
        return plain.train(self.training)


def adapter_names(model: nn.Module) -> set[str]:
    """Names (as in model.state_dict() and named_parameters) of the adapter parameters of every LoRA layer in
    `model` (each layer's `adapter_params`, under each name a shared layer has): what a base model lacks."""
    return {f"{name}.{p}" if name else p for name, m in model.named_modules(remove_duplicate=False)
            if isinstance(m, LoRALinear) for p in m.adapter_params}


def _matching(model: nn.Module, names: list[str], patterns: tuple[str, ...], what: str, kind: str, hint: str
              ) -> list[str]:
    """The names matching any pattern; refuses a pattern that matches none of them."""
    for p in patterns:
        if not any(matches(n, (p,)) for n in names):
            raise ConfigError(f"{what} {p!r} matches no {kind} of {type(model).__name__}; {hint}")
    return [n for n in names if matches(n, patterns)]


def _short_names(names: list[str]) -> list[str]:
    """The last parts of dotted module names, sorted, without list indices ('blocks.0.attn.wq' -> 'wq')."""
    tails = {n.rsplit(".", 1)[-1] for n in names}
    return sorted(t for t in tails if not t.isdigit())


def _refuse_tied(model: nn.Module, targets: list[str]) -> None:
    """A tied weight (lm_head = tok_emb) cannot take a merged update without changing its other owner."""
    owners: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(n)
    for name in targets:
        weight = getattr(model.get_submodule(name), "weight", None)
        if not isinstance(weight, nn.Parameter):  # a quantized layer: no shared float weight to tie
            continue
        other = [o for o in owners[id(weight)] if o != f"{name}.weight"]
        if other:
            raise ConfigError(f"{name}.weight is tied to {other[0]}; LoRA on it could not be merged without "
                              f"changing both; leave {name} out of targets")


def _refuse_rank(model: nn.Module, targets: list[str], r: int) -> None:
    """An update B A has rank at most min(r, in, out): an r above min(in, out) of every target buys no rank
    anywhere, only memory (`--lora.r 100000` ran the demo out of memory with a traceback). PEFT takes any r,
    and an r above a narrow layer's min (a GQA wk of out 128 at r=256) still adds rank to the wider ones: kept."""
    widest = max(min(model.get_submodule(n).in_features, model.get_submodule(n).out_features) for n in targets)
    if r > widest:
        raise ConfigError(f"r={r} exceeds min(in, out) of every adapted layer (at most {widest}), where B A's rank "
                          f"stops: give r <= {widest}")


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """In place: every nn.Linear (or other linear_like layer: a quantized Linear, for QLoRA) matching
    cfg.targets becomes a LoRALinear (not the parts inside a quantized layer: outer_layers); every other
    parameter is frozen except those of modules matching cfg.trainable and of the model's task heads (its
    `task_heads`, module names: a reward model's or critic's scalar head, new weights for its task, trains in
    full, as PEFT trains a sequence classifier's score head, which its SEQ_CLS task adds to modules_to_save;
    a task head that is itself a target gets its adapter instead). Returns the model. Refuses a pattern
    that matches nothing, a tied target weight, a layer the adapter cannot wrap (DoRA over a quantized base)
    and a model that already has adapters; a refused call leaves the model as it was."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ConfigError(f"{type(model).__name__} already has LoRA adapters; merge_lora(model) first, or "
                          "apply_lora to a fresh model")
    linears = list(outer_layers(model))
    targets = _matching(model, linears, cfg.targets, "LoRA target", "nn.Linear (or linear-like layer)",
                        f"its Linear layers are named {', '.join(_short_names(linears))} (a quantized layer's own "
                        "parts are adapted with it, not alone)")
    modules = [n for n, _ in model.named_modules() if n]
    kept = _matching(model, modules, cfg.trainable, "trainable pattern", "module",  # it said "e.g. 'head'" to 'head'
                     f"its modules are named {', '.join(_short_names(modules))}")
    _refuse_tied(model, targets)
    _refuse_rank(model, targets, cfg.r)
    layer = layer_kinds()["dora" if cfg.dora else "lora"]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:  # every layer is built before the model changes (building one freezes its base)
        built = {name: layer(model.get_submodule(name), cfg.r, cfg.scale, cfg.dropout) for name in targets}
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    model.requires_grad_(False)
    heads = [n for n in getattr(model, "task_heads", ()) if n not in built]
    for name in dict.fromkeys([*kept, *heads]):
        model.get_submodule(name).requires_grad_(True)
    for name, wrapped in built.items():
        replace_module(model, name, wrapped)
    return model


def layer_kinds() -> dict[str, type[LoRALinear]]:
    """The adapter layers a checkpoint can name (lora_record's third entry), by their `kind`."""
    from lmforge.adapt.dora import DoRALinear

    return {"lora": LoRALinear, "dora": DoRALinear}


def _kind(layer: LoRALinear) -> str:
    """The name a checkpoint records `layer` under: its kind when that names its class, else its class's path
    (a subclass lmforge does not know: restore_lora refuses it by name)."""
    if layer_kinds().get(layer.kind) is type(layer):
        return layer.kind
    return f"{type(layer).__module__}.{type(layer).__qualname__}"


def lora_record(model) -> dict[str, list]:
    """{layer: [r, scale]} of a model's unmerged adapters, [r, scale, kind] for a layer other than plain LoRA
    (DoRA's "dora"): what a checkpoint records (restore_lora's input), each layer under its state_dict name (an
    activation-checkpointed model's too: lmforge.model.surgery.state_dict_name). A stand-in for a model (a sharded
    model's gathered weights) gives its `lora` attribute."""
    if not isinstance(model, nn.Module):
        return dict(getattr(model, "lora", {}))
    return {n: [m.lora_A.shape[0], m.scale, *([kind] if (kind := _kind(m)) != "lora" else [])]
            for n, m in unwrapped_modules(model).items() if isinstance(m, LoRALinear)}


def restore_lora(model: nn.Module, layers: dict[str, list]) -> nn.Module:
    """In place: the LoRA layers a checkpoint records ({name: [r, scale(, kind)]}, lmforge.checkpoint.model_meta)
    around the model's Linears, so its weights load as they were saved (no dropout: for inference and
    evaluation; apply_lora builds adapters to train). Returns the model."""
    kinds = layer_kinds()
    for name, (r, scale, *kind) in layers.items():
        name = state_dict_name(name)  # (an activation-checkpointed run's record before names were: a wrapper's part)
        layer = kinds.get(kind[0] if kind else "lora")
        if layer is None:
            raise ConfigError(f"the checkpoint's LoRA layer {name} is a {kind[0]}, an adapter layer lmforge does not "
                              f"build (it builds {', '.join(kinds)}); build the model yourself (apply that layer) "
                              "and load_weights(model, path)")
        base = module_at(model, name)
        if base is None or not linear_like(base):
            raise ConfigError(f"the checkpoint has a LoRA adapter on {name}, which is not a Linear layer of "
                              f"{type(model).__name__}")
        replace_module(model, name, layer(base, int(r), float(scale)))
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the context every LoRALinear of `model` computes its base layer alone (the base model's
    function, from the same weights); each layer's previous `enabled` comes back on exit, error or not.
    Refuses a model without adapters (merged or never applied), whose "base" would be the model itself."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no LoRA adapters to disable (merged, or apply_lora was "
                          "never called); its base model is a separate copy of the weights")
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, enabled in zip(layers, before):
            m.enabled = enabled


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """In place: fold scale · B A into each base weight and put a plain nn.Linear (the same weight and bias
    Parameters) back in the LoRALinear's place. The function is unchanged up to rounding; requires_grad
    stays as apply_lora left it (model.requires_grad_(True) to train it in full). Returns the model."""
    layers = lora_layers(model)
    off = [n for n, m in layers.items() if not m.enabled]
    if off:  # the merged layer would compute the adapted function, not the disabled one asked for
        raise ConfigError(f"LoRA layer {off[0]} is disabled (inside adapters_disabled); merge outside it")
    # every layer checked before any changes: folding B A into packed low-bit weights would requantize them (not
    # the trained function), and adding to a tensor subclass (torchao) raises half-way through the model
    wrapped = unmergeable(model)
    if wrapped:
        base = layers[wrapped[0]].unwrapped()
        w = getattr(base, "weight", None)
        held = f" of {type(w).__name__} {w.dtype}" if isinstance(w, torch.Tensor) else ""
        raise ConfigError(f"LoRA layer {wrapped[0]} wraps a {type(base).__name__}{held}, not an nn.Linear of float "
                          "weights (e.g. a quantized base, QLoRA): its update cannot be merged into it; serve it "
                          "unmerged, save the adapters alone (lora_state_dict), or merge onto a full-precision copy")
    for name, lora in layers.items():
        lora.weight.add_(lora.delta_weight())  # the fp32 delta added in place: W + scale·BA rounded once
        replace_module(model, name, lora.unwrapped())
    return model


def mergeable(layer: LoRALinear) -> bool:
    """Whether merge_lora can fold the layer's update into its base: a plain float weight the layer holds, not a
    wrapped quantized base (folding B A into packed low-bit codes would requantize them) nor a tensor subclass."""
    return layer.base is None and bare_tensor(layer.weight)


def unmergeable(model: nn.Module) -> list[str]:
    """The names of the model's LoRA layers merge_lora cannot fold (not `mergeable`: a QLoRA checkpoint's)."""
    return [n for n, m in lora_layers(model).items() if not mergeable(m)]


def remove_lora(model: nn.Module) -> dict[str, LoRALinear]:
    """In place: put each LoRALinear's base Linear (the same weight and bias Parameters) back without its
    update, which leaves the base model; returns the removed layers by name, adapters and scales intact (what
    `lmforge export --adapter` writes apart from the base)."""
    layers = lora_layers(model)
    for name, lora in layers.items():
        replace_module(model, name, lora.unwrapped())
    return layers


SCALE = ".lora_scale"
"""key suffix of each adapter's scale in an adapter checkpoint (not a model tensor: load_lora checks it)"""


def lora_state_dict(model: nn.Module, cfg: LoRAConfig) -> dict[str, torch.Tensor]:
    """The adapter checkpoint: every LoRA A and B, every parameter apply_lora left trainable (those of the
    modules cfg.trainable names and of their submodules; detached; keys as in model.state_dict()), and each
    adapter's scale as `<layer>.lora_scale` (fp64 scalars), which load_lora checks: adapters trained at one
    alpha / r are wrong at another."""
    layers = lora_layers(model)
    if not layers:
        raise ConfigError(f"{type(model).__name__} has no LoRA adapters; apply_lora(model, cfg) first")
    adapters = adapter_names(model)
    state = {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)
             if n in adapters or p.requires_grad}
    return {**state, **{n + SCALE: torch.tensor(m.scale, dtype=torch.float64) for n, m in layers.items()}}


@torch.no_grad()
def load_lora(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an adapter checkpoint (lora_state_dict) into a model given the same apply_lora. Refuses a
    missing adapter, an unknown key, a shape mismatch or another scale (alpha, r, rslora) before copying
    anything. (Checkpoints without scales, from before they were saved, load unchecked.)"""
    params = dict(model.named_parameters(remove_duplicate=False))
    layers = lora_layers(model)
    scales = {n[: -len(SCALE)]: float(t) for n, t in state.items() if n.endswith(SCALE)}
    state = {n: t for n, t in state.items() if not n.endswith(SCALE)}
    adapters = adapter_names(model)
    needed = [n for n in params if n in adapters]
    missing = [n for n in needed if n not in state]
    unknown = [n for n in state if n not in params] + [n + SCALE for n in scales if n not in layers]
    if not needed or missing or unknown:
        raise ConfigError(f"adapter state does not fit this model: missing {missing[:3]}, unknown {unknown[:3]}; "
                          "apply_lora with the config the adapters were trained with, then load_lora")
    for n, t in state.items():
        if t.shape != params[n].shape:
            raise ConfigError(f"adapter tensor {n} has shape {tuple(t.shape)}, the model expects "
                              f"{tuple(params[n].shape)}; use the same r and targets")
    for n, scale in scales.items():
        if not math.isclose(scale, layers[n].scale, rel_tol=1e-12):
            raise ConfigError(f"adapter {n} was trained with scale {scale:g}, this model's LoRAConfig gives "
                              f"{layers[n].scale:g}; use the same alpha, r and rslora")
    for n, t in state.items():
        params[n].copy_(t)


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} ({100 * self.fraction:.2f}%)"


def trainable_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameter counts (tied parameters once), as PEFT's print_trainable_parameters. The total
    is lmforge.model.transformer.parameter_count, Transformer.num_params' rule: a quantized layer counts as its
    in x out weights whether its codes sit in buffers or in Parameters (bitsandbytes' Params4bit), so a QLoRA
    model's total is the model's size, not its floating-point remainder, nor its packed codes."""
    from lmforge.model.transformer import parameter_count  # (the model code: not needed by LoRAConfig's users)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ParamCount(trainable, parameter_count(model))
