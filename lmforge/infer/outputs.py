"""What `LLM.generate` returns: one RequestOutput per prompt, holding one CompletionOutput per sample."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    does; clipped to the text shown)"""
    stop_reason: int | str | None = None
    """what ended a 'stop': the stop string matched, or the token id of SamplingParams.stop_token_ids; None
    for the model's own end-of-text token and every other finish (vLLM's semantics). token_ids may run past
    a stop string's cut (the tokens whose text held it)"""


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: dict = field(default_factory=dict)
    """time_to_first_token_s; num_cached_tokens (prompt tokens read from the prefix cache); speculative
    decoding: acceptance rate, drafted / accepted tokens, target forwards"""
    request_id: str | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """with SamplingParams.prompt_logprobs=k: per prompt token, None for the first, then {token id:
    log-probability} holding the prompt token itself and the k most likely tokens at its position"""
    finished: bool = True
    """False for the engine's intermediate outputs of a request still generating"""

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
