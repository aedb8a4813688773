"""Fused projections: several Linear layers that read the same input become one wider Linear.

q, k and v all project the attention input, gate and up both project the MLP input; one matmul with
the weights stacked row-wise computes all of them at once, and the output is split afterwards. The
arithmetic is the same (each output element is the same dot product), but one big kernel replaces
several small ones: at batch-1 decode every kernel launch and every partly-filled GPU wave costs time
that rivals the weight reads themselves. Checkpoints do not change: the module's state_dict still
shows the parts under their own names (split on save, stacked again on load), so a fused model loads
unfused checkpoints and HF weights, and writes files an unfused model reads.

Fusing in place (`Transformer.fuse_projections()`, or `fused_proj = true` for training) changes the
model's Parameters. Inference must not do that to the model it is given: `fused_copy(model)` returns a
copy that shares every other parameter and buffer with the model and owns the stacked weights, leaving
the model's parameters, their identities and its state_dict as they were.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Iterator
from functools import partial

import torch
from torch import nn


def plain_linear(module: nn.Module | None) -> bool:
    """A bare nn.Linear holding bare floating-point tensors: its .weight (and .bias) is its whole function. Paths
    that read the weight instead of calling the module (fusing, the batch-1 decode kernels, the fused LM-head
    loss, MLA's absorbed decode) must check this: a subclass or wrapper - a LoRALinear's B A, a quantized layer's
    scales - would drop out, and so would an nn.Linear whose weight is a tensor subclass (torchao's quantized
    tensors: reshaping or stacking them raises, or reads codes as values)."""
    return type(module) is nn.Linear and bare_tensor(module.weight) and (module.bias is None or
                                                                       bare_tensor(module.bias))


def bare_tensor(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> bool:
    """t is a plain torch.Tensor or nn.Parameter (no tensor subclass: quantized, distributed, ...) holding
    floating-point values - of `dtype`, where one is given - so reading it as a matrix reads what a layer
    computes with."""
    return (type(t) in (torch.Tensor, nn.Parameter) and t.is_floating_point()
            and (dtype is None or t.dtype == dtype))


class NotFusable(ValueError):
    """fuse_linears' refusal, raised before anything is changed."""


def fuse_linears(module: nn.Module, fused: str, parts: tuple[str, ...]) -> list[int]:
    """Replace module.<parts> (Linears on the same input, all with or all without bias) by module.<fused>,
    whose output is the parts' outputs concatenated in order; the parts become None. Returns their
    output sizes, for `torch.split`."""
    lins = [getattr(module, p) for p in parts]
    if not all(plain_linear(l) for l in lins):  # e.g. a LoRALinear: stacking .weight would drop its adapter
        kinds = [f"{type(l).__name__} of {type(getattr(l, 'weight', None)).__name__}" for l in lins]
        raise NotFusable(f"cannot fuse {parts}: they are {kinds}, not plain nn.Linear of plain float weights; "
                         "merge_lora(model) first (a quantized layer cannot be stacked: leave it unfused)")
    first = lins[0]
    has_bias = first.bias is not None
    if any(l.in_features != first.in_features or (l.bias is not None) != has_bias for l in lins):
        raise NotFusable(f"cannot fuse {parts}: they differ in input size or bias")
    sizes = [l.out_features for l in lins]
    out = nn.Linear(first.in_features, sum(sizes), bias=has_bias, device=first.weight.device,
                    dtype=first.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(torch.cat([l.weight for l in lins]))
        if has_bias:
            out.bias.copy_(torch.cat([l.bias for l in lins]))
    out.weight.requires_grad_(first.weight.requires_grad)
    if has_bias:
        out.bias.requires_grad_(first.bias.requires_grad)
    for p in parts:
        setattr(module, p, None)
    setattr(module, fused, out)
    module.register_state_dict_post_hook(partial(_split_keys, fused, parts, sizes))
    module.register_load_state_dict_pre_hook(partial(_join_keys, fused, parts))
    return sizes


def _split_keys(fused, parts, sizes, module, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: '<prefix><fused>.weight' -> one key per part (copies, so no tensors share memory)."""
    for kind in ("weight", "bias"):
        key = f"{prefix}{fused}.{kind}"
        if key in state_dict:
            for p, t in zip(parts, state_dict.pop(key).split(sizes, dim=0)):
                state_dict[f"{prefix}{p}.{kind}"] = t.clone()


def _join_keys(fused, parts, module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: stack the parts' keys into '<prefix><fused>.*' (a file holding the fused
    key itself, or missing a part, is left alone so load_state_dict reports it as usual)."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{p}.{kind}" for p in parts]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{fused}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])


def shared_copy(model: nn.Module) -> nn.Module:
    """A copy of `model`'s modules that holds the model's own tensors: parameters, buffers and any tensor a
    module keeps among its attributes (e.g. MoE's last aux loss, a non-leaf tensor that deepcopy refuses; a
    quantizer's record of absmax and code tables), however deep in lists, tuples, dicts, dataclasses or other
    objects (`reachable_tensors`), none of them copied. Module-level changes to the copy (classes, fused
    projections, hooks) leave `model` alone; in-place changes to the model's tensors reach it."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    for m in model.modules():
        shared.update((id(t), t) for t in reachable_tensors(vars(m)))
    return copy.deepcopy(model, shared)


def reachable_tensors(root: object) -> Iterator[torch.Tensor]:
    """Every tensor reachable from `root` through lists, tuples, sets, dicts, dataclass fields and other objects'
    attributes (`vars`), each object visited once; modules are not entered (shared_copy walks each itself), nor
    classes, functions or a tensor's own attributes (the tensor is shared whole)."""
    seen, todo = set(), [root]
    while todo:
        v = todo.pop()
        if id(v) in seen or isinstance(v, (nn.Module, type, str, bytes, int, float)) or callable(v):
            continue
        seen.add(id(v))
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, dict):
            todo += v.values()
        elif isinstance(v, (list, tuple, set, frozenset)):
            todo += v
        elif dataclasses.is_dataclass(v):
            todo += (getattr(v, f.name, None) for f in dataclasses.fields(v))
        elif hasattr(v, "__dict__"):
            todo += vars(v).values()


def fused_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose fusable projections (modules with a `fuse()` method: attention q/k/v, gated
    MLP gate/up) are fused; every other parameter and buffer is the model's own tensor (no copy), the
    stacked weights are new (the parts' bytes once more; none for a model already fused). `model` is not
    changed. A snapshot: later changes to the model's q/k/v or gate/up weights do not reach the copy.
    Parts that cannot be stacked (a LoRA adapter, a quantized layer, parts differing in bias) stay unfused:
    the copy computes the model's function either way, and fusing is only a speed-up."""
    out = shared_copy(model)
    for m in out.modules():
        if m is not out and hasattr(m, "fuse"):
            try:
                m.fuse()
            except NotFusable:
                pass
    return out
