"""What a speculative drafter reads of the target besides tokens: its hidden states ("features").

EAGLE-1/2 (Li et al. 2024, §3-4) drafts from the target's top features, the LM head's input, at every
position: its draft head runs over (feature_t, token_{t+1}) pairs, so after a prefill it needs the whole
prompt's features and after a verify step those of every accepted token. EAGLE-3 (Li et al. 2025, §3) reads
a low, a middle and a high layer's outputs, concatenated. Medusa (Cai et al. 2024) reads the last row only.
A drafter object says what it reads (lmforge.infer.speculative's protocol):

  uses_hidden_states = True    propose(..., hidden=(D,)): the feature at ctx[-2], whose logits gave ctx[-1]
  uses_hidden_states = "all"   propose(..., hidden=Features): every position's feature, each exactly once and
                               in order: those computed and verified since this sequence's last propose
  hidden_layers = (i, j, k)    the features are those blocks' outputs concatenated (D = 3 d_model; the model's
                               forward(return_hidden=(i, j, k))); unset = the final hidden state after the
                               final norm (return_hidden=True, D = d_model)

Which features: EAGLE's paper reads the "second-to-top-layer" features, the layer before the LM head; its
code takes the base model's last_hidden_state, which HF computes after the final norm: return_hidden=True.
EAGLE-3's code takes the inputs of layers 2, L // 2 and L - 3 of an L-layer target, i.e. the outputs of
blocks (1, L // 2 - 1, L - 4) here (HF's hidden_states[2], [L // 2], [L - 3]).
Cost: none unless a drafter asks (the engine checks one attribute per step); with "all", steps holding a
speculative sequence run eagerly (drafted steps do anyway) and return (chunk length, D) states per chunk.

Alignment ("all"): `Features.states[j]` is the feature at position start + j, i.e. of token ctx[start + j],
the one whose logits gave ctx[start + j + 1]; the states end at position len(ctx) - 2, so the pending token
ctx[-1] has none yet (the draft head pairs the last feature with it). A verify step's chunk holds the pending
token and the drafts (a chain, or a tree's nodes in node order); only the pending token and the accepted
drafts (a tree's accepted path, in path order) have their features handed on, rejected ones never.
Where they live: between the step that computes them and the next propose, on the Sequence
(`Sequence.features`, a FeatureStream); afterwards the drafter owns what it keeps of them, keyed by
Features.seq_id and dropped at `release(seq_id)`, which the engine calls when the sequence finishes or is
aborted. A sample forked after the prefill (n > 1) gets a copy of the prompt's features and its own seq_id.
A preempted sequence recomputes its positions: those already handed on are dropped, not handed twice; its
prompt's positions not yet handed are computed, never taken from the prefix cache (the scheduler looks
the cache up only below `FeatureStream.next`). A drafter whose cache lives in the engine's blocks (a paged
head, lmforge.infer.draft.PagedDraftHead) lost it with them: its stream restarts (`restart`) and every
position is computed and handed again, from 0, or from a prefix hit: a paged head keeps each block's last
feature, so its sequences take prefix hits and resume there (`resume`). Chunked prefill hands each chunk's
positions on in order.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from lmforge.errors import ConfigError, LmforgeError


@dataclass(frozen=True)
class Features:
    """The target's features handed to a drafter with uses_hidden_states="all" (propose's hidden=)."""

    seq_id: int
    """the engine's sequence: a drafter keeps per-sequence state under it (released by `release(seq_id)`)"""
    start: int
    """position of states[0]: where this sequence's previous Features ended (0 the first time)"""
    states: torch.Tensor
    """(F, D) features at positions start .. start + F - 1 = len(ctx) - 2"""


class FeatureStream:
    """One sequence's features not yet handed to its drafter: pushed as positions are computed and verified,
    each position once and in order, taken by the next propose."""

    def __init__(self) -> None:
        self.next = 0
        """the first position whose feature was never pushed (the prefix cache is looked up only below it)"""
        self.start = 0
        """the position of the first held feature"""
        self.held: list[torch.Tensor] = []

    def push(self, first: int, states: torch.Tensor) -> None:
        """states (n, D): the features at positions first .. first + n - 1; those before `next` (recomputed
        after a preemption) are dropped."""
        if first > self.next:
            raise LmforgeError(f"internal: features from position {first} arrived but position {self.next}'s "
                               "never did (a position computed from the prefix cache?)")
        if first + states.shape[0] > self.next:
            self.held.append(states[self.next - first:])
            self.next = first + states.shape[0]

    def take(self, seq_id: int, ctx_len: int) -> Features:
        """The held features, handed with a context of ctx_len tokens (they must reach position ctx_len - 2)."""
        if self.next != ctx_len - 1 or not self.held:
            raise LmforgeError(f"internal: a drafter's context has {ctx_len} tokens but features reach position "
                               f"{self.next - 1} (from {self.start})")
        states = self.held[0] if len(self.held) == 1 else torch.cat(self.held)
        out = Features(seq_id, self.start, states)
        self.start, self.held = self.next, []
        return out

    def resume(self, position: int, feature: torch.Tensor) -> None:
        """A new sequence whose first `position` tokens came from the prefix cache (a paged head's blocks hold
        its entries for them, lmforge.infer.draft.PagedDraftHead): its features start there, after the one at
        position - 1 (the cached block's last, kept beside it), which pairs with the token at `position`."""
        self.next, self.start, self.held = position, position - 1, [feature[None]]

    def restart(self) -> None:
        """Hand every position again from 0 (a preempted sequence whose drafter's cache went with its blocks:
        lmforge.infer.draft.PagedDraftHead); nothing was computed since, so the scheduler takes no prefix."""
        self.next, self.start, self.held = 0, 0, []

    def copy(self) -> FeatureStream:
        """A forked sample's stream: the same held features (tensors are never written in place)."""
        out = FeatureStream()
        out.next, out.start, out.held = self.next, self.start, list(self.held)
        return out


@dataclass(frozen=True)
class StepHidden:
    """The hidden states one step asks the runner for (runner.execute's `hidden`)."""

    layers: bool | tuple[int, ...]
    """the model's return_hidden: True (the final normed state) or block indices"""
    chunks: list[int] | None = None
    """None: at the sampled and extra rows (Sampled.hidden); else at every position of these chunks, in
    order (Sampled.features)"""


@dataclass(frozen=True)
class HiddenAsk:
    """What the engine asks the target for, from its drafter's uses_hidden_states and hidden_layers."""

    layers: bool | tuple[int, ...]
    """the model's return_hidden: True (final normed state) or block indices"""
    every: bool
    """every new position of each speculative sequence's chunk ("all"), or its sampled rows only (True)"""

    def ask(self, batch) -> StepHidden | None:
        """What one step asks for: None in an "all" step with no chunk of a sequence with a FeatureStream."""
        if not self.every:
            return StepHidden(self.layers)
        chunks = [c for c, (seq, _) in enumerate(batch.chunks) if seq.features is not None]
        return StepHidden(self.layers, chunks) if chunks else None


def hidden_ask(draft, model) -> HiddenAsk | None:
    """What the drafter reads (None: no hidden states), checked against the model; one-line errors."""
    uses = getattr(draft, "uses_hidden_states", False)
    layers = getattr(draft, "hidden_layers", None)
    if not (uses is False or uses is True or uses == "all"):
        raise ConfigError(f"uses_hidden_states must be False, True (the feature at the sampled row) or 'all' "
                          f"(every position's), got {uses!r}")
    if not uses:
        if layers is not None:
            raise ConfigError(f"the drafter sets hidden_layers={layers!r} but not uses_hidden_states; set "
                              "uses_hidden_states to True or 'all'")
        return None
    if "return_hidden" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"the drafter reads hidden states but {type(model).__name__}.forward has no "
                          "return_hidden option; use a drafter without uses_hidden_states")
    if layers is not None:
        n = getattr(getattr(model, "cfg", None), "n_layers", None) or getattr(model, "n_layers", None)
        ok = isinstance(layers, tuple) and layers and all(isinstance(i, int) and not isinstance(i, bool)
                                                          and 0 <= i < (n or i + 1) for i in layers)
        if not ok:
            raise ConfigError(f"hidden_layers must be a non-empty tuple of block indices{f' in [0, {n})' if n else ''}, "
                              f"e.g. (1, L // 2 - 1, L - 4) for EAGLE-3's low/middle/high of L blocks; got {layers!r}")
    return HiddenAsk(layers if layers is not None else True, uses == "all")
