"""Beam search (Graves 2012; Sutskever et al. 2014) with length normalisation (Wu et al. 2016) and early
stopping, over a KV cache whose rows are the live beams (reordered with `select_rows` each step).

Each step expands every live beam by every token, keeps the 2·W best candidates by summed
log-probability, moves those ending in a stop token to the finished set (scored sum / length**alpha),
and continues with the W best others. With early_stopping the search ends as soon as W hypotheses are
finished; otherwise once no live beam can still beat the worst finished one at its current length.
"""

from __future__ import annotations

import torch

from lmforge.infer.detok import safe_decode
from lmforge.infer.decoders import decode_attention
from lmforge.infer.request import stop_ids
from lmforge.infer.outputs import CompletionOutput, RequestOutput
from lmforge.infer.sampling import SamplingParams
from lmforge.model.cache import KVCache


def _norm(score: float, length: int, alpha: float) -> float:
    return score / max(length, 1) ** alpha


@torch.inference_mode()
@decode_attention()
def beam_search(llm, prompt, ids: list[int], params: SamplingParams) -> RequestOutput:
    model, W = llm.model, params.beam_width
    eos = stop_ids(params, llm.tokenizer)
    steps = min(params.max_tokens, llm.max_seq_len - len(ids))
    cache = KVCache.for_model(model, 1, len(ids) + steps)
    logp = model(torch.tensor([ids], device=llm.device), cache=cache)[:, -1].float().log_softmax(-1)
    beams: list[tuple[list[int], list[float]]] = [([], [])]  # (tokens, per-token logprobs)
    finished: list[tuple[float, list[int], list[float], str]] = []
    for step in range(steps):
        sums = torch.tensor([sum(lp) for _, lp in beams], device=logp.device)
        total = (logp + sums[:, None]).flatten()
        cand = total.topk(min(2 * W, total.numel()))
        V = logp.shape[-1]
        nxt, parents = [], []
        for rank, (score, flat) in enumerate(zip(cand.values.tolist(), cand.indices.tolist())):
            b, tok = divmod(flat, V)
            toks, lps = beams[b][0] + [tok], beams[b][1] + [float(logp[b, tok])]
            if tok in eos:
                if rank < W:  # a stop candidate counts only if it ranks among the W best
                    finished.append((_norm(score, len(toks), params.length_penalty), toks, lps, "stop"))
                continue
            nxt.append((toks, lps))
            parents.append(b)
            if len(nxt) == W:
                break
        if _done(finished, nxt, params, W) or step == steps - 1:
            beams = nxt
            break
        beams = nxt
        cache.select_rows(torch.tensor(parents, device=llm.device))
        last = torch.tensor([[t[-1]] for t, _ in beams], device=llm.device)
        logp = model(last, cache=cache)[:, -1].float().log_softmax(-1)
    for toks, lps in beams:
        finished.append((_norm(sum(lps), len(toks), params.length_penalty), toks, lps, "length"))
    best = sorted(finished, key=lambda h: -h[0])[: params.n]
    outs = [CompletionOutput(index=i, text=safe_decode(llm.tokenizer, [t for t in toks if t not in eos]),
                             token_ids=toks, finish_reason=why, logprobs=lps,
                             cumulative_logprob=sum(lps)) for i, (_, toks, lps, why) in enumerate(best)]
    return RequestOutput(prompt if isinstance(prompt, str) else None, ids, outs)


def _done(finished, live, params: SamplingParams, W: int) -> bool:
    if not live:
        return True
    if len(finished) < W:
        return False
    if params.early_stopping:
        return True
    worst = sorted(h[0] for h in finished)[-W]
    best_live = max(_norm(sum(lp), len(t), params.length_penalty) for t, lp in live)
    return best_live <= worst
