"""Which norm feeds which linear layers: the model's structure as weight-only quantizers see it.

AWQ (Lin et al. 2024, §3.2) and SmoothQuant (Xiao et al. 2023, §4) move a per-input-channel scale s out of a
linear layer's input and into whatever produced it: y = (x / s)(W diag(s))ᵀ is the same function, and when x is
a norm's output, x / s is the norm with its weight (and bias) divided by s - free at inference. GPTQ (Frantar et
al. 2023) quantizes the linears that read one input together, sharing their calibration statistics. Both need
the groups of linears reading the same norm, which the module tree alone does not say:

    pre-norm, sandwich  norm1 -> attention's q/k/v (MLA: wq or wq_a, and wkv_a); norm2 -> the MLP's gate/up
    parallel (GPT-J)    norm1 -> q/k/v and gate/up together (one norm, both sublayers)
    post-norm           the norm's output is also the residual stream: a scale folded into it would change
                        the residual, so those groups are listed but not foldable; block 0's attention reads
                        the embeddings
    MLA                 q_norm -> wq_b, kv_norm -> wkv_b (kv_norm's output is the cached latent)
    MoE                 norm2 -> the router (and noisy gating's noise layer) as well as the experts' stacked
                        w_gate / w_up (E, out, in) and the shared expert: the router's columns take s too, or
                        routing changes
    output              final_norm -> lm_head, also read by the MTP depths' norms (the shared head); a head
                        tied to the token embedding is not foldable: its columns are the embedding's too
    MTP (DeepSeek-V3)   h_norm and e_norm -> proj's two halves of input columns; each depth's block as above

Linears whose input is no norm's output (attention's wo, the MLP's down, experts' w_down) are listed too, with
no norm, so the groups cover every linear weight of the model once (per input column).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.layers.fused import bare_tensor

NOT_FOLDABLE = ("residual", "tied", "no-norm")
"""notes that make a group's scale impossible to fold into its norms without changing the model's function"""


@dataclass(frozen=True, kw_only=True)
class LinearGroup:
    norms: tuple[str, ...]
    """module names of the norms whose output is these linears' input (several: alternatives, in different
    forwards, e.g. final_norm and the MTP norms before the shared head); () = the input is not a norm's output"""
    linears: tuple[str, ...]
    """module names of layers with a .weight (out, in) (nn.Linear, or what replaced one: a quantized or LoRA
    layer under the same name), or parameter names of MoE's stacked experts, (E, out, in): input on the last axis"""
    columns: tuple[int, int] | None = None
    """the input columns [lo, hi) the norms feed (MTP's proj reads two norms side by side); None = all"""
    notes: tuple[str, ...] = ()
    """'fused' (stacked q/k/v or gate/up), 'parallel' (norm shared by attention and MLP), 'router' (the MoE router
    reads the norm: fold into it too, keep it unquantized), 'experts', 'latent' (MLA's kv_norm: its output is
    cached), 'shared-head' (lm_head after several norms), 'hidden-states' (final_norm's output is also what
    return_hidden=True gives a draft head: folding changes those features, not the logits), 'concat' (see
    columns); not foldable: 'residual' (post-norm: the norm's output is also the residual stream), 'tied' (a
    weight shared with a parameter outside the group), 'no-norm'"""

    @property
    def foldable(self) -> bool:
        """Whether a per-channel scale folds exactly: norms' weights / s, the linears' input columns * s."""
        return bool(self.norms) and not set(self.notes) & set(NOT_FOLDABLE)


def tied_weights(model: nn.Module) -> list[tuple[str, ...]]:
    """Names of parameters sharing one tensor, each group in named_parameters order: [('tok_emb.weight',
    'lm_head.weight')] for tie_embeddings. A change to one (a folded scale, a merged adapter) changes all."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    return [tuple(names) for names in owners.values() if len(names) > 1]


def linear_groups(model: nn.Module) -> list[LinearGroup]:
    """Every linear weight of an lmforge Transformer grouped by the norm that feeds it (module docstring), in
    forward order: each block's groups, the MTP depths', then the output head's."""
    if not hasattr(model, "blocks") or not hasattr(model, "lm_head"):
        raise LmforgeError(f"linear_groups reads lmforge Transformer models, got {type(model).__name__}")
    groups: list[LinearGroup] = []
    feeds = None  # post-norm: the previous block's norm2, whose output the next attention reads
    for i, block in enumerate(model.blocks):
        feeds = _block_groups(groups, f"blocks.{i}", block, feeds)
    mtp = getattr(model, "mtp", None)
    head_norms = ["final_norm" if model.final_norm is not None else None]
    if mtp is not None:
        for k, mod in enumerate(mtp.modules_):
            pre = f"mtp.modules_.{k}"
            if hasattr(mod, "proj"):  # sequential: proj(cat(h_norm(h), e_norm(embedding)))
                d = mod.proj.in_features // 2
                groups += [LinearGroup(norms=(f"{pre}.h_norm",), linears=(f"{pre}.proj",), columns=(0, d),
                                       notes=("concat",)),
                           LinearGroup(norms=(f"{pre}.e_norm",), linears=(f"{pre}.proj",), columns=(d, 2 * d),
                                       notes=("concat",))]
                mod = mod.block
                pre += ".block"
            _block_groups(groups, pre, mod, None)
            head_norms.append(f"mtp.norms.{k}")
    notes = ("hidden-states",) if model.final_norm is not None else ()
    if None in head_norms:
        notes += ("no-norm",)
    if len(head_norms) > 1:
        notes += ("shared-head",)
    groups.append(LinearGroup(norms=tuple(n for n in head_norms if n is not None), linears=("lm_head",),
                              notes=notes))
    return [_mark_tied(model, g) for g in groups]


def _block_groups(groups: list[LinearGroup], pre: str, block: nn.Module, feeds: str | None) -> str | None:
    """Appends one Block's groups; feeds: post-norm's norm whose output this block's attention reads.
    Returns the norm the next block's attention reads (post-norm), else None."""
    attn_in, attn_out = _attention(pre + ".attn", block.attn)
    mlp_in, mlp_out, moe = _mlp(pre + ".mlp", block.mlp)
    a_notes, m_notes = _fused(attn_in), _fused(mlp_in) + (("router", "experts") if moe else ())
    if block.kind == "parallel":
        groups.append(LinearGroup(norms=(f"{pre}.norm1",), linears=attn_in + mlp_in,
                                  notes=("parallel",) + a_notes + m_notes))
    elif block.kind == "post":  # x = norm1(x + attn(x)); x = norm2(x + mlp(x))
        groups.append(LinearGroup(norms=(feeds,) if feeds else (), linears=attn_in,
                                  notes=(("residual",) if feeds else ("no-norm",)) + a_notes))
        groups.append(LinearGroup(norms=(f"{pre}.norm1",), linears=mlp_in, notes=("residual",) + m_notes))
    else:  # pre-norm and sandwich: the post-sublayer norms read the sublayers' outputs, never a linear's input
        groups.append(LinearGroup(norms=(f"{pre}.norm1",), linears=attn_in, notes=a_notes))
        groups.append(LinearGroup(norms=(f"{pre}.norm2",), linears=mlp_in, notes=m_notes))
    attn = block.attn
    if getattr(attn, "wq_b", None) is not None:  # MLA's query and key/value up-projections
        groups.append(LinearGroup(norms=(f"{pre}.attn.q_norm",), linears=(f"{pre}.attn.wq_b",)))
    if hasattr(attn, "wkv_b"):
        groups.append(LinearGroup(norms=(f"{pre}.attn.kv_norm",), linears=(f"{pre}.attn.wkv_b",), notes=("latent",)))
    groups.append(LinearGroup(norms=(), linears=attn_out, notes=("no-norm",)))
    groups.append(LinearGroup(norms=(), linears=mlp_out, notes=("no-norm",) + (("experts",) if moe else ())))
    return f"{pre}.norm2" if block.kind == "post" else None


def _fused(names: tuple[str, ...]) -> tuple[str, ...]:
    return ("fused",) if any(n.endswith((".wqkv", ".gate_up")) for n in names) else ()


def _attention(pre: str, attn: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(linears reading the block's attention input, those reading attention's output)."""
    names = ("wqkv",) if getattr(attn, "wqkv", None) is not None else ("wq", "wk", "wv", "wq_a", "wkv_a")
    return tuple(f"{pre}.{n}" for n in names if getattr(attn, n, None) is not None), (f"{pre}.wo",)


def _mlp(pre: str, mlp: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(linears reading the MLP's input, those reading its hidden activations, whether it is a MoE)."""
    if hasattr(mlp, "router"):  # MoE: stacked routed experts beside the router and the shared expert
        ex = mlp.experts
        into = [f"{pre}.router"] + ([f"{pre}.noise"] if mlp.noise is not None else [])
        into += [f"{pre}.experts.{w}" for w in ("w_gate", "w_up") if getattr(ex, w) is not None]
        into_shared, out_shared, _ = _mlp(f"{pre}.shared", mlp.shared) if mlp.shared is not None else ((), (), 0)
        return tuple(into) + into_shared, (f"{pre}.experts.w_down",) + out_shared, True
    names = ("gate_up",) if getattr(mlp, "gate_up", None) is not None else ("gate", "up")
    return tuple(f"{pre}.{n}" for n in names if getattr(mlp, n, None) is not None), (f"{pre}.down",), False


def _mark_tied(model: nn.Module, group: LinearGroup) -> LinearGroup:
    """The group with 'tied' noted where one of its weights is shared with a parameter outside it."""
    own = {f"{n}.weight" for n in group.linears} | set(group.linears)
    for names in tied_weights(model):
        if own & set(names) and not set(names) <= own:
            return LinearGroup(norms=group.norms, linears=group.linears, columns=group.columns,
                               notes=group.notes + ("tied",))
    return group


def group_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight a LinearGroup entry names: the module's .weight (out, in), or the stacked parameter (E, out, in)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:  # not a module: MoE's stacked expert weights
        return model.get_parameter(name)
    if getattr(module, "weight", None) is None:
        raise LmforgeError(f"{name} is a {type(module).__name__} without a .weight (a quantized or adapted layer); "
                           "read the structure before quantizing or adapting the model")
    return module.weight


def fold_scale(model: nn.Module, group: LinearGroup, s: torch.Tensor) -> None:
    """In place: each norm's weight (and bias) / s, each linear's input columns * s; the model computes the same
    function (exactly, up to rounding). s: (width,) positive, width = the group's columns or the linears' input
    size. Refuses a group that is not foldable, and weights that are not plain float tensors (fold before
    quantizing: a quantized layer's codes cannot take the scale)."""
    if not group.foldable:
        raise LmforgeError(f"cannot fold a scale into {group.norms or 'no norm'} -> {group.linears}: "
                           f"{', '.join(n for n in group.notes if n in NOT_FOLDABLE)} (see LinearGroup.notes)")
    _fold(model, group, s)


@torch.no_grad()
def _fold(model: nn.Module, group: LinearGroup, s: torch.Tensor) -> None:
    lo, hi = group.columns or (0, s.shape[0])
    tensors = [(n, group_weight(model, n)) for n in group.linears]
    for name in group.norms:
        norm = model.get_submodule(name)
        tensors += [(f"{name}.{k}", t) for k in ("weight", "bias") if (t := getattr(norm, k, None)) is not None]
    for name, t in tensors:
        if not bare_tensor(t):
            raise LmforgeError(f"{name} is a {type(t).__name__} of {t.dtype}, not a plain float tensor; fold scales "
                               "before quantizing or adapting the model")
    for name in group.norms:
        norm = model.get_submodule(name)
        norm.weight.div_(s.to(norm.weight))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias))
    for _, w in tensors[:len(group.linears)]:  # the linears' (then the norms') tensors
        w[..., lo:hi] *= s.to(w)
