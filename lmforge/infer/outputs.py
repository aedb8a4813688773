"""What `LLM.generate` returns: one RequestOutput per prompt, holding one CompletionOutput per sample; and the
errors= contract of LLM's batch methods (check_errors, input_error, failed_output), shared by generation and
scoring."""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from typing import Sequence

from lmforge.errors import ConfigError, LmforgeError, RequestError


class PromptIds(list):
    """A request's prompt token ids, made once at admission and shared by the engine and every output of the
    request (copying the prompt into each output cost 95 ms a step at 256 requests of 8k-token prompts,
    2026-12). A list, so it compares equal to one and concatenates like one (`ids + out.token_ids`); changing it
    in place raises, as it would change the running request's prompt: copy it first (`list(ids)`)."""

    __slots__ = ()

    def _read_only(self, *args, **kwargs):
        raise LmforgeError("a request's prompt_token_ids are shared with the engine and its other outputs: copy "
                           "them first (list(out.prompt_token_ids)) to change them")

    append = extend = insert = pop = remove = clear = sort = reverse = _read_only
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _read_only

    def __reduce__(self):  # (pickle and copy rebuild it from a plain list, not by appending)
        return PromptIds, (list(self),)


@dataclass
class CompletionOutput:
    index: int
    text: str
    """the sample's text, cut before a stop string; while it runs, without a tail that may begin one (so
    the text of successive outputs only grows: lmforge.infer.request.Sequence.output)"""
    token_ids: list[int]
    finish_reason: str | None
    """'stop' (stop token or string), 'length' (max_tokens or the context window) or 'abort'; None in the
    engine's intermediate outputs while the sample is still generating"""
    logprobs: list[float] | None = None
    """log-probability of each generated token under the model (log_softmax of the raw logits)"""
    top_logprobs: list[dict[int, float]] | None = None
    """per step, the SamplingParams.logprobs most likely tokens and their log-probabilities"""
    cumulative_logprob: float | None = None
    text_offsets: list[int] | None = None
    """with logprobs: where each token's text starts in `text` (OpenAI's text_offset, counted from the
    completion's start; a token that shows no character yet, a byte of an incomplete one, starts where the next
    does; the tokens past a stop string's cut start at the text's end). While the sample runs, the tokens whose
    text would start after the text shown (inside a tail held back as a possible stop string) are not in the
    output yet, log-probs and all: an offset given is never revised (lmforge.infer.request.Sequence.output)"""
    stop_reason: int | str | None = None
    """what ended a 'stop': the stop string matched, or the token id of SamplingParams.stop_token_ids; None
    for the model's own end-of-text token and every other finish (vLLM's semantics). token_ids may run past
    a stop string's cut (the tokens whose text held it)"""

    def then(self, later: "CompletionOutput") -> "CompletionOutput":
        """This delta output followed by a later one of the same sample (SamplingParams.output_kind='delta'):
        lists and text joined, the later one's finish and cumulative fields (join_samples)."""
        return join_samples([self, later])


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int] | None
    """the prompt's token ids, one object shared by all of the request's outputs (PromptIds: read-only). With
    SamplingParams.output_kind='delta' only the request's first and finished outputs carry them (None between:
    O(new) per step), and RequestOutput.then keeps them"""
    outputs: list[CompletionOutput]
    metrics: dict = field(default_factory=dict)
    """time_to_first_token_s; num_cached_tokens (prompt tokens read from the prefix cache); num_prompt_tokens
    and num_generated_tokens (all samples' tokens so far, those a running output still holds back included:
    `usage`); speculative decoding: acceptance rate, drafted / accepted tokens, target forwards"""
    request_id: str | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """with SamplingParams.prompt_logprobs=k: per prompt token, None for the first, then {token id:
    log-probability} holding the prompt token itself and the k most likely tokens at its position"""
    finished: bool = True
    """False for the engine's intermediate outputs of a request still generating"""
    error: Exception | None = None
    """the lmforge.errors.RequestError that ended the request when its own input failed mid-generation (a
    logits processor that left no token allowed, or raised): it was aborted (finish_reason 'abort') and the
    others went on. LLM's methods and AsyncEngine's streams raise it; a reader of Engine.step checks it"""

    def then(self, later: "RequestOutput") -> "RequestOutput":
        """This delta output followed by a later one of the same request (SamplingParams.output_kind='delta'):
        each sample's parts joined (CompletionOutput.then), prompt log-probs joined, the later one's metrics
        and state. Folding a request's deltas in order gives its cumulative output."""
        return join_outputs([self, later])

    @property
    def usage(self) -> dict[str, int]:
        """Token counts for cost accounting, the OpenAI API's usage: prompt_tokens, completion_tokens (every
        sample's generated tokens: n samples, or beam search's n returned beams) and cached_tokens (prompt
        tokens read from the prefix cache, metrics' num_cached_tokens). The request's totals so far in every
        output kind, a 'delta' output's too (taken from metrics, which the engine sets; counted from the fields
        for an output built elsewhere)."""
        m = self.metrics
        prompt = m.get("num_prompt_tokens")
        if prompt is None:
            prompt = len(self.prompt_token_ids) if self.prompt_token_ids is not None else 0
        done = m.get("num_generated_tokens")
        if done is None:
            done = sum(len(o.token_ids) for o in self.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": done, "cached_tokens": m.get("num_cached_tokens", 0)}

    # the first sample's fields, so the common n=1 case reads outs[0].text
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def logprobs(self) -> list[float] | None:
        return self.outputs[0].logprobs

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason


def join_outputs(deltas: Sequence[RequestOutput]) -> RequestOutput:
    """A request's delta outputs (SamplingParams.output_kind='delta'), in order, as one: what folding them with
    RequestOutput.then gives, in one pass over their parts (a fold re-copies everything so far at each step:
    O(k^2) for a reader k outputs behind). The last output's samples, each joined with its deltas in the
    consecutive outputs before it that hold it (join_samples); prompt log-probs joined; the last prompt ids
    given (delta outputs carry them only first and last); the last output's metrics and state."""
    if len(deltas) == 1:
        return deltas[0]
    runs: dict[int, list[CompletionOutput]] = {}  # sample index -> its deltas in the outputs so far that hold it
    for out in deltas:  # (a sample missing from an output starts over after it, as a fold of `then` does)
        before, runs = runs, {}
        for o in out.outputs:
            runs[o.index] = before.get(o.index, [])
            runs[o.index].append(o)
    last = deltas[-1]
    ids = next((d.prompt_token_ids for d in reversed(deltas) if d.prompt_token_ids is not None), None)
    return RequestOutput(last.prompt, ids, [join_samples(runs[o.index]) for o in last.outputs], last.metrics,
                         last.request_id, _joined([d.prompt_logprobs for d in deltas]), last.finished, last.error)


def join_samples(deltas: Sequence[CompletionOutput]) -> CompletionOutput:
    """One sample's delta outputs, in order, as one (CompletionOutput.then's rule, in one pass): text and lists
    joined, the last one's finish and cumulative fields."""
    last = deltas[-1]
    return CompletionOutput(last.index, "".join(d.text for d in deltas), _joined([d.token_ids for d in deltas]),
                            last.finish_reason, _joined([d.logprobs for d in deltas]),
                            _joined([d.top_logprobs for d in deltas]), last.cumulative_logprob,
                            _joined([d.text_offsets for d in deltas]), last.stop_reason)


def _joined(lists: list) -> list | None:
    """Lists concatenated, a None among them read as empty; None when all are None."""
    if all(x is None for x in lists):
        return None
    return [v for x in lists if x is not None for v in x]


def check_errors(errors) -> None:
    """LLM's errors= option (generate, chat, score, ...): "raise" or "return"."""
    if errors not in ("raise", "return"):
        raise ConfigError(f"errors must be 'raise' or 'return' (a failed request's output in its place), "
                          f"got {errors!r}")


def input_error(error: LmforgeError, what: str, index: int, errors: str) -> RequestError:
    """An input refused before it ran, named by its place ("prompt 3: ...", "pair 3: ..." unless its message
    already says so): errors="raise" raises it (its own type), "return" gives the RequestError its failed output
    holds, the original error as its cause."""
    message = str(error) if re.match(rf"{what} {index}\b", str(error)) else f"{what} {index}: {error}"
    if errors == "raise":
        if message == str(error):
            raise error
        try:
            named = type(error)(message)
        except TypeError:  # (a subclass taking other arguments)
            named = LmforgeError(message)
        raise named from error
    named = RequestError(message)
    named.__cause__ = error
    return named


def unstarted(first: CompletionOutput, n: int) -> list[CompletionOutput]:
    """Samples 1..n-1 of a request that ended before they forked from its prompt's logits: copies of its first
    sample, which holds no token yet, each with its own lists and its own index."""
    return [dataclasses.replace(copy.deepcopy(first), index=j) for j in range(1, n)]


def failed_output(error: RequestError, prompt_token_ids, n: int = 1) -> RequestOutput:
    """A request refused before it ran, as the output errors="return" gives in its place: finished, each of its
    n samples empty (finish_reason 'abort', as a request failing while it runs), `error` set."""
    return RequestOutput(None, list(prompt_token_ids), [CompletionOutput(j, "", [], "abort") for j in range(n)],
                         finished=True, error=error)
