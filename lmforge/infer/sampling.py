"""SamplingParams: every knob of one generation request, as a frozen dataclass validated on creation.

Defaults switch every method off except plain sampling at temperature 1; temperature=0 is greedy.
The logits processors each field turns on live in `lmforge.infer.processors`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Callable, Literal

from lmforge.config import check, coerce_fields, is_int


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    max_tokens: int | None = 64
    """new tokens at most per sample (finish_reason 'length' when reached). 0 = score the prompt only (the
    OpenAI completions API's max_tokens=0 with echo): with prompt_logprobs, each prompt token's log-prob and
    nothing generated; the prompt's last token is never run through the model (nothing reads its logits), so
    the prompt may hold max_seq_len + 1 tokens (lm-eval's window on HF models). None = up to the context window
    (the OpenAI API's max_tokens=null): the engine sets it to the room the prompt leaves when it admits the
    request (its outputs' request holds that number)"""
    n: int = 1
    """independent samples per prompt (RequestOutput.outputs holds them all); at most the engine's max_num_seqs
    under EngineConfig.strict_admission"""
    temperature: float = 1.0
    """0 = greedy (argmax); otherwise logits are divided by it (below 1e-4 after subtracting the row's largest,
    so that the division cannot overflow)"""
    top_k: int = 0
    """keep the k most likely tokens; 0 = off"""
    top_p: float = 1.0
    """nucleus: smallest set of tokens with probability mass >= top_p (Holtzman et al. 2020); 1 = off"""
    min_p: float = 0.0
    """keep tokens with probability >= min_p * max probability (Nguyen et al. 2024); 0 = off"""
    typical_p: float = 1.0
    """locally typical sampling mass (Meister et al. 2023); 1 = off"""
    epsilon_cutoff: float = 0.0
    """keep tokens with probability >= epsilon (Hewitt et al. 2022); 0 = off"""
    eta_cutoff: float = 0.0
    """eta-sampling: threshold min(eta, sqrt(eta)·exp(-entropy)) (Hewitt et al. 2022); 0 = off"""
    repetition_penalty: float = 1.0
    """CTRL penalty on tokens already in the prompt or output (Keskar et al. 2019); 1 = off"""
    frequency_penalty: float = 0.0
    """subtract penalty·count(token in output) from its logit (OpenAI API semantics)"""
    presence_penalty: float = 0.0
    """subtract penalty from the logit of every token present in the output"""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """token id -> value added to its logit"""
    logits_processors: tuple[Callable, ...] = ()
    """per-request functions f(output_ids: list[int], logits: Tensor (V,)) -> Tensor (V,), applied in order to
    the row's model logits before everything above (constrained decoding: one of given options, a regex, a
    grammar; vLLM's logits_processors). V is the model's row count, which may exceed the tokenizer's vocabulary
    (padded embeddings): return a float tensor of that exact shape; ids past the tokenizer's are never drawn,
    whatever a processor gives them. -inf forbids a token; leaving none allowed (or returning another shape or
    dtype, or raising) aborts that request alone. A function is shared by every sample of the request (n > 1)
    and by every request given these params, so it must be a pure function of (output_ids, logits); a processor
    that keeps state (an incremental parser, an FSM) is given as a factory instead: an object whose
    `for_sequence()` returns a new processor, called once per sample, whose processor then sees that sample's
    tokens only (its first token's call included; the same instance serves it after a preemption). They read
    every earlier output token, so such a request's steps never overlap (async scheduling) and it cannot use
    beam search or speculative decoding, which rank or verify the model's own distribution. 'raw' logprobs
    stay the model's; 'processed' ones include them"""
    stop: tuple[str, ...] = ()
    """stop strings: generation ends when the text contains one; the text is cut before it (after it with
    include_stop_str_in_output), and whatever the last token spelled past it is dropped. token_ids (and their
    log-probs) keep every token sampled, those that spelled the stop string and the last one whole, as vLLM's
    do: the tokens the model produced, which a continuation or an RL loss reads; with logprobs, text_offsets
    say where each token's text starts (the text length for those past the cut)"""
    include_stop_str_in_output: bool = False
    """keep the stop string that ended a sample at the end of its text (vLLM's name; a ReAct loop's 'search[');
    a running sample's text then needs no held-back tail"""
    stop_token_ids: tuple[int, ...] = ()
    """token ids that end generation (the tokenizer's end-of-text id is added unless ignore_eos)"""
    ignore_eos: bool = False
    seed: int | None = None
    """reproducible sampling: the same seed gives the same samples, whatever else is in the batch. With a
    drafter (speculative decoding) the draws also depend on how many tokens each round drafts, which the step's
    room sets (max_num_batched_tokens, max_num_seqs, preemption): the same seed in another batch or engine may
    then sample other tokens, from the same distribution"""
    logprobs: int | None = None
    """None = no logprobs; k >= 0 = the chosen token's log-probability plus the k most likely ones (k at most the
    engine's EngineConfig.max_logprobs, 20 by default; prompt_logprobs too)"""
    logprobs_mode: Literal["raw", "processed"] = "raw"
    """'raw': logprobs are those of the model's own distribution, log_softmax(logits); 'processed': of the
    distribution tokens are drawn from, after temperature, penalties, logit_bias and the top-k/top-p/...
    filters (RL's behaviour-policy log-probs; vLLM's processed_logprobs). Greedy rows report raw ones either
    way; prompt_logprobs are always raw"""
    prompt_logprobs: int | None = None
    """None = off; k >= 0 = for every prompt token after the first, its log-probability given the tokens
    before it plus the k most likely tokens there (RequestOutput.prompt_logprobs; vLLM semantics). The
    positions they need are computed, not taken from the prefix cache"""
    prompt_logprobs_start: int = 1
    """with prompt_logprobs: the first prompt token that gets them (earlier ones get None, and their
    positions may come from the prefix cache: scoring continuations of one shared context)"""
    beam_width: int = 1
    """> 1 = beam search (deterministic; sampling fields must stay off); n best beams are returned"""
    length_penalty: float = 1.0
    """beam score = sum logprob / length**length_penalty (Wu et al. 2016 without the +5 offset)"""
    early_stopping: bool = True
    """beam search ends once beam_width hypotheses are finished"""
    truncate_prompt: bool = False
    """cut prompts from the left so that prompt + max_tokens fits the context window (the prompt keeps at
    least half the window; generation then ends at the window, finish_reason 'length'), instead of
    raising for a prompt longer than the window"""
    skip_special_tokens: bool = False
    """leave special tokens (the tokenizer's `special_tokens`, e.g. '<|endoftext|>' sampled under ignore_eos, a
    chat template's markers) out of the text; token_ids keep them. False keeps lmforge's texts as they were;
    vLLM and its OpenAI server default to True (a server passes it). Not for beam search (its text is decoded
    whole: lmforge.infer.beam)"""
    output_kind: Literal["cumulative", "delta", "final"] = "cumulative"
    """what the engine's outputs of a running request hold (vLLM's RequestOutputKind): 'cumulative' = everything
    so far, every time; 'delta' = only what is new since the request's previous output (text, token ids, their
    log-probs and offsets, prompt log-probs; each sample's finish fields as they stand): a stream costs O(new)
    per step instead of O(length), and the deltas concatenate (RequestOutput.then) to the cumulative output;
    'final' = no intermediate outputs, only the finished one (whole)"""

    def __post_init__(self) -> None:
        if callable(self.logits_processors) or is_factory(self.logits_processors):  # one function given as it is
            object.__setattr__(self, "logits_processors", (self.logits_processors,))
        # every field's type (a request body's seed 1.5 or top_k "7" would otherwise fail inside an engine step,
        # taking the batch's other requests with it); lists become tuples, numpy numbers plain ones
        coerce_fields(self)
        check(all(is_int(k) and k >= 0 and isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
                  for k, v in self.logit_bias.items()),
              f"logit_bias must map token ids (ints >= 0) to finite numbers, got {self.logit_bias!r}")
        check(self.max_tokens is None or self.max_tokens >= 0,
              f"max_tokens must be >= 0 (0 = score the prompt only; None = up to the context window), got "
              f"{self.max_tokens}")
        check(self.max_tokens != 0 or (self.n == 1 and self.beam_width == 1),
              f"max_tokens=0 scores the prompt and samples nothing: n={self.n} and beam_width={self.beam_width} "
              "must be 1")
        check(self.n >= 1, f"n must be >= 1, got {self.n}")
        check(self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        check(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        check(0 < self.top_p <= 1, f"top_p must lie in (0, 1], got {self.top_p}")
        check(0 <= self.min_p <= 1, f"min_p must lie in [0, 1], got {self.min_p}")
        check(0 < self.typical_p <= 1, f"typical_p must lie in (0, 1], got {self.typical_p}")
        check(0 <= self.epsilon_cutoff < 1, f"epsilon_cutoff must lie in [0, 1), got {self.epsilon_cutoff}")
        check(0 <= self.eta_cutoff < 1, f"eta_cutoff must lie in [0, 1), got {self.eta_cutoff}")
        check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            check(-2 <= v <= 2, f"{name} must lie in [-2, 2], got {v}")
        check(isinstance(self.stop, (tuple, list)) and all(isinstance(s, str) and s for s in self.stop),
              f"stop must be a tuple of non-empty strings, got {self.stop!r}")
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        check(self.logprobs is None or self.logprobs >= 0, f"logprobs must be None or >= 0, got {self.logprobs}")
        check(self.logprobs_mode == "raw" or self.logprobs is not None,
              f"logprobs_mode={self.logprobs_mode!r} chooses which log-probs are returned, but none are asked for: "
              "set logprobs=0 (the sampled token's) or more")
        check(self.prompt_logprobs is None or self.prompt_logprobs >= 0,
              f"prompt_logprobs must be None or >= 0, got {self.prompt_logprobs}")
        check(self.prompt_logprobs_start >= 1,
              f"prompt_logprobs_start must be >= 1 (the first token has no log-prob), got {self.prompt_logprobs_start}")
        check(self.beam_width == 1 or self.output_kind != "delta",
              "beam search's running beams change as the search goes (they do not only grow): output_kind='delta' "
              "needs samples that do; use 'cumulative' or 'final'")
        check(self.beam_width >= 1, f"beam_width must be >= 1, got {self.beam_width}")
        check(self.beam_width == 1 or self.n <= self.beam_width,
              f"n={self.n} beams asked for but beam_width={self.beam_width}")
        check(self.beam_width == 1 or self.temperature == 0,
              f"beam search is deterministic: set temperature=0 (got {self.temperature})")
        check(self.beam_width == 1 or not (self.penalized or self.logit_bias),
              "beam search ranks the model's raw log-probabilities: penalties and logit_bias do not apply to it; "
              "drop them or use beam_width=1")
        check(all(callable(f) or is_factory(f) for f in self.logits_processors),
              "logits_processors must be functions f(output_ids, logits) -> logits or factories with a "
              f"for_sequence() method returning one, got {self.logits_processors!r:.80}")
        check(self.beam_width == 1 or not self.logits_processors,
              "beam search ranks the model's raw log-probabilities: logits_processors do not apply to it; drop them "
              "or use beam_width=1")
        check(self.beam_width == 1 or not self.skip_special_tokens,
              "beam search decodes its text whole, special tokens included: skip_special_tokens needs beam_width=1")

    @classmethod
    def from_dict(cls, options: dict) -> "SamplingParams":
        """From plain options (a request body, a TOML table); an unknown key is a one-line error."""
        import dataclasses

        from lmforge.errors import ConfigError

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown sampling option {unknown[0]!r}; known options: {', '.join(sorted(known))}")
        opts = dict(options)
        for name in ("stop", "stop_token_ids"):
            if isinstance(opts.get(name), list):
                opts[name] = tuple(opts[name])
        if isinstance(opts.get("stop"), str):
            opts["stop"] = (opts["stop"],)
        bias = opts.get("logit_bias")
        if isinstance(bias, dict):  # JSON object keys are strings: {"50256": -100} (the OpenAI API's form)
            opts["logit_bias"] = {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in bias.items()}
        return cls(**opts)

    def __hash__(self) -> int:
        """Equal params hash equal (a dict or set key: grouping requests, caching per-params state). The
        generated hash would hash every field as it is and fail on logit_bias, a dict: it enters as its sorted
        (id, value) pairs, the form equality compares. Do not mutate logit_bias after creation."""
        return hash(tuple(tuple(sorted(v.items())) if f.name == "logit_bias" else v
                          for f, v in ((f, getattr(self, f.name)) for f in fields(self))))

    def cache_key(self) -> str:
        """A digest of these params that is the same in every process and run (sha256 of their sorted JSON),
        for a disk cache of LM calls: equal keys ask for the same outputs. Greedy params (temperature 0) leave
        out the fields greedy decoding ignores (GREEDY_IGNORES), so they share one key whatever those say. The
        key changes when SamplingParams gains a field (old cache entries then miss, never mismatch).
        logits_processors (functions, whose digest would be their id in this process) are refused."""
        import hashlib
        import json

        from lmforge.errors import ConfigError

        if self.logits_processors:
            raise ConfigError("cache_key: logits_processors are functions with no stable digest; drop them or key "
                              "the cache yourself")
        skip = GREEDY_IGNORES if self.greedy else ()
        fields_ = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        fields_["logit_bias"] = sorted(self.logit_bias.items())
        fields_.pop("logits_processors")
        text = json.dumps(fields_, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        """Whether a penalty reads the sequence's history (repetition, frequency or presence)."""
        return self.repetition_penalty != 1 or bool(self.frequency_penalty) or bool(self.presence_penalty)


GREEDY_IGNORES = ("top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "seed", "logprobs_mode")
"""fields greedy decoding (temperature 0) never reads: the filters (lmforge.infer.processors.build_processors
stops before them), the seed (greedy rows draw nothing: no generator) and logprobs_mode (greedy rows report raw
log-probs either way). Penalties, logit_bias and logits_processors still shape greedy's argmax"""


def is_factory(entry) -> bool:
    """Whether a logits_processors entry makes one processor per sample (`for_sequence()`) instead of being one
    processor every sample of the request shares (lmforge.infer.processors.for_sample)."""
    return callable(getattr(entry, "for_sequence", None))
