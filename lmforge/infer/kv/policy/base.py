"""The KV-policy protocol: `KVPolicy` (what a policy may say: the slots to keep, what it observes, its per-sequence
state), `CacheLayout` (what it may know of the cache) and `Keep` (the form of a plan). How the engine applies a
plan is lmforge.infer.kv.policy's docstring; the shipped policies subclass KVPolicy in streaming.py and scored.py."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

Keep = list[int] | range | torch.Tensor
"""slots a sequence keeps, ascending: a host list (every layer and head alike) or an (L, heads, K) int64
tensor on the cache's device (per layer and kv head; K the same everywhere; any order along K with
ordered_slots False)"""


@dataclass(frozen=True)
class CacheLayout:
    """What a policy may know of the cache: layers, kv heads per layer (1 for MLA latents), block size."""

    num_layers: int
    heads: tuple[int, ...]
    block_size: int


class KVPolicy:
    """Base of KV policies. A subclass is a frozen kw-only dataclass of its parameters (one object may serve
    several engines); what it learns per sequence lives in the state `start` returns, which the engine keeps
    by sequence id, copies on forks (`fork`), drops on release and restarts after a preemption."""

    needs_scores: ClassVar[bool] = False
    """observe() wants attention probabilities (steps it observes run eagerly with a score hook)"""
    observed_tail: ClassVar[int] = 0
    """the last this-many tokens of a prefill are computed, never taken from the prefix cache (sys.maxsize:
    every prompt query's attention is observed, H2O's accumulated scores)"""
    ordered_slots: ClassVar[bool] = True
    """True: a compaction keeps slots in position order (every kept key after an evicted one moves: O(K)
    copies). False: evicted slots below the new count K are filled with the surviving keys of slots >= K,
    per layer and kv head (O(evictions) copies); slot order is then not position order, so the policy
    tracks what each slot holds through `compacted` (H2O, TOVA: one eviction per step)"""
    check_plans: ClassVar[bool] = False
    """read a device tensor plan's values to refuse repeated or out-of-range slots (one device sync per
    compaction: turn it on while writing or testing a policy). Host lists and CPU tensors are always checked."""

    @property
    def cache_positions(self) -> bool:
        """Queries and kept keys take their positions within the cache (a key at slot s acts as if at position s),
        not their positions in the text; each compaction turns the keys it moves by their shift
        (StreamingLLM(positions="cache"), the paper's §3.2)."""
        return False

    def start(self, seq, layout: CacheLayout) -> object:
        """Per-sequence state when a sequence is (re)admitted: len(seq.tokens) tokens are to be prefilled."""
        return None

    def observes(self, state, start: int, n: int) -> bool:
        """Whether the chunk of n tokens from position `start` is observed (needs_scores only)."""
        return False

    def observe(self, state, layer: int, probs: torch.Tensor, first: int) -> None:
        """probs (H, T, S): one sequence's T queries (positions first..) over its S cache slots."""

    def plan(self, seq, state) -> Keep | None:
        """The slots to keep of seq's num_slots (ascending, at least one, fewer than num_slots), or None."""
        raise NotImplementedError

    def max_slots(self, prompt_len: int, chunk: int) -> int | None:
        """The most keys a sequence of a `prompt_len`-token prompt can hold at once when a step adds at most `chunk`
        tokens, also while it is recomputed after a preemption (None: no bound below its length).
        Engine.add_request sizes its pool check with it, so a request longer than the pool still runs under a
        policy that bounds its keys."""
        return None

    def compacted(self, state, keep: Keep) -> None:
        """The engine applied the plan: new slot i holds the key of old slot keep[..., i], for i < K. keep has
        the plan's form (a host list, or an (L, heads, K) tensor on the cache's device). ordered_slots: the
        plan's slots, ascending. Otherwise a permutation of them: keep[..., i] = i for a kept slot below K,
        the tail key moved into it for an evicted one (gather per-slot state with it: state[..., keep])."""

    def fork(self, state) -> object:
        return copy.deepcopy(state)
