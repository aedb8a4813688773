"""KV caches: objects attention layers hand their q, k, v to (the model <-> cache seam).

Every cache kind keeps one interface (the model calls nothing else):
  cache.attend(layer, q, k, v, spec, meta) -> out   store this step's keys/values, build the mask for where
                                                    this kind keeps its queries and keys, attend; q (B, H, T,
                                                    hd), k/v (B, KV, T, hd) after RoPE, spec an AttnSpec
  cache.attend_latent(layer, mla, ...)              the same for MLA's latents (latent caches only)
  cache.advance(T)                                  called once per forward, after every layer (stateful kinds)
  cache.score_hook                                  None, or f(layer, probs (B, H, T, S)): KV policies
                                                    (StreamingLLM, H2O, SnapKV) see the attention weights
                                                    (every kind, MLA's included; the engine then runs its
                                                    eager step, where the hook sees every layer)
  cache.fork(parent, child) / cache.release(seq_id) / cache.preempt(seq_id)
                                                    optional: the engine names forked, finished and
                                                    preempted sequences to caches keeping per-sequence
                                                    state, keyed by meta.seq_ids_host (KV-policy scores,
                                                    SSM states)
  cache.read_state(layer, meta) / cache.write_state(layer, states, meta)
                                                    recurrent layers (kind 'state': Mamba, hybrids): each
                                                    sequence's state before / after this step, one (S, *shape)
                                                    tensor per state; layers call them through `recur`
So masking lives in one place per kind. The kinds: `DENSE` (no cache: training, recompute; in
layers/attention.py), KVCache (contiguous, the reference), StaticKVCache (CUDA graphs), MLACache
(layers/mla.py), SlidingWindowCache (layers/sliding.py) and the engine's paged caches (lmforge.infer.kv).

`model.cache_spec()` returns a `CacheSpec`: what a cache must hold per layer, so engines size and build
caches without reading the model's config.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.model.layers.attention import AttnSpec, Mask, attend_with, tree_visible, visible
from lmforge.model.meta import cu_seqlens_from_doc_ids


@dataclass(frozen=True, kw_only=True)
class LayerCacheSpec:
    kind: str
    """'full' | 'sliding' (keys behind the window are never read) | 'latent' (MLA) | 'state' (a recurrent
    layer, e.g. Mamba: fixed-size tensors per sequence, nothing per token; lmforge.infer.kv.state)"""
    window: int = 0
    kv_heads: int = 0
    query_heads: int = 0
    head_dim: int = 0
    latent_rank: int = 0
    """latent kind: width of c_kv"""
    rope_dim: int = 0
    """latent kind: width of the shared rope key"""
    state_shapes: tuple[tuple[int, ...], ...] = ()
    """state kind: the shape of each per-sequence state tensor (Mamba: conv (d_inner, k - 1), ssm (d_inner, n))"""
    state_dtype: torch.dtype | None = None
    """state kind: the dtype states are kept in; None = the cache's (SSM states often stay fp32 in bf16 models)"""
    state_dtypes: tuple[torch.dtype | None, ...] = ()
    """state kind: one dtype per state tensor (state_shapes' order), each None = state_dtype, else the cache's;
    () = state_dtype for all. Mamba as vLLM keeps it: conv in the model's dtype, ssm in fp32: (None, torch.float32)"""

    def __post_init__(self) -> None:
        if self.kind == "state" and (not self.state_shapes or not all(
                isinstance(s, tuple) and s and all(isinstance(d, int) and d > 0 for d in s) for s in self.state_shapes)):
            raise LmforgeError(f"a 'state' layer needs state_shapes, a tuple of shapes of positive ints, got "
                               f"{self.state_shapes!r}: e.g. state_shapes=((d_inner, k - 1), (d_inner, n))")
        if self.state_dtypes and (len(self.state_dtypes) != len(self.state_shapes) or not all(
                d is None or isinstance(d, torch.dtype) for d in self.state_dtypes)):
            raise LmforgeError(f"state_dtypes needs one torch.dtype or None per state_shapes entry "
                               f"({len(self.state_shapes)}), got {self.state_dtypes!r}: e.g. (None, torch.float32)")

    def state_dtype_of(self, i: int, default: torch.dtype) -> torch.dtype:
        """The dtype state tensor i is kept in: state_dtypes[i], else state_dtype, else `default` (the cache's)."""
        return (self.state_dtypes[i] if self.state_dtypes else None) or self.state_dtype or default

    @property
    def numbers_per_token(self) -> int:
        if self.kind == "state":
            return 0
        return self.latent_rank + self.rope_dim if self.kind == "latent" else 2 * self.kv_heads * self.head_dim

    @property
    def numbers_per_sequence(self) -> int:
        """state kind: numbers of recurrent state one sequence holds in this layer (0 for attention kinds)"""
        return sum(math.prod(s) for s in self.state_shapes)


@dataclass(frozen=True, kw_only=True)
class CacheSpec:
    layers: tuple[LayerCacheSpec, ...]
    dtype: torch.dtype
    max_seq_len: int
    vocab_size: int

    @property
    def latent(self) -> bool:
        """the attention layers keep MLA latents (a hybrid's state layers keep no per-token numbers)"""
        return any(layer.kind == "latent" for layer in self.layers)

    @property
    def has_state(self) -> bool:
        """some layers keep a recurrent state per sequence (Mamba, or a hybrid of attention and Mamba)"""
        return any(layer.kind == "state" for layer in self.layers)

    @classmethod
    def of(cls, model) -> "CacheSpec":
        """model.cache_spec(), with a one-line error for models that do not describe their cache."""
        if not hasattr(model, "cache_spec"):
            raise LmforgeError(f"{type(model).__name__} has no cache_spec(): it cannot use lmforge's caches")
        return model.cache_spec()

    def bytes_per_token(self, dtype: torch.dtype | None = None) -> int:
        size = torch.empty((), dtype=dtype or self.dtype).element_size()
        return sum(layer.numbers_per_token for layer in self.layers) * size

    def bytes_per_sequence(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of recurrent state one sequence holds, whatever its length (0 without state layers)."""
        return sum(math.prod(shape) * torch.empty((), dtype=layer.state_dtype_of(i, dtype or self.dtype)).element_size()
                   for layer in self.layers for i, shape in enumerate(layer.state_shapes))


def contiguous_mask(T: int, S: int, window: int, device) -> Mask:
    """Mask for T queries that are the last T of S contiguous keys (query i at position S - T + i)."""
    if window > 0 and S > window:
        return visible(torch.arange(S - T, S, device=device), torch.arange(S, device=device), window)
    return None if T == 1 else "causal"


class _Hooked:
    score_hook = None

    def _probs_hook(self, layer: int):
        return None if self.score_hook is None else (lambda p: self.score_hook(layer, p))


def padded_causal_mask(pad: torch.Tensor, q_pos: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(B, 1, T, S) bool: query at slot q_pos[t] of row b sees key slots j with pad[b] <= j <= q_pos[t].

    Rows are left-padded: slots [0, pad[b]) hold no token. A query sitting on a pad slot would see no key
    at all (softmax of all -inf is NaN, and NaN values leak through 0-weights into later layers), so
    every query also sees its own slot; those rows' outputs are never used or attended to."""
    j = torch.arange(n_keys, device=q_pos.device)
    causal = j[None, :] <= q_pos[:, None]  # (T, S)
    real = j[None, :] >= pad[:, None]  # (B, S)
    own = j[None, :] == q_pos[:, None]
    return ((causal[None] & real[:, None]) | own[None])[:, None]


class KVCache(_Hooked):
    """Contiguous, pre-allocated cache: k and v of shape (n_layers, B, KV, max_len, hd). Row b's queries
    are its newest keys; left-padded rows (`set_padding`) hide their pad slots."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0
        self.pad: torch.Tensor | None = None  # (B,) left-pad slots per row; None = no padding

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None
                  ) -> "KVCache":
        spec, p = CacheSpec.of(model), next(model.parameters())
        layer = spec.layers[0]
        return cls(len(spec.layers), batch_size, layer.kv_heads, layer.head_dim, max_len or spec.max_seq_len,
                   device=p.device, dtype=dtype or spec.dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def set_padding(self, pad: torch.Tensor | list[int] | None) -> None:
        """Declare that row b's first pad[b] slots are padding (left-padded prompts)."""
        if pad is not None:
            pad = torch.as_tensor(pad, dtype=torch.long, device=self.k.device)
            if pad.shape != (self.batch_size,):
                raise LmforgeError(f"padding needs one length per row ({self.batch_size}), got {tuple(pad.shape)}")
            pad = pad if bool((pad > 0).any()) else None
        self.pad = pad

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        end = self.length + T
        if end > self.max_len:
            raise LmforgeError(f"KV cache is full: {end} tokens > max_len={self.max_len}; "
                               "allocate a longer cache or generate fewer tokens")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec, meta=None
               ) -> torch.Tensor:
        T, S = k.shape[2], self.length + k.shape[2]
        k_all, v_all = self.update(layer, k, v)
        tree = meta.tree_parents if meta is not None else None
        slots = torch.arange(S, device=self.k.device)
        if tree is not None:  # a candidate tree (lmforge.model.meta); its window is measured on depths
            mask = meta.derived(("tree", S, spec.window),
                                lambda: tree_visible(meta.parents_for(T).to(q.device), S, spec.window)[:, None])
            if self.pad is not None:  # ancestors precede their children, so slot order agrees
                mask = mask & padded_causal_mask(self.pad, slots[S - T:], S)
        elif self.pad is not None:  # slot differences are position differences within a row
            mask = padded_causal_mask(self.pad, slots[S - T:], S)
            if spec.window > 0:
                mask = mask & visible(slots[S - T:], slots, spec.window)
        else:
            mask = contiguous_mask(T, S, spec.window, q.device)
        return attend_with(q, k_all, v_all, mask, spec, self._probs_hook(layer))

    def advance(self, T: int) -> None:
        self.length += T

    def reset(self) -> None:
        self.length = 0
        self.pad = None

    def rewind(self, length: int) -> None:
        """Forget every token after the first `length` (rejected speculative drafts)."""
        if not 0 <= length <= self.length:
            raise LmforgeError(f"cannot rewind a cache of {self.length} tokens to {length}")
        self.length = length

    def keep_path(self, start: int, path: list[int]) -> None:
        """After a tree step written from slot `start`: move the accepted root-to-node path's keys and
        values (tree indices, lmforge.model.meta.accepted_slots) to slots start.. and forget the rest.
        Every row keeps the same path (one tree per batch)."""
        if start + len(path) > self.length or any(start + t >= self.length for t in path):
            raise LmforgeError(f"keep_path: path {path} from slot {start} lies past the cache's {self.length} tokens")
        src = torch.tensor([start + t for t in path], device=self.k.device)
        dst = torch.arange(start, start + len(path), device=self.k.device)
        for pool in (self.k, self.v):
            pool.index_copy_(3, dst, pool.index_select(3, src))
        self.length = start + len(path)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (and reorder/duplicate) batch rows: beam search reorders beams, finished rows are dropped."""
        rows = rows.to(self.k.device)
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        if self.pad is not None:
            self.pad = self.pad.index_select(0, rows)


def refuse_trees(meta, cache: str) -> None:
    """Caches whose mask assumes a causal chain of new tokens refuse candidate trees (one-line error)."""
    if meta is not None and meta.tree_parents is not None:
        raise LmforgeError(f"tree attention (meta.tree_parents) runs on KVCache, the no-cache path or the paged "
                           f"caches, not on {cache}")


def recur(cache, layer: int, scan, x: torch.Tensor, meta=None) -> torch.Tensor:
    """A recurrent layer's one call (what `attend` is to attention): run scan over the forward's layout.

    scan(x (R, T, d), states) -> (y (R, T, e), final states) runs R independent rows of T tokens, each from
    its states: a tuple of (R, *shape) tensors, one per LayerCacheSpec.state_shapes entry, or None = zeros.
    No cache (training, the recompute reference): every row of x (B, T, d) from zero. The engine's varlen
    row (1, N, d) (lmforge.model.meta): each sequence's state comes from the cache (zeroed by the engine
    where a sequence starts), the decode tokens run as one scan of num_decodes one-token rows, then each
    prefill chunk as a row of its own (so a chunked prompt carries its state from chunk to chunk; chunks
    of one length side by side share a scan: state_runs), and
    the final states go back to the cache. A fused varlen kernel may call read_state/write_state itself.
    Packed training rows (meta.doc_ids, no cache): each document runs from zero states, as if alone (one
    scan per document length; a varlen kernel would take cu_seqlens_from_doc_ids or Mamba-2's seq_idx)."""
    if cache is not None and not hasattr(cache, "read_state"):
        raise LmforgeError(f"{type(cache).__name__} keeps no recurrent state: run this model without a cache "
                           "(full recompute) or on the engine (lmforge.infer.kv.state)")
    if meta is not None and meta.tree_parents is not None or cache is not None and meta is None:
        raise LmforgeError("a recurrent layer runs on the engine's varlen row (AttnMetadata with state_slots) and "
                           "cannot score a candidate tree: its state follows one chain of tokens")
    if cache is None:
        return scan(x, None)[0] if meta is None or meta.doc_ids is None else _per_document(scan, x, meta)
    states = cache.read_state(layer, meta)
    ys, finals, drafted = [], [], meta.drafted_host
    for lo, hi, start, n in meta.derived("state_runs", lambda: state_runs(meta)):
        xs, st = x[0, start:start + (hi - lo) * n].view(hi - lo, n, -1), tuple(s[lo:hi] for s in states)
        if drafted and any(drafted[lo:hi]):  # speculative chunks: the states after their last tokens, for the rollback
            last = max(drafted[lo:hi]) + 1  # the pending token and the drafts (a recomputed context before them)
            y, new = _scan_each(scan, xs, st, last, lambda after: cache.stage_states(layer, meta, lo, hi, after))
        else:
            y, new = scan(xs, st)
        ys.append(y.flatten(0, 1))
        finals.append(new)
    cache.write_state(layer, tuple(torch.cat(f) for f in zip(*finals)), meta)
    return torch.cat(ys)[None]


def _scan_each(scan, x: torch.Tensor, states, last: int, keep):
    """scan over x (R, T, d), its last `last` tokens one at a time (as decoding would), handing keep() the
    states after each of them: a tuple of (R, last, *shape) tensors, one per state."""
    ys, after, T = [], [], x.shape[1]
    if T > last:
        y, states = scan(x[:, :T - last], states)
        ys.append(y)
    for t in range(T - last, T):
        y, states = scan(x[:, t:t + 1], states)
        ys.append(y)
        after.append(states)
    keep(tuple(torch.stack(s, 1) for s in zip(*after)))
    return torch.cat(ys, 1), states


def _per_document(scan, x: torch.Tensor, meta) -> torch.Tensor:
    """recur over packed rows x (B, T, d): the documents of equal length scanned together from zero states,
    outputs put back in token order."""
    flat = x.flatten(0, 1)
    order, ys = [], []
    for n, starts in meta.derived("document_runs", lambda: _document_runs(meta.doc_ids)).items():
        idx = (torch.tensor(starts, device=x.device)[:, None] + torch.arange(n, device=x.device)).flatten()
        ys.append(scan(flat[idx].view(len(starts), n, -1), None)[0].flatten(0, 1))
        order.append(idx)
    return torch.cat(ys)[torch.cat(order).argsort()].view(*x.shape[:2], -1)


def _document_runs(doc_ids: torch.Tensor) -> dict[int, list[int]]:
    """document length -> flat start of every document of that length (a document also ends at a row end)"""
    cu = cu_seqlens_from_doc_ids(doc_ids).tolist()
    runs: dict[int, list[int]] = {}
    for lo, hi in zip(cu, cu[1:]):
        runs.setdefault(hi - lo, []).append(lo)
    return runs


def state_runs(meta) -> list[tuple[int, int, int, int]]:
    """(first sequence, end sequence, first token, tokens per sequence) of the varlen row's runs that a
    recurrent layer scans at once: the decodes together (one token each), then the prefill chunks, those
    of equal length that follow each other as one run (a scan's cost is mostly per call: on a CPU, 32 chunks
    of 2 to 5 tokens took 15 ms as 32 scans, 32 chunks of 4 tokens 0.9 ms as one; docs/state_caches.md)."""
    nd, cu = meta.num_decodes, meta.cu_seqlens_q
    runs = [(0, nd, 0, 1)] if nd else []
    for i in range(nd, len(meta.query_lens_host)):
        n = meta.query_lens_host[i]
        if runs and runs[-1][3] == n:  # the previous run ends where this chunk starts: the row is contiguous
            runs[-1] = (runs[-1][0], i + 1, runs[-1][2], n)
        else:
            runs.append((i, i + 1, cu[i], n))
    return runs


class StaticKVCache(_Hooked):
    """Fixed-shape cache for CUDA-graph decoding (the gpt-fast / vLLM recipe).

    Every tensor a forward reads or writes keeps its address and shape: the write slot `pos` is a 0-d
    device tensor that `advance` bumps on the device, `update` writes with index_copy_ and returns all
    max_len keys, and `mask` hides the slots that are unwritten or padding. A captured decode graph thus
    stays valid for every position. `length` is a host-side mirror of `pos`; a graph replay runs no
    Python, so the graph runner advances it itself."""

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_len: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 repeat_kv: int = 1):
        # repeat_kv > 1 stores each kv head once per query head of its group, so attention sees plain MHA
        # and SDPA can use a fused kernel with a mask (its GQA mode falls back to unfused math with masks);
        # costs repeat_kv x the cache memory and reads - worthwhile at batch 1, not at large batches
        shape = (n_layers, batch_size, n_kv_heads * repeat_kv, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.repeat_kv = repeat_kv
        self.max_len = max_len
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._slots = torch.arange(max_len, device=device)
        self.length = 0

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int | None = None, *, dtype: torch.dtype | None = None,
                  repeat_kv: bool = False) -> "StaticKVCache":
        spec, p = CacheSpec.of(model), next(model.parameters())
        layer = spec.layers[0]
        return cls(len(spec.layers), batch_size, layer.kv_heads, layer.head_dim, max_len or spec.max_seq_len,
                   device=p.device, dtype=dtype or spec.dtype,
                   repeat_kv=layer.query_heads // layer.kv_heads if repeat_kv else 1)

    def view(self, batch_size: int) -> "StaticKVCache":
        """The first batch_size rows as a cache of their own: same storage and write slot, so graphs
        captured for a smaller batch bucket read and write this cache's memory."""
        v = copy.copy(self)
        v.k, v.v, v.pad, v.length = self.k[:, :batch_size], self.v[:, :batch_size], self.pad[:batch_size], 0
        return v

    def start(self, pad: torch.Tensor | list[int] | None = None) -> None:
        """Begin a new batch: empty cache, rows left-padded by pad[b] slots."""
        self.pos.zero_()
        self.length = 0
        self.pad.zero_()
        if pad is not None:
            pad = torch.as_tensor(pad, dtype=torch.long)
            self.pad[: len(pad)].copy_(pad)

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) token positions of the next T slots: slot index minus the row's padding."""
        return (self.pos + self._slots[:T])[None, :] - self.pad[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.pos + self._slots[: k.shape[2]]
        if self.repeat_kv > 1:  # (B, KV, T, hd) -> (B, H, T, hd), heads in attention's group order
            k, v = k.repeat_interleave(self.repeat_kv, dim=1), v.repeat_interleave(self.repeat_kv, dim=1)
        self.k[layer].index_copy_(2, idx, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, idx, v.to(self.v.dtype))
        return self.k[layer], self.v[layer]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec, meta=None
               ) -> torch.Tensor:
        """Attention over all max_len slots. The queries sit at slots pos..pos+T-1, which are NOT the
        last keys (unwritten slots follow): the window is measured from those slots (issue 11 §0: a
        window assuming the queries were the last keys hid the wrong keys on this path)."""
        refuse_trees(meta, "the static CUDA-graph cache")
        k_all, v_all = self.update(layer, k, v)
        q_slots = self.pos + self._slots[: q.shape[2]]
        mask = padded_causal_mask(self.pad, q_slots, self.max_len)
        if spec.window > 0:
            mask = mask & visible(q_slots, self._slots, spec.window)
        return attend_with(q, k_all, v_all, mask, spec, self._probs_hook(layer))

    def advance(self, T: int) -> None:
        self.pos.add_(T)
        self.length += T
