"""KV-cache policies: which keys a sequence keeps in the engine's paged cache (the seam StreamingLLM, SnapKV,
H2O and their kin attach to). Policies act on the cache, never on the model.

Slots apart from positions. A sequence holds `num_computed` tokens (its position) but only `num_slots =
num_computed - evicted` keys (lmforge.infer.request.Sequence). Queries keep their true positions (RoPE) and
keys are stored after RoPE, so a key moved to another slot keeps its original position; a step writes its
new keys at slots num_slots.. and attends over num_slots + new keys (runner.prepare). Slots stay in position
order unless the policy sets ordered_slots = False (below). Without a policy evicted is 0 and nothing changes.
A policy with `cache_positions` (StreamingLLM(positions="cache"), the paper's §3.2) moves positions with the
slots instead: a query's position is its slot (num_computed - Sequence.pos_shift), each compaction turns the
keys it moves by their shift (PagedCache.rotate_keys with the model's key_rotation(), after the copies; the
whole-block table moves are off so a turned key is always in a private block), and the scheduler keeps every
chunk's positions below the model's window (Scheduler.max_positions), so a stream runs past max_seq_len.

A step of the engine with a policy (lmforge.infer.engine):
  1. before scheduling, `plan(seq, state)` of every running sequence returns the slots to keep (or None):
     one ascending host list for every layer and head alike, or an (L, heads, K) device tensor per layer and
     kv head (heads = 1 for MLA's latent caches). Every layer and head keeps the same count K, so the
     sequence keeps one num_slots; its K slots must be distinct in every layer and head (a repeated slot
     is a key attention counts twice). Plans are validated in `PolicySession._checked`: host lists and
     CPU tensors always (values included: repeated or out-of-range slots are refused with one line naming
     the policy, the layer and head), a device tensor by shape only, its values only with the policy's
     `check_plans = True` (one device sync per compaction: for writing and testing a policy). The plan
     reads counts (num_computed, num_slots, its own state), never token values: under async scheduling the
     previous step's tokens may still be on the device, but its keys are written before the compaction
     (one stream), so planning here gives sync and async engines the same evictions. A fork (n > 1
     samples, beams) applies its parent's plan first, so the children share the compacted blocks.
  2. compaction (`PolicySession.compact`): the kept keys move to the first K slots through the block table
     (gather, then write: `PagedKVCache.compact`); a destination block whose kept keys are one source block
     whole, in order, takes that block's table entry instead (StreamingLLM dropping whole middle blocks
     copies nothing); a block others hold or the prefix cache names is never written (a fresh one is);
     blocks past the end go back to the pool (`BlockPool.compact`). A sequence whose copies find no free
     block is retried after the newest running sequences are preempted, as a chunk preempts them - itself
     when it is the newest (a plan is never skipped: outputs follow the policy's definition; the oldest
     running sequence always compacts, so some sequence always runs: Scheduler.preempt_for). The copies of
     all sequences compacting before a step run as one gather and one write per pool (`_flush`).
     ordered_slots = False (`_fill_moves`): each evicted slot below the new count K takes a surviving key of
     a slot >= K, per layer and kv head, so an eviction of E keys copies E keys per (layer, head), not K
     (H2O or TOVA evict one key per step: O(K) -> O(1)). The blocks below K must be private
     (`BlockPool.compact_in_place`: a block shared after a fork or named by the prefix cache is replaced by a
     fresh one whose every slot is written, through the same gather and write); blocks past K go back.
     `compacted` receives the permutation (new slot i holds old slot keep[..., i]). Full attention does not
     depend on slot order: a decode query sees every slot < context length (the reference's mask, the
     Triton decode kernel, MLA's absorbed path), a prefill chunk's queries see every earlier slot and are
     causal among the chunk's own keys, which a step always appends in order at slots num_slots.. (the
     reference mask, the varlen kernel, MLA's expansion). What else reads slots as positions is refused
     below or never sees an evicting sequence (prefix-cache naming).
  3. after scheduling, policies with `needs_scores` say which chunks they observe (`observes`); for such
     a step the cache's score hook is set and `observe(state, layer, probs, first)` gets each observed
     sequence's probabilities (H, T, S): its T queries from position `first` over its S slots. A hooked
     step runs eagerly (runner), other steps keep CUDA graphs and kernels.

Interactions: prefix caching never registers a block of a sequence that has evicted anything (every key
computed after an eviction saw a lossy context), and a block a prefix names is never written, so a lookup
never hands a lossless prompt a lossy block (a policy's sequence may still start from lossless cached
blocks, first planned after its first computed chunk: prefix and chunk act as one chunk; a policy
observing the prompt's last tokens, SnapKV, has them computed: `observed_tail`, sys.maxsize for all).
Preemption recomputes from token 0 (evicted = 0, state restarted: the recomputed tokens are a prompt, except
for H2O, which evicts from a recomputed output as it comes).
Forks copy the parent's state (`fork`). Refused with a one-line error (`check_engine`): speculative decoding
and token trees (drafts rewind and move keys by position), sliding-window and recurrent-state models
(windows are measured on slots), models without cache_spec(), and kernel_step=True (the batch-1 kernel step
writes each key at its position's slot; it is off with a policy), and a policy with needs_scores on a
CacheStore that does not declare `calls_score_hook` (its attend would never feed `observe`). CUDA graphs and
the Triton decode kernel read each row's context length in slots, so they stay on. A CacheStore's cache is
told of every applied plan after the keys moved (`PagedCache.compacted(seq_id, keep, old_num_slots)`, also when
only block-table entries changed hands): a policy selects slots, a store compresses what they hold.

Per-(layer, head) budgets (PyramidKV: fewer keys in upper layers; Ada-KV: per kv head) are not supported:
K is one count per sequence, and padding a smaller layer's plan by repeating a slot is refused (above). To add
them: let a plan carry counts, e.g. an (L, heads, Kmax) tensor plus an (L, heads) count tensor whose padding
entries are ignored (`_checked`, `_ordered_moves`/`_fill_moves`, `compacted`); keep one `Sequence.num_slots`
= Kmax, so every layer still appends a step's new keys at slots Kmax.. and the block table, BlockPool
accounting and prefix-cache rules stay per sequence (memory is then bounded by the largest layer's budget;
saving memory per layer needs per-layer block tables, a much larger change); and make attention skip each
(layer, head)'s slots count..Kmax-1: a per-(layer, kv head) valid length or slot mask passed from the runner's
metadata (beside `context_lens`) to every attention path - the reference mask, the Triton decode and varlen
prefill kernels, MLA's absorbed/expanded paths and the CUDA-graph static buffers - and to the score hook
(`observe` would see those slots masked).
"""

from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.config import check, claim, coerce_fields
from lmforge.errors import ConfigError, LmforgeError
from lmforge.utils import to_device

Keep = list[int] | range | torch.Tensor
"""slots a sequence keeps, ascending: a host list (every layer and head alike) or an (L, heads, K) int64
tensor on the cache's device (per layer and kv head; K the same everywhere; any order along K with
ordered_slots False)"""


@dataclass(frozen=True)
class CacheLayout:
    """What a policy may know of the cache: layers, kv heads per layer (1 for MLA latents), block size."""

    num_layers: int
    heads: tuple[int, ...]
    block_size: int


class KVPolicy:
    """Base of KV policies. A subclass is a frozen kw-only dataclass of its parameters (one object may serve
    several engines); what it learns per sequence lives in the state `start` returns, which the engine keeps
    by sequence id, copies on forks (`fork`), drops on release and restarts after a preemption."""

    needs_scores: ClassVar[bool] = False
    """observe() wants attention probabilities (steps it observes run eagerly with a score hook)"""
    observed_tail: ClassVar[int] = 0
    """the last this-many tokens of a prefill are computed, never taken from the prefix cache (sys.maxsize:
    every prompt query's attention is observed, H2O's accumulated scores)"""
    ordered_slots: ClassVar[bool] = True
    """True: a compaction keeps slots in position order (every kept key after an evicted one moves: O(K)
    copies). False: evicted slots below the new count K are filled with the surviving keys of slots >= K,
    per layer and kv head (O(evictions) copies); slot order is then not position order, so the policy
    tracks what each slot holds through `compacted` (H2O, TOVA: one eviction per step)"""
    check_plans: ClassVar[bool] = False
    """read a device tensor plan's values to refuse repeated or out-of-range slots (one device sync per
    compaction: turn it on while writing or testing a policy). Host lists and CPU tensors are always checked."""

    @property
    def cache_positions(self) -> bool:
        """Queries and kept keys take their positions within the cache (a key at slot s acts as if at position s),
        not their positions in the text; each compaction turns the keys it moves by their shift
        (StreamingLLM(positions="cache"), the paper's §3.2)."""
        return False

    def start(self, seq, layout: CacheLayout) -> object:
        """Per-sequence state when a sequence is (re)admitted: len(seq.tokens) tokens are to be prefilled."""
        return None

    def observes(self, state, start: int, n: int) -> bool:
        """Whether the chunk of n tokens from position `start` is observed (needs_scores only)."""
        return False

    def observe(self, state, layer: int, probs: torch.Tensor, first: int) -> None:
        """probs (H, T, S): one sequence's T queries (positions first..) over its S cache slots."""

    def plan(self, seq, state) -> Keep | None:
        """The slots to keep of seq's num_slots (ascending, at least one, fewer than num_slots), or None."""
        raise NotImplementedError

    def max_slots(self, prompt_len: int, chunk: int) -> int | None:
        """The most keys a sequence of a `prompt_len`-token prompt can hold at once when a step adds at most `chunk`
        tokens, also while it is recomputed after a preemption (None: no bound below its length).
        Engine.add_request sizes its pool check with it, so a request longer than the pool still runs under a
        policy that bounds its keys."""
        return None

    def compacted(self, state, keep: Keep) -> None:
        """The engine applied the plan: new slot i holds the key of old slot keep[..., i], for i < K. keep has
        the plan's form (a host list, or an (L, heads, K) tensor on the cache's device). ordered_slots: the
        plan's slots, ascending. Otherwise a permutation of them: keep[..., i] = i for a kept slot below K,
        the tail key moved into it for an evicted one (gather per-slot state with it: state[..., keep])."""

    def fork(self, state) -> object:
        return copy.deepcopy(state)


@dataclass(frozen=True, kw_only=True)
class StreamingLLM(KVPolicy):
    """Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks": keep the first
    sink_tokens keys (the attention sinks, §3.1) and the most recent `window` (the rolling cache, §3.2).

    positions: "original" (default): keys are cached after RoPE, so a kept key keeps the position it was
    computed at, and a query at position p sees sinks at 0..3 and its window at p - window...; the policy
    bounds memory (sink_tokens + window keys), not the context window (max_seq_len still applies).
    "cache": the paper's §3.2 - positions within the cache: a query takes the position of its slot (the count
    of keys held before it), so sinks sit at 0..3 and the window right after them, and a stream runs past
    the model's max_seq_len (the number of keys held never reaches it; a prompt longer than it is prefilled in
    chunks that fit, with evictions between them). The paper caches keys before RoPE and rotates them at every
    step; here keys stay rotated in the cache and each compaction turns the keys it moves by their shift
    (rotations compose: a key turned by -e acts as if computed e positions earlier), computed in fp32 and
    stored in the cache's dtype - so a key is rounded once more per shift (window / slack shifts per key; a bf16
    cache turned at every token measured level with fp32: bench/streaming.py). Needs plain RoPE
    (Transformer.key_rotation).

    slack: evict when sink_tokens + window + slack keys are held (1: the paper's rolling cache, which moves
    the whole window every step). With sink_tokens and slack multiples of the block size, an eviction drops
    whole middle blocks from the block table and copies nothing (positions "original"; with "cache" the
    moved keys are copied to private blocks and turned there: a whole block may be a fork's or the prefix
    cache's)."""

    sink_tokens: int = 4
    window: int
    slack: int = 1
    positions: Literal["original", "cache"] = "original"

    def __post_init__(self) -> None:
        coerce_fields(self, "StreamingLLM")
        check(self.sink_tokens >= 0, f"StreamingLLM sink_tokens must be >= 0, got {self.sink_tokens}")
        check(self.window >= 1, f"StreamingLLM window must be >= 1, got {self.window}")
        check(self.slack >= 1, f"StreamingLLM slack must be >= 1, got {self.slack}")

    @property
    def cache_positions(self) -> bool:
        return self.positions == "cache"

    def plan(self, seq, state) -> Keep | None:
        n = seq.num_slots
        if n < self.sink_tokens + self.window + self.slack:
            return None
        return [*range(self.sink_tokens), *range(n - self.window, n)]

    def max_slots(self, prompt_len: int, chunk: int) -> int:
        # whatever the prompt: a plan leaves at most sink_tokens + window + slack - 1 keys before a step, which
        # adds <= chunk
        return self.sink_tokens + self.window + self.slack - 1 + chunk


@dataclass
class _H2OState:
    prompt_len: int
    heads: tuple[int, ...]
    score: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> (kv heads, S) attention each slot's key has received so far"""
    pos: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> (kv heads, S) each slot's key's position (slots leave position order: ordered_slots False)"""


@dataclass(frozen=True, kw_only=True)
class H2O(KVPolicy):
    """Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models"
    (§3-4, Algorithm 1): per (layer, kv head) the attention each key has received, accumulated over every query so
    far (the prompt's and each decoded token's; a kv head sums its group's query heads); once the prompt is
    computed, keep the `heavy` keys with the most among the older ones (the heavy hitters) and the `recent`
    newest, so from then on one key goes per decoded token - the greedy eviction of Algorithm 1. A sequence
    recomputed after a preemption observes every query again and evicts before each chunk past the prompt, so it
    never holds more than max(prompt, heavy + recent) keys + a step's (max_slots: a generation longer than the
    pool runs).

    The scores come from the attention weights (`needs_scores`: observed steps run the reference attention, not
    the kernels) and every prompt query is observed (`observed_tail`: prompts are computed, never read from the
    prefix cache). Slots are filled from the tail (ordered_slots False: O(1) keys move per eviction), so the
    state keeps each slot's position. per_head False: one choice for every layer and head (scores summed), a host
    list. Positions are the text's (a key keeps the position it was computed at)."""

    heavy: int
    recent: int
    per_head: bool = True
    needs_scores: ClassVar[bool] = True
    observed_tail: ClassVar[int] = sys.maxsize
    ordered_slots: ClassVar[bool] = False

    def __post_init__(self) -> None:
        coerce_fields(self, "H2O")
        check(self.heavy >= 0 and self.recent >= 1,
              f"H2O needs heavy >= 0 and recent >= 1, got heavy={self.heavy}, recent={self.recent}")

    def start(self, seq, layout: CacheLayout) -> _H2OState:
        # the request's prompt, also when a preempted sequence restarts: its recomputed outputs are evicted from
        # as they come (chunk by chunk), not held whole as a prompt, so it holds no more keys than it did (max_slots)
        return _H2OState(seq.request.prompt_len, layout.heads)

    def observes(self, state: _H2OState, start: int, n: int) -> bool:
        return True

    def observe(self, state: _H2OState, layer: int, probs: torch.Tensor, first: int) -> None:
        H, T, S = probs.shape
        kv = state.heads[layer]
        c = probs.float().sum(1).view(kv, H // kv, S).sum(1)  # (kv heads, S): this chunk's attention per slot
        pos = torch.arange(first, first + T, device=c.device).expand(kv, T)
        if layer in state.score:  # this step's new keys sit at the last T slots
            c[:, :S - T] += state.score[layer]
            pos = torch.cat((state.pos[layer], pos), 1)
        state.score[layer], state.pos[layer] = c, pos

    def plan(self, seq, state: _H2OState) -> Keep | None:
        n, budget = seq.num_slots, self.heavy + self.recent
        if n <= budget or seq.num_computed < state.prompt_len:
            return None
        _all_observed(self, seq, state.score, state.heads)
        layers, first_recent = range(len(state.heads)), seq.num_computed - self.recent
        if not self.per_head:
            total = sum(state.score[layer].sum(0) for layer in layers)
            total = total.masked_fill(state.pos[0][0] >= first_recent, float("inf"))
            return total.topk(budget).indices.sort().values.tolist()
        return torch.stack([state.score[layer].masked_fill(state.pos[layer] >= first_recent, float("inf"))
                            .topk(budget, dim=-1).indices for layer in layers])  # (L, kv heads, K), any order

    def max_slots(self, prompt_len: int, chunk: int) -> int:
        # the prompt is held whole until it is computed (a recomputation's chunk may pass its end), then a plan
        # leaves heavy + recent keys before each step, which adds <= chunk
        return max(prompt_len, self.heavy + self.recent) + chunk

    def compacted(self, state: _H2OState, keep: Keep) -> None:  # new slot i holds old slot keep[..., i]
        for layer, kv in enumerate(state.heads):
            idx = (torch.tensor(keep, device=state.score[layer].device) if isinstance(keep, list)
                   else keep[layer]).expand(kv, -1)
            state.score[layer], state.pos[layer] = state.score[layer].gather(1, idx), state.pos[layer].gather(1, idx)


@dataclass
class _SnapState:
    prompt_len: int
    heads: tuple[int, ...]
    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    """layer -> (heads, prefix) Eq. 1's C, summed over the observed window queries so far"""
    done: bool = False


@dataclass(frozen=True, kw_only=True)
class SnapKV(KVPolicy):
    """Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation" (§4.1, Algorithm 1):
    once the prompt is computed, each (layer, kv head) keeps the `budget` prefix keys that the prompt's last
    `window` queries (the observation window) attend to most, plus the window's own keys.

      C = sum_{i in window} A[:, i, :L_prefix]          Eq. 1: attention of the window's queries over the
                                                         prefix keys (L_prefix = prompt - window), summed
      C' = pool1d(C, pool_kernel, padding=pool_kernel//2)  §4.2: clustering by pooling along the keys
      I = top-budget(C')                                 Eq. 2, per head (ties: the earlier key)

    GQA: a kv head's C sums its group's query heads (MLA's one latent "head": all heads). budget counts the
    prefix keys only: the paper's max_capacity_prompt is budget + window. Prompts of at most budget + window
    tokens are kept whole, as in Algorithm 1. Decoding keeps every later key (SnapKV compresses once)."""

    budget: int
    window: int = 32
    pool_kernel: int = 7
    pooling: str = "avg"
    needs_scores: ClassVar[bool] = True

    def __post_init__(self) -> None:
        coerce_fields(self, "SnapKV")
        check(self.budget >= 1, f"SnapKV budget must be >= 1, got {self.budget}")
        check(self.window >= 1, f"SnapKV window must be >= 1, got {self.window}")
        check(self.pool_kernel >= 1 and self.pool_kernel % 2 == 1,
              f"SnapKV pool_kernel must be odd and >= 1 (the pooled scores keep their length), got {self.pool_kernel}")
        check(self.pooling in ("avg", "max"), f"SnapKV pooling must be 'avg' or 'max', got {self.pooling!r}")

    @property
    def observed_tail(self) -> int:  # the window's queries must run: their attention is the observation
        return self.window

    def start(self, seq, layout: CacheLayout) -> _SnapState:
        return _SnapState(len(seq.tokens), layout.heads)

    def _compresses(self, state: _SnapState) -> bool:
        return not state.done and state.prompt_len - self.window > self.budget

    def observes(self, state: _SnapState, start: int, n: int) -> bool:
        return self._compresses(state) and start + n > state.prompt_len - self.window and start < state.prompt_len

    def observe(self, state: _SnapState, layer: int, probs: torch.Tensor, first: int) -> None:
        prefix = state.prompt_len - self.window
        lo, hi = max(0, prefix - first), min(probs.shape[1], state.prompt_len - first)
        c = probs[:, lo:hi, :prefix].float().sum(1)  # (H, prefix): Eq. 1 over this chunk's window queries
        c = c.view(state.heads[layer], -1, prefix).sum(1)  # query head h belongs to kv head h // group
        state.scores[layer] = state.scores[layer] + c if layer in state.scores else c

    def plan(self, seq, state: _SnapState) -> Keep | None:
        if not self._compresses(state) or seq.num_computed < state.prompt_len:
            return None
        _all_observed(self, seq, state.scores, state.heads)
        prefix, k = state.prompt_len - self.window, self.pool_kernel
        pool = F.avg_pool1d if self.pooling == "avg" else F.max_pool1d
        keep = []
        for layer in range(len(state.heads)):
            pooled = pool(state.scores[layer][:, None], k, stride=1, padding=k // 2)[:, 0]  # (heads, prefix)
            # ties (max pooling makes plateaus of equal scores) go to the earlier key, on every device and
            # whatever order topk would leave them in
            top = pooled.argsort(dim=-1, descending=True, stable=True)[:, :self.budget].sort(dim=-1).values
            rest = torch.arange(prefix, seq.num_slots, device=top.device).expand(top.shape[0], -1)
            keep.append(torch.cat((top, rest), dim=-1))  # the window (and any later key) is kept
        return torch.stack(keep)

    def compacted(self, state: _SnapState, keep: Keep) -> None:
        state.done, state.scores = True, {}


def _all_observed(policy: KVPolicy, seq, scores: dict, heads: tuple[int, ...]) -> None:
    """Refuse to plan from scores some layer never gave (its attention did not call the score hook)."""
    if len(scores) != len(heads):
        raise LmforgeError(f"{type(policy).__name__} observed {len(scores)} of {len(heads)} layers of sequence "
                           f"{seq.seq_id}: a layer's attention did not reach the cache's score hook (a cache's "
                           "attend passes hook_for(layer, seq_ids) to its attention: CacheStore.calls_score_hook)")


POLICIES = {"streaming": StreamingLLM, "h2o": H2O, "snapkv": SnapKV}
"""names of the policies `policy_from_spec` builds (the command line's --kv-policy): the shipped ones, and those
register_policy adds"""
EXAMPLES = {"streaming": "streaming:window=256", "h2o": "h2o:heavy=64,recent=64", "snapkv": "snapkv:budget=128"}


def register_policy(name: str, cls: type, example: str | None = None) -> type:
    """Let policy_from_spec (the command line's --kv-policy NAME:key=value,...) build `cls`, a KVPolicy dataclass
    written outside lmforge, by `name`, as register_model adds a model class; `example` is a spec errors show. A
    name taken by another class is refused; registering the same class again does nothing. Returns cls."""
    import dataclasses

    if not isinstance(name, str) or not name or name != name.strip().lower() or any(c in name for c in ":,="):
        raise ConfigError(f"a KV policy registers under a lower-case name without ':', ',' or '=' (it opens a "
                          f"spec 'NAME:key=value,...'), got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, KVPolicy) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"register_policy({name!r}, ...) takes a KVPolicy dataclass (its fields are the spec's "
                          f"keys), got {getattr(cls, '__qualname__', cls)!r}")
    claim(POLICIES, name, cls, "KV policy")
    if example is not None:
        EXAMPLES[name] = example
    return cls


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _spec_value(text: str) -> int | float | bool | str:
    """A spec value as the command line writes it: '256' an int, '0.25' or '1e-3' a float (a registered policy's
    float field; it stayed the string '0.25'), 'true'/'false' a bool, anything else its text."""
    if text.lstrip("+-").isdigit():
        return int(text)
    if _NUMBER.fullmatch(text):
        return float(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def policy_from_spec(spec: str) -> KVPolicy:
    """'NAME:key=value,...' -> that policy, e.g. 'streaming:window=256,positions=cache', 'h2o:heavy=64,recent=64',
    'snapkv:budget=128' (NAME one of POLICIES; keys its fields; values as the dataclass coerces them)."""
    import dataclasses

    name, _, rest = spec.partition(":")
    kind = POLICIES.get(name.strip().lower())
    if kind is None:
        raise ConfigError(f"unknown KV policy {name!r} in {spec!r}; choose one of {', '.join(POLICIES)} "
                          f"(e.g. {', '.join(EXAMPLES.values())})")
    name = name.strip().lower()
    known = {f.name for f in dataclasses.fields(kind)}
    fields = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in known:
            raise ConfigError(f"KV policy {name}: {item!r} is not key=value with a key among "
                              f"{', '.join(sorted(known))}")
        if key in fields:
            raise ConfigError(f"KV policy {name}: {key} is given twice in {spec!r}; give it once")
        fields[key] = _spec_value(value.strip())
    try:
        return kind(**fields)
    except TypeError as e:  # a required field left out
        example = EXAMPLES.get(name) or f"{name}:" + ",".join(f"{f.name}=VALUE" for f in dataclasses.fields(kind)
                                                             if f.default is f.default_factory is dataclasses.MISSING)
        raise ConfigError(f"KV policy {spec!r}: {e} (e.g. {example})") from None


def check_engine(policy: KVPolicy, spec, draft, config) -> None:
    """One-line refusals of what a policy cannot run with (see the module docstring)."""
    if not isinstance(policy, KVPolicy):
        raise ConfigError(f"kv_policy must be a KVPolicy (lmforge.infer.kv.policy), got {type(policy).__name__}")
    name = type(policy).__name__
    if not isinstance(policy.ordered_slots, bool):
        raise ConfigError(f"{name}.ordered_slots must be True (slots in position order) or False (hole filling), "
                          f"got {policy.ordered_slots!r}")
    if spec is None:
        raise ConfigError(f"kv_policy={name} needs a model with cache_spec() (the paged cache); this one runs on "
                          "the recompute runner, which keeps no cache")
    if draft is not None:
        what = repr(draft) if isinstance(draft, str) else type(draft).__name__
        raise ConfigError(f"kv_policy={name} with speculative decoding (draft={what}) is not supported: drafts "
                          "rewind and move keys by position; use one or the other")
    kinds = {layer.kind for layer in spec.layers}
    if kinds - {"full", "latent"} or any(layer.window for layer in spec.layers):
        raise ConfigError(f"kv_policy={name} on a model with sliding-window or recurrent-state layers (kinds "
                          f"{sorted(kinds)}, window {max(layer.window for layer in spec.layers)}) is not supported: "
                          "its masks measure windows on cache slots, which eviction renumbers; use a full-attention "
                          "model")
    store = config.kv_cache
    if policy.needs_scores and store is not None and not store.calls_score_hook:
        raise ConfigError(f"kv_policy={name} scores keys by their attention, but kv_cache={type(store).__name__} "
                          "does not declare calls_score_hook = True (its attend must pass hook_for(layer, seq_ids) "
                          "to its attention, as PagedKVCache.attend does); use a policy without scores "
                          "(StreamingLLM) or the default cache")
    if config.kernel_step:
        raise ConfigError(f"kernel_step=True with kv_policy={name}: the batch-1 kernel step writes each key at "
                          "its position's slot; set kernel_step=None (off with a policy) or False")
    if policy.cache_positions:
        if not policy.ordered_slots:
            raise ConfigError(f"kv_policy={name} with positions within the cache needs ordered_slots=True (a key's "
                              "slot is its position)")
        if not config.chunked_prefill:
            raise ConfigError(f"kv_policy={name} with positions within the cache prefills a prompt in chunks that "
                              "fit the model's window: turn chunked_prefill on")
        if config.kv_cache is not None:
            raise ConfigError(f"kv_policy={name} with positions within the cache turns moved keys in the pools; a "
                              "CacheStore (EngineConfig.kv_cache) keeps its own: use the default cache")


def key_rotation(policy: KVPolicy, model, max_seq_len: int):
    """The model's key rotation for a policy with positions within the cache (None without them), or a one-line
    refusal: keys without plain RoPE, or a policy whose kept keys leave no room below the model's window."""
    if not policy.cache_positions:
        return None
    name = type(policy).__name__
    rotate = model.key_rotation() if hasattr(model, "key_rotation") else None
    if rotate is None:
        raise ConfigError(f"kv_policy={name} with positions within the cache turns cached keys by their shift: it "
                          "needs a model whose keys carry plain RoPE (not learned positions, not a scaling that "
                          "depends on the sequence length)")
    held = policy.max_slots(max_seq_len + 1, 1)  # (any prompt: a stream runs past the window)
    if held is None or held > max_seq_len:
        raise ConfigError(f"kv_policy={name} with positions within the cache holds up to {held} keys, more than the "
                          f"model's max_seq_len={max_seq_len}: a smaller window or slack")
    return rotate


class PolicySession:
    """A policy at work in one engine: per-sequence state, the score hook, compactions, counters."""

    def __init__(self, policy: KVPolicy, pool, cache, spec, rotate=None):
        self.policy, self.pool, self.cache, self.rotate = policy, pool, cache, rotate
        self.turns: list = []  # (flat slots, shifts) of keys a positions-within-the-cache compaction moved
        self.told: list = []  # (seq_id, keep, old num_slots) of compactions the cache is still to be told of
        heads = tuple(1 if layer.kind == "latent" else layer.kv_heads for layer in spec.layers)
        self.layout = CacheLayout(len(spec.layers), heads, pool.block_size)
        self.states: dict[int, object] = {}
        self.observed: dict[int, tuple[object, object]] = {}  # seq_id -> (seq, state) observed this step
        self.evicted_tokens = self.compactions = 0

    # engine events ------------------------------------------------------------------------------------
    def plan(self, running, make_room) -> None:
        """Before scheduling: apply every running sequence's plan. One whose compaction found no free block for
        its copies goes to make_room(seq, retry) (Scheduler.preempt_for: the newest running sequences are
        preempted until its retry fits, or it itself - a plan is never skipped). The copies of all of them run
        as one gather and one write per pool (`_flush`), not one per sequence: a policy evicting every step (H2O,
        TOVA) compacts every running sequence each step; the retries' as one more, after the first are written
        and turned (a preempted sequence's blocks may be the fresh ones a retry writes)."""
        moves: list = []
        failed = [seq for seq in running if not self.apply(seq, moves)]
        self._finish(moves)
        moves = []
        for seq in failed:
            make_room(seq, lambda: self.apply(seq, moves))
        self._finish(moves)

    def _finish(self, moves: list) -> None:
        """The copies of a round of compactions, then the turns of the keys they moved, then the cache told."""
        self._flush(moves)
        self._turn()
        self._tell()

    def _tell(self) -> None:
        """Tell the cache of each compaction since the last call, once its keys moved (PagedCache.compacted: a
        store's per-sequence state follows the slots)."""
        for event in self.told:
            self.cache.compacted(*event)
        self.told = []

    def _turn(self) -> None:
        """Turn the keys the compactions since the last call moved (positions within the cache), once their
        copies are written: one rotation of every key pool."""
        if self.turns:
            slots, shift = (torch.cat(t) for t in zip(*self.turns))
            self.turns = []
            self.cache.rotate_keys(slots, shift, self.rotate)

    def apply(self, seq, moves: list | None = None) -> bool:
        """seq's plan, applied (a sequence not started yet holds no keys); False: no room for its copies.
        moves: collect the copies there (plan flushes them) instead of running them now."""
        if seq.seq_id in self.states:
            state = self.states[seq.seq_id]
            keep = self.policy.plan(seq, state)
            if keep is not None:
                return self.compact(seq, keep, state, moves)
        return True

    def _flush(self, moves: list) -> None:
        """Run the (src, dst) copies of several sequences' compactions in one cache.compact, which reads every
        source before it writes any destination. Batched copies rely on that: a block one sequence's
        compaction released (its keys still to be read) may be the fresh block another one's copies write.
        Sources of mixed forms are widened to (L, heads, M), destinations too when one is per head (an
        unordered compaction's)."""
        if len(moves) > 1:
            L = self.layout.num_layers
            heads = max(1 if t.dim() == 1 else t.shape[1] for move in moves for t in move)
            wide = lambda t: t.expand(L, heads, -1) if t.dim() == 1 else t.expand(-1, heads, -1)
            src = torch.cat([wide(s) for s, _ in moves], dim=-1)
            per_head = any(d.dim() == 3 for _, d in moves)
            moves[:] = [(src, torch.cat([wide(d) if per_head else d for _, d in moves], dim=-1))]
        if moves:
            self.cache.compact(*moves[0])

    def begin_step(self, batch) -> None:
        """After scheduling: new (and readmitted) sequences start, observed chunks get the hook."""
        self.observed.clear()
        for seq, n in batch.chunks:
            state = self.states.get(seq.seq_id)
            if state is None and seq.seq_id not in self.states:
                state = self.states[seq.seq_id] = self.policy.start(seq, self.layout)
            if self.policy.needs_scores and self.policy.observes(state, seq.num_computed, n):
                self.observed[seq.seq_id] = (seq, state)
        if self.policy.needs_scores:
            self.cache.score_hook = self._observe if self.observed else None

    def fork(self, parent: int, child: int) -> None:
        if parent in self.states:
            self.states[child] = self.policy.fork(self.states[parent])

    def release(self, seq_id: int) -> None:
        self.states.pop(seq_id, None)

    def preempt(self, seq_id: int) -> None:  # recomputed from token 0: its state starts again at admission
        self.states.pop(seq_id, None)

    def _observe(self, layer: int, probs: torch.Tensor) -> None:
        """The cache's score hook: rows of probs belong to cache.hook_seq_ids (a decode group's rows padded
        to the group's widest context, or one prefill chunk); queries run before num_computed advances."""
        for r, sid in enumerate(self.cache.hook_seq_ids):
            got = self.observed.get(sid)
            if got is not None:
                seq, state = got
                self.policy.observe(state, layer, probs[r, :, :, :seq.num_slots + probs.shape[2]], seq.num_computed)

    # compaction -----------------------------------------------------------------------------------------
    def compact(self, seq, keep: Keep, state, moves: list | None = None) -> bool:
        """Apply seq's plan `keep`; False (nothing changed) when the pool cannot cover the fresh blocks
        copy-on-write needs (the plan is asked again before the next step, or at a fork). ordered_slots: the
        kept keys move to the first K slots in order; else evicted slots below K are filled from the tail
        (`_fill_moves`). moves: append the (src, dst) flat slots there instead of copying now (`plan`)."""
        n = seq.num_slots
        keep, host = self._checked(seq, keep, n)
        k = len(keep) if host else keep.shape[-1]
        old = list(seq.block_table)
        if self.policy.ordered_slots:
            got = self._ordered_moves(seq, keep, host, k, old)
        else:
            got = self._fill_moves(seq, keep, host, k, n, old)
        if got is None:
            return False
        src, dst, keep = got
        if src is not None:
            if moves is None:
                self.cache.compact(src, dst)
            else:
                moves.append((src, dst))
        if self.policy.cache_positions:  # kept key keep[i] now sits at slot i: turned by i - keep[i]
            self._shifts(seq, keep, host)
            seq.pos_shift += n - k
            if moves is None:
                self._turn()
        self.told.append((seq.seq_id, keep, n))
        if moves is None:
            self._tell()
        seq.evicted += n - k
        self.evicted_tokens += n - k
        self.compactions += 1
        self.policy.compacted(state, keep)
        return True

    def _shifts(self, seq, keep: Keep, host: bool) -> None:
        """Queue the turns of seq's kept keys that changed slots (positions within the cache: host plans only)."""
        if not host:
            raise LmforgeError(f"{type(self.policy).__name__} keeps positions within the cache: its plan must be one "
                               "list of slots for every layer and head, not a per-head tensor")
        new = np.arange(len(keep))
        shift = new - np.asarray(keep, np.int64)
        moved = np.flatnonzero(shift)
        if len(moved):
            slots = _flat(seq.block_table, new[moved], self.pool.block_size)
            self.turns.append(tuple(to_device(torch.from_numpy(a), self.cache.device) for a in (slots, shift[moved])))

    def _checked(self, seq, keep: Keep, n: int) -> tuple[Keep, bool]:
        """The plan validated: (a host list, True), or (the (L, heads, K) tensor, False), sorted along K for
        ordered slots (hole filling needs no order). A tensor's values (distinct slots in [0, n) in every
        layer and head) are checked on a CPU tensor; a device tensor's only with the policy's check_plans
        (reading them is a device sync), else its shape alone."""
        if not isinstance(keep, torch.Tensor) or keep.dim() == 1:  # (a 1-d device tensor is read: one sync)
            keep = keep.tolist() if isinstance(keep, torch.Tensor) else list(keep)
            k = len(keep)
            if not 0 < k < n or keep[0] < 0 or keep[-1] >= n or any(a >= b for a, b in zip(keep, keep[1:])):
                raise LmforgeError(f"{type(self.policy).__name__}.plan kept {keep[:8]}... ({k} slots) of sequence "
                                   f"{seq.seq_id}'s {n}: keep 1 to {n - 1} distinct slots in [0, {n}), ascending")
            return keep, True
        k = keep.shape[-1]
        L, heads = self.layout.num_layers, max(self.layout.heads)
        if keep.dim() != 3 or keep.shape[0] != L or keep.shape[1] not in (1, heads) or not 0 < k < n:
            raise LmforgeError(f"{type(self.policy).__name__}.plan returned a tensor of shape {tuple(keep.shape)} "
                               f"for sequence {seq.seq_id} ({n} slots): give ({L}, {heads} or 1, K < {n}) slots, "
                               "or one list for every layer and head")
        keep = keep.sort(dim=-1).values if self.policy.ordered_slots else keep
        if keep.device.type == "cpu" or self.policy.check_plans:
            self._refuse_repeats(seq, keep, n)
        return keep, False

    def _refuse_repeats(self, seq, keep: torch.Tensor, n: int) -> None:
        """A tensor plan's slots must be distinct and in [0, n) in every layer and head: a repeated slot (a
        smaller layer budget padded to K) would be a key attention counts twice. Reads keep on the host."""
        s = keep.detach().cpu()
        s = s if self.policy.ordered_slots else s.sort(dim=-1).values
        repeat = (s[..., 1:] == s[..., :-1]).any(-1)
        outside = (s[..., 0] < 0) | (s[..., -1] >= n)
        for bad, what in ((repeat, "repeats a slot"), (outside, "keeps a slot outside [0, {n})")):
            if bool(bad.any()):
                layer, head = (int(i) for i in bad.nonzero()[0])
                raise LmforgeError(
                    f"{type(self.policy).__name__}.plan {what.format(n=n)} in layer {layer}, kv head {head} of "
                    f"sequence {seq.seq_id}: keep K distinct slots of [0, {n}) in every layer and head (one K "
                    "for all: a smaller layer budget cannot be padded by repeating a slot, which attention "
                    "would count twice; per-layer budgets: lmforge.infer.kv.policy's docstring)")

    def _ordered_moves(self, seq, keep: Keep, host: bool, k: int, old: list[int]):
        """Kept keys to slots 0..k-1 in order: (src, dst, keep), src None when nothing is copied; None when
        the pool has no room. A destination block that is one source block whole takes its table entry."""
        bs = self.pool.block_size
        if host and not self.policy.cache_positions:  # (turned keys are written: a reused block may be shared)
            reuse = [_whole_block(keep[j * bs:(j + 1) * bs], bs) for j in range(-(-k // bs))]
        else:
            reuse = [None] * -(-k // bs)
        write = self.pool.compact(seq.block_table, reuse, k)
        if write is None:
            return None
        # the written slots and their flat cache slots, as arrays: a per-head plan writes all K slots every
        # time, so per-slot Python here would cost O(K) host work per sequence and step
        dst = (np.asarray(write, np.int64)[:, None] * bs + np.arange(bs)).ravel()
        dst = dst[dst < k]
        if not len(dst):
            return None, None, keep
        dst_flat = to_device(torch.from_numpy(_flat(seq.block_table, dst, bs)), self.cache.device)
        if host:
            src = to_device(torch.from_numpy(_flat(old, np.asarray(keep, np.int64)[dst], bs)), self.cache.device)
        else:
            slots = keep[..., to_device(torch.from_numpy(dst), keep.device)]  # (L, heads, M) slot indices
            src = to_device(old, keep.device)[slots // bs] * bs + slots % bs
        return src, dst_flat, keep

    def _fill_moves(self, seq, keep: Keep, host: bool, k: int, n: int, old: list[int]):
        """Unordered compaction (ordered_slots False): each evicted slot below k takes a surviving key from
        slots >= k, per layer and kv head, so min(k, n - k) keys per (layer, head) move, not k; a block that
        copy-on-write replaces (shared after a fork, or prefix-named) gets every slot. Returns (src, dst,
        perm): new slot i holds old slot perm[..., i] (`compacted`); None when the pool has no room."""
        bs = self.pool.block_size
        cow = self.pool.compact_in_place(seq.block_table, k)
        if cow is None:
            return None
        new, dev = seq.block_table, self.cache.device
        whole = (np.asarray(cow, np.int64)[:, None] * bs + np.arange(bs)).ravel()
        whole = whole[whole < k]  # every slot of a replaced block (its kept keys stay at their slots)
        if host:
            perm = _fill_perm(np.asarray(keep, np.int64), k)
            slots = np.union1d(np.flatnonzero(perm != np.arange(k)), whole)
            if not len(slots):
                return None, None, keep
            src = to_device(torch.from_numpy(_flat(old, perm[slots], bs)), dev)
            return src, to_device(torch.from_numpy(_flat(new, slots, bs)), dev), perm.tolist()
        holes, perm = _fill_plan(keep, n)
        slots = holes  # (L, heads, F): each head's holes (padding: kept slots copied onto themselves)
        if len(whole):
            slots = torch.cat((holes, to_device(torch.from_numpy(whole), dev).expand(*holes.shape[:2], -1)), -1)
        src = perm.gather(-1, slots)  # duplicates (a hole in a replaced block) write the same key twice
        tables = to_device(torch.from_numpy(np.asarray(old + new, np.int64)), dev)  # one host-to-device copy
        old_t, new_t = tables[:len(old)], tables[len(old):]
        return old_t[src // bs] * bs + src % bs, new_t[slots // bs] * bs + slots % bs, perm


def _fill_perm(keep: np.ndarray, k: int) -> np.ndarray:
    """Host hole fill: keep (K,) ascending -> perm (K,), new slot i holds old slot perm[i]: kept slots below
    K stay, the evicted ones (holes, ascending) take the kept slots >= K (ascending)."""
    perm = np.arange(k)
    below = int(np.searchsorted(keep, k))  # kept slots below K; the K - below others are the movers
    hole = np.ones(k, bool)
    hole[keep[:below]] = False
    perm[hole] = keep[below:]
    return perm


def _fill_plan(keep: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Device hole fill, fixed shapes (no host sync): keep (L, heads, K) distinct slots of n -> holes
    (L, heads, F), F = min(K, n - K) >= the evicted slots below K in any head (their count = kept slots
    >= K), padded with kept slots below K; and perm (L, heads, K): new slot i holds old slot perm[..., i]
    (a padding slot holds itself)."""
    L, h, K = keep.shape
    F, keep = min(K, n - K), keep.long()
    alive = torch.zeros(L, h, n, dtype=torch.bool, device=keep.device).scatter_(-1, keep, True)
    hole = ~alive[..., :K]
    # stable sorts of 0/1 keys: the holes first (ascending), the kept tail slots first (ascending)
    holes = torch.sort((~hole).to(torch.int8), dim=-1, stable=True).indices[..., :F]
    movers = K + torch.sort((~alive[..., K:]).to(torch.int8), dim=-1, stable=True).indices[..., :F]
    src = torch.where(hole.gather(-1, holes), movers, holes)
    perm = torch.arange(K, device=keep.device).expand(L, h, K).scatter(-1, holes, src)
    return holes, perm


def _flat(table: list[int], slots: np.ndarray, bs: int) -> np.ndarray:
    """Flat cache slots (block * bs + offset) of a sequence's slots through its block table."""
    return np.asarray(table, np.int64)[slots // bs] * bs + slots % bs


def _whole_block(seg: list[int], bs: int) -> int | None:
    """The source block whose slots seg (a destination block's kept slots, ascending) are, in order from
    its first slot; None when they are not one block's."""
    if seg[0] % bs or seg[-1] - seg[0] != len(seg) - 1:
        return None
    return seg[0] // bs
