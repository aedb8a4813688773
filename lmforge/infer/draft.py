"""A draft model for speculative decoding that drafts for the whole batch at once.

The draft model keeps its own paged cache with the same block size and the same block ids as the
target's: a sequence's block table addresses both (vLLM's layout), so the draft needs no tables, no
allocation and no preemption logic of its own. Each round of drafting is one flat forward of the draft
model over every speculating sequence: the first feeds each sequence's tokens the draft has not seen
yet (its context since the last verified position, a small prefill), the next ones one draft token
each. Draft keys are valid up to the verified prefix (`accept`); a preempted sequence's blocks were
freed, so its draft state restarts from zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmforge.infer.runner import PagedRunner
from lmforge.infer.scheduler import Batch


@dataclass
class _View:
    """What PagedRunner.prepare reads of a sequence: the draft's own token and progress counts."""

    tokens: list[int]
    num_computed: int
    block_table: list[int]
    seq_id: int
    evicted: int = 0
    """keys dropped by a KV policy (Sequence.evicted): the draft's own cache keeps every key"""


class PagedDraftModel:
    def __init__(self, model, num_blocks: int, block_size: int, device):
        self.model = model.eval()
        self.runner = PagedRunner(model, model.cache_spec(), num_blocks, block_size, device)
        self.known: dict[int, tuple[int, int]] = {}  # seq_id -> (tokens with draft keys, preemptions seen)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        self.runner.cache.copy_blocks(pairs)

    def accept(self, seq, verified: int) -> None:
        """seq's first `verified` tokens are final: draft keys past them are stale."""
        done, pre = self.known.get(seq.seq_id, (0, seq.preemptions))
        self.known[seq.seq_id] = (min(done, verified), pre)

    @torch.inference_mode()
    def propose(self, items, probs) -> dict[int, tuple[list[int], torch.Tensor]]:
        """items: (seq, number of drafts, processors, greedy); probs(logits, procs, greedy) -> q.
        Returns seq_id -> (drafts, q (d, V))."""
        views = {}
        for seq, _, _, _ in items:
            done, pre = self.known.get(seq.seq_id, (0, seq.preemptions))
            views[seq.seq_id] = _View(list(seq.tokens), done if pre == seq.preemptions else 0, seq.block_table, seq.seq_id)
        out = {seq.seq_id: ([], []) for seq, _, _, _ in items}
        for r in range(max(k for _, k, _, _ in items)):
            chunks = []
            for it in items:
                if it[1] > r:
                    view = views[it[0].seq_id]
                    chunks.append(((view, len(view.tokens) - view.num_computed), it))
            chunks.sort(key=lambda c: c[0][1] != 1)  # decodes first, as the runner's layout wants
            batch = Batch(chunks=[c[0] for c in chunks])
            ids, meta = self.runner.prepare(batch, [(i, 0, None) for i in range(len(chunks))])
            logits = self.model(ids, cache=self.runner.cache, meta=meta)[0]
            for i, (_, (seq, _, procs, greedy)) in enumerate(chunks):
                q = probs(logits[i:i + 1], procs, greedy)[0]
                tok = int(q.argmax()) if greedy else int(torch.multinomial(q, 1, generator=seq.generator))
                view = views[seq.seq_id]
                view.num_computed = len(view.tokens)
                view.tokens.append(tok)
                out[seq.seq_id][0].append(tok)
                out[seq.seq_id][1].append(q)
        for seq, _, _, _ in items:
            self.known[seq.seq_id] = (views[seq.seq_id].num_computed, seq.preemptions)
        return {sid: (d, torch.stack(q) if q else None) for sid, (d, q) in out.items()}

    def forget(self, seq) -> None:
        self.known.pop(seq.seq_id, None)
