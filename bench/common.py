"""Helpers several bench scripts share: the --sections list checked against the names a script knows, the weight
bytes a batch-1 decode step reads per token (the roofline's numerator), and the check that gates a variant's
timing on its agreement with the reference.

Imported as `bench.common` (the scripts put the repository root on sys.path first)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn


def parse_sections(ap: argparse.ArgumentParser, value: str, known: Iterable[str], option: str = "--sections"
                   ) -> list[str]:
    """The comma-separated `value` of `option` in the order given; an unknown name stops the script before anything
    runs (a misspelt section used to be skipped silently, or to fail only after the valid ones had run)."""
    known = list(known)
    names = [s for s in value.split(",") if s]
    unknown = [s for s in names if s not in known]
    if unknown:
        ap.error(f"{option}: unknown {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    return names


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one batch-1 decode step reads: every parameter once (a tied tensor once), except an
    embedding table looked up by the step (token or learned-position embedding), of which one row is read. A table
    tied to the head is counted whole, since the head's matmul reads all of it. MoE experts count whole (every
    expert may be routed to). For the 1.1B Llama shape in bf16: 2,069,028,864 bytes (the whole-table count,
    2,200,096,768, charged 131 MB of embedding rows no step reads)."""
    from lmforge.model.layers.position import LearnedPositions

    head = getattr(getattr(model, "lm_head", None), "weight", None)
    lookups = {id(m.weight) for m in model.modules()
               if isinstance(m, (nn.Embedding, LearnedPositions)) and m.weight is not head}
    total = 0
    for p in model.parameters():
        total += (p.shape[-1] if id(p) in lookups else p.numel()) * p.element_size()
    return total


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
"""max |x - reference| / max |reference| a variant may reach and still be timed: fp32 agrees to rounding; bf16
outputs carry its 8-bit mantissa (~4e-3 per value) plus different summation orders (the GPU tests of the fused
kernels use 2e-2-3e-2 of the largest value)"""


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, in fp32: one scale for the whole tensor, so entries near zero do not blow up."""
    got, want = got.detach().float(), want.detach().float()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def verdict(errors: Mapping[str, float], tol: float) -> str:
    """'ok', or 'FAIL' naming each comparison past `tol` (a NaN error fails)."""
    bad = [f"{name} {err:.2g}" for name, err in errors.items() if not err <= tol]
    return "ok" if not bad else f"FAIL ({', '.join(bad)} > {tol:g})"


def output_and_grads(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """layer(x) and the gradients of mean(layer(x)²) (the benches' forward+backward step) with respect to x
    ("x") and to each parameter by name; x's and the parameters' .grad are cleared before and after."""
    x.grad = None
    layer.zero_grad(set_to_none=True)
    out = layer(x)
    out.float().square().mean().backward()
    grads = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}}
    x.grad = None
    layer.zero_grad(set_to_none=True)
    return out.detach(), grads


def compare(got: tuple[torch.Tensor, dict[str, torch.Tensor]], want: tuple[torch.Tensor, dict[str, torch.Tensor]]
            ) -> dict[str, float]:
    """rel_err of output_and_grads' output ("forward") and of each gradient the reference has ("grad NAME"; a
    gradient the variant lacks is infinitely wrong)."""
    errors = {"forward": rel_err(got[0], want[0])}
    for name, w in want[1].items():
        errors[f"grad {name}"] = rel_err(got[1][name], w) if name in got[1] else float("inf")
    return errors
