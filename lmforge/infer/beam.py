"""Beam search (Graves 2012; Sutskever et al. 2014) with length normalisation (Wu et al. 2016) and early
stopping, as a strategy running on the engine: the live beams of a request are ordinary sequences of
the engine's batch (any number of requests search at once, beside sampled requests), and a new beam is
a fork of its parent that shares the parent's cache blocks (copy-on-write, lmforge.infer.blocks).

Each round, once every live beam has its next-token log-probabilities, the candidates are ranked by summed
log-probability; those ending in a stop token, or whose text now contains a stop string, join the finished
set (scored sum / length**alpha) if they rank among the W best, and the W best others become the next beams
(HF ranks the (1 + stop ids)·W best, which always hold W that do not stop). With early_stopping the search
ends as soon as W hypotheses are finished; otherwise once no live beam can still beat the worst finished one
at its current length. Beams still running when the search ends are dropped (they are not hypotheses: they
neither stopped nor reached the length limit); at the length limit the running beams join the finished set
(finish_reason "length"). Log-probabilities are those of
the raw model distribution (SamplingParams refuses penalties and logit_bias with beams). Outputs carry
cumulative_logprob always, logprobs, top_logprobs and text_offsets (as a sample's) when params.logprobs asks for
them; while the search runs, the n best live beams are the request's outputs (finish_reason None), and an aborted
search returns them, finish_reason "abort" (one empty sample if it had not run a step: only the prompt's beam lives).
"""

from __future__ import annotations

import math

import torch

from lmforge.infer.detok import StreamDecoder, decode_after
from lmforge.infer.outputs import CompletionOutput
from lmforge.infer.request import Sequence
from lmforge.infer.runner import row_for
from lmforge.infer.sampler import token_logprobs

Hyp = tuple[list[int], list[float], list[dict[int, float]]]
"""a hypothesis: its tokens, their log-probs, and (with params.logprobs) each step's top-k entries"""


def _norm(score: float, length: int, alpha: float) -> float:
    """The rank of the normalised score score / length**alpha (Wu et al. 2016): larger is better, computed in log
    space so that no finite alpha overflows (length**1000 is past a float: the quotient raised OverflowError, and
    ZeroDivisionError at -1000). A score is a sum of log-probs (<= 0), so the quotient is -exp(m) with
    m = log(-score) - alpha log(length), and -m orders hypotheses as the quotient does."""
    if score >= 0:  # (a certain hypothesis: its quotient 0 beats every other)
        return math.inf
    return alpha * math.log(max(length, 1)) - math.log(-score)


def _ranked(scores: torch.Tensor, first: int):
    """(score, flat index) of `scores` from the best down: the `first` best in one topk (HF's (1 + stop ids)·W
    candidates always hold W that do not stop), the rest, if a round asks for more (stop strings can end any
    candidate), from one full sort."""
    top = scores.topk(min(max(first, 2), scores.numel()))
    yield from zip(top.values.tolist(), top.indices.tolist())
    if top.indices.numel() < scores.numel():
        seen = set(top.indices.tolist())
        values, order = scores.sort(descending=True, stable=True)
        yield from ((v, i) for v, i in zip(values.tolist(), order.tolist()) if i not in seen)


class BeamSearch:
    """Attached to a request with params.beam_width > 1; the engine hands it each beam's logits."""

    def __init__(self, request, tokenizer, max_seq_len: int):
        self.request, self.params = request, request.params
        self.W = self.params.beam_width
        self.eos = request.eos
        self.tokenizer = tokenizer
        self.steps = min(self.params.max_tokens, max_seq_len - request.prompt_len)
        self.hyp: dict[int, Hyp] = {request.seqs[0].seq_id: ([], [], [])}
        self.pending: dict[int, torch.Tensor] = {}
        self.finished: list[tuple[float, Hyp, str]] = []
        self.outputs: list[CompletionOutput] | None = None

    def claims(self, seq: Sequence) -> bool:
        return True

    def rows(self, seq: Sequence, n: int):
        return [(0, row_for(seq, None))]

    def on_logits(self, engine, seq: Sequence, rows: list[int], sampled) -> None:
        # scores and log-probs under the model's own distribution, over all its rows (sampler.Sampled.full)
        full = sampled.logits if sampled.full is None else sampled.full
        self.pending[seq.seq_id] = full[rows[0]].float().log_softmax(-1)
        live = [s for s in self.request.seqs if s.seq_id in self.hyp]
        if all(s.seq_id in self.pending for s in live):
            self._expand(engine, live)

    def _expand(self, engine, live: list[Sequence]) -> None:
        logp = torch.stack([self.pending.pop(s.seq_id) for s in live])  # (beams, V)
        sums = torch.tensor([sum(self.hyp[s.seq_id][1]) for s in live], device=logp.device)
        V, alpha, k, limit = logp.shape[-1], self.params.length_penalty, self.params.logprobs, engine.vocab_limit
        cand = logp if limit is None else logp.index_fill(-1, torch.arange(limit, V, device=logp.device), -math.inf)
        top = self._top_entries(logp, k, limit)
        nxt = []  # (ids past a padded vocabulary's tokenizer: never a candidate, never listed, but their mass counts)
        for rank, (score, flat) in enumerate(_ranked((cand + sums[:, None]).flatten(), (1 + len(self.eos)) * self.W)):
            b, tok = divmod(flat, V)
            toks, lps, tops = self.hyp[live[b].seq_id]
            lp = float(logp[b, tok])
            if top is not None:
                tops = tops + [top[b]]
            h = (toks + [tok], lps + [lp], tops)
            why = "stop" if tok in self.eos or self._stop_at(h[0]) is not None else None
            if why:
                if rank < self.W:  # a finished candidate counts only if it ranks among the W best
                    self.finished.append((_norm(score, len(h[0]), alpha), h, why))
                continue
            nxt.append((live[b], h))
            if len(nxt) == self.W:
                break
        if nxt and len(nxt[0][1][0]) >= self.steps:  # the length limit finishes the running beams (even where
            self._finish(engine, live, nxt)           # this round filled the finished set: they compete in it)
            return
        if self._done([h for _, h in nxt]):  # the finished set is final: beams still running are dropped
            self._finish(engine, live, [])
            return
        for parent, h in nxt:  # fork every survivor before dropping the old beams
            child = engine.fork(parent, len(self.request.seqs))
            child.tokens.append(h[0][-1])
            self.hyp[child.seq_id] = h
        for s in live:
            self.hyp.pop(s.seq_id)
            engine.scheduler.finish(s)

    @staticmethod
    def _top_entries(logp: torch.Tensor, k: int | None, limit: int | None) -> list[dict[int, float]] | None:
        """Each live beam's top-k entries of this step, as a sample's (Engine.accept: the k most likely, not the
        chosen one besides), for logp (beams, V); None when params.logprobs asks for none. They do not depend on
        the token a beam extends with: one token_logprobs and one host copy per step, not per candidate."""
        if k is None:
            return None
        if k == 0:
            return [{} for _ in range(len(logp))]
        _, values, ids = token_logprobs(logp, torch.zeros(len(logp), dtype=torch.long, device=logp.device), k, limit)
        # ids (< 2**53) and float32 values are exact as doubles: both in one .tolist()
        rows = torch.cat([ids.double(), values.double()], -1).tolist()
        n = ids.shape[-1]
        return [dict(zip(map(int, row[:n]), row[n:])) for row in rows]

    def _stop_at(self, toks: list[int]) -> int | None:
        """Where the first stop string starts in the hypothesis' text (None: it holds none)."""
        if not self.params.stop:
            return None
        text = decode_after(self.tokenizer, self.request.context, [t for t in toks if t not in self.eos])
        hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _done(self, live: list[Hyp]) -> bool:
        if not live:
            return True
        if len(self.finished) < self.W:
            return False
        if self.params.early_stopping:
            return True
        worst = sorted(f[0] for f in self.finished)[-self.W]
        return max(_norm(sum(h[1]), len(h[0]), self.params.length_penalty) for h in live) <= worst

    def _output(self, index: int, h: Hyp, why: str | None) -> CompletionOutput:
        toks, lps, tops = h
        ids = [t for t in toks if t not in self.eos]
        if why == "stop" and self.params.include_stop_str_in_output and toks[-1] in self.params.stop_token_ids:
            ids.append(toks[-1])  # a stop token's text shows as a sampled sequence's does (request.Sequence)
        text = decode_after(self.tokenizer, self.request.context, ids)
        cut = self._stop_at(toks) if why == "stop" else None
        reason = self._stop_reason(toks, text, cut) if why == "stop" else None
        if cut is not None and self.params.include_stop_str_in_output:
            cut += len(reason)
        want, text = self.params.logprobs is not None, text if cut is None else text[:cut]
        return CompletionOutput(index=index, text=text, token_ids=list(toks),
                                finish_reason=why, logprobs=list(lps) if want else None,
                                top_logprobs=list(tops) if want else None, cumulative_logprob=sum(lps),
                                stop_reason=reason, text_offsets=self._offsets(toks, len(text)) if want else None)

    def _offsets(self, toks: list[int], shown: int) -> list[int]:
        """A hypothesis' text_offsets, as a sample's (request.Sequence.output): each token's text starts where the
        text before it ended, complete characters only (the sample's StreamDecoder), at most at the text's end."""
        decoder, ends = StreamDecoder(self.tokenizer, (), self.request.context), [0]
        for t in toks[:-1]:
            ends.append(ends[-1] + (len(decoder.push(t)) if t not in self.eos else 0))
        return [min(e, shown) for e in ends]

    def _stop_reason(self, toks: list[int], text: str, cut: int | None) -> int | str | None:
        """What ended a stopped hypothesis, as a sampled sequence reports it (request.Sequence.stop_reason): the
        stop string found at `cut`, else its last token when that is one of SamplingParams.stop_token_ids
        (None: the model's end of text)."""
        if toks and toks[-1] in self.eos:
            return toks[-1] if toks[-1] in self.params.stop_token_ids else None
        return None if cut is None else next(s for s in self.params.stop if text.startswith(s, cut))

    def partial(self, reason: str | None = None) -> list[CompletionOutput]:
        """The n best live beams so far, their finish_reason `reason`: the request's outputs while the search
        runs (None) or when it was aborted ('abort'). Before the first expansion only the prompt's own beam
        lives (no token yet): an abort then gives that one empty sample, not n copies of it."""
        live = sorted(self.hyp.values(), key=lambda h: -_norm(sum(h[1]), len(h[0]), self.params.length_penalty))
        return [self._output(i, h, reason) for i, h in enumerate(live[: self.params.n])]

    def _finish(self, engine, live: list[Sequence], nxt) -> None:
        for _, h in nxt:
            self.finished.append((_norm(sum(h[1]), len(h[0]), self.params.length_penalty), h, "length"))
        best = sorted(self.finished, key=lambda f: -f[0])[: self.params.n]
        self.outputs = [self._output(i, h, why) for i, (_, h, why) in enumerate(best)]
        for s in live:
            engine.scheduler.finish(s)
        self.hyp.clear()
        self.request.done = True
