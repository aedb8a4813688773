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
and token trees (drafts rewind and move keys by position), sliding-window models (windows are measured on
slots), recurrent-state models (state layers keep no keys; a plan covers every layer), models without
cache_spec(), and kernel_step=True (the batch-1 kernel step writes each key at its position's slot; it is off
with a policy), and a policy with needs_scores on a
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

The package: base.py (KVPolicy, CacheLayout, Keep: the protocol), streaming.py (StreamingLLM), scored.py (H2O,
SnapKV: policies scoring keys by attention), registry.py (names for policy_from_spec, register_policy),
session.py (check_engine, key_rotation, PolicySession: plans applied as compactions).
"""

from lmforge.infer.kv.policy.base import CacheLayout, KVPolicy, Keep
from lmforge.infer.kv.policy.registry import EXAMPLES, POLICIES, policy_from_spec, register_policy
from lmforge.infer.kv.policy.scored import H2O, SnapKV
from lmforge.infer.kv.policy.session import PolicySession, check_engine, key_rotation
from lmforge.infer.kv.policy.streaming import StreamingLLM

__all__ = ["EXAMPLES", "H2O", "POLICIES", "CacheLayout", "Keep", "KVPolicy", "PolicySession", "SnapKV", "StreamingLLM",
           "check_engine", "key_rotation", "policy_from_spec", "register_policy"]
