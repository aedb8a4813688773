"""Scoring text with the engine (LLM's score, score_tokens, score_request, score_rolling): lm-eval's loglikelihood
and loglikelihood_rolling as score-only requests - no new token, prompt log-probs from the continuation on -
batched like any other requests, and read back into a Score per pair or document (read_score).

    llm.score([("The capital of France is", " Paris")])   # [(sum log-prob, is greedy)]
    llm.score_tokens(pairs)[0].token_logprobs             # per continuation token
    rid = llm.submit(*llm.score_request(ctx, cont)); read_score(llm.wait([rid])[0])
    llm.score_rolling([document])[0].logprob              # whole document in windows
"""

from __future__ import annotations

import dataclasses
from typing import Sequence as Seq

import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.outputs import RequestOutput, check_errors, failed_output, input_error
from lmforge.infer.request import check_ids, prompt_list
from lmforge.infer.sampling import SamplingParams

Prompt = str | list[int]


@dataclasses.dataclass(frozen=True)
class Score:
    """One (context, continuation) pair scored (LLM.score_tokens): the continuation's tokens, each one's
    log-prob given all before it, their sum and whether every token is the argmax (lm-eval's two numbers).
    context_ids: the context as scored (BOS or end-of-text for an empty one; cut to the window). A document
    scored in windows (LLM.score_rolling) is one Score: its tokens, after the prefix token as context_ids."""
    logprob: float
    is_greedy: bool
    context_ids: list[int]
    token_ids: list[int]
    token_logprobs: list[float]
    num_cached_tokens: int = 0
    """context tokens read from the prefix cache (RequestOutput.metrics; a rolling score: all its windows')"""
    error: Exception | None = None
    """errors="return": the lmforge.errors.RequestError ("pair i: ...", "document i: ...") that refused this pair
    or document, which was then not scored: logprob NaN, is_greedy False, no token_logprobs (the ids are those
    tokenized, where it got that far)"""


class Scoring:
    """LLM's scoring methods (a mixin: they queue score-only requests through LLM._run and read its tokenizer,
    engine and window)."""

    def score(self, pairs: Seq[tuple[Prompt, Prompt]], *, truncate: str = "left", errors: str = "raise"
              ) -> list[tuple[float, bool] | None]:
        """lm-eval's loglikelihood: for each (context, continuation), the sum of the continuation tokens'
        log-probs given everything before them, and whether the continuation is the greedy one (each of
        its tokens the argmax, the first maximal id as greedy decoding picks: a token merely tied with it is
        not greedy, as in lm-eval; on a padded vocabulary the argmax of the tokenizer's ids, where lm-eval's HFLM
        takes every row's: docs/inference.md). Strings are split as lm-eval does: the context's trailing whitespace
        moves to the continuation, the context is tokenized alone and the continuation is what follows that many
        tokens of context + continuation tokenized whole (a merge across the boundary is not undone: the
        scored sequence is the context's own tokens, then those); both are tokenized as prompts (text_ids: a
        Llama-3 tokenizer's BOS first, as HF's tokenizer does for lm-eval); token ids are taken as they are. An
        empty context is the tokenizer's BOS token, else its end-of-text token (lm-eval's prefix_token_id), or
        the continuation's first token when that is it (lm-eval: no doubled token). Too long a pair loses its
        oldest context tokens: the window holds max_seq_len + 1 tokens, as lm-eval's on HF models (the last
        token is a target, never an input); truncate="error" refuses it instead (a few-shot prompt whose
        instruction would be cut silently). tests/infer/test_lm_eval_parity.py compares with lm-eval's HFLM.
        Pairs run as score-only requests (max_tokens=0) with prompt log-probs from the continuation on:
        first one pair per distinct context, then the others, whose shared context the prefix cache then
        serves (a multiple-choice question's context is computed once). score_tokens: the same, per token.
        score_request: one pair as a request to submit. Token ids may be lists, tuples or 1-D tensors.
        errors: as generate's: "raise" (default) raises the first refused pair's error, named "pair i: " (a
        malformed pair, an out-of-vocabulary id, too long for truncate="error", more KV blocks than the pool
        has); "return" puts None in a refused pair's place (score_tokens: a Score with `error` set) and scores
        the others."""
        scores = self.score_tokens(pairs, truncate=truncate, errors=errors)
        return [(s.logprob, s.is_greedy) if s.error is None else None for s in scores]

    def score_tokens(self, pairs: Seq[tuple[Prompt, Prompt]], *, truncate: str = "left", errors: str = "raise"
                     ) -> list["Score"]:
        """`score`, with each continuation's tokens and their log-probs (a Score per pair): what per-token or
        per-byte normalized scores (lm-eval's acc_norm, perplexity) and LM-as-judge readers need. errors="return":
        a refused pair's Score has `error` set (and logprob NaN)."""
        check_errors(errors)
        _check_truncate(truncate)
        pairs = _list_of(pairs, "pairs", "(context, continuation) pairs")  # (a generator is read once)
        built: list = []  # per pair: (context ids, continuation ids), or the failed output errors="return" gives
        for i, p in enumerate(pairs):
            try:
                if not isinstance(p, (tuple, list)) or len(p) != 2:
                    hint = ("; pairs is a list of pairs: score([(context, continuation)]), not score((context, "
                            "continuation))") if isinstance(p, str) else ""
                    raise LmforgeError(f"pair {i} must be (context, continuation), got {p!r:.80}{hint}")
                built.append(self._pair(p[0], p[1], i, truncate))
            except LmforgeError as e:
                built.append(failed_output(input_error(e, "pair", i, errors), []))
        ok = [i for i, b in enumerate(built) if not isinstance(b, RequestOutput)]
        first = {tuple(built[i][0]): i for i in reversed(ok)}  # each context's first pair
        firsts = set(first.values())  # (built once: a membership test per pair, not a set per pair)
        rest = [i for i in ok if i not in firsts]
        params: dict[int, SamplingParams] = {}  # one per context length: MMLU's pairs share a few
        outs: list = list(built)
        for group in (sorted(firsts), rest):
            requests = []
            for i in group:
                start = len(built[i][0])
                if start not in params:
                    params[start] = _score_params(start)
                requests.append((built[i][0] + built[i][1], params[start]))
            for i, out in zip(group, self._run(requests, errors, "pair", group) if group else []):
                outs[i] = out
        return [read_score(out) if out.error is None else _failed_score(out.error, *(b if isinstance(b, tuple) else ()))
                for out, b in zip(outs, built)]

    def score_request(self, context: Prompt, continuation: Prompt, *, truncate: str = "left"
                      ) -> tuple[list[int], SamplingParams]:
        """One (context, continuation) pair as a score-only request, tokenized and cut as score does:
        `rid = llm.submit(*llm.score_request(ctx, cont))`, then read_score(the output) is its Score (a program
        queueing its scoring calls beside its generation with submit / completed)."""
        _check_truncate(truncate)
        ctx, cont = self._pair(context, continuation, 0, truncate)
        return ctx + cont, _score_params(len(ctx))

    def _pair(self, context: Prompt, continuation: Prompt, index: int, truncate: str = "left"
              ) -> tuple[list[int], list[int]]:
        if isinstance(context, str) and isinstance(continuation, str):
            if context:
                stripped = context.rstrip()
                context, continuation = stripped, context[len(stripped):] + continuation
                whole, ctx = self.text_ids(context + continuation), self.text_ids(context)
                cont = whole[len(ctx):]  # the context keeps its own tokens where a merge crosses it (lm-eval)
            else:  # (lm-eval: the continuation alone gets no BOS; the prefix token below stands for the context)
                ctx, cont = [], self.tokenizer.encode(continuation)
        elif _is_ids(context) and _is_ids(continuation):
            ctx, cont = self._ids(context, f"pair {index}"), self._ids(continuation, f"pair {index}")
        else:
            raise LmforgeError(f"pair {index}: context and continuation must both be strings or both token ids (lists "
                               f"or 1-D tensors), got {_kind(context)} and {_kind(continuation)}")
        if not cont:
            raise LmforgeError(f"pair {index} has an empty continuation: there is nothing to score")
        if not ctx:  # lm-eval's prefix_token_id: the BOS token, else end-of-text
            start = self._prefix_id()
            if start is None:
                raise LmforgeError(f"pair {index} has an empty context and the tokenizer has no BOS or end-of-text "
                                   "token to stand for it; give at least one context token")
            # lm-eval: a continuation that opens with that token is its own context (not [eot] + [eot, ...])
            ctx, cont = (cont[:1], cont[1:]) if int(cont[0]) == int(start) else ([int(start)], cont)
            if not cont:
                raise LmforgeError(f"pair {index} has an empty context and a continuation of only the "
                                   f"{'end-of-text' if getattr(self.tokenizer, 'bos_id', None) is None else 'BOS'} "
                                   "token that stands for it: nothing "
                                   "is left to score (lm-eval refuses it too); give a context or more continuation")
        keep = self.max_seq_len + 1  # the last token is only read (a score-only request's window)
        if len(cont) >= keep:
            raise LmforgeError(f"pair {index}: a {len(cont)}-token continuation leaves no context in the "
                               f"{self.max_seq_len}-token window; shorten it below {keep} tokens")
        if truncate == "error" and len(ctx) + len(cont) > keep:
            raise LmforgeError(f"pair {index}: its {len(ctx)}-token context and {len(cont)}-token continuation pass "
                               f"the {keep}-token window (max_seq_len + 1); shorten the context, or pass "
                               "truncate='left' to drop its oldest tokens as lm-eval does")
        return ctx[max(0, len(ctx) + len(cont) - keep):], cont

    def score_rolling(self, documents: Prompt | Seq[Prompt], *, errors: str = "raise") -> list[Score]:
        """lm-eval's loglikelihood_rolling (perplexity, bits per byte): each document's every token scored once,
        given the tokens before it, in windows of at most max_seq_len predicted tokens (rolling_windows: lm-eval's
        layout, so documents longer than the window score as lm-eval's HFLM scores them). A Score per document:
        logprob is the sum (lm-eval's number), token_ids the document's tokens, token_logprobs one per token,
        context_ids the prefix token the first one is predicted from (the tokenizer's BOS, else end-of-text, as
        for score's empty context), is_greedy whether every token is the argmax. Perplexity is
        exp(-logprob / len(token_ids)); bits per byte -logprob / (ln 2 * the text's UTF-8 bytes).
        `documents`: one document or a list; a string is tokenized as lm-eval's HFLM tokenizes it (text_ids: a
        Llama-3 tokenizer's BOS first, which is then scored after the prefix BOS, as lm-eval does), token ids are
        taken as given. Every window of every document is one score-only request, all queued together.
        errors: as score's ("return": a refused document's Score has `error` set, "document i: ...", its first
        refused window's)."""
        check_errors(errors)
        prefix = self._prefix_id()
        if prefix is None:
            raise LmforgeError("score_rolling predicts a document's first token from the tokenizer's BOS or "
                               "end-of-text token, and this tokenizer has neither")
        docs: list = []  # per document: its token ids, or the error errors="return" keeps for it
        for i, d in enumerate(prompt_list(documents)):
            try:
                docs.append(self._document(d, i))
            except LmforgeError as e:
                docs.append(input_error(e, "document", i, errors))
        windows = [(i, ctx, cont) for i, ids in enumerate(docs) if isinstance(ids, list) for ctx, cont in
                   rolling_windows(ids, prefix, self.max_seq_len)]
        params = {n: _score_params(n) for n in {len(ctx) for _, ctx, _ in windows}}
        outs = self._run([(ctx + cont, params[len(ctx)]) for _, ctx, cont in windows], errors, "document",
                         [i for i, _, _ in windows])
        per_doc: list[list[RequestOutput]] = [[] for _ in docs]
        for (i, _, _), out in zip(windows, outs):
            per_doc[i].append(out)
        scores = []
        for ids, ws in zip(docs, per_doc):
            error = ids if not isinstance(ids, list) else next((w.error for w in ws if w.error is not None), None)
            if error is not None:
                scores.append(_failed_score(error, [prefix], ids if isinstance(ids, list) else []))
                continue
            ws = [read_score(w) for w in ws]
            lps = [lp for w in ws for lp in w.token_logprobs]
            scores.append(Score(sum(lps), all(w.is_greedy for w in ws), [prefix], ids, lps,
                                sum(w.num_cached_tokens for w in ws)))
        return scores

    def _prefix_id(self) -> int | None:
        """lm-eval's prefix_token_id: the token a sequence's first token is predicted from (BOS, else
        end-of-text)."""
        bos = getattr(self.tokenizer, "bos_id", None)
        return bos if bos is not None else getattr(self.tokenizer, "eot_id", None)

    def _document(self, document: Prompt, index: int) -> list[int]:
        if isinstance(document, str):
            if not document:
                raise LmforgeError(f"document {index} is empty text: there is nothing to score")
            return self.text_ids(document)
        if not _is_ids(document):
            raise LmforgeError(f"document {index} must be a string or token ids (a list or 1-D tensor), got "
                               f"{_kind(document)}")
        ids = self._ids(document, f"document {index}")
        if not ids:
            raise LmforgeError(f"document {index} has no tokens: there is nothing to score")
        return ids

    def _ids(self, ids, what: str) -> list[int]:
        """Token ids given as a list, tuple or 1-D tensor (_is_ids), as a list of plain ints, each checked against
        the model's vocabulary (an error naming `what`): how score and score_rolling read ids."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return ids if not ids or check_ids(ids, self.engine.vocab_size, what) else [int(t) for t in ids]


def _is_ids(x) -> bool:
    """x is token ids as score and score_rolling take them: a list, a tuple or a 1-D tensor."""
    return isinstance(x, (list, tuple)) or isinstance(x, torch.Tensor) and x.dim() == 1


def _kind(x) -> str:
    """x's type for an error message (a tensor with its number of dimensions)."""
    return f"a {x.dim()}-D tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def _failed_score(error: Exception, context_ids=(), token_ids=()) -> Score:
    """What errors="return" gives for a pair or document refused: not scored, `error` set (Score.error)."""
    return Score(float("nan"), False, list(context_ids), list(token_ids), [], error=error)


def rolling_windows(ids: list[int], prefix: int, window: int) -> list[tuple[list[int], list[int]]]:
    """A document's (context, continuation) pairs for LLM.score_rolling, lm-eval's layout (its
    get_rolling_token_windows with context_len=1, made disjoint): every token is in exactly one continuation, in
    order, each given all the tokens before it that fit a (window + 1)-token score-only request, the most a
    model with a `window`-token window reads (the last token is only a target). For window W and n tokens:

        [prefix] -> ids[0:W]                    the first window: the prefix token stands for "no context"
        ids[W-1:W] -> ids[W:2W]                 full windows: W predicted tokens leave room for one of context
        ids[n-W-1:k] -> ids[k:n]                a short last window fills the rest with more context
    """
    pairs = [([prefix], ids[:window])]
    for start in range(window, len(ids), window):
        end = min(start + window, len(ids))
        pairs.append((ids[end - window - 1:start], ids[start:end]))  # (end > window: never a negative start)
    return pairs


def read_score(out: RequestOutput) -> Score:
    """A score-only request's output (LLM.score_request: its prompt ctx + cont, log-probs from len(ctx) on,
    the context's positions None; or a request's own, with prompt_logprobs >= 1) as cont's Score. A failed output
    raises its error."""
    if out.error is not None:
        raise out.error
    lps_at = out.prompt_logprobs
    if lps_at is None or all(d is None for d in lps_at):
        raise LmforgeError("read_score reads a score-only request's output (LLM.score_request); this one has no "
                           "prompt log-probs")
    start = next(k for k, d in enumerate(lps_at) if d is not None)
    ctx, cont = out.prompt_token_ids[:start], out.prompt_token_ids[start:]
    steps = lps_at[start:]
    lps = [d[t] for d, t in zip(steps, cont)]
    return Score(sum(lps), all(_is_argmax(d, t) for d, t in zip(steps, cont)), list(ctx), list(cont), lps,
                 out.metrics.get("num_cached_tokens", 0))


def _is_argmax(entry: dict[int, float], token: int) -> bool:
    """Whether `token` IS the argmax of its step (lm-eval: cont == logits.argmax), not merely tied with it, from its
    prompt log-prob entry (logprob_entries: the token first, then the k likeliest ids, the token kept in its first
    place when among them). The first other id is the argmax unless the token is; on a tie the argmax is the smaller
    id (the first maximal one, greedy decoding's). Any k >= 1 reads right (the last key is the argmax only for k = 1,
    score_request's: a request's own prompt_logprobs=5 was never greedy); k = 0 lists no argmax to compare with, so
    the token reads as the argmax whatever it is (docs/inference.md says to ask for k >= 1)."""
    other = next((i for i in entry if i != token), None)
    return other is None or (entry[token], -token) > (entry[other], -other)


def _score_params(start: int) -> SamplingParams:
    """A score-only request's params: no new token, prompt log-probs from token `start` (the continuation) on."""
    return SamplingParams.default().derived(max_tokens=0, prompt_logprobs=1, prompt_logprobs_start=start)


def _check_truncate(truncate) -> None:
    if truncate not in ("left", "error"):
        raise ConfigError(f"truncate must be 'left' (drop a too-long pair's oldest context tokens, lm-eval's way) "
                          f"or 'error', got {truncate!r}")


def _list_of(items, name: str, what: str) -> list:
    """items as a list (a generator read once), or a one-line error for what is not iterable."""
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise LmforgeError(f"{name} must be a list of {what}, got {type(items).__name__}")
    return list(items)
