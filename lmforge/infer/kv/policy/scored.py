"""The KV policies that keep keys by the attention they receive: H2O (heavy hitters, accumulated over every
query) and SnapKV (the prompt's observation window, once). Both observe attention probabilities through the
cache's score hook (KVPolicy.needs_scores), which session.py sets for the steps they observe."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from lmforge.config import check, coerce_fields
from lmforge.errors import LmforgeError
from lmforge.infer.kv.policy.base import CacheLayout, KVPolicy, Keep


@dataclass
class _H2OState:
    prompt_len: int
    heads: tuple[int, ...]
    score: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> (kv heads, S) attention each slot's key has received so far"""
    pos: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> (kv heads, S) each slot's key's position (slots leave position order: ordered_slots False)"""


@dataclass(frozen=True, kw_only=True)
class H2O(KVPolicy):
    """Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
    (§3-4, Algorithm 1): per (layer, kv head) the attention each key has received, accumulated over every query so
    far (the prompt's and each decoded token's; a kv head sums its group's query heads); once the prompt is
    computed, keep the `heavy` keys with the most among the older ones (the heavy hitters) and the `recent`
    newest, so from then on one key goes per decoded token - the greedy eviction of Algorithm 1. A sequence
    recomputed after a preemption observes every query again and evicts before each chunk past the prompt, so it
    never holds more than max(prompt, heavy + recent) keys + a step's (max_slots: a generation longer than the
    pool runs).

    The scores come from the attention weights (`needs_scores`: observed steps run the reference attention, not
    the kernels) and every prompt query is observed (`observed_tail`: prompts are computed, never read from the
    prefix cache). Slots are filled from the tail (ordered_slots False: O(1) keys move per eviction), so the
    state keeps each slot's position. per_head False: one choice for every layer and head (scores summed), a host
    list. Positions are the text's (a key keeps the position it was computed at)."""

    heavy: int
    recent: int
    per_head: bool = True
    needs_scores: ClassVar[bool] = True
    observed_tail: ClassVar[int] = sys.maxsize
    ordered_slots: ClassVar[bool] = False

    def __post_init__(self) -> None:
        coerce_fields(self, "H2O")
        check(self.heavy >= 0 and self.recent >= 1,
              f"H2O needs heavy >= 0 and recent >= 1, got heavy={self.heavy}, recent={self.recent}")

    def start(self, seq, layout: CacheLayout) -> _H2OState:
        # the request's prompt, also when a preempted sequence restarts: its recomputed outputs are evicted from
        # as they come (chunk by chunk), not held whole as a prompt, so it holds no more keys than it did (max_slots)
        return _H2OState(seq.request.prompt_len, layout.heads)

    def observes(self, state: _H2OState, start: int, n: int) -> bool:
        return True

    def observe(self, state: _H2OState, layer: int, probs: torch.Tensor, first: int) -> None:
        H, T, S = probs.shape
        kv = state.heads[layer]
        c = probs.float().sum(1).view(kv, H // kv, S).sum(1)  # (kv heads, S): this chunk's attention per slot
        pos = torch.arange(first, first + T, device=c.device).expand(kv, T)
        if layer in state.score:  # this step's new keys sit at the last T slots
            c[:, :S - T] += state.score[layer]
            pos = torch.cat((state.pos[layer], pos), 1)
        state.score[layer], state.pos[layer] = c, pos

    def plan(self, seq, state: _H2OState) -> Keep | None:
        n, budget = seq.num_slots, self.heavy + self.recent
        if n <= budget or seq.num_computed < state.prompt_len:
            return None
        _all_observed(self, seq, state.score, state.heads)
        layers, first_recent = range(len(state.heads)), seq.num_computed - self.recent
        if not self.per_head:
            total = sum(state.score[layer].sum(0) for layer in layers)
            total = total.masked_fill(state.pos[0][0] >= first_recent, float("inf"))
            return total.topk(budget).indices.sort().values.tolist()
        return torch.stack([state.score[layer].masked_fill(state.pos[layer] >= first_recent, float("inf"))
                            .topk(budget, dim=-1).indices for layer in layers])  # (L, kv heads, K), any order

    def max_slots(self, prompt_len: int, chunk: int) -> int:
        # the prompt is held whole until it is computed (a recomputation's chunk may pass its end), then a plan
        # leaves heavy + recent keys before each step, which adds <= chunk
        return max(prompt_len, self.heavy + self.recent) + chunk

    def compacted(self, state: _H2OState, keep: Keep) -> None:  # new slot i holds old slot keep[..., i]
        for layer, kv in enumerate(state.heads):
            idx = (torch.tensor(keep, device=state.score[layer].device) if isinstance(keep, list)
                   else keep[layer]).expand(kv, -1)
            state.score[layer], state.pos[layer] = state.score[layer].gather(1, idx), state.pos[layer].gather(1, idx)


@dataclass
class _SnapState:
    prompt_len: int
    heads: tuple[int, ...]
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> (heads, prefix) Eq. 1's C, summed over the observed window queries so far"""
    done: bool = False


@dataclass(frozen=True, kw_only=True)
class SnapKV(KVPolicy):
    """Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (§4.1, Algorithm 1):
    once the prompt is computed, each (layer, kv head) keeps the `budget` prefix keys that the prompt's last
    `window` queries (the observation window) attend to most, plus the window's own keys.

      C = sum_{i in window} A[:, i, :L_prefix]          Eq. 1: attention of the window's queries over the
                                                         prefix keys (L_prefix = prompt - window), summed
      C' = pool1d(C, pool_kernel, padding=pool_kernel//2)  §4.2: clustering by pooling along the keys
      I = top-budget(C')                                 Eq. 2, per head (ties: the earlier key)

    GQA: a kv head's C sums its group's query heads (MLA's one latent "head": all heads). budget counts the
    prefix keys only: the paper's max_capacity_prompt is budget + window. Prompts of at most budget + window
    tokens are kept whole, as in Algorithm 1. Decoding keeps every later key (SnapKV compresses once)."""

    budget: int
    window: int = 32
    pool_kernel: int = 7
    pooling: str = "avg"
    needs_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        coerce_fields(self, "SnapKV")
        check(self.budget >= 1, f"SnapKV budget must be >= 1, got {self.budget}")
        check(self.window >= 1, f"SnapKV window must be >= 1, got {self.window}")
        check(self.pool_kernel >= 1 and self.pool_kernel % 2 == 1,
              f"SnapKV pool_kernel must be odd and >= 1 (the pooled scores keep their length), got {self.pool_kernel}")
        check(self.pooling in ("avg", "max"), f"SnapKV pooling must be 'avg' or 'max', got {self.pooling!r}")

    @property
    def observed_tail(self) -> int:  # the window's queries must run: their attention is the observation
        return self.window

    def start(self, seq, layout: CacheLayout) -> _SnapState:
        return _SnapState(len(seq.tokens), layout.heads)

    def _compresses(self, state: _SnapState) -> bool:
        return not state.done and state.prompt_len - self.window > self.budget

    def observes(self, state: _SnapState, start: int, n: int) -> bool:
        return self._compresses(state) and start + n > state.prompt_len - self.window and start < state.prompt_len

    def observe(self, state: _SnapState, layer: int, probs: torch.Tensor, first: int) -> None:
        prefix = state.prompt_len - self.window
        lo, hi = max(0, prefix - first), min(probs.shape[1], state.prompt_len - first)
        c = probs[:, lo:hi, :prefix].float().sum(1)  # (H, prefix): Eq. 1 over this chunk's window queries
        c = c.view(state.heads[layer], -1, prefix).sum(1)  # query head h belongs to kv head h // group
        state.scores[layer] = state.scores[layer] + c if layer in state.scores else c

    def plan(self, seq, state: _SnapState) -> Keep | None:
        if not self._compresses(state) or seq.num_computed < state.prompt_len:
            return None
        _all_observed(self, seq, state.scores, state.heads)
        prefix, k = state.prompt_len - self.window, self.pool_kernel
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        keep = []
        for layer in range(len(state.heads)):
            pooled = pool(state.scores[layer][:, None], k, stride=1, padding=k // 2)[:, 0]  # (heads, prefix)
            # ties (max pooling makes plateaus of equal scores) go to the earlier key, on every device and
            # whatever order topk would leave them in
            top = pooled.argsort(dim=-1, descending=True, stable=True)[:, :self.budget].sort(dim=-1).values
            rest = torch.arange(prefix, seq.num_slots, device=top.device).expand(top.shape[0], -1)
            keep.append(torch.cat((top, rest), dim=-1))  # the window (and any later key) is kept
        return torch.stack(keep)

    def compacted(self, state: _SnapState, keep: Keep) -> None:
        state.done, state.scores = True, {}


def _all_observed(policy: KVPolicy, seq, scores: dict, heads: tuple[int, ...]) -> None:
    """Refuse to plan from scores some layer never gave (its attention did not call the score hook)."""
    if len(scores) != len(heads):
        raise LmforgeError(f"{type(policy).__name__} observed {len(scores)} of {len(heads)} layers of sequence "
                           f"{seq.seq_id}: a layer's attention did not reach the cache's score hook (a cache's "
                           "attend passes hook_for(layer, seq_ids) to its attention: CacheStore.calls_score_hook)")
