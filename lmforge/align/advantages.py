"""Advantages for policy-gradient RL on the Trainer's (B, T) grid: GAE for PPO with a critic, group-relative
advantages for GRPO and RLOO without one, and masked whitening.

    kl = kl_penalty(logps, ref_logps, mask)                          # (B, T): KL to the reference, 0 off the mask
    rewards = outcome_rewards(scores, mask) - kl_coef * kl           # (B, T): the score on the last token
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)      # PPO: values from lmforge.align.value
    adv = masked_whiten(adv, mask)
    adv = group_advantages(scores, group_size=4)                     # GRPO: (N,) one per sampled completion

The grid is the batch layout of lmforge.train.objective: position t holds the state that chooses
targets[:, t], its log-prob (lmforge.align.logprobs.token_logprobs), its value (values[:, t]) and its
reward; `mask` is response_mask(batch): the sampled tokens, not the prompt and not the padding.

GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
§3, eq. 11-16): delta_t = r_t + gamma V(s_{t+1}) - V(s_t), A_t = sum_l (gamma lam)^l delta_{t+l} (eq. 16), as
A_t = delta_t + gamma lam A_{t+1} from the end; returns R_t = A_t + V(s_t) (the critic's regression target).
Each maximal run of mask positions in a row is one episode: it ends where the mask ends, with V = 0 after
its last token (a finished or truncated response is not bootstrapped) and A = 0 beyond it; positions
outside the mask get A = R = 0. Rewards outside the mask are refused rather than dropped (the classic slip:
a score placed one past the last token, which TRL's PPO does on purpose, where its loop still reads it).
On rows whose response starts at position 0 and is right-padded, this is TRL's PPO loop exactly (tested).

Whitening (masked_whiten) is TRL's PPO's (the masked form of lm-human-preferences' whiten): mean and unbiased
variance over the masked entries, (x - mean) / sqrt(var + 1e-8), optionally keeping the mean (rewards).

KL to a reference (kl_penalty): the per-token estimators of KL(pi || ref) from tokens sampled from pi in
Schulman's "Approximating KL Divergence" (2020), with log r = log ref(x) - log pi(x): k1 = -log r (unbiased;
TRL's PPO default, InstructGPT's penalty), k2 = (log r)^2 / 2 (biased, low variance), k3 = (r - 1) - log r
(unbiased, >= 0; GRPO's KL term, TRL's GRPOTrainer). Positions outside the mask are 0: token_logprobs gives a
meaningless value at a -100 target, which would otherwise put a penalty on the prompt and padding (TRL's PPO
sets both log-probs to one constant there for the same reason).

Group-relative advantages (outcome supervision): each prompt's `group_size` completions are consecutive
rows (SamplingParams(n=...)'s order). GRPO (Shao et al. 2024, "DeepSeekMath", §4.1.2): A_i = (r_i -
mean(r)) / std(r), the std unbiased and + 1e-4 as TRL's GRPOTrainer (scale "group"; "batch" uses the
batch's std, "none" none: Dr. GRPO, Liu et al. 2025). RLOO (Ahmadian et al. 2024, "Back to Basics";
Kool et al. 2019): A_i = r_i - mean of the other completions' rewards. A group of equal rewards gets exactly
0 from both (no signal; rounding in the mean would otherwise leave one). Both give one number per completion:
broadcast it over the completion's tokens (adv[:, None] * mask).
"""

from __future__ import annotations

from typing import Literal

import torch

from lmforge.errors import ConfigError


def _grid(name: str, x: torch.Tensor, like: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.shape != like.shape or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        hint = ("; one score per sequence goes on its last response token: outcome_rewards(scores, mask)"
                if name == "rewards" and shape == tuple(like.shape[:1]) else "")  # (B,): a score per sequence
        raise ConfigError(f"{name} must be a (B, T) tensor shaped like the mask {tuple(like.shape)}, got {shape}{hint}")
    if x.device != like.device:  # (e.g. a reference's log-probs left on its own device)
        raise ConfigError(f"{name} is on {x.device} but the mask on {like.device}: move it there (.to(mask.device))")


@torch.no_grad()
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, T) in fp32 (fp64 for fp64 inputs), zero outside `mask` (B, T) bool.
    rewards (B, T): per-token rewards, zero outside the mask; values (B, T): the critic's V(s_t) (outside
    the mask they are ignored). gamma, lam in [0, 1] (lam = 1: Monte-Carlo returns minus V; lam = 0: TD(0))."""
    _grid("values", values, mask)
    _grid("rewards", rewards, mask)
    if not (0 <= gamma <= 1 and 0 <= lam <= 1):
        raise ConfigError(f"gamma={gamma} and lam={lam} must lie in [0, 1] (e.g. gamma=1.0, lam=0.95)")
    dtype = torch.promote_types(torch.promote_types(values.dtype, rewards.dtype), torch.float32)
    m = mask.bool()
    outside = rewards.ne(0) & ~m
    if outside.any():
        row, col = (int(i) for i in outside.nonzero()[0])
        raise ConfigError(f"rewards[{row}, {col}] = {float(rewards[row, col]):g} lies outside the mask, where GAE "
                          "would drop it; put a sequence's score on its last response token (outcome_rewards) and "
                          "keep per-token terms inside the mask (kl_penalty(logps, ref_logps, mask) is 0 outside)")
    keep = m.to(dtype)
    # where, not * keep: a NaN or inf value in the padding must not reach the row (NaN * 0 = NaN)
    r, v = torch.where(m, rewards.to(dtype), 0.0), torch.where(m, values.to(dtype), 0.0)
    adv = torch.zeros_like(v)
    B, T = v.shape
    last = v.new_zeros(B)  # A_{t+1}: 0 past an episode's end
    next_v = v.new_zeros(B)  # V(s_{t+1}): 0 past an episode's end
    for t in range(T - 1, -1, -1):
        delta = r[:, t] + gamma * next_v - v[:, t]  # the TD residual delta_t
        last = (delta + gamma * lam * last) * keep[:, t]  # eq. 16 as a recursion; 0 outside the mask
        adv[:, t] = last
        next_v = v[:, t]  # already 0 where the mask is off: the episode before it ends there
    return adv, (adv + v) * keep


KL_ESTIMATORS = {  # log r = log ref(x) - log pi(x) -> the per-token estimate of KL(pi || ref) (Schulman 2020)
    "k1": lambda log_r: -log_r,
    "k2": lambda log_r: 0.5 * log_r ** 2,
    "k3": lambda log_r: torch.expm1(log_r) - log_r,
}


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, *, kind: str = "k1"
               ) -> torch.Tensor:
    """(B, T) fp32 estimate of KL(pi || ref) at each sampled token (k1, k2 or k3 of KL_ESTIMATORS), 0 outside
    `mask`; logps, ref_logps (B, T): the policy's and the reference's log-probs of the sampled tokens (token_logprobs).
    Differentiable in both (GRPO's k3 term in the loss); a reward penalty uses it without gradients."""
    if kind not in KL_ESTIMATORS:
        raise ConfigError(f"kind={kind!r} must be one of {sorted(KL_ESTIMATORS)} (Schulman's KL estimators; k1: TRL's "
                          "PPO penalty, k3: GRPO's)")
    _grid("logps", logps, mask)
    _grid("ref_logps", ref_logps, mask)
    m = mask.bool()
    # where on the inputs, not only on the result: a NaN or inf log-prob outside the mask (padding) must reach neither
    # the value nor, through exp's backward (0 * inf = NaN), the gradient
    dtype = torch.promote_types(torch.promote_types(logps.dtype, ref_logps.dtype), torch.float32)
    log_r = torch.where(m, ref_logps.to(dtype), 0.0) - torch.where(m, logps.to(dtype), 0.0)
    return torch.where(m, KL_ESTIMATORS[kind](log_r), 0.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8
                  ) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (var unbiased), 0 outside the mask; shift_mean=False
    adds the mean back (whitened rewards keep their sign on average). Needs 2 masked entries or more. Equal
    masked entries give exactly 0 (x itself with shift_mean=False)."""
    _grid("x", x, mask)
    m = mask.bool()
    n = int(m.sum())
    if n < 2:
        raise ConfigError(f"masked_whiten needs at least 2 masked entries for a variance, the mask selects {n}; "
                          "whiten over a larger batch")
    x = torch.where(m, x, 0.0)  # entries outside the mask are ignored, even NaN or inf ones
    mean = x.sum() / n
    var = torch.where(m, (x - mean) ** 2, 0.0).sum() / (n - 1)  # Bessel's correction, as TRL's masked_var
    out = (x - mean) * torch.rsqrt(var + eps)
    out = torch.where(m, out + mean if not shift_mean else out, 0.0)
    # no spread: 0 exactly (fp32's mean of equal values can miss them by an ulp, which / sqrt(ulp^2 + 1e-8) made
    # 1.2e-3 of 0.7s). Chosen on the device: a Python branch on the masked entries (x[m], bool()) was two host syncs
    # per call; the count above stays one, as the refusal of fewer than 2 entries needs it on the host.
    flat = torch.where(m, x, float("-inf")).amax() == torch.where(m, x, float("inf")).amin()  # (NaN: never flat)
    return torch.where(flat, x if not shift_mean else torch.zeros_like(x), out)


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ConfigError(f"rewards must be a (N,) tensor, one per completion, got {shape}")
    if not isinstance(group_size, int) or isinstance(group_size, bool):
        raise ConfigError(f"group_size={group_size!r} must be an int: the completions per prompt (SamplingParams.n)")
    if group_size < 2 or rewards.numel() % group_size:
        raise ConfigError(f"group_size={group_size} must be >= 2 and divide the {rewards.numel()} rewards "
                          "(each prompt's completions consecutive, SamplingParams(n=group_size))")
    _finite("rewards", rewards, "drop its whole group")  # (a NaN spreads over its whole group's advantages)
    return rewards.float().view(-1, group_size)


def _finite(name: str, x: torch.Tensor, drop: str) -> None:
    """Refuse a NaN or infinite entry of the (N,) scores `x`: it would reach the loss as NaN a step later."""
    bad = ~torch.isfinite(x.float())
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ConfigError(f"{name}[{i}] = {float(x[i])}: every completion needs a finite score; score one the "
                          f"verifier or reward model cannot judge as wrong (e.g. 0.0), or {drop}")


def _no_signal(g: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """(N,) advantages with every group of equal rewards exactly 0: it carries no signal, but fp32's mean (or
    leave-one-out mean) of equal values can miss them by an ulp, which a division by the group's std (0 up to
    rounding) + eps blows up to 6e-4 at eps=1e-4 (7 rewards of 0.7) and to NaN or +-0.93 at eps=0."""
    same = (g == g[:, :1]).all(1, keepdim=True).expand_as(g).reshape(-1)
    return torch.where(same, 0.0, adv)


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: Literal["group", "batch", "none"] = "group",
                     eps: float = 1e-4) -> torch.Tensor:
    """(N,) GRPO advantages: each reward minus its group's mean, divided by (the group's std + eps) ("group"),
    by (the batch's std + eps) ("batch"), or not at all ("none", Dr. GRPO). std unbiased, as TRL's. A group
    whose rewards are all equal gets exactly 0 (also at eps=0)."""
    g = _groups(rewards, group_size)
    if not (isinstance(eps, (int, float)) and 0 <= eps < float("inf")):
        raise ConfigError(f"eps={eps!r} must be a finite number >= 0 (TRL's 1e-4 is the default)")
    centred = (g - g.mean(1, keepdim=True)).view(-1)
    if scale == "group":
        scaled = centred / (g.std(1).repeat_interleave(group_size) + eps)
    elif scale == "batch":
        scaled = centred / (g.std() + eps)
    elif scale == "none":
        scaled = centred
    else:
        raise ConfigError(f"scale={scale!r} must be 'group', 'batch' or 'none'")
    return _no_signal(g, scaled)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N,) REINFORCE leave-one-out advantages: r_i - (sum of the group's other rewards) / (group_size - 1);
    exactly 0 in a group of equal rewards."""
    g = _groups(rewards, group_size)
    baseline = (g.sum(1, keepdim=True) - g) / (group_size - 1)
    return _no_signal(g, (g - baseline).view(-1))


def outcome_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) rewards holding each row's score (B,) on its last masked position (the response's last token,
    where a verifier or reward model judged the whole response), 0 elsewhere."""
    m = mask.bool()
    if not isinstance(scores, torch.Tensor) or scores.shape != m.shape[:1]:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ConfigError(f"scores must be a (B,) = ({m.shape[0]},) tensor, one per row, got {shape}")
    if scores.device != m.device:
        raise ConfigError(f"scores are on {scores.device} but the mask on {m.device}: move them there "
                          "(.to(mask.device))")
    _finite("scores", scores, "drop its row")
    if not m.any(-1).all():
        row = int((~m.any(-1)).nonzero()[0])
        raise ConfigError(f"row {row} of the mask selects no token, so its score has nowhere to go; drop the row")
    T = m.shape[1]
    last = T - 1 - m.flip(-1).int().argmax(-1)
    out = torch.zeros(m.shape, dtype=torch.promote_types(scores.dtype, torch.float32), device=scores.device)
    out[torch.arange(m.shape[0], device=m.device), last] = scores.to(out.dtype)
    return out
