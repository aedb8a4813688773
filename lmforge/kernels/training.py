"""Put the fused training kernels into a built model, from outside it (as torchtitan's `parallelize`
functions do): the model code keeps its plain layers, which stay the references.

    apply_fused_kernels(model)   RMSNorm (incl. QK-norm)  -> kernels.rmsnorm.FusedRMSNorm
                                 MLP with SwiGLU          -> kernels.swiglu.FusedSwiGLUMLP
                                 MoE                      -> kernels.moe.TritonMoE (grouped GEMM dispatch)
                                 modules with a `rope_fn`  -> rope_fn = kernels.rope.rope (attention layers of
                                                              RoPE models call their RoPE through it)

    kernel_view(model)           a copy of the model with those kernels in, sharing every parameter and
                                 buffer (the model itself unchanged): the inference engine's forward on a GPU

Each module's class is replaced by a subclass that only overrides the forward (or the dispatch), so
parameters, buffers and state-dict names are untouched and checkpoints load either way. The loss side is
kernels.fused_ce.FusedLMObjective (pretraining's objective with the LM head and loss fused); RoPE is
kernels.rope.rope, a drop-in for layers.rope.apply_rope at its call in the attention layer.
"""

from __future__ import annotations

import itertools
import sys

import torch
from torch import nn

from lmforge.kernels.decode import pre_ampere, unavailable
from lmforge.model.layers.fused import shared_copy
from lmforge.model.layers.mlp import MLP
from lmforge.model.layers.moe import MoE
from lmforge.model.layers.norm import RMSNorm

KINDS = ("norm", "swiglu", "moe", "rope")


def unsupported(device: torch.device | str) -> str | None:
    """Why the Triton training kernels cannot run on `device`, or None when they can."""
    dev = torch.device(device)
    if (why := unavailable(dev)) is not None:
        return f"each Triton kernel {why}"
    if (why := pre_ampere(dev)) is not None:
        return f"the bf16 Triton kernels: each {why}"
    return None


def apply_fused_kernels(model: nn.Module, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """Swap the fused kernels into `model` in place; returns the names of the swapped modules. On a device
    the kernels do not support, prints a one-line notice and leaves the model as it is."""
    from lmforge.kernels.moe import TritonMoE
    from lmforge.kernels.rmsnorm import FusedRMSNorm
    from lmforge.kernels.rope import rope
    from lmforge.kernels.swiglu import FusedSwiGLUMLP

    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unknown fused kernel kind(s) {bad}: choose from {KINDS}")
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    why = unsupported(t.device) if t is not None else "the model has no parameters or buffers"
    if why is not None:
        from lmforge.parallel.reports import report_once

        say = f"fused kernels not applied: {why}; the plain layers run instead"
        if report_once(say):  # (the N processes of one --nproc launch: once)
            print(say, file=sys.stderr)
        return []
    swaps = {RMSNorm: ("norm", FusedRMSNorm), MLP: ("swiglu", FusedSwiGLUMLP), MoE: ("moe", TritonMoE)}
    done = []
    for name, m in model.named_modules():
        if "rope" in kinds and callable(getattr(m, "rope_fn", None)):
            m.rope_fn = rope
            done.append(name)
        kind, cls = swaps.get(type(m), (None, None))
        if kind not in kinds or (kind == "swiglu" and m.activation != "swiglu"):
            continue
        m.__class__ = cls  # a forward-only subclass: same attributes, parameters and names
        done.append(name)
    return done


def kernel_view(model: nn.Module, kinds: tuple[str, ...] = ("norm", "swiglu", "rope")) -> nn.Module | None:
    """A copy of `model` whose layers run the fused kernels, sharing every parameter and buffer with it (no
    weight is copied; in-place weight updates reach both), the model itself when it has no layer to swap,
    or None where the kernels cannot run (no notice: the caller keeps the plain model; `unsupported` says why).
    `model` itself is not changed, so the engine can use this for its forwards without touching the model a
    trainer or the user holds. MoE stays out by default: its dispatch is a training choice (`model.moe.gemm`)."""
    t = next(itertools.chain(model.parameters(), model.buffers()), None)
    if t is None or unsupported(t.device) is not None:
        return None
    view = shared_copy(model)
    return view if apply_fused_kernels(view, kinds) else model  # no layer to swap: the model as it is
