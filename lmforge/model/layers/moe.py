"""Mixture of experts: token-choice top-k routing over E expert MLPs (+ optional shared experts).

    scores = softmax(x W_r) or sigmoid(x W_r)                    (Mixtral / DeepSeek-V3)
    chosen = top-k(scores + bias)  [within the best groups]       (bias: aux-loss-free balancing)
    y      = shared(x) + routed_scale · Σ_{e in chosen} w_e · expert_e(x),  w = scores[chosen] (renormed)

Balancing (all optional, weights in MoEConfig): the Switch/GShard loss E·Σ_i f_i·P_i (f = fraction
of assignments, P = mean router probability), the ST-MoE router z-loss mean(logsumexp(logits)²),
DeepSeek-V3's sequence-wise loss (the Switch loss per sequence) and its auxiliary-loss-free bias,
nudged by ±rate towards under-loaded experts and used only to choose experts, never to weight them.
Capacity factor cf > 0 keeps at most ceil(cf·N·k/E) assignments per expert (earlier tokens first);
the rest are dropped (their residual passes through). cf = 0 is dropless.

Dispatch: `grouped` sorts the N·k assignments by expert and runs each projection as one grouped
matmul (`torch._grouped_mm` where available, else a padded batched matmul); `loop` runs experts one
by one and is the reference the fast path is tested against. Expert weights are stacked (E, out, in).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.layers.mlp import ACT, GATED, MLP, glu


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (M, in) sorted by expert, counts (E,) rows per expert, w (E, out, in) -> (M, out)."""
    E, out_dim, in_dim = w.shape
    if torch.is_autocast_enabled(x.device.type):  # autocast does not cover _grouped_mm/bmm of 3-D weights
        x = x.to(torch.get_autocast_dtype(x.device.type))
    w = w.to(x.dtype)
    aligned = (in_dim * x.element_size()) % 16 == 0 and (out_dim * x.element_size()) % 16 == 0
    if hasattr(torch, "_grouped_mm") and aligned and x.shape[0] > 0:
        offs = counts.cumsum(0).to(torch.int32)
        try:
            y = torch._grouped_mm(x.contiguous(), w.transpose(-2, -1), offs=offs)
            if y.requires_grad:  # the CPU backward wants a dense incoming gradient
                y.register_hook(lambda g: g.contiguous())
            return y
        except RuntimeError:
            pass  # dtype/device without a grouped kernel: fall through to the padded path
    return _padded_linear(x, w, counts)


def _padded_linear(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Pad every expert's rows to the largest count and use one batched matmul (E, C, in) @ (E, in, out)."""
    E = w.shape[0]
    C = int(counts.max()) if counts.numel() else 0
    starts = counts.cumsum(0) - counts
    expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts)
    slot = torch.arange(x.shape[0], device=x.device) - starts[expert]
    padded = x.new_zeros(E, C, x.shape[1])
    padded[expert, slot] = x
    return torch.bmm(padded, w.transpose(-2, -1))[expert, slot]


class MoE(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        m = cfg.moe_cfg
        self.m, self.layer_idx, self.activation = m, layer_idx, cfg.activation
        self.E, self.k, d = m.n_experts, m.top_k, cfg.d_model
        de = m.d_expert or cfg.ff
        self.gated = cfg.activation in GATED
        self.router = nn.Linear(d, self.E, bias=m.router_bias)
        self.noise = nn.Linear(d, self.E, bias=False) if m.noisy else None
        self.w_up = nn.Parameter(torch.empty(self.E, de, d))
        self.w_gate = nn.Parameter(torch.empty(self.E, de, d)) if self.gated else None
        self.w_down = nn.Parameter(torch.empty(self.E, d, de))
        self.b_up = nn.Parameter(torch.zeros(self.E, de)) if m.expert_bias else None
        self.b_gate = nn.Parameter(torch.zeros(self.E, de)) if m.expert_bias and self.gated else None
        self.b_down = nn.Parameter(torch.zeros(self.E, d)) if m.expert_bias else None
        self.shared = MLP(d, m.n_shared * de, cfg.activation, cfg.bias) if m.n_shared > 0 else None
        # aux-loss-free balancing bias (DeepSeek-V3 e_score_correction_bias): selection only
        self.register_buffer("e_bias", torch.zeros(self.E))
        self.dispatch = m.dispatch
        self.last_aux: torch.Tensor | None = None
        self.last_stats: dict[str, torch.Tensor] = {}

    # routing ------------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> top-k expert ids (N, k), their weights (N, k), scores (N, E), logits (N, E)."""
        logits = self.router(x).float()
        if self.noise is not None and self.training:  # Shazeer et al. 2017, eq. 4
            logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x).float())
        scores = logits.softmax(-1) if self.m.score == "softmax" else logits.sigmoid()
        choice = scores + self.e_bias.float()
        if self.m.n_groups > 1:  # keep the topk_groups groups with the best top-2 score sums
            g = choice.view(-1, self.m.n_groups, self.E // self.m.n_groups)
            group_score = g.topk(min(2, g.shape[-1]), dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(self.m.topk_groups, -1).indices, 1)
            choice = (g * keep[..., None]).view(-1, self.E)
        idx = choice.topk(self.k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.m.norm_topk:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.m.routed_scale, scores, logits

    def capacity(self, n_tokens: int) -> int | None:
        cf = self.m.capacity_factor
        return math.ceil(cf * n_tokens * self.k / self.E) if cf > 0 else None

    # experts ------------------------------------------------------------------------------------
    def _expert_mlp(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, d) sorted by expert with `counts` rows each -> (M, d) grouped through all experts."""
        e = None if self.b_up is None else torch.repeat_interleave(torch.arange(self.E, device=x.device), counts)
        up = _grouped_linear(x, self.w_up, counts)
        if self.b_up is not None:
            up = up + self.b_up[e]
        if self.gated:
            gate = _grouped_linear(x, self.w_gate, counts)
            if self.b_gate is not None:
                gate = gate + self.b_gate[e]
            h = glu(self.activation, gate, up)
        else:
            h = ACT[self.activation](up)
        y = _grouped_linear(h, self.w_down, counts)
        return y + self.b_down[e] if self.b_down is not None else y

    def _one_expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        up = F.linear(x, self.w_up[e], None if self.b_up is None else self.b_up[e])
        if self.gated:
            gate = F.linear(x, self.w_gate[e], None if self.b_gate is None else self.b_gate[e])
            h = glu(self.activation, gate, up)
        else:
            h = ACT[self.activation](up)
        return F.linear(h, self.w_down[e], None if self.b_down is None else self.b_down[e])

    def _keep_mask(self, idx: torch.Tensor) -> torch.Tensor:
        """(N, k) bool: assignments within capacity; earlier tokens (and higher choices) win."""
        cap = self.capacity(idx.shape[0])
        if cap is None:
            return torch.ones_like(idx, dtype=torch.bool)
        onehot = F.one_hot(idx.reshape(-1), self.E)  # (N·k, E) in token order
        rank = (onehot.cumsum(0) * onehot).sum(-1) - 1  # position of each assignment in its expert's queue
        return (rank < cap).view_as(idx)

    def experts_grouped(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, keep: torch.Tensor
                        ) -> torch.Tensor:
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        order = order[keep.reshape(-1)[order]]  # drop over-capacity assignments
        tok = order // self.k
        counts = _count(flat[order], self.E)
        y = self._expert_mlp(x[tok], counts) * w.reshape(-1)[order, None]
        return x.new_zeros(x.shape).index_add_(0, tok, y.to(x.dtype))

    def experts_loop(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, keep: torch.Tensor
                     ) -> torch.Tensor:
        """Reference: one expert at a time over the tokens routed to it."""
        out = x.new_zeros(x.shape)
        for e in range(self.E):
            tok, slot = torch.where((idx == e) & keep)
            if tok.numel():
                out.index_add_(0, tok, (self._one_expert(x[tok], e) * w[tok, slot, None]).to(x.dtype))
        return out

    # forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        flat = x.reshape(-1, d)
        idx, w, scores, logits = self.route(flat)
        keep = self._keep_mask(idx)
        run = self.experts_grouped if self.dispatch == "grouped" else self.experts_loop
        y = run(flat, idx, w, keep)
        if self.shared is not None:
            y = y + self.shared(flat)
        self._balance(idx, keep, scores, logits, B, T)
        return y.view(B, T, d)

    def _balance(self, idx, keep, scores, logits, B: int, T: int) -> None:
        """Auxiliary losses and load statistics of this forward; the aux-loss-free bias update."""
        m, E, k = self.m, self.E, self.k
        load = _count(idx.reshape(-1), E).float()  # assignments per expert
        f = load / load.sum()
        probs = scores / scores.sum(-1, keepdim=True)  # sigmoid scores normalised per token
        aux = logits.new_zeros(())
        if m.aux_loss > 0:  # Switch (Fedus et al. 2021, eq. 4), GShard
            aux = aux + m.aux_loss * E * (f * probs.mean(0)).sum()
        if m.z_loss > 0:  # ST-MoE (Zoph et al. 2022, eq. 5)
            aux = aux + m.z_loss * torch.logsumexp(logits, -1).square().mean()
        if m.seq_aux_loss > 0:  # DeepSeek-V3 eq. 17-20, per sequence then averaged
            hit = F.one_hot(idx.view(B, T * k), E).float().sum(1)  # (B, E)
            f_seq = hit * E / (k * T)
            aux = aux + m.seq_aux_loss * (f_seq * probs.view(B, T, E).mean(1)).sum(-1).mean()
        self.last_aux = aux
        if m.bias_update_rate > 0 and self.training:  # DeepSeek-V3 §2.1.2
            with torch.no_grad():
                self.e_bias += m.bias_update_rate * torch.sign(load.mean() - load)
        self.last_stats = {"load": f.detach(), "dropped": (~keep).float().mean().detach()}


@torch.no_grad()
def upcycle_mlp(moe: MoE, mlp: MLP, noise_std: float = 0.0) -> None:
    """Sparse upcycling (Komatsuzaki et al. 2023): every expert starts as a copy of the dense MLP
    (optionally perturbed), the router from N(0, 0.02) so routing starts near uniform."""
    from lmforge.errors import ConfigError

    if getattr(mlp, "gate_up", None) is not None:
        raise ConfigError("upcycling reads the dense MLP's gate and up weights: upcycle a model built with "
                          "model.fused_proj=false")
    if moe.w_up.shape[1] != mlp.up.weight.shape[0]:
        raise ConfigError(f"upcycling needs model.moe.d_expert == dense d_ff ({mlp.up.weight.shape[0]}), "
                          f"got {moe.w_up.shape[1]}")
    pairs = [(moe.w_up, mlp.up), (moe.w_down, mlp.down)] + ([(moe.w_gate, mlp.gate)] if moe.gated else [])
    for stacked, lin in pairs:
        stacked.copy_(lin.weight.expand_as(stacked))
        if noise_std > 0:
            stacked.add_(torch.randn_like(stacked) * noise_std)
    for b, lin in ((moe.b_up, mlp.up), (moe.b_gate, mlp.gate), (moe.b_down, mlp.down)):
        if b is not None and lin is not None and lin.bias is not None:
            b.copy_(lin.bias.expand_as(b))
    nn.init.normal_(moe.router.weight, 0.0, 0.02)


def _count(ids: torch.Tensor, n: int) -> torch.Tensor:
    """Occurrences of each of 0..n-1 in ids, as bincount(ids, minlength=n) but without its device->host
    sync on a GPU (bincount reads ids.max() to size its output): two syncs per MoE layer per forward."""
    return torch.zeros(n, dtype=torch.long, device=ids.device).index_add_(0, ids, torch.ones_like(ids))
