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

Linears whose input is no norm's output (attention's wo, the MLP's down, experts' w_down) are listed too, so the
groups cover every linear weight of the model once (per input column). Where the linear producing that input is
linear in its output rows, AWQ folds the scale into it instead (llm-awq's auto_scale, Lin et al. 2024 §3.2: v -> o
and up -> down), and the group names it as a producer:

    v -> o       plain attention's wv (not fused into wqkv; MLA's values come out of wkv_b beside the keys): v is
                 never rotated (RoPE turns q and k only) and attention mixes it linearly, so wv's rows / s give o's
                 input / s. GQA: each value head is read by n_heads / n_kv_heads query heads, so s must be equal
                 across the query heads of one KV group (LinearGroup.repeat)
    up -> down   a gated MLP, down(act(gate(x)) · up(x)): the hidden is linear in up, so up's rows / s. Not a plain
                 MLP's act(up(x)), nor swiglu_oss's clamped up, nor a fused gate_up (fold before fusing)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.layers.attention import Attention
from lmforge.model.layers.fused import bare_tensor, plain_linear
from lmforge.model.layers.mlp import MLP

NOT_FOLDABLE = ("residual", "tied", "no-norm")
"""notes that make a group's scale impossible to fold into its norms (or producers) without changing the model's
function"""


@dataclass(frozen=True, kw_only=True)
class LinearGroup:
    norms: tuple[str, ...]
    """module names of the norms whose output is these linears' input (several: alternatives, in different
    forwards, e.g. final_norm and the MTP norms before the shared head); () = the input is not a norm's output"""
    linears: tuple[str, ...]
    """module names of layers with a .weight (out, in) (nn.Linear, or what replaced one: a quantized or LoRA
    layer under the same name: group_weight and fold_scale refuse those), or parameter names of MoE's stacked
    experts, (E, out, in): input on the last axis"""
    columns: tuple[int, int] | None = None
    """the input columns [lo, hi) the norms feed (MTP's proj reads two norms side by side); None = all"""
    producers: tuple[str, ...] = ()
    """module names of the plain Linears whose output is these linears' input, where a scale folds exactly into
    their output rows (and bias) / s: AWQ's v -> o and up -> down (module docstring); () = none"""
    repeat: tuple[int, int] | None = None
    """(r, d) where the linears' input is the producers' output with each block of d channels repeated r times in
    a row (GQA's v -> o: r = n_heads / n_kv_heads query heads read each value head of d = head_dim channels): s
    must be equal across the r copies, and the producers' rows take one; None = the input is the output itself"""
    notes: tuple[str, ...] = ()
    """'fused' (stacked q/k/v or gate/up), 'parallel' (norm shared by attention and MLP), 'router' (the MoE router
    reads the norm: fold into it too, keep it unquantized), 'experts', 'latent' (MLA's kv_norm: its output is
    cached), 'shared-head' (lm_head after several norms), 'hidden-states' (final_norm's output is also what
    return_hidden=True gives a draft head: folding changes those features, not the logits), 'concat' (see
    columns); not foldable: 'residual' (post-norm: the norm's output is also the residual stream), 'tied' (a
    weight shared with a parameter outside the group), 'no-norm' (neither a norm nor a producer takes the scale)"""

    def __post_init__(self):
        if self.producers and self.columns is not None:
            raise LmforgeError(f"LinearGroup {self.linears}: producers feed all input columns; columns={self.columns} "
                               "belong to norms side by side")
        if self.repeat is not None and not self.producers:
            raise LmforgeError(f"LinearGroup {self.linears}: repeat={self.repeat} describes producers' rows, and "
                               "there are none")

    @property
    def foldable(self) -> bool:
        """Whether a per-channel scale folds exactly: norms' weights (or producers' rows) / s, the linears' input
        columns * s."""
        return bool(self.norms or self.producers) and not set(self.notes) & set(NOT_FOLDABLE)


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
    groups.append(_produced(attn_out, (), **_value_producer(pre + ".attn", block.attn)))
    groups.append(_produced(mlp_out, ("experts",) if moe else (), **_up_producer(pre + ".mlp", block.mlp)))
    return f"{pre}.norm2" if block.kind == "post" else None


def _produced(linears: tuple[str, ...], notes: tuple[str, ...], producers: tuple[str, ...] = (),
              repeat: tuple[int, int] | None = None) -> LinearGroup:
    """The group of linears reading a sublayer's hidden activations: foldable into its producers when there are
    any, else 'no-norm'."""
    return LinearGroup(norms=(), linears=linears, producers=producers, repeat=repeat,
                       notes=notes if producers else ("no-norm",) + notes)


def _value_producer(pre: str, attn: nn.Module) -> dict:
    """v -> o: lmforge's plain attention with its own wv (module docstring); {} for MLA or a fused wqkv."""
    if type(attn) is not Attention or getattr(attn, "wv", None) is None:
        return {}
    return dict(producers=(f"{pre}.wv",), repeat=(attn.n_heads // attn.n_kv, attn.hd))


def _up_producer(pre: str, mlp: nn.Module) -> dict:
    """up -> down: a gated MLP whose hidden act(gate)·up is linear in up, with up unfused; {} otherwise (a plain
    MLP's act(up), swiglu_oss's clamp(up), a MoE, a fused gate_up)."""
    if type(mlp) is not MLP or not mlp.gated or mlp.activation == "swiglu_oss" or getattr(mlp, "up", None) is None:
        return {}
    return dict(producers=(f"{pre}.up",))


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
    names += ("out_gate",)  # a gated shared expert's gate reads the MLP's input too (Qwen2-MoE)
    return tuple(f"{pre}.{n}" for n in names if getattr(mlp, n, None) is not None), (f"{pre}.down",), False


def _mark_tied(model: nn.Module, group: LinearGroup) -> LinearGroup:
    """The group with 'tied' noted where one of its weights is shared with a parameter outside it."""
    mods = group.linears + group.producers
    own = {f"{n}.{k}" for n in mods for k in ("weight", "bias")} | set(mods)
    for names in tied_weights(model):
        if own & set(names) and not set(names) <= own:
            return dataclasses.replace(group, notes=group.notes + ("tied",))
    return group


def group_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The weight a LinearGroup entry names: the module's .weight (out, in), or the stacked parameter (E, out, in).
    Refuses a module that is not a plain nn.Linear of float weights (fused.plain_linear): an unmerged LoRA layer's
    .weight leaves out its B A, a quantized layer's (a dequantizing property, torchao's tensor subclass) is a copy
    or codes, so a scale or statistic read from or written to it would not be the layer's."""
    try:
        module = model.get_submodule(name)
    except AttributeError:  # not a module: MoE's stacked expert weights
        try:
            return model.get_parameter(name)
        except AttributeError:
            raise LmforgeError(f"{name} is no module or parameter of {type(model).__name__} (MoE experts replaced "
                               "by a quantized module?); read the structure before quantizing the model") from None
    if not plain_linear(module):
        w = getattr(module, "weight", None)
        held = f" of {type(w).__name__} {w.dtype}" if isinstance(module, nn.Linear) else ""  # (torchao, int8)
        raise LmforgeError(f"{name} is a {type(module).__name__}{held}, not a plain nn.Linear of float weights (its "
                           ".weight is not its whole function); fold scales before quantizing or adapting the model")
    return module.weight


def fold_scale(model: nn.Module, group: LinearGroup, s: torch.Tensor) -> None:
    """In place: each norm's weight (and bias) / s, or each producer's output rows (and bias) / s, and each
    linear's input columns * s; the model computes the same function (exactly, up to rounding). s: (width,)
    positive, width = the group's columns or the linears' input size; with group.repeat = (r, d), equal across
    the r copies of each d-block (GQA: one scale per KV group, e.g. s.view(-1, r, d).mean(1, keepdim=True)
    .expand(-1, r, d).flatten()). Refuses a group that is not foldable, and layers that are not plain nn.Linear
    of float weights (fold before quantizing or adapting: a quantized layer's codes, or an unmerged LoRA
    layer's A, would not take the scale) - before changing anything."""
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
    rows = _producer_scale(group, s)
    producers = [model.get_submodule(n) for n in group.producers]
    for name, p in zip(group.producers, producers):
        if group_weight(model, name).shape[0] != rows.shape[0]:
            raise LmforgeError(f"producer {name} has {p.out_features} output rows, the scale gives {rows.shape[0]} "
                               f"(s of width {s.shape[0]}, repeat {group.repeat})")
    for name in group.norms:
        norm = model.get_submodule(name)
        offset = getattr(norm, "offset", 0.0)  # an offset RMSNorm's gain is offset + w: (offset + w) / s - offset,
        w = norm.weight  # in fp32 (offset + w in bf16 loses w's precision, which the offset form keeps)
        w.copy_(((w.float() + offset) / s.float().to(w.device) - offset).to(w.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.div_(s.to(norm.bias))
    for p in producers:  # (out, in) rows and (out,) bias: the producer's output / s
        p.weight.div_(rows.to(p.weight)[:, None])
        if p.bias is not None:
            p.bias.div_(rows.to(p.bias))
    for _, w in tensors[:len(group.linears)]:  # the linears' (then the norms') tensors
        w[..., lo:hi] *= s.to(w)


def _producer_scale(group: LinearGroup, s: torch.Tensor) -> torch.Tensor:
    """The scale of the producers' output rows: s itself, or one copy of each repeated block (group.repeat),
    refused where the copies differ (GQA: query heads sharing a value head cannot take different scales)."""
    if group.repeat is None:
        return s
    r, d = group.repeat
    blocks = s.view(-1, r, d)
    if not torch.equal(blocks, blocks[:, :1].expand_as(blocks)):
        raise LmforgeError(f"s differs across the {r} query heads that read one value head (GQA) in {group.linears}: "
                           f"a value row cannot take {r} scales; use one per KV group, e.g. "
                           f"s.view(-1, {r}, {d}).mean(1, keepdim=True).expand(-1, {r}, {d}).flatten()")
    return blocks[:, 0].flatten()
