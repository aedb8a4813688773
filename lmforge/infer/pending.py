"""Async scheduling's bookkeeping: a launched step whose sampled tokens the host has not read yet.

vLLM v1's async scheduling: a decode's shape (one token, its slot, its block table) does not depend on
the token's value, so the engine schedules and launches step t + 1 before it reads step t's tokens; the
decode inputs of t + 1 are copied on the device from t's sampled-token tensor (lmforge.infer.runner's
LateIds), and the host reads t's tokens while t + 1 runs. Each sampled sequence of a step that overlaps
counts its token as `Sequence.inflight` until the host appends it, so the scheduler treats it as known.
A sequence whose token at t ends it (EOS, a stop id or string: known only when read) has computed one
more token at t + 1, which the engine drops: its row is stale (`Launched.stale`).

A step overlaps only when nothing before the next step needs its token values (`overlaps`): no extra
rows (prompt log-probs), every chunk's request plain (Request.overlaps: no strategy, no penalties) and
no sampled row of a request that forks its n samples from it (the forks must exist before the next
schedule). Otherwise the engine reads the step's tokens at once, as without async scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.infer.request import Sequence, Status
from lmforge.infer.runner import Extra, LateIds, Step
from lmforge.infer.sampler import Sampled
from lmforge.infer.scheduler import Batch


@dataclass
class Launched:
    """A step on the device: its batch, logits rows and sampled tensors (read by Engine._finish)."""

    batch: Batch
    rows: Step
    sampled: Sampled
    overlap: bool
    """its tokens are read after the next step is launched (they are `inflight` until then)"""
    row_of: dict[int, int] = field(default_factory=dict)
    """seq_id -> its sampled row (an overlapping step samples each sequence once)"""

    def hold_tokens(self) -> None:
        """An overlapping step's samples count as their sequences' next tokens until the host reads them."""
        for r, (c, _, _) in enumerate(self.rows):
            seq = self.batch.chunks[c][0]
            seq.inflight += 1
            self.row_of[seq.seq_id] = r

    def late_ids(self, batch: Batch) -> LateIds | None:
        """The decode chunks of the next batch whose input is this step's sample (not on the host yet).
        Called before the next batch advances num_computed."""
        chunks, rows = [], []
        for c, (seq, n) in enumerate(batch.chunks):
            if seq.num_computed >= len(seq.tokens):
                assert n == 1, "only a decode runs on a token still on the device"
                chunks.append(c)
                rows.append(self.row_of[seq.seq_id])
        return LateIds(self.sampled.tokens, chunks, rows) if chunks else None

    def stale(self) -> set[int]:
        """seq_ids whose rows are dropped: finished (a stop read late) or aborted since the launch."""
        return {s.seq_id for s, _ in self.batch.chunks if s.status == Status.FINISHED}


def overlaps(batch: Batch, rows: Step, extra: Extra) -> bool:
    """Whether the step's tokens may be read after the next step is launched (see the module docstring)."""
    if extra or not all(seq.request.overlaps for seq, _ in batch.chunks):
        return False
    return all(_forked(batch.chunks[c][0]) for c, _, _ in rows)


def _forked(seq: Sequence) -> bool:
    """The row samples one sequence only (its n samples exist, or there is one)."""
    return seq.request.forked or seq.request.params.n == 1
