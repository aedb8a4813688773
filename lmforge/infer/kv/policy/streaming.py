"""StreamingLLM (attention sinks + a rolling window): the KV policy that keeps keys by their place in the
sequence, scoring nothing. Its positions-within-the-cache mode is applied by session.py (turned keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lmforge.config import check, coerce_fields
from lmforge.infer.kv.policy.base import KVPolicy, Keep


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
