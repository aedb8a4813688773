"""SamplingParams: every knob of one generation request, as a frozen dataclass validated on creation.

Defaults switch every method off except plain sampling at temperature 1; temperature=0 is greedy. Requests given
no params share one validated SamplingParams.default(); per-request variants (a prompt's own seed) come from
params.derived(**changes), which checks only what changed.
The logits processors each field turns on live in `lmforge.infer.processors`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from dataclasses import dataclass, field, fields
from typing import Callable, Literal

from lmforge.config import coerce_fields, is_int
from lmforge.errors import ConfigError, LmforgeError


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
    """keep the stop string that ended a sample at the end of its text (vLLM's name; a ReAct loop's 'search['),
    or the text of the stop_token_ids token that ended it (vLLM keeps it too). The end-of-text id ends a sample
    without being listed, and then its text never shows; listed in stop_token_ids it is a stop token like any other,
    its text shown (unless skip_special_tokens). A running sample's text then needs no held-back tail"""
    stop_token_ids: tuple[int, ...] = ()
    """token ids that end generation (the tokenizer's end-of-text id is added unless ignore_eos); the token is in
    token_ids and stop_reason, its text only with include_stop_str_in_output"""
    ignore_eos: bool = False
    """keep sampling past the end-of-text token, to max_tokens (benchmarks' fixed output lengths)"""
    seed: int | None = None
    """reproducible sampling: the same seed gives the same samples, whatever else is in the batch. With a
    drafter (speculative decoding) the draws also depend on how many tokens each round drafts, which the step's
    room sets (max_num_batched_tokens, max_num_seqs, preemption): the same seed in another batch or engine may
    then sample other tokens, from the same distribution. None: the engine's own stream (Engine.rng, seeded from
    torch's RNG when the engine is built), never torch's global RNG. An int64, [-2**63, 2**63) (vLLM's API range;
    torch.Generator takes a seed's 64 bits, -1 as 2**64 - 1): distinct seeds, distinct generator seeds (each
    sample's: lmforge.infer.request.seed_for). On a CPU torch's generator (mt19937) reads only their low 32 bits,
    so there seeds equal mod 2**32 share a stream (seeds apart by less than 2**32 never do)"""
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
    positions may come from the prefix cache: scoring continuations of one shared context); past the prompt's
    last token (where none would get them) the engine refuses the request"""
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
        self._validate(None)

    def _validate(self, changed: Collection[str] | None) -> None:
        """Normalise and check the fields (all of them, or only the `changed` ones and the rules that read them:
        derived). A single logits processor becomes a 1-tuple; every field's type is checked (a request body's
        seed 1.5 or top_k "7" would otherwise fail inside an engine step, taking the batch's other requests with
        it; lists become tuples, numpy numbers plain ones); then the _RULES, in order, whose messages are only
        built for a rule that fails (formatting all of them was a third of a construction's ~40 us, 2026-12)."""
        if ((changed is None or "logits_processors" in changed)  # one function given as it is
                and (callable(self.logits_processors) or is_factory(self.logits_processors))):
            object.__setattr__(self, "logits_processors", (self.logits_processors,))
        coerce_fields(self)  # (~8 us: a value that already has its field's type is not converted)
        rules = _RULES if changed is None else [_RULES[i] for i in sorted({i for n in changed for i in _READING[n]})]
        for _, ok, message in rules:
            if not ok(self):
                raise ConfigError(message(self))

    @classmethod
    def default(cls) -> "SamplingParams":
        """The default params, built and validated once and shared by every caller (requests given no params:
        LLM.submit(prompt), Engine.add_request): frozen, and its logit_bias read-only, so no caller can change
        what the others run with. Derive variants with derived()."""
        made = _DEFAULTS.get(cls)
        if made is None:
            made = _DEFAULTS[cls] = cls(logit_bias=_SharedBias())
        return made

    def derived(self, **changes) -> "SamplingParams":
        """These params with `changes` (what dataclasses.replace(self, **changes) gives), validated as a
        construction validates them, but only the changed fields and the rules reading them are checked: the
        others were when self was made (a per-prompt seed, the window's max_tokens: ~15 us where
        dataclasses.replace takes ~40-50, 2 CPU cores, 2026-12). An unknown field name is a one-line error."""
        if not changes:
            return self
        _check_known(changes)
        new = object.__new__(type(self))  # every field, later ones too: the instance dict is copied whole
        new.__dict__.update(self.__dict__)  # (copy.copy's reduce protocol took 6 us of it)
        for name, value in changes.items():
            object.__setattr__(new, name, value)
        new._validate(changes)
        return new

    @classmethod
    def from_dict(cls, options: dict) -> "SamplingParams":
        """From plain options (a request body, a TOML table); an unknown key is a one-line error."""
        if not isinstance(options, dict):  # (a JSON body of null or a list: a TypeError, or "unknown option 1")
            raise ConfigError(f"sampling options must be a dict (a JSON object) of option -> value, got "
                              f"{type(options).__name__}")
        _check_known(options)
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


def _finite_bias(bias: dict) -> bool:
    return all(is_int(k) and k >= 0 and isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
               for k, v in bias.items())


_Rule = tuple[frozenset, Callable[[SamplingParams], bool], Callable[[SamplingParams], str]]


def _rule(names: str, ok: Callable[[SamplingParams], bool], message: Callable[[SamplingParams], str]) -> _Rule:
    return frozenset(names.split()), ok, message


_RULES: tuple[_Rule, ...] = (
    # (the fields a rule reads: derived() runs the rules reading a changed field; the order is the checks' order)
    _rule("logit_bias", lambda p: _finite_bias(p.logit_bias),
          lambda p: f"logit_bias must map token ids (ints >= 0) to finite numbers, got {p.logit_bias!r}"),
    _rule("max_tokens", lambda p: p.max_tokens is None or p.max_tokens >= 0,
          lambda p: f"max_tokens must be >= 0 (0 = score the prompt only; None = up to the context window), got "
                    f"{p.max_tokens}"),
    _rule("max_tokens n beam_width", lambda p: p.max_tokens != 0 or (p.n == 1 and p.beam_width == 1),
          lambda p: f"max_tokens=0 scores the prompt and samples nothing: n={p.n} and beam_width={p.beam_width} "
                    "must be 1"),
    _rule("n", lambda p: p.n >= 1, lambda p: f"n must be >= 1, got {p.n}"),
    _rule("temperature", lambda p: p.temperature >= 0,
          lambda p: f"temperature must be >= 0 (0 = greedy), got {p.temperature}"),
    _rule("top_k", lambda p: p.top_k >= 0, lambda p: f"top_k must be >= 0 (0 = off), got {p.top_k}"),
    _rule("top_p", lambda p: 0 < p.top_p <= 1, lambda p: f"top_p must lie in (0, 1], got {p.top_p}"),
    _rule("min_p", lambda p: 0 <= p.min_p <= 1, lambda p: f"min_p must lie in [0, 1], got {p.min_p}"),
    _rule("typical_p", lambda p: 0 < p.typical_p <= 1, lambda p: f"typical_p must lie in (0, 1], got {p.typical_p}"),
    _rule("epsilon_cutoff", lambda p: 0 <= p.epsilon_cutoff < 1,
          lambda p: f"epsilon_cutoff must lie in [0, 1), got {p.epsilon_cutoff}"),
    _rule("eta_cutoff", lambda p: 0 <= p.eta_cutoff < 1,
          lambda p: f"eta_cutoff must lie in [0, 1), got {p.eta_cutoff}"),
    _rule("repetition_penalty", lambda p: p.repetition_penalty > 0,
          lambda p: f"repetition_penalty must be > 0, got {p.repetition_penalty}"),
    _rule("frequency_penalty", lambda p: -2 <= p.frequency_penalty <= 2,
          lambda p: f"frequency_penalty must lie in [-2, 2], got {p.frequency_penalty}"),
    _rule("presence_penalty", lambda p: -2 <= p.presence_penalty <= 2,
          lambda p: f"presence_penalty must lie in [-2, 2], got {p.presence_penalty}"),
    _rule("stop", lambda p: isinstance(p.stop, (tuple, list)) and all(isinstance(s, str) and s for s in p.stop),
          lambda p: f"stop must be a tuple of non-empty strings, got {p.stop!r}"),
    _rule("stop_token_ids", lambda p: all(isinstance(t, int) and t >= 0 for t in p.stop_token_ids),
          lambda p: f"stop_token_ids must be non-negative ints, got {p.stop_token_ids!r}"),
    _rule("seed", lambda p: p.seed is None or -2**63 <= p.seed < 2**63,
          lambda p: f"seed must be an int in [-2**63, 2**63) (an int64, as vLLM's API takes it) or None, got {p.seed}"),
    _rule("logprobs", lambda p: p.logprobs is None or p.logprobs >= 0,
          lambda p: f"logprobs must be None or >= 0, got {p.logprobs}"),
    _rule("logprobs_mode logprobs", lambda p: p.logprobs_mode == "raw" or p.logprobs is not None,
          lambda p: f"logprobs_mode={p.logprobs_mode!r} chooses which log-probs are returned, but none are asked "
                    "for: set logprobs=0 (the sampled token's) or more"),
    _rule("prompt_logprobs", lambda p: p.prompt_logprobs is None or p.prompt_logprobs >= 0,
          lambda p: f"prompt_logprobs must be None or >= 0, got {p.prompt_logprobs}"),
    _rule("prompt_logprobs_start", lambda p: p.prompt_logprobs_start >= 1,
          lambda p: f"prompt_logprobs_start must be >= 1 (the first token has no log-prob), got "
                    f"{p.prompt_logprobs_start}"),
    _rule("beam_width output_kind", lambda p: p.beam_width == 1 or p.output_kind != "delta",
          lambda p: "beam search's running beams change as the search goes (they do not only grow): "
                    "output_kind='delta' needs samples that do; use 'cumulative' or 'final'"),
    _rule("beam_width", lambda p: p.beam_width >= 1, lambda p: f"beam_width must be >= 1, got {p.beam_width}"),
    _rule("beam_width n", lambda p: p.beam_width == 1 or p.n <= p.beam_width,
          lambda p: f"n={p.n} beams asked for but beam_width={p.beam_width}: a search returns at most its "
                    f"beam_width beams; raise beam_width to {p.n} or lower n"),
    _rule("length_penalty", lambda p: math.isfinite(p.length_penalty),
          lambda p: f"length_penalty must be a finite number (beam score = sum logprob / length ** length_penalty; "
                    f"0 = no normalisation), got {p.length_penalty}"),
    _rule("beam_width temperature", lambda p: p.beam_width == 1 or p.temperature == 0,
          lambda p: f"beam search is deterministic: set temperature=0 (got {p.temperature})"),
    _rule("beam_width repetition_penalty frequency_penalty presence_penalty logit_bias",
          lambda p: p.beam_width == 1 or not (p.penalized or p.logit_bias),
          lambda p: "beam search ranks the model's raw log-probabilities: penalties and logit_bias do not apply to "
                    "it; drop them or use beam_width=1"),
    _rule("logits_processors", lambda p: all(callable(f) or is_factory(f) for f in p.logits_processors),
          lambda p: "logits_processors must be functions f(output_ids, logits) -> logits or factories with a "
                    f"for_sequence() method returning one, got {p.logits_processors!r:.80}"),
    _rule("beam_width logits_processors", lambda p: p.beam_width == 1 or not p.logits_processors,
          lambda p: "beam search ranks the model's raw log-probabilities: logits_processors do not apply to it; "
                    "drop them or use beam_width=1"),
    _rule("beam_width skip_special_tokens", lambda p: p.beam_width == 1 or not p.skip_special_tokens,
          lambda p: "beam search decodes its text whole, special tokens included: skip_special_tokens needs "
                    "beam_width=1"),
)
"""SamplingParams' checks, each (the fields it reads, the test, its message: built only when the test fails)"""

_FIELDS = frozenset(f.name for f in fields(SamplingParams))
_READING = {name: tuple(i for i, rule in enumerate(_RULES) if name in rule[0]) for name in _FIELDS}
"""field name -> the indices of the _RULES reading it"""

_DEFAULTS: dict[type, SamplingParams] = {}
"""SamplingParams.default()'s instance, per class"""


def _check_known(names) -> None:
    """Refuse a name that is no SamplingParams field, listing the known ones."""
    unknown = sorted(set(names) - _FIELDS)
    if unknown:
        raise ConfigError(f"unknown sampling option {unknown[0]!r}; known options: {', '.join(sorted(_FIELDS))}")


class _SharedBias(dict):
    """SamplingParams.default()'s logit_bias (empty): read-only, as every request given no params shares it."""

    __slots__ = ()

    def _read_only(self, *args, **kwargs):
        raise LmforgeError("SamplingParams.default() is shared by every request given no params: its logit_bias "
                           "cannot change; build your own (SamplingParams(logit_bias={...}) or "
                           "SamplingParams.default().derived(logit_bias={...}))")

    __setitem__ = __delitem__ = __ior__ = setdefault = update = pop = popitem = clear = _read_only

    def __reduce__(self):  # (a pickled or deep-copied one is the caller's own: a plain dict)
        return dict, (dict(self),)
