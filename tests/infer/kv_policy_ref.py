"""The independent reference of the KV-policy tests (tests/infer/test_kv_policy*.py): a contiguous cache
holding every key at its original position, whose attention sees exactly the keys a policy's definition
keeps, replaying the engine's own schedule (chunks, forks, preemptions) and scoring its tokens."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch

from lmforge.infer.engine import Engine
from lmforge.infer.kv.policy import StreamingLLM

from .infer_helpers import tiny_model

PROMPT = "the quick brown fox jumps over the lazy dog"


class RefCache:
    """Every key at its position; layer l's kv head h attends key j only if alive[l][h, j] (a step's own new
    keys always, causally). Attention by hand (GQA: query head q uses kv head q // group). With `record`,
    the probabilities of each layer's queries are kept (SnapKV's observation)."""

    def __init__(self, n_layers: int, kv_heads: int):
        self.k, self.v = [None] * n_layers, [None] * n_layers
        self.alive = [torch.zeros(kv_heads, 0, dtype=torch.bool) for _ in range(n_layers)]
        self.probs: dict[int, list[torch.Tensor]] = {}

    @property
    def length(self) -> int:
        return self.alive[0].shape[1]

    def _keys(self, layer, keys: list, new: torch.Tensor):
        """Append a step's rotated keys (1, heads, T, d) to keys[layer] (before `alive` grows); returns a function
        giving the keys the attention uses, read once `alive` has grown (here as stored: keys keep the positions
        they were computed at)."""
        keys[layer] = new if keys[layer] is None else torch.cat((keys[layer], new), 2)
        return lambda: keys[layer]

    def attend(self, layer, q, k, v, spec, meta=None):
        T = k.shape[2]
        keys = self._keys(layer, self.k, k)  # a function: read after `alive` grows
        self.v[layer] = v if self.v[layer] is None else torch.cat((self.v[layer], v), 2)
        alive = self.alive[layer] = torch.cat((self.alive[layer], torch.ones(k.shape[1], T, dtype=torch.bool)), 1)
        S, G = alive.shape[1], q.shape[1] // k.shape[1]
        causal = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]  # (T, S)
        mask = causal[None] & alive.repeat_interleave(G, 0)[:, None, :]  # (H, T, S)
        kk, vv = (t[0].repeat_interleave(G, 0).float() for t in (keys(), self.v[layer]))
        s = (q[0].float() @ kk.transpose(1, 2)) * spec.scale
        p = s.masked_fill(~mask, float("-inf")).softmax(-1)
        self.probs.setdefault(layer, []).append(p)
        return (p @ vv)[None].to(q.dtype)

    def attend_latent(self, layer, mla, q_nope, q_rope, c_kv, k_rope, spec, meta=None):
        """MLA: the latents of every position; the library's plain per-head expansion over the visible ones
        (one latent "head": every query head sees the same keys)."""
        T = c_kv.shape[1]
        self.k[layer] = c_kv if self.k[layer] is None else torch.cat((self.k[layer], c_kv), 1)
        rope_keys = self._keys(layer, self.v, k_rope)
        alive = self.alive[layer] = torch.cat((self.alive[layer], torch.ones(1, T, dtype=torch.bool)), 1)
        S = alive.shape[1]
        mask = (torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]) & alive  # (T, S)
        return mla.naive(q_nope, q_rope, self.k[layer], rope_keys(), mask[None, None], spec,
                         lambda p: self.probs.setdefault(layer, []).append(p[0]))

    def advance(self, T: int) -> None:
        pass

    def next_position(self) -> int | None:
        """The position the next token's query takes (None: its position in the text)."""
        return None

    def keep_positions(self, keep: list[torch.Tensor]) -> None:
        """keep[l] (kv heads, S) bool: which positions stay visible from now on."""
        self.alive = [a & kl for a, kl in zip(self.alive, keep)]


class CachePositionsRef(RefCache):
    """StreamingLLM's positions within the cache (§3.2), by definition: each visible key acts at its rank among
    the visible keys, and a query at the count of visible keys before it. Keys are kept turned back to position
    0 and turned to their rank at every attention (not by the engine's per-shift turns)."""

    def __init__(self, n_layers: int, kv_heads: int, rope):
        super().__init__(n_layers, kv_heads)
        self.rope = rope

    def _turn(self, keys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        from lmforge.model.layers.rope import rotate_by

        return rotate_by(keys[0].transpose(0, 1), pos, self.rope.inv_freq, self.rope.layout).transpose(0, 1)[None]

    def _keys(self, layer, keys: list, new: torch.Tensor):
        T, p0 = new.shape[2], int(self.alive[layer][0].sum())  # the step's keys came at positions p0 ..
        plain = self._turn(new, -torch.arange(p0, p0 + T))
        keys[layer] = plain if keys[layer] is None else torch.cat((keys[layer], plain), 2)
        return lambda: self._turn(keys[layer], self.alive[layer][0].long().cumsum(0) - 1)

    def next_position(self) -> int:
        return int(self.alive[0][0].sum())


def streaming_keep(ref: RefCache, sinks: int, window: int, slack: int) -> None:
    """StreamingLLM's definition: once sinks + window + slack keys are held, keep the first `sinks` of them
    and the last `window` (every layer and head alike)."""
    alive = ref.alive[0][0]
    held = alive.nonzero().flatten().tolist()
    if len(held) >= sinks + window + slack:
        keep = torch.zeros_like(alive)
        keep[held[:sinks] + held[len(held) - window:]] = True
        ref.keep_positions([keep.expand_as(a) for a in ref.alive])


def snapkv_by_hand(probs: dict[int, list[torch.Tensor]], prompt_len: int, budget: int, window: int, kernel: int,
                   pooling: str, kv_heads: int) -> list[list[list[int]]]:
    """SnapKV §4.1-4.2 from the equations: per layer and kv head the `budget` prefix positions with the largest
    pooled C = sum over the window's queries of their attention to the prefix (the group's query heads summed)."""
    prefix, out = prompt_len - window, []
    for layer in sorted(probs):
        chunks = [torch.nn.functional.pad(c, (0, prompt_len - c.shape[-1])) for c in probs[layer]]  # keys past: 0
        p = torch.cat(chunks, 1)[:, :prompt_len]  # (H, prompt queries, prompt keys)
        heads = []
        for h in range(kv_heads):
            G = p.shape[0] // kv_heads
            c = [float(p[h * G:(h + 1) * G, prefix:prompt_len, j].sum()) for j in range(prefix)]  # Eq. 1
            r = kernel // 2
            win = [[c[i] for i in range(j - r, j + r + 1) if 0 <= i < prefix] for j in range(prefix)]
            pooled = [sum(w) / kernel if pooling == "avg" else max(w) for w in win]  # zero padding counts (avg)
            heads.append(sorted(sorted(range(prefix), key=lambda j: -pooled[j])[:budget]))  # Eq. 2
        out.append(heads)
    return out


def replay(model, log, policy, on_prefill=None) -> dict[tuple[int, int], torch.Tensor]:
    """The engine's schedule on the reference: log[step] = [(seq, start, n[, tokens held then, preemptions])]. A
    sequence first seen after position 0 is a fork and starts from its parent's state as the prompt's last chunk
    left it (the parent may have decoded further before the fork's first step: a small token budget), unless it
    was preempted before its first step (then recomputed: a restart, from a prefix hit or 0). Start 0
    (re)starts a sequence (its prompt: the tokens held then, `RefCache.prompt_len`), and so does a preemption since
    its last step, also at start > 0 after a prefix hit (which may equal where it stopped: blocks computed before
    any eviction are in the prefix cache). Returns {(seq_id, position):
    log-probs of the token at that position} (the first computation's: the one the token was chosen from)."""
    cfg = model.cfg
    kv = 1 if cfg.attention == "mla" else cfg.n_kv_heads or cfg.n_heads
    states: dict[int, RefCache] = {}
    prefilled: dict[int, RefCache] = {}  # a request's first sequence as its prompt's last chunk left it
    times: dict[int, int] = {}  # each sequence's preemptions when last scheduled
    out = {}
    for step in log:
        for seq, start, _, *held in step:
            # forks share the prompt's state, whatever the first sequence did since; one preempted before its first
            # step is recomputed (from a prefix hit: a restart)
            if seq.index > 0 and seq.seq_id not in states and not (len(held) > 1 and held[1]):
                states[seq.seq_id] = copy.deepcopy(prefilled[seq.request.seqs[0].seq_id])
        for seq, start, n, *held in step:
            hit = False
            preempted = len(held) > 1 and held[1] != times.setdefault(seq.seq_id, held[1])
            times[seq.seq_id] = held[1] if len(held) > 1 else 0
            if seq.seq_id not in states or start < states[seq.seq_id].length or preempted:  # new, or restarted
                ref = (CachePositionsRef(cfg.n_layers, kv, model.rope) if getattr(policy, "cache_positions", False)
                       else RefCache(cfg.n_layers, kv))
                states[seq.seq_id] = ref
                ref.prompt_len = held[0] if held else None
                if start:  # blocks from the prefix cache: a lossless prefill of the prefix
                    with torch.no_grad():
                        model(torch.tensor([seq.tokens[:start]]), positions=torch.arange(start)[None], cache=ref)
                    hit = True  # first planned after this chunk: the cached prefix and the chunk act as one
            ref = states[seq.seq_id]
            assert ref.length == start
            if isinstance(policy, StreamingLLM) and not hit:
                streaming_keep(ref, policy.sink_tokens, policy.window, policy.slack)
            elif on_prefill is not None:
                on_prefill(seq, ref, start)
            p = ref.next_position()
            p = start if p is None else p
            with torch.no_grad():
                logits = model(torch.tensor([seq.tokens[start:start + n]]), positions=torch.arange(p, p + n)[None],
                               cache=ref)
            # a recomputation after a preemption (the policy applied anew) does not replace the logits its token
            # was chosen from
            out.setdefault((seq.seq_id, start + n), logits[0, -1].float().log_softmax(-1))
            if seq.index == 0 and start + n == seq.request.prompt_len:
                prefilled[seq.seq_id] = copy.deepcopy(ref)
    return out


def run(model, tok, config, prompts, params, before=None, max_steps: int = 2000):
    """The engine's outputs and its schedule: [(seq, num_computed before, n, tokens held, preemptions)] per step.
    before(engine): called before the first request (spies). max_steps: a bound, so a scheduling loop fails the
    test instead of hanging it."""
    engine = Engine(model, tok, config)
    if before is not None:
        before(engine)
    log, real = [], engine.runner.execute

    def spy(batch, *a, **k):
        log.append([(seq, seq.num_computed, n, len(seq.tokens), seq.preemptions) for seq, n in batch.chunks])
        return real(batch, *a, **k)
    engine.runner.execute = spy
    reqs = [engine.requests[engine.add_request(p, params)] for p in prompts]
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        engine.step()
    assert not engine.has_unfinished(), (f"unfinished after {max_steps} steps "
                                         f"({engine.stats()['preemptions']} preemptions)")
    return engine, reqs, log


def check_against(ref_lps, reqs, greedy: bool) -> int:
    """Every output token's log-prob (and, greedy, its being the argmax) equals the reference's; returns the
    number of tokens checked."""
    checked = 0
    for req in reqs:
        P = req.prompt_len
        for seq in req.seqs:
            for i, (tok, lp) in enumerate(zip(seq.tokens[P:], seq.logprobs)):
                src = req.seqs[0].seq_id if i == 0 else seq.seq_id  # first samples: the parent's prefill logits
                want = ref_lps[(src, P + i)]
                assert abs(float(want[tok]) - lp) < 2e-4, (seq.seq_id, i, float(want[tok]), lp)
                if greedy:
                    assert tok == int(want.argmax())
                checked += 1
    return checked


STREAM = dict(sink_tokens=4, window=8, slack=3)
MLA = dict(attention="mla", rope_layout="interleaved", n_kv_heads=None)


def model_of(arch: str):
    """llama: GQA 4 query heads on 2 kv heads; mla: one latent cache per layer (lmforge.model.layers.mla)."""
    if arch == "mla":
        from lmforge.model.config import MLAConfig

        return tiny_model("llama", **MLA, mla=MLAConfig(kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8,
                                                         qk_rope_head_dim=8, v_head_dim=8))
    return tiny_model("llama")


@dataclass(frozen=True, kw_only=True)
class StreamingByPosition(StreamingLLM):
    """StreamingLLM's rule with unordered slots: the sinks are positions < sink_tokens, the window the last
    `window` positions; the state maps each slot to its key's position (keys a step appended sit at the
    next slots in order; `compacted` permutes the map). Observes nothing: decode and prefill kernels and CUDA
    graphs stay on."""

    ordered_slots: ClassVar[bool] = False

    def start(self, seq, layout):
        return {"pos": []}

    def plan(self, seq, state):
        n, now, pos = seq.num_slots, seq.num_computed, state["pos"]
        pos += range(now - (n - len(pos)), now)  # keys appended since the last plan
        if n < self.sink_tokens + self.window + self.slack:
            return None
        return [i for i, p in enumerate(pos) if p < self.sink_tokens or p >= now - self.window]

    def compacted(self, state, keep):  # (a tensor plan: every layer and head alike)
        state["pos"] = [state["pos"][i] for i in (keep[0, 0].tolist() if isinstance(keep, torch.Tensor) else keep)]
