"""QK-clip, the "Clip" of MuonClip (Kimi Team 2025, "Kimi K2: Open Agentic Intelligence", section 2.1).

Muon lets attention logits grow until training spikes. After each optimizer step, for every head h whose
largest pre-softmax logit S_max^h (measured in that step's forward pass) exceeds tau, the query and key
projections of that head are shrunk so that the same inputs would give a maximum of exactly tau:
    gamma_h = min(1, tau / S_max^h);   W_q^h <- gamma_h^alpha W_q^h;   W_k^h <- gamma_h^(1-alpha) W_k^h
(alpha = 0.5). Logits are bilinear in W_q and W_k, so they scale by gamma_h. With grouped-query attention
a key head is shared, so only W_q^h is scaled (by gamma_h): the cap still holds exactly, per query head.
Weights are nn.Linear layout (out_features, in_features), head h owning rows h*hd : (h+1)*hd.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def qk_clip_(w_q: torch.Tensor, w_k: torch.Tensor, max_logits: torch.Tensor, tau: float,
             head_dim: int, alpha: float = 0.5) -> torch.Tensor:
    """Rescale W_q, W_k in place so no head's max logit exceeds tau; returns gamma per query head."""
    if not tau > 0:  # gamma = tau / S_max <= 0 would zero the heads or (tau < 0) turn them to NaN
        raise ValueError(f"QK-clip's cap tau must be > 0, got {tau}")
    n_q, n_kv = w_q.shape[0] // head_dim, w_k.shape[0] // head_dim
    if max_logits.numel() != n_q:
        raise ValueError(f"max_logits has {max_logits.numel()} entries for {n_q} query heads")
    gamma = (tau / max_logits.float().clamp_min(1e-12)).clamp(max=1.0)
    if n_q == n_kv:
        q_scale, k_scale = gamma**alpha, gamma ** (1 - alpha)
        w_k.view(n_kv, head_dim, -1).mul_(k_scale.to(w_k.dtype).view(-1, 1, 1))
    else:
        q_scale = gamma
    w_q.view(n_q, head_dim, -1).mul_(q_scale.to(w_q.dtype).view(-1, 1, 1))
    return gamma
