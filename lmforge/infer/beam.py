"""Beam search (Graves 2012; Sutskever et al. 2014) with length normalisation (Wu et al. 2016) and early
stopping, as a strategy running on the engine: the live beams of a request are ordinary sequences of
the engine's batch (any number of requests search at once, beside sampled requests), and a new beam is
a fork of its parent that shares the parent's cache blocks (copy-on-write, lmforge.infer.blocks).

Each round, once every live beam has its next-token log-probabilities, the 2·W best candidates by summed
log-probability are ranked; those ending in a stop token join the finished set (scored sum / length**alpha)
if they rank among the W best, and the W best others become the next beams. With early_stopping the
search ends as soon as W hypotheses are finished; otherwise once no live beam can still beat the worst
finished one at its current length. Log-probabilities are those of the raw model distribution.
"""

from __future__ import annotations

import torch

from lmforge.infer.detok import safe_decode
from lmforge.infer.outputs import CompletionOutput
from lmforge.infer.request import Sequence, stop_ids
from lmforge.infer.runner import row_for


def _norm(score: float, length: int, alpha: float) -> float:
    return score / max(length, 1) ** alpha


class BeamSearch:
    """Attached to a request with params.beam_width > 1; the engine hands it each beam's logits."""

    def __init__(self, request, tokenizer, max_seq_len: int):
        self.request, self.params = request, request.params
        self.W = self.params.beam_width
        self.eos = stop_ids(self.params, tokenizer)
        self.tokenizer = tokenizer
        self.steps = min(self.params.max_tokens, max_seq_len - request.prompt_len)
        self.hyp: dict[int, tuple[list[int], list[float]]] = {request.seqs[0].seq_id: ([], [])}
        self.pending: dict[int, torch.Tensor] = {}
        self.finished: list[tuple[float, list[int], list[float], str]] = []
        self.outputs: list[CompletionOutput] | None = None

    def claims(self, seq: Sequence) -> bool:
        return True

    def rows(self, seq: Sequence, n: int):
        return [(0, row_for(seq, None))]

    def on_logits(self, engine, seq: Sequence, rows: list[int], sampled) -> None:
        self.pending[seq.seq_id] = sampled.logits[rows[0]].float().log_softmax(-1)
        live = [s for s in self.request.seqs if s.seq_id in self.hyp]
        if all(s.seq_id in self.pending for s in live):
            self._expand(engine, live)

    def _expand(self, engine, live: list[Sequence]) -> None:
        logp = torch.stack([self.pending.pop(s.seq_id) for s in live])  # (beams, V)
        sums = torch.tensor([sum(self.hyp[s.seq_id][1]) for s in live], device=logp.device)
        cand = (logp + sums[:, None]).flatten().topk(min(2 * self.W, logp.numel()))
        V, alpha = logp.shape[-1], self.params.length_penalty
        nxt = []
        for rank, (score, flat) in enumerate(zip(cand.values.tolist(), cand.indices.tolist())):
            b, tok = divmod(flat, V)
            toks, lps = self.hyp[live[b].seq_id]
            toks, lps = toks + [tok], lps + [float(logp[b, tok])]
            if tok in self.eos:
                if rank < self.W:  # a stop candidate counts only if it ranks among the W best
                    self.finished.append((_norm(score, len(toks), alpha), toks, lps, "stop"))
                continue
            nxt.append((live[b], toks, lps))
            if len(nxt) == self.W:
                break
        if self._done([(t, lp) for _, t, lp in nxt]) or len(nxt[0][1]) >= self.steps:
            self._finish(engine, live, nxt)
            return
        for parent, toks, lps in nxt:  # fork every survivor before dropping the old beams
            child = engine.fork(parent, len(self.request.seqs))
            child.tokens.append(toks[-1])
            self.hyp[child.seq_id] = (toks, lps)
        for s in live:
            self.hyp.pop(s.seq_id)
            engine.scheduler.finish(s)

    def _done(self, live: list[tuple[list[int], list[float]]]) -> bool:
        if not live:
            return True
        if len(self.finished) < self.W:
            return False
        if self.params.early_stopping:
            return True
        worst = sorted(h[0] for h in self.finished)[-self.W]
        return max(_norm(sum(lp), len(t), self.params.length_penalty) for t, lp in live) <= worst

    def _finish(self, engine, live: list[Sequence], nxt) -> None:
        for _, toks, lps in nxt:
            self.finished.append((_norm(sum(lps), len(toks), self.params.length_penalty), toks, lps, "length"))
        best = sorted(self.finished, key=lambda h: -h[0])[: self.params.n]
        self.outputs = [CompletionOutput(index=i, text=safe_decode(self.tokenizer, [t for t in toks if t not in self.eos]),
                                         token_ids=toks, finish_reason=why, logprobs=lps, cumulative_logprob=sum(lps))
                        for i, (_, toks, lps, why) in enumerate(best)]
        for s in live:
            engine.scheduler.finish(s)
        self.hyp.clear()
        self.request.done = True
