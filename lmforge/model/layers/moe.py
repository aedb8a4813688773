"""Mixture of experts: token-choice top-k routing over E expert MLPs (+ optional shared experts).

    scores = softmax(x W_r) or sigmoid(x W_r)                    (Mixtral / DeepSeek-V3)
    chosen = top-k(scores + bias)  [within the best groups]       (bias: aux-loss-free balancing; groups ranked
                                                                   by top-2 sums (V3) or maxima (V2))
    y      = shared(x) + routed_scale · Σ_{e in chosen} w_e · expert_e(x),  w = scores[chosen] (renormed)

Balancing (all optional, weights in MoEConfig): the Switch/GShard loss E·Σ_i f_i·P_i (f = fraction
of assignments, P = mean router probability), the ST-MoE router z-loss mean(logsumexp(logits)²),
DeepSeek-V3's sequence-wise loss (the Switch loss per sequence) and its auxiliary-loss-free bias,
nudged by ±rate towards under-loaded experts once per optimizer step (`update_expert_biases`, by the step's
whole load over every micro-batch and rank) and used only to choose experts, never to weight them.
Capacity factor cf > 0 keeps at most ceil(cf·N·k/E) assignments per expert (earlier tokens first);
the rest are dropped (their residual passes through). cf = 0 is dropless.

Dispatch: `grouped` (dropless) sorts the N·k assignments by expert once, so expert e owns rows
[o_e, o_e + n_e) of the permuted activations (MegaBlocks, Gale et al. 2023: no capacity, no padding), and
runs every projection of all experts as one grouped matmul, gate and up together over the stacked
(E, 2·d_expert, d) weights. Rows are gathered into expert order and back through the sort's inverse, so
no step reads a count on the host. `gemm` picks the grouped matmul (model.moe.gemm):

    torch   torch._grouped_mm (CUTLASS on sm90/sm100 in bf16, without a host sync; CPU in fp32/bf16/fp16;
            other CUDA cases through a loop over the offsets on the host, which torch.compile refuses)
    triton  lmforge.kernels.moe.grouped_mm (any CUDA GPU, no host sync)
    loop    one matmul per expert over its rows: the grouped matmuls' reference (counts on the host)
    auto    torch where it runs without a host sync (dims of 16 bytes; CPU, or bf16 on sm90/sm100), else
            triton on a CUDA GPU with Triton, else loop

`loop` dispatch runs experts one by one over torch.where's tokens and is the reference the grouped path is
tested against. With a capacity factor the grouped path drops over-capacity assignments (a host sync: the
kept count sizes the rows). Expert weights are stacked (E, out, in).

The routed experts are a submodule, `MoE.experts` (an `Experts`: the stacked weights, the grouped path and
the per-expert reference), and every dispatch reaches them through one call, the contract a replacement keeps:

    moe.experts(x, counts, *, mm=..., act=..., reference=...) -> y
        x       (M, d)  the routed rows sorted by expert (M = kept assignments: N·k when dropless; the grouped
                        dispatch casts them to autocast's dtype); expert e owns rows [o_e, o_e + counts[e])
        counts  (E,)    int64 rows per expert, on x's device
        y       (M, d)  row i through expert e(i)'s MLP (before the router weighting, which MoE applies)
        keywords        how the built-in Experts computes (grouped matmul, the fused gated activation of a
                        kernel-swapped MoE, the per-expert reference of dispatch 'loop'); a replacement may
                        ignore them

So a quantizer or an adapter swaps `moe.experts` for its own module, calibration hangs a forward (pre-)hook
on it and sees exactly each expert's inputs (GPTQ's X^T X per expert: x.split(counts.tolist())), and expert
parallelism holds `Experts.slice` of its share. State-dict names: `mlp.experts.w_up` etc.; an older lmforge
checkpoint's `mlp.w_up` loads through a load_state_dict pre-hook (`move_expert_keys`).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.errors import ConfigError
from lmforge.model.layers.mlp import ACT, GATED, MLP, glu
from lmforge.utils import compiler_disable

GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@compiler_disable  # counts.tolist() breaks the graph anyway; traced, the frame after the break guarded on
# every expert's count and recompiled at each new routing until dynamo's recompile limit (then ran eager)
def grouped_mm_loop(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Reference: x (M, in) sorted by expert with counts (E,) rows each, w (E, out, in) -> (M, out), one
    matmul per expert."""
    if not len(x):  # (0, out), still a function of x and w: autograd reaches what made x (expert
        return x @ w[0].T  # parallelism's all-to-all must run its backward on every rank, rows or none)
    return torch.cat([xe @ w[e].T for e, xe in enumerate(x.split(counts.tolist()))])


def grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """grouped_mm_loop on torch._grouped_mm: offsets are the groups' cumulative ends, built on the device;
    its backward is two more grouped matmuls (dX with W_e, dW_e = dY[g_e]^T X[g_e] over the same offsets)."""
    if not len(x):  # as grouped_mm_loop: an empty result still connected to x and w
        return x @ w[0].T
    return _GroupedLinear.apply(x.contiguous(), w, counts.cumsum(0, dtype=torch.int32))


class _GroupedLinear(torch.autograd.Function):
    """y = x_g @ W_e^T per group on torch._grouped_mm, with a backward that writes dW in W's own (E, out, in)
    layout: dW = grouped (dY^T, X) over the row offsets. torch's derivative of _grouped_mm(x, W^T) produces
    (E, in, out) and leaves a transposing copy to every consumer (the cast back to fp32 master weights read
    it column by column: ~1 ms per MoE layer on an H200)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch._grouped_mm(dy, w, offs=offs) if ctx.needs_input_grad[0] else None
        dw = torch._grouped_mm(dy.t(), x, offs=offs) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm_applies(x: torch.Tensor, dims: tuple[int, ...]) -> bool:
    """torch._grouped_mm takes these operands: fp32/bf16/fp16 and rows of 16 bytes' multiples for every
    width in `dims`; from torch 2.9 on any device (CPU and GPUs without its CUTLASS kernel through a
    fallback loop, with a host sync), in torch 2.8 only bf16 on sm90 (anything else raises); under
    torch.compile only bf16."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in (torch.float32, torch.bfloat16, torch.float16) \
            or any(d * x.element_size() % 16 for d in dims):
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:  # its meta function (what torch.compile
        return False                                                   # traces) takes bf16 only (torch 2.13)
    if _torch_version() >= (2, 9):
        return True
    return x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] == 9


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def grouped_mm_sync_free(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs without a device->host sync: on CPU, and CUTLASS's bf16 kernel on sm90/sm100
    (elsewhere on CUDA it falls back to a loop over offs.cpu())."""
    return x.device.type == "cpu" or (x.dtype == torch.bfloat16 and x.is_cuda
                                      and torch.cuda.get_device_capability(x.device)[0] in (9, 10))


def pick_gemm(gemm: str, x: torch.Tensor, dims: tuple[int, ...]) -> GroupedMM:
    """The grouped matmul `gemm` names (model.moe.gemm) for operands like x with widths `dims`."""
    if gemm == "auto":
        if grouped_mm_applies(x, dims) and grouped_mm_sync_free(x):
            gemm = "torch"
        elif x.is_cuda:  # (Triton, ~0.6 s to import, only where its kernel could run)
            from lmforge.kernels.decode import available

            gemm = "triton" if available(x.device) else "loop"
        else:
            gemm = "loop"
    if gemm == "triton":
        from lmforge.kernels.moe import available, grouped_mm_trusted

        if not available(x.device):
            raise ConfigError(f"model.moe.gemm='triton' needs Triton on a CUDA device (got {x.device.type}); "
                              "use gemm='auto'")
        return grouped_mm_trusted  # (its counts come from routing: they sum to the rows, no device check)
    if gemm == "torch" and not grouped_mm_applies(x, dims):
        raise ConfigError(f"model.moe.gemm='torch': torch._grouped_mm needs fp32/bf16/fp16, widths {dims} of "
                          f"16-byte multiples and torch >= 2.9 off sm90 bf16 (got {x.dtype} on {x.device.type}, "
                          f"torch {torch.__version__}); use gemm='auto' or 'loop'")
    return {"torch": grouped_mm_torch, "loop": grouped_mm_loop}[gemm]


class StackCast(torch.autograd.Function):
    """(E, out_i, in) weights -> (E, Σ out_i, in) in `dtype`: one copy per weight, as the cast alone would
    be under autocast (torch.cat of casts copies twice; slice assignment clones the gradient per slice)."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *ws: torch.Tensor) -> torch.Tensor:
        ctx.sizes, ctx.dtypes = [w.shape[1] for w in ws], [w.dtype for w in ws]
        out = ws[0].new_empty(ws[0].shape[0], sum(ctx.sizes), ws[0].shape[2], dtype=dtype)
        for part, w in zip(out.split(ctx.sizes, 1), ws):
            part.copy_(w)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return None, *(p.to(dt) for p, dt in zip(g.split(ctx.sizes, 1), ctx.dtypes))


class GatherRows(torch.autograd.Function):
    """x (N, d) -> x[order // k] (N·k, d) for a permutation `order` of the N·k assignments t·k + j and its
    inverse `inv`: row t lands on the k places its assignments take. The backward sums each row's k copies
    through inv (k = 1: a permutation and its inverse) - gathers, where autograd's indexing backward would
    scatter-add with atomics or a sort."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inv)
        ctx.k = k
        return x[order // k] if k > 1 else x[order]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (inv,) = ctx.saved_tensors
        g = g[inv]
        return (g.view(-1, ctx.k, g.shape[-1]).sum(1) if ctx.k > 1 else g), None, None, None


def sort_by_expert(idx: torch.Tensor, n_experts: int, counts: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx (N, k) expert ids -> order (N·k,): assignment ids t·k + j grouped by expert (stable: tokens in
    order within an expert), its inverse permutation inv, and counts (E,) assignments per expert (counted
    here unless given). The ids are sorted as the narrowest integer that holds them: a GPU radix sort makes
    one pass per key byte (8 for topk's int64 ids, 1 for uint8)."""
    flat = idx.reshape(-1)
    order = flat.to(_key_dtype(n_experts)).argsort(stable=True)
    inv = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=idx.device))
    return order, inv, _count(flat, n_experts) if counts is None else counts


def _key_dtype(n: int) -> torch.dtype:
    """The narrowest sortable integer dtype holding 0..n-1."""
    return torch.uint8 if n <= 256 else torch.int16 if n <= 2**15 else torch.int32 if n <= 2**31 else torch.int64


def combine(y: torch.Tensor, w: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype
            ) -> torch.Tensor:
    """y (N·k, d) expert outputs in expert order -> (N, d): out[t] = Σ_j w[t, j]·y[inv[t·k + j]] in y's dtype
    (as a dense MLP's output is under autocast; fp32 products would move twice the bytes); the gradient
    reaches y (through the permutation, gathered) and the router weights w."""
    N, k = w.shape
    rows = GatherRows.apply(y, inv, order, 1).view(N, k, -1)  # back in token order
    return (rows * w.to(y.dtype).unsqueeze(-1)).sum(1).to(dtype)


def autocast_to(x: torch.Tensor) -> torch.Tensor:
    """x in the autocast dtype where autocast is on: it does not cover grouped matmuls of 3-D weights."""
    return x.to(torch.get_autocast_dtype(x.device.type)) if torch.is_autocast_enabled(x.device.type) else x


def glu_fused(activation: str, gu: torch.Tensor) -> torch.Tensor:
    """act(gate)·up of the fused (M, 2·d_expert) [gate | up] projection."""
    return glu(activation, *gu.chunk(2, dim=-1))


class Experts(nn.Module):
    """The E routed expert MLPs of an MoE layer, weights stacked (E, out, in) (+ optional (E, out) biases):
    the seam a quantizer or adapter replaces (module docstring). x (M, d) sorted by expert, expert e owning
    `counts[e]` consecutive rows -> (M, d), each row through its expert's MLP."""

    STACKED_VECTORS = ("b_up", "b_gate", "b_down")
    """(E, d) parameters that are one vector per expert (biases): role "vector" for the optimizers"""

    def __init__(self, n_experts: int, d_model: int, d_expert: int, activation: str, bias: bool = False):
        super().__init__()
        E, d, de = n_experts, d_model, d_expert
        self.E, self.d_model, self.d_expert, self.activation = E, d, de, activation
        self.gated = activation in GATED
        self.w_up = nn.Parameter(torch.empty(E, de, d))
        self.w_gate = nn.Parameter(torch.empty(E, de, d)) if self.gated else None
        self.w_down = nn.Parameter(torch.empty(E, d, de))
        self.b_up = nn.Parameter(torch.zeros(E, de)) if bias else None
        self.b_gate = nn.Parameter(torch.zeros(E, de)) if bias and self.gated else None
        self.b_down = nn.Parameter(torch.zeros(E, d)) if bias else None

    def extra_repr(self) -> str:
        return f"E={self.E}, d_model={self.d_model}, d_expert={self.d_expert}, activation={self.activation!r}, " \
               f"bias={self.b_up is not None}"

    def forward(self, x: torch.Tensor, counts: torch.Tensor, *, mm: GroupedMM | None = None,
                act: Callable[[str, torch.Tensor], torch.Tensor] = glu_fused, reference: bool = False
                ) -> torch.Tensor:
        """x (M, d) sorted by expert with `counts` (E,) rows each -> (M, d). The keywords say how, never what:
        `reference` runs one F.linear per expert (MoE dispatch 'loop'); else grouped matmuls `mm` (default:
        gemm 'auto'), gate and up as one over their stacked weights where the weights are cast anyway
        (autocast) or the rows outnumber them (training batches), else one each, then down; `act` is the
        gated activation of the fused [gate | up] rows (a kernel-swapped MoE passes its own)."""
        if reference:
            return self._reference(x, counts)
        x = autocast_to(x)
        mm = mm or pick_gemm("auto", x, (self.d_model, self.d_expert))
        e = None if self.b_up is None else torch.repeat_interleave(
            torch.arange(self.E, device=x.device), counts, output_size=x.shape[0])  # each row's expert
        if self.gated and self.w_gate.dtype == x.dtype and x.shape[0] < self.E * x.shape[1]:
            # no cast to make and fewer rows than the weights hold (a decode step): two grouped matmuls on the
            # weights as they are, not a stacked copy of every expert's gate and up weights each forward
            gate, up = mm(x, self.w_gate, counts), mm(x, self.w_up, counts)
            if e is not None:
                gate, up = gate + self.b_gate.to(x.dtype)[e], up + self.b_up.to(x.dtype)[e]
            h = glu(self.activation, gate, up)
        elif self.gated:  # the cast copies the weights anyway: stacked, one grouped matmul for both
            up = mm(x, StackCast.apply(x.dtype, self.w_gate, self.w_up), counts)  # (M, 2·d_expert)
            if e is not None:
                up = up + torch.cat([self.b_gate, self.b_up], 1).to(x.dtype)[e]
            h = act(self.activation, up)
        else:
            up = mm(x, self.w_up.to(x.dtype), counts)
            h = ACT[self.activation](up if e is None else up + self.b_up.to(x.dtype)[e])
        y = mm(h, self.w_down.to(x.dtype), counts)
        return y if e is None else y + self.b_down.to(x.dtype)[e]

    def _reference(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """One expert at a time over its rows: the grouped path's reference."""
        return torch.cat([self.expert(xe, e) for e, xe in enumerate(x.split(counts.tolist()))])

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e's MLP on rows x (M, d) -> (M, d), as a dense MLP computes it."""
        up = F.linear(x, self.w_up[e], None if self.b_up is None else self.b_up[e])
        if self.gated:
            gate = F.linear(x, self.w_gate[e], None if self.b_gate is None else self.b_gate[e])
            h = glu(self.activation, gate, up)
        else:
            h = ACT[self.activation](up)
        return F.linear(h, self.w_down[e], None if self.b_down is None else self.b_down[e])

    def slice(self, lo: int, hi: int) -> "Experts":
        """Experts [lo, hi) as their own module (expert parallelism's local share): copies of those rows of
        every weight, on their device and in their dtype."""
        with torch.device("meta"):
            part = Experts(hi - lo, self.d_model, self.d_expert, self.activation, self.b_up is not None)
        for name, p in self.named_parameters():
            setattr(part, name, nn.Parameter(p[lo:hi].detach().clone(), requires_grad=p.requires_grad))
        return part


_EXPERT_WEIGHTS = ("w_up", "w_gate", "w_down", "b_up", "b_gate", "b_down")


def move_expert_keys(state: dict, prefix: str = "") -> int:
    """Rename, in place, an old checkpoint's routed-expert weights of the MoE at `prefix` (its `prefix`w_up,
    from before the experts moved into MoE.experts) to `prefix`experts.w_up, ...; returns how many moved."""
    moved = 0
    for name in _EXPERT_WEIGHTS:
        if prefix + name in state and prefix + "experts." + name not in state:
            state[prefix + "experts." + name] = state.pop(prefix + name)
            moved += 1
    return moved


def upgrade_expert_keys(model: nn.Module, state: dict) -> dict:
    """`state` (a model's state dict, possibly from an older lmforge) with every MoE layer's routed-expert weights
    under their current names (`move_expert_keys`), in place; for loaders that compare names before
    load_state_dict (whose own pre-hook on MoE renames them too)."""
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            move_expert_keys(state, f"{name}." if name else "")
    return state


class SharedExperts(MLP):
    """The always-on shared experts as one MLP; with `gated`, its output scaled per token by σ(x·w_g), one learned
    logit (Qwen2-MoE's shared_expert_gate). Part of the module, so whoever calls `moe.shared` (expert parallelism
    too) gets the gate."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool = False, gated: bool = False):
        super().__init__(d_model, d_ff, activation, bias)
        self.out_gate = nn.Linear(d_model, 1, bias=False) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.out_gate is None else y * torch.sigmoid(self.out_gate(x))


class MoE(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        m = cfg.moe_cfg
        self.m, self.layer_idx, self.activation = m, layer_idx, cfg.activation
        self.E, self.k, d = m.n_experts, m.top_k, cfg.d_model
        self.d_model, self.d_expert = d, m.d_expert or cfg.ff
        # registered first: its parameters come first, in the order they had as MoE's own (initialisation draws
        # them in that order, optimizer states list them so)
        self.experts = Experts(self.E, d, self.d_expert, cfg.activation, m.expert_bias)
        self.router = nn.Linear(d, self.E, bias=m.router_bias)
        self.noise = nn.Linear(d, self.E, bias=False) if m.noisy else None
        self.shared = (SharedExperts(d, m.n_shared * self.d_expert, cfg.activation, cfg.bias, m.shared_gate)
                       if m.n_shared > 0 else None)
        # aux-loss-free balancing bias (DeepSeek-V3 e_score_correction_bias): selection only
        self.register_buffer("e_bias", torch.zeros(self.E))
        # the assignments per expert of this optimizer step's training forwards, until update_expert_biases
        # (integers: a float buffer would follow the model to bf16, whose sums past 256 round)
        self.register_buffer("step_load", torch.zeros(self.E, dtype=torch.long), persistent=False)
        self.dispatch, self.gemm = m.dispatch, m.gemm
        self.last_aux: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}
        self.register_load_state_dict_pre_hook(_old_expert_names)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.e_bias.dtype != torch.float32:  # model.to(bf16) must not round the balancing bias: a ±1e-3 step
            self.e_bias = self.e_bias.float()   # past |0.5| is under half a bf16 step (HF keeps it fp32 too)
        return self

    # routing ------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> top-k expert ids (N, k), their weights (N, k), scores (N, E), logits (N, E)."""
        logits = self.router(x).float()
        if self.noise is not None and self.training:  # Shazeer et al. 2017, eq. 4
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x).float())
        scores = logits.softmax(-1) if self.m.score == "softmax" else logits.sigmoid()
        choice = scores + self.e_bias.float()
        if self.m.n_groups > 1:  # keep the topk_groups groups with the best top-2 score sums (V3) or maxima (V2)
            g = choice.view(-1, self.m.n_groups, self.E // self.m.n_groups)
            group_score = (g.amax(-1) if self.m.group_score == "max" else
                           g.topk(min(2, g.shape[-1]), dim=-1).values.sum(-1))
            keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(
                1, group_score.topk(self.m.topk_groups, -1).indices, True)
            # -inf, not 0, as DeepSeek-V3's Gate and HF's DeepseekV3TopkRouter: with the balancing bias a kept
            # expert's choice score can be negative, and a zeroed expert of a discarded group would beat it
            choice = g.masked_fill(~keep[..., None], float("-inf")).view(-1, self.E)
        idx = choice.topk(self.k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.m.norm_topk:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, (w if self.m.routed_scale == 1 else w * self.m.routed_scale), scores, logits

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments each expert keeps in a training forward of n_tokens; None = dropless, as every forward
        in eval mode is: a capacity over the whole batch would make one sequence's output depend on the others
        (its batch-mates, prefill chunks and decode steps in the inference engine)."""
        cf = self.m.capacity_factor
        return math.ceil(cf * n_tokens * self.k / self.E) if cf > 0 and self.training else None

    # experts ------------------------------------------------------------------------------------
    def _keep_mask(self, idx: torch.Tensor) -> torch.Tensor | None:
        """(N, k) bool: assignments within capacity; earlier tokens (and higher choices) win. None when
        dropless (every assignment kept)."""
        cap = self.capacity(idx.shape[0])
        if cap is None:
            return None
        onehot = F.one_hot(idx.reshape(-1), self.E)  # (N·k, E) in token order
        rank = (onehot.cumsum(0) * onehot).sum(-1) - 1  # position of each assignment in its expert's queue
        return (rank < cap).view_as(idx)

    def experts_grouped(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, keep: torch.Tensor | None,
                        counts: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dropless: the N·k assignments sorted by expert once, rows gathered into that order (in the
        matmuls' dtype under autocast: half the bytes), the expert MLP as grouped matmuls, and the outputs
        gathered back and weighted by the router (whose weights get their gradient here). `counts`: the
        assignments per expert where the caller has them; the output is in `dtype` (default x's)."""
        dtype = dtype or x.dtype
        if self.capacity(x.shape[0]) is not None:
            return self._experts_dropping(x, idx, w, keep, dtype)
        order, inv, counts = sort_by_expert(idx, self.E, counts)
        rows = self._gather(autocast_to(x), order, inv, self.k)  # (N·k, d) in expert order
        y = self.experts(rows, counts, mm=self._gemm(rows), act=self._act)
        return self._combine(y, w, order, inv, dtype)

    def _experts_dropping(self, x, idx, w, keep, dtype: torch.dtype) -> torch.Tensor:
        """With a capacity: the kept assignments in expert order, their outputs added back per token."""
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        order = order[keep.reshape(-1)[order]]  # drop over-capacity assignments
        tok = order // self.k
        rows = autocast_to(x)[tok]
        y = self.experts(rows, _count(flat[order], self.E), mm=self._gemm(rows), act=self._act)
        return x.new_zeros(x.shape, dtype=dtype).index_add_(0, tok, (y * w.reshape(-1)[order, None]).to(dtype))

    # the grouped path's steps, which lmforge.kernels.moe.TritonMoE replaces with Triton kernels
    def _gemm(self, x: torch.Tensor) -> GroupedMM:
        return pick_gemm(self.gemm, x, (self.d_model, self.d_expert))

    _act = staticmethod(glu_fused)
    _combine = staticmethod(combine)

    @staticmethod
    def _gather(x: torch.Tensor, order: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
        return GatherRows.apply(x, order, inv, k)

    def experts_loop(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, keep: torch.Tensor | None
                     ) -> torch.Tensor:
        """Reference: each expert's tokens found with torch.where, run through the experts one expert at a time
        (Experts' reference) and added back expert by expert."""
        picks = [torch.where(idx == e if keep is None else (idx == e) & keep) for e in range(self.E)]
        tok, slot = torch.cat([t for t, _ in picks]), torch.cat([s for _, s in picks])
        counts = torch.tensor([len(t) for t, _ in picks], device=x.device)
        # gathered expert by expert, as the loop always did: x's gradient sums its parts in the same order
        y = self.experts(torch.cat([x[t] for t, _ in picks]), counts, reference=True)
        return x.new_zeros(x.shape).index_add_(0, tok, (y * w[tok, slot, None]).to(x.dtype))

    # forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        xa = autocast_to(flat)  # cast once for the router, the experts and the shared experts (as each would)
        idx, w, scores, logits = self.route(xa)
        keep = self._keep_mask(idx)
        counts = _count(idx.reshape(-1), self.E)  # assignments per expert: the sort's groups and the load
        if self.dispatch == "grouped":
            y = self.experts_grouped(xa, idx, w, keep, counts, flat.dtype)
        else:
            y = self.experts_loop(flat, idx, w, keep)
        if self.shared is not None:
            y = y + self.shared(xa)
        self._balance(idx, keep, scores, logits, B, T, counts)
        return y.view(B, T, d)

    def _balance(self, idx, keep, scores, logits, B: int, T: int, load: torch.Tensor | None = None) -> None:
        """Auxiliary losses and load statistics of this forward; the aux-loss-free bias update. `load`: the
        assignments per expert where the caller counted them; keep None = nothing dropped."""
        m, E, k = self.m, self.E, self.k
        if load is None:
            load = _count(idx.reshape(-1), E)
        f = load / idx.numel()  # fraction of the N·k assignments per expert (float)
        # sigmoid scores normalised per token (softmax rows already sum to one)
        probs = scores if m.score == "softmax" else scores / scores.sum(-1, keepdim=True)
        aux = None
        if m.aux_loss > 0:  # Switch (Fedus et al. 2021, eq. 4), GShard
            aux = torch.dot(f, probs.mean(0)) * (m.aux_loss * E)
        if m.z_loss > 0:  # ST-MoE (Zoph et al. 2022, eq. 5)
            z = torch.logsumexp(logits.float(), -1).square().mean() * m.z_loss
            aux = z if aux is None else aux + z
        if m.seq_aux_loss > 0:  # DeepSeek-V3 eq. 17-20, per sequence then averaged
            hit = F.one_hot(idx.view(B, T * k), E).float().sum(1)  # (B, E)
            f_seq = hit * E / (k * T)
            s = (f_seq * probs.view(B, T, E).mean(1)).sum(-1).mean() * m.seq_aux_loss
            aux = s if aux is None else aux + s
        self.last_aux = logits.new_zeros((), dtype=torch.float32) if aux is None else aux
        if m.bias_update_rate > 0 and self.training and torch.is_grad_enabled():  # counted, applied once per step
            with torch.no_grad():
                self.step_load += load.round().long() if load.is_floating_point() else load
        dropped = f.new_zeros(()) if keep is None else (~keep).float().mean()
        self.last_stats = {"load": f.detach(), "dropped": dropped.detach()}


def _old_expert_names(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook of MoE: an older lmforge checkpoint's `prefix`w_up, ... (the routed experts were
    MoE's own parameters) load into `prefix`experts.w_up, ..."""
    move_expert_keys(state_dict, prefix)


_WORLD_ROWS: "weakref.WeakKeyDictionary[nn.Module, list[tuple[str, int]]]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def update_expert_biases(model: nn.Module, world: bool = False) -> int:
    """DeepSeek-V3's auxiliary-loss-free balancing (§2.1.2), once per optimizer step: every MoE layer with
    model.moe.bias_update_rate > 0 moves its selection bias by rate·sign(mean load - load), the load being its
    expert assignments over the whole step (every micro-batch's training forward since the last call, but those
    under `load_uncounted`; with `world`, summed over every rank of torch.distributed, so all data-parallel
    replicas keep one bias). Call after optimizer.step() (the Trainer does); returns the number of layers updated.

    A forward recomputed under activation checkpointing counts its tokens again; each layer is either always
    recomputed or never, so its loads are scaled uniformly and the sign is unchanged. Under pipeline
    parallelism the layers live on different ranks: the loads travel as one (layers over all ranks, E) table,
    the rows keyed by module name, a rank adding zeros for the layers it does not hold.

    A layer whose router is frozen (no trainable parameter: the base of an adapter run, where only LoRA
    matrices train) keeps its bias: the bias is part of the frozen routing, as HF and PEFT keep it; its load is
    dropped."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoE) and m.m.bias_update_rate > 0}
    # (decided at every call: the world's table below keeps every layer, so a router unfrozen later joins in)
    moving = {name for name, m in layers.items() if any(p.requires_grad for p in m.router.parameters())}
    if world:
        import torch.distributed as dist

        rows = _WORLD_ROWS.get(model)
        if rows is None:  # every rank's (name, E), gathered once per model
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sorted((name, m.E) for name, m in layers.items()))
            rows = _WORLD_ROWS[model] = sorted(set().union(*map(set, gathered)))
        if not rows:
            return 0
        device = next(iter(model.parameters())).device
        table = torch.zeros(len(rows), max(E for _, E in rows), dtype=torch.float64, device=device)
        for i, (name, E) in enumerate(rows):
            if name in layers:
                table[i, :E] = layers[name].step_load
        dist.all_reduce(table)
        loads = {name: table[i, :E] for i, (name, E) in enumerate(rows) if name in layers}
    else:
        loads = {name: m.step_load for name, m in layers.items()}
    for name, m in layers.items():
        if name in moving:
            n = loads[name].double()
            m.e_bias.copy_(m.e_bias.float() + m.m.bias_update_rate * torch.sign(n.mean() - n))
        m.step_load.zero_()
    return len(moving)


@contextlib.contextmanager
def load_uncounted(model: nn.Module) -> Iterator[None]:
    """Training forwards inside add nothing to the step's expert load (`MoE.step_load`): each MoE layer's
    load is restored on exit, so a forward, its backward and any activation-checkpoint recompute all leave it
    as it was (nothing in the forward changes, compiled or not). For a batch run only to join the step's
    collectives (a rank's weight-0 `lmforge.train.distributed.Repeated` rows, which another rank trains on):
    its tokens are not part of the step and must not move the aux-loss-free bias."""
    saved = [(m, m.step_load.clone()) for m in model.modules() if isinstance(m, MoE)]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, load in saved:
                m.step_load.copy_(load)


@torch.no_grad()
def upcycle_mlp(moe: MoE, mlp: MLP, noise_std: float = 0.0) -> None:
    """Sparse upcycling (Komatsuzaki et al. 2023): every expert starts as a copy of the dense MLP
    (optionally perturbed), its biases included, the router from N(0, 0.02) so routing starts near uniform,
    and the shared experts' down projection at zero, so they add nothing until trained."""
    if getattr(mlp, "gate_up", None) is not None:
        raise ConfigError("upcycling reads the dense MLP's gate and up weights: upcycle a model built with "
                          "model.fused_proj=false")
    ex = moe.experts
    if ex.w_up.shape[1] != mlp.up.weight.shape[0]:
        raise ConfigError(f"upcycling needs model.moe.d_expert == dense d_ff ({mlp.up.weight.shape[0]}), "
                          f"got {ex.w_up.shape[1]}")
    if ex.b_up is None and any(lin is not None and lin.bias is not None for lin in (mlp.up, mlp.gate, mlp.down)):
        raise ConfigError("upcycling a dense MLP with biases: the experts would drop them; set "
                          "model.moe.expert_bias=true")
    pairs = [(ex.w_up, mlp.up), (ex.w_down, mlp.down)] + ([(ex.w_gate, mlp.gate)] if ex.gated else [])
    for stacked, lin in pairs:
        stacked.copy_(lin.weight.expand_as(stacked))
        if noise_std > 0:
            stacked.add_(torch.randn_like(stacked) * noise_std)
    for b, lin in ((ex.b_up, mlp.up), (ex.b_gate, mlp.gate), (ex.b_down, mlp.down)):
        if b is not None and lin is not None and lin.bias is not None:
            b.copy_(lin.bias.expand_as(b))
    if moe.shared is not None:  # zero output (as LoRA's B): the layer starts as the dense MLP alone
        nn.init.zeros_(moe.shared.down.weight)
        if moe.shared.down.bias is not None:
            nn.init.zeros_(moe.shared.down.bias)
    nn.init.normal_(moe.router.weight, 0.0, 0.02)


def _count(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Occurrences of each of 0..n-1 in ids, as bincount(ids, minlength=n) but without its device->host
    sync on a GPU (bincount reads ids.max() to size its output): two syncs per MoE layer per forward.
    Under torch.compile as a one-hot sum, which Inductor fuses into one reduction: its lowering of the int64
    index_add_ is a sort-based index_put_ (1.1 ms per MoE layer at 32k assignments on an H200, 16% of the
    compiled step)."""
    if torch.compiler.is_compiling():
        return (ids.unsqueeze(-1) == torch.arange(n, device=ids.device)).sum(0)
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, ids, torch.ones_like(ids))
