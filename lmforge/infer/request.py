"""Requests and sequences: what the engine tracks for each prompt and each of its samples.

A `Request` is one prompt with its own SamplingParams; it owns `params.n` `Sequence`s (one per sample).
The first sequence is prefilled alone; when its prompt is done, the other n - 1 fork from it and share
its cache blocks (lmforge.infer.blocks), each drawing its first token from the same logits with its own
random stream. A sequence holds its tokens (prompt + output), how many of them have keys in the cache
(num_computed), its block table, and its text, built incrementally so that stop strings end it.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass, field
from typing import Iterable

import torch

from lmforge.config import is_int
from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.detok import StreamDecoder
from lmforge.infer.outputs import CompletionOutput, RequestOutput, unstarted
from lmforge.infer.processors import for_sample
from lmforge.infer.sampling import SamplingParams


class Status(enum.Enum):
    """Where a sequence is: in the scheduler's queue, in its running batch, out of both for good, or - FAILED - out
    of both with its blocks freed because it can never fit in the pool (lmforge.infer.scheduler.Batch.failed): not
    waiting, whatever a reader of the status assumes; Scheduler.finish ends it (FINISHED) when its request fails."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


def stop_ids(params: SamplingParams, tokenizer, model_eos: tuple[int, ...] = ()) -> set[int]:
    """The ids that end a sample: params.stop_token_ids, and unless ignore_eos the tokenizer's end-of-text
    id and the model's own end-of-sequence ids (a HF checkpoint's eos_token_id: Transformer.eos_token_ids)."""
    ids = set(params.stop_token_ids)
    if params.ignore_eos:
        return ids
    eot = getattr(tokenizer, "eot_id", None)
    if eot is not None:
        ids.add(int(eot))
    return ids | {int(i) for i in model_eos}


def seed_for(seed: int, index: int) -> int:
    """A distinct, fixed stream for item `index` under `seed` (prompt i of a batch, sample j of a request),
    so identical prompts do not draw identical samples and a stream never depends on batch companions.
    seed * 1_000_003 + index * 7_919 + 1 wrapped into an int64 (a seed SamplingParams takes; torch.Generator
    takes its 64 bits): for one index, distinct int64 seeds give distinct generator seeds (times an odd number is
    a bijection mod 2**64, and mod 2**32: the low 32 bits, all a CPU generator reads, differ for seeds apart mod
    2**32), and seeds below ~9e12 in size never meet another (seed, index) with an index less than 1_000_003
    apart (the sum itself, unwrapped)."""
    x = (seed * 1_000_003 + index * 7_919 + 1) % 2**64
    return x - 2**64 if x >= 2**63 else x


def checked_prompt_index(index) -> int:
    """A caller's prompt_index (prompt i of its batch: seed_for's index and the name its errors give), or a one-line
    refusal of what is no int >= 0."""
    if not is_int(index) or index < 0:
        raise ConfigError(f"prompt_index must be an int >= 0 (the prompt's place in a batch: its seed and the name "
                          f"its errors give), got {index!r}")
    return int(index)


def stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of one of `stops` (0: none is): the
    text a running sample holds back. Holding the longest keeps the shown part growing: had the next
    step's held tail begun earlier, this step's text would already have ended in a longer prefix."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):  # longest first
            if text.endswith(s[:n]):
                best = n
                break
    return best


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: "Request"
    index: int
    """sample index within the request (CompletionOutput.index)"""
    tokens: list[int]
    generator: torch.Generator | None = None
    num_computed: int = 0
    """tokens whose keys/values are in the cache (the position of the next token to run)"""
    pos_shift: int = 0
    """positions within the cache (a KV policy's cache_positions): the next token's position is num_computed -
    pos_shift, its slot; 0 otherwise (positions are the text's)"""
    evicted: int = 0
    """keys a KV policy dropped from the cache (lmforge.infer.kv.policy): the cache holds num_slots =
    num_computed - evicted keys (in position order, unless the policy sets ordered_slots = False); the next
    token's key goes to slot num_slots"""
    block_table: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)
    """prefix keys of the leading full blocks (lmforge.infer.blocks)"""
    status: Status = Status.WAITING
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    """sum(logprobs), kept as they are appended (left to right, as sum() adds): no O(length) sum per output"""
    text_ends: list[int] = field(default_factory=list)
    """with logprobs: len(text) after each generated token (CompletionOutput.text_offsets)"""
    text: str = ""
    sent_tokens: int = 0
    sent_text: int = 0
    """output tokens and characters of shown text already in an output (SamplingParams.output_kind='delta')"""
    finish: str | None = None
    stop_reason: int | str | None = None
    """the stop string or SamplingParams.stop_token_ids id that ended it (CompletionOutput.stop_reason)"""
    decoder: StreamDecoder | None = None
    row: object | None = None
    """the sampler's Row of this sequence (lmforge.infer.sampler.Row), built once: its fields never change but
    `history`, the penalties' state of the tokens, advanced as they are appended and dropped when it ends"""
    num_cached_tokens: int = 0
    """prompt tokens found in the prefix cache at admission"""
    snapshot_marks: dict[int, int] = field(default_factory=dict)
    """position -> prefix key: where a model with recurrent-state layers keeps a snapshot of its state for
    later prefix hits (its prefill chunks end there; set at admission, lmforge.infer.kv.state)"""
    preemptions: int = 0
    """times this sequence lost its cache blocks (state kept beside the cache, e.g. a draft's, restarts)"""
    inflight: int = 0
    """tokens sampled on the device but not read by the host yet (async scheduling: lmforge.infer.pending);
    they count as this sequence's next tokens when it is scheduled"""
    hidden: torch.Tensor | None = None
    """(D,) the model's features at the position of tokens[-2], whose logits gave the newest token (kept
    only for drafters that read hidden states: Engine(draft=...) with uses_hidden_states=True)"""
    features: object | None = None
    """a lmforge.infer.features.FeatureStream: every position's features not yet handed to the drafter
    (uses_hidden_states="all"); the scheduler computes, never takes from the prefix cache, positions from
    its `next` on"""

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_slots(self) -> int:
        return self.num_computed - self.evicted

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.request.prompt_len

    @property
    def remaining(self) -> int:
        """tokens still to run through the model before this sequence can sample"""
        return len(self.tokens) + self.inflight - self.num_computed

    def append(self, tok: int, eos: set[int], max_seq_len: int) -> str:
        """Add one sampled token, update text and finish state; return the newly visible text."""
        params = self.params
        self.tokens.append(tok)
        piece = self._append(tok, eos, max_seq_len, params)
        if params.logprobs is not None:
            self.text_ends.append(len(self.text))
        return piece

    def _append(self, tok: int, eos: set[int], max_seq_len: int, params) -> str:
        """append's work on the text and the finish state (the token is in self.tokens already)."""
        if tok in eos:  # a character it cut short still shows (as U+FFFD)
            self.finish = "stop"
            self.stop_reason = tok if tok in params.stop_token_ids else None  # (None: the model's end of text)
            # a stop token's text shows as a stop string does, with include_stop_str_in_output (vLLM cuts the last
            # token's text only without it); the end-of-text id's only where stop_token_ids lists it
            kept = self.stop_reason is not None and params.include_stop_str_in_output
            tail = (self.decoder.push(tok) if kept else "") + self.decoder.flush()
            self.text += tail
            return tail
        piece = self.decoder.push(tok)
        self.text += piece
        if params.stop:
            window = self.text[-(len(piece) + max(map(len, params.stop))):]
            hits = [self.text.find(s, len(self.text) - len(window)) for s in params.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                cut = min(hits)
                self.stop_reason = next(s for s in params.stop if self.text.startswith(s, cut))
                end = cut + len(self.stop_reason) if params.include_stop_str_in_output else cut
                piece = piece[: max(0, len(piece) - (len(self.text) - end))]
                self.text, self.finish = self.text[:end], "stop"
                return piece
        length = len(self.tokens)  # (num_output without its two property lookups: once per token)
        if length - len(self.request.prompt_ids) >= params.max_tokens or length >= max_seq_len:
            self.finish = "length"
            tail = self.decoder.flush()
            self.text += tail
            piece += tail
        return piece

    def output(self, final: bool = True, delta: bool = False) -> CompletionOutput:
        """final: the request has ended; a sample without a finish of its own then reads 'length' (a fallback:
        an abort sets 'abort' on the request's running samples first, Engine._abort); otherwise a running
        sample's finish_reason is None. delta: only the tokens and text after the previous delta output
        (SamplingParams.output_kind='delta'; its offsets stay counted from the completion's start).

        A running sample's text leaves out a tail that may be the start of a stop string, until later
        tokens show whether it is one (then it is cut) or not (then it shows): so the text of successive
        outputs only grows, and a stream built on them (LLM.stream, AsyncEngine, a server's deltas) never
        shows what a stop string takes back. Once the sample ends, its text is whole.

        With log-probs, the tokens whose text would start after the text shown (inside the held tail: the
        tail spans several tokens, or a byte of a character still incomplete follows it) are left out too,
        with their log-probs, until it shows or is cut: their offsets are not known yet (the tail may be
        cut before them), and a delta cannot take back an offset it sent. So every offset given is final
        (each later output, the finished one too, repeats it) and folded deltas equal the cumulative output."""
        text = self.text
        running = self.finish is None and not final
        if running and self.params.stop and not self.params.include_stop_str_in_output:  # (kept if it completes)
            text = text[:len(text) - stop_prefix_len(text, self.params.stop)]
        want, n = self.params.logprobs is not None, len(self.tokens) - self.request.prompt_len
        whole = n
        if want and running and n and len(text) < len(self.text):  # token i > 0 starts at text_ends[i - 1]
            n = 1 + bisect.bisect_right(self.text_ends, len(text), 0, n - 1)
        lo, shown = (self.sent_tokens, len(text)) if delta else (0, 0)
        if want:  # each token's text starts where the last one's ended
            starts = [self.text_ends[lo - 1] if lo else 0, *self.text_ends[lo:n - 1]] if lo < n else []
        first = self.request.prompt_len
        out = CompletionOutput(
            index=self.index, text=text[self.sent_text:] if delta else text,
            token_ids=self.tokens[first + lo:first + n],
            finish_reason=self.finish or ("length" if final else None),
            logprobs=self.logprobs[lo:n] if want else None, top_logprobs=self.top[lo:n] if want else None,
            cumulative_logprob=(self.cumulative_logprob if n == whole else sum(self.logprobs[:n])) if want else None,
            stop_reason=self.stop_reason, text_offsets=[min(s, len(text)) for s in starts] if want else None)
        if delta:
            self.sent_tokens, self.sent_text = n, shown
        return out


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False
    """whether the n samples exist yet (they fork after the first sequence's prefill)"""
    aborted: bool = False
    error: Exception | None = None
    """what ended it when its own input failed in a step (a lmforge.errors.RequestError: Engine.step)"""
    strategy: object | None = None
    """decodes this request instead of sampling (beam search: lmforge.infer.beam); gets each row's logits"""
    done: bool = False
    """set by a strategy when it has its outputs"""
    generators: list = field(default_factory=list)
    """one torch.Generator (or None) per sample"""
    context: list[int] = field(default_factory=list)
    """the prompt ids its samples' texts continue (lmforge.infer.detok.continuation_context; empty: the prompt holds
    only special tokens, and a text starts the text)"""
    arrival_time: float = 0.0
    first_token_time: float | None = None
    """time.perf_counter() when added and when its first token was sampled"""
    eos: frozenset = frozenset()
    """token ids that end a sample (stop_ids), computed once"""
    kind: tuple = ()
    """the sampler's grouping key of params (lmforge.infer.sampler.kind_of), computed once"""
    lookahead: int = 0
    """cache slots the scheduler reserves beyond a decode token (speculative drafts)"""
    max_len: int = 0
    """a sample ends ('length') at this many tokens: prompt + max_tokens, at most the context window"""
    overlaps: bool = False
    """its steps may run ahead of reading its tokens (async scheduling, lmforge.infer.pending): nothing
    before the next step needs their values (no strategy, no penalties, no prompt log-probs)"""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """filled as the prompt is computed when params.prompt_logprobs is set: [None, {...}, ...]"""
    sent_prompt_logprobs: int = 0
    """entries of prompt_logprobs already in a delta output (SamplingParams.output_kind='delta')"""
    sent_prompt: bool = False
    """a delta output carried prompt_ids already (the later ones carry None, but the finished one)"""
    processors: dict[int, tuple | None] = field(default_factory=dict)
    """sample index -> its logits processors (`processors_for`), made on its first row"""

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = [None] * min(self.params.prompt_logprobs_start, self.prompt_len)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def processors_for(self, index: int) -> tuple | None:
        """Sample `index`'s logits processors: params.logits_processors with every factory entry's
        `for_sequence()` instance, made once per sample, so the rows of its first token (drawn from the shared
        prefill logits), of its forked sequence and of its recomputation after a preemption share it; None
        where no entry is a factory (lmforge.infer.processors.for_sample)."""
        if index not in self.processors:
            self.processors[index] = for_sample(self.params.logits_processors)
        return self.processors[index]

    @property
    def owed_prompt_logprob(self) -> int | None:
        """The first prompt token whose log-prob is still owed (None: none is). Positions from this
        token's predecessor on must be computed, not taken from the prefix cache; a preempted sequence
        recomputing its prompt owes none twice."""
        owed = len(self.prompt_logprobs) if self.prompt_logprobs is not None else self.prompt_len
        return owed if owed < self.prompt_len else None

    @property
    def finished(self) -> bool:
        if self.aborted or self.done:
            return True
        if not self.forked:
            return False
        for s in self.seqs:  # a loop, not all(generator): read for every running request each step
            if s.finish is None:
                return False
        return True

    def output(self) -> RequestOutput:
        done, delta = self.finished, self.params.output_kind == "delta"
        outs = getattr(self.strategy, "outputs", None)
        if outs is None:  # (an aborted search's outputs are its live beams, ended 'abort')
            outs = (self.strategy.partial("abort" if self.aborted else None) if hasattr(self.strategy, "partial")
                    else [s.output(done, delta) for s in self.seqs])
            if done and not self.forked and outs:  # ended before its n samples forked from the prompt's logits (aborted
                outs += unstarted(outs[0], self.params.n)  # queued or mid-prefill, a processor failing there)
        metrics = self.strategy.metrics() if hasattr(self.strategy, "metrics") else {}
        if self.first_token_time is not None:
            metrics["time_to_first_token_s"] = self.first_token_time - self.arrival_time
        if self.seqs:  # prompt tokens read from the prefix cache (a multi-turn program's previous turns)
            metrics["num_cached_tokens"] = self.seqs[0].num_cached_tokens
        plen = len(self.prompt_ids)  # RequestOutput.usage (a score-only sequence holds one token less)
        metrics["num_prompt_tokens"] = plen
        metrics["num_generated_tokens"] = (sum(len(o.token_ids) for o in outs) if hasattr(self.strategy, "partial")
                                           else sum(max(len(s.tokens) - plen, 0) for s in self.seqs))
        prompt_lps = self.prompt_logprobs
        if prompt_lps is not None:
            prompt_lps = prompt_lps[self.sent_prompt_logprobs:]
            if delta:
                self.sent_prompt_logprobs += len(prompt_lps)
        ids = self.prompt_ids  # shared, never copied (PromptIds); a delta stream sends it first and last only
        if delta:
            ids, self.sent_prompt = ids if done or not self.sent_prompt else None, True
        return RequestOutput(self.prompt, ids, sorted(outs, key=lambda o: o.index), metrics,
                             request_id=self.request_id, finished=done, prompt_logprobs=prompt_lps, error=self.error)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """`text` tokenized as HF tokenizes a prompt (encode's add_special_tokens=True: a Llama-3 tokenizer.json's
    <|begin_of_text|> first), unless it already opens with that BOS (a rendered chat template), as lm-eval's
    HFLM: the prompt holds it once. Tokenizers without such tokens (lmforge's, GPT-2's) encode it as it is.
    Every front door's text prompt comes through here (Engine, LLM, AsyncEngine, the server, LLM.score)."""
    before, after = getattr(tokenizer, "prefix_tokens", ()), getattr(tokenizer, "suffix_tokens", ())
    if not before and not after:
        return tokenizer.encode(text)
    return tokenizer.encode(text, add_special_tokens=not (before and text.startswith(before[0])))


def encode_prompt(tokenizer, prompt, params: SamplingParams, index: int, vocab_size: int, max_seq_len: int
                  ) -> list[int]:
    """Tokenize (prompt_ids) and validate one prompt (ids are checked against the model's vocabulary and
    window; prompt `index` is named in errors). truncate_prompt keeps a text prompt's BOS first."""
    if isinstance(prompt, torch.Tensor) and prompt.dim() == 1:
        prompt = prompt.tolist()
    if not isinstance(prompt, (str, list, tuple)):
        raise LmforgeError(f"prompt {index} must be a string or a list of token ids, got {type(prompt).__name__}")
    ids = list(prompt) if not isinstance(prompt, str) else prompt_ids(tokenizer, prompt)
    if not ids:
        raise LmforgeError(f"prompt {index} is empty: give at least one token of text")
    plain = check_ids(ids, vocab_size, f"prompt {index}")
    longest = max_seq_len + 1 if params.max_tokens == 0 else max_seq_len - 1  # (its last token unrun)
    if params.truncate_prompt:  # room for max_tokens, but at least half the window stays prompt
        keep = max(max_seq_len - params.max_tokens, max_seq_len // 2, 1) if params.max_tokens else longest
        bos = getattr(tokenizer, "bos_id", None) if isinstance(prompt, str) else None
        if len(ids) > keep and keep > 1 and bos is not None and ids[0] == bos:
            ids = ids[:1] + ids[len(ids) - keep + 1:]  # (the oldest text goes, not the BOS the model expects)
        else:
            ids = ids[-keep:]
    elif len(ids) > longest:
        score = " (a score-only prompt, max_tokens=0, may hold max_seq_len + 1)" if params.max_tokens == 0 else ""
        if len(ids) <= max_seq_len:  # (it fits the window, but leaves no room for a new token)
            score = f" and must also hold a new token (at most {longest} prompt tokens)"
        raise LmforgeError(f"prompt {index} has {len(ids)} tokens but the context window is "
                           f"{max_seq_len}{score}; shorten it or set truncate_prompt=True (on the command line: "
                           "--truncate-prompt True)")
    return ids if plain else [int(t) for t in ids]


def check_ids(ids: list, vocab_size: int, what: str) -> bool:
    """Refuse a token id that is not an int in [0, vocab_size) in one line naming `what` ("prompt 3", "pair 0");
    returns whether every id is a plain int. Plain ints (what tokenizers return) are checked by C loops - their
    types, then the bounds (32k ids: ~2 ms; a Python loop of is_int took 65 ms) -; numpy ints, bools, floats take
    the per-token loop."""
    plain = set(map(type, ids)) == {int}
    if not plain or min(ids) < 0 or max(ids) >= vocab_size:
        bad = [t for t in ids if not is_int(t) or not 0 <= t < vocab_size]
        if bad and not is_int(bad[0]):  # (2.0 or True is not "outside" the vocabulary)
            raise LmforgeError(f"{what} has token id {bad[0]!r} that is not an int: token ids are ints in "
                               f"[0, {vocab_size})")
        if bad:
            raise LmforgeError(f"{what} has token id {bad[0]!r} outside the model's vocabulary [0, {vocab_size})")
    return plain


def prompt_list(prompts) -> list:
    """One prompt (a string, token ids as a list, tuple or 1-D tensor) or an iterable of prompts -> a list (LLM's
    generate and score_rolling)."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2):
            raise LmforgeError(f"a tensor of prompts must be 1-D (one prompt's ids) or 2-D (one row per prompt), "
                               f"got {prompts.dim()}-D")
        return [prompts.tolist()] if prompts.dim() == 1 else prompts.tolist()
    if not isinstance(prompts, Iterable):
        raise LmforgeError(f"prompts must be a string, a list of token ids, or a list of those; got "
                           f"{type(prompts).__name__}")
    prompts = list(prompts)
    if prompts and all(is_int(t) for t in prompts):  # one prompt given as its token ids
        return [prompts]
    return prompts
