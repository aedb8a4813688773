"""Paged caches (Kwon et al. 2023, "Efficient Memory Management for LLM Serving with PagedAttention").

Keys and values live in fixed-size blocks of one pre-allocated pool per layer, k and v of shape
(num_blocks, block_size, n_kv_heads, head_dim) (MLA: latents (num_blocks, block_size, r) and rope keys
(num_blocks, block_size, d_r)); a sequence's block table lists its blocks in order, so its key at slot s
sits in block table[s // block_size], row s % block_size. A slot is the token's position unless a KV policy
evicted keys (lmforge.infer.kv.policy: `compact` moves the kept ones to the first slots, in position order,
or, for a policy with ordered_slots = False, fills evicted slots with surviving tail keys in any order; keys
are stored after RoPE, so they keep their positions; full attention over a sequence's earlier slots is
the same in any slot order). The engine's forward is one flat
row of N new tokens (lmforge.model.meta.AttnMetadata): every layer first writes the N new keys at their
slots, then attends
  decode tokens (the first meta.num_decodes sequences, one query each): batched, through the Triton
      paged decode kernel when lmforge.kernels.paged_attention is importable on a CUDA device, else
      through `paged_decode_reference` (gather every block of the batch, then masked attention);
  prefill chunks: all of a step's chunks in one call of the Triton FlashAttention-2 kernel in varlen
      form (`prefill="kernel"`, or "auto" on a CUDA device when the kernel takes the layer's shapes):
      the queries packed by cu_seqlens_q, the keys of every chunk's context gathered from the blocks in
      one index (or the fresh keys themselves when every chunk is a whole prompt) and packed by
      cu_seqlens_k; else (`prefill="reference"`, a probs hook, a tree, or no kernel) one sequence at a
      time, over the fresh keys when the chunk is the whole context, else over its gathered blocks.
Sequence i's queries are its last query_lens[i] keys: the mask is `contiguous_mask` over its context
(bottom-right causal), narrowed by `tree_visible` for the last meta.tree_size(i, n) of them when
meta.tree_parents lays a candidate tree there (a speculative chunk: pending token + token tree).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.model.cache import CacheSpec, _Hooked, contiguous_mask
from lmforge.model.layers.attention import AttnSpec, attend_with, tree_visible, visible
from lmforge.utils import to_device


DECODE = ("auto", "kernel", "reference")
PREFILL = DECODE
LATENT_KERNEL_AUTO = True
"""whether decode 'auto' takes MLA's Triton latent kernel on a GPU: on since its H200 run of 2026-12-05 (42/42 tests; the
engine in fp32, kernel vs reference: equal greedy tokens, log-probs within 3.3e-6; 2-3.8x the gathered path per call;
docs/benchmarks.md); decode_attention='reference' keeps the gathered path"""


def decode_kernel(device: torch.device, mode: str = "auto", module: str = "paged_attention"):
    """The Triton paged decode kernel for mode 'kernel' (an error if it cannot be imported; on a CPU it
    runs in Triton's interpreter) and for 'auto' on a CUDA device when importable; None = the reference.
    module: lmforge.kernels.paged_attention (K/V caches) or paged_latent (MLA's latents: LATENT_KERNEL_AUTO)."""
    if mode == "reference" or (mode == "auto" and (device.type != "cuda" or
                                                   module == "paged_latent" and not LATENT_KERNEL_AUTO)):
        return None
    try:
        if module == "paged_latent":
            from lmforge.kernels.paged_latent import paged_latent_attention as kernel
        else:
            from lmforge.kernels.paged_attention import paged_decode_attention as kernel
    except ImportError:
        if mode == "kernel":
            raise LmforgeError(f"decode_attention='kernel' needs lmforge.kernels.{module} and triton "
                               "(pip install 'lmforge[kernels]')") from None
        return None
    return kernel


def prefill_kernel(device: torch.device, mode: str = "auto"):
    """The Triton FlashAttention-2 kernel (varlen) for prefill chunks, chosen like `decode_kernel`."""
    if mode not in PREFILL:
        raise LmforgeError(f"prefill attention must be one of {PREFILL}, got {mode!r}")
    if mode == "reference" or (mode == "auto" and device.type != "cuda"):
        return None
    from lmforge.kernels import flash_attention as fa

    if fa.triton is None:
        if mode == "kernel":
            raise LmforgeError("prefill attention 'kernel' needs triton (pip install 'lmforge[kernels]')")
        return None
    return fa


def gather(pool: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
    """The first n slots of a sequence: pool (num_blocks, block_size, ...) and its table row -> (n, ...)."""
    bs = pool.shape[1]
    return pool[table[: -(-n // bs)].long()].flatten(0, 1)[:n]


def decode_mask(context_lens: torch.Tensor, n_keys: int, window: int, first_key: int = 0,
                tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, 1, 1, n_keys): decode query b (at position context_lens[b] - 1) sees its gathered keys (none
    before slot first_key but its own: PagedCache.first_key; tree: AttnMetadata.tree_rows, the rows' tree
    slots only where their bits say)."""
    k_pos = torch.arange(n_keys, device=context_lens.device)
    q_pos = (context_lens.long() - 1)[:, None]
    seen = visible(q_pos, k_pos, window)
    if tree is not None:  # bit i of a row's bits: tree slot start + i is its ancestor (or itself)
        rel = k_pos - tree[0][:, None, None]  # (B, 1, n_keys), as `visible` gives
        seen = seen & ((rel < 0) | ((tree[1][:, None, None] >> rel.clamp(0, 62)) & 1).bool())
    if first_key:
        seen = seen & ((k_pos >= first_key) | (k_pos == q_pos[..., None]))
    return seen[:, None]


def gather_blocks(cache: torch.Tensor, block_tables: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A pool (num_blocks, block_size, KV, hd) read through block_tables (B, max_blocks) -> (KV·B, S, hd) in
    `dtype`: whole blocks gathered along the pool's first dim (index_select: 2.5-3.4x faster on a CPU than
    indexing a permuted view, 2026-12-05), then laid out (KV, B, S, hd), so (KV·B) is one batch dim of both
    attention products; a cache kept narrower than the compute (bf16 or fp8 keys under an fp32 model) is read
    in the compute's dtype, as prefill does."""
    B, (KV, hd) = block_tables.shape[0], cache.shape[2:]
    blocks = cache.index_select(0, block_tables.flatten().long())
    return blocks.view(B, -1, KV, hd).permute(2, 0, 1, 3).reshape(KV * B, -1, hd).to(dtype)


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, *, scale: float,
                           softcap: float = 0.0, window: int = 0, sinks: torch.Tensor | None = None,
                           probs_hook=None, first_key: int = 0, tree=None, mask: torch.Tensor | None = None
                           ) -> torch.Tensor:
    """Plain gather-then-attend: q (B, H, hd), caches (num_blocks, block_size, KV, hd), block_tables
    (B, max_blocks) int32, context_lens (B,) int32 -> (B, H, hd). Same signature as the kernel (tree: rows of
    a token tree, AttnMetadata.tree_rows), plus mask: these arguments' `decode_mask` where the caller built it
    already (once per step for every layer: PagedKVCache.attend).
    Each kv head's G = H / KV query heads are one (G, hd) @ (hd, S) product, so keys are gathered once
    and never repeated per query head (math_attention's repeat would double the bytes at GQA 2:1)."""
    B, H, hd = q.shape
    KV = k_cache.shape[2]
    k, v = (gather_blocks(c, block_tables, q.dtype) for c in (k_cache, v_cache))
    qg = q.view(B, KV, H // KV, hd).transpose(0, 1).reshape(KV * B, H // KV, hd)
    s = torch.bmm(qg, k.transpose(1, 2)).float().view(KV, B, H // KV, -1) * scale  # (KV, B, G, S)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if mask is None:
        mask = decode_mask(context_lens, s.shape[-1], window, first_key, tree)
    s = s.masked_fill(~mask[None, :, 0], float("-inf"))
    if sinks is not None:  # one extra logit per head, dropped after the softmax
        sink = sinks.float().view(1, KV, H // KV, 1).transpose(0, 1).expand(-1, B, -1, 1)
        p = torch.softmax(torch.cat((s, sink), dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(s, dim=-1)
    if probs_hook is not None:
        probs_hook(p.transpose(0, 1).reshape(B, H, 1, -1))
    out = torch.bmm(p.to(v.dtype).view(KV * B, H // KV, -1), v)  # (KV·B, G, hd)
    return out.view(KV, B, H // KV, hd).transpose(0, 1).reshape(B, H, hd)


def _tree_rows(meta, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """meta.tree_rows of decode rows lo .. hi - 1 (None: no tree rows)."""
    return None if meta.tree_rows is None else (meta.tree_rows[0][lo:hi], meta.tree_rows[1][lo:hi])


FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def _raw(t: torch.Tensor) -> torch.Tensor:
    """fp8 pools as their bytes: index_copy_ has no fp8 kernel (CPU, torch 2.13); moving bytes is the same move."""
    return t.view(torch.uint8) if t.dtype in FP8 else t


def pool_zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape), zeroed lazily on a CPU: numpy's zeros come from calloc, whose pages the OS maps as
    zeros and backs only when first written, so a pool sized for the worst case (up to 1 GiB) costs neither
    the 1-2 s that torch.zeros takes to write every byte nor resident memory until blocks are used. Dtypes numpy
    lacks (bf16, fp8) are allocated as integers of their width: all-zero bytes read as +0.0 in every float dtype."""
    if device.type != "cpu":
        return torch.zeros(shape, device=device, dtype=dtype)
    alias = {torch.bfloat16: torch.int16, **{t: torch.uint8 for t in FP8}}.get(dtype, dtype)
    return torch.from_numpy(np.zeros(shape, dtype=torch.empty(0, dtype=alias).numpy().dtype)).view(dtype)


def check_cache_dtype(dtype: torch.dtype) -> None:
    """K/V pools hold floats read as they are: an integer dtype would silently truncate keys on write."""
    if not dtype.is_floating_point:
        raise LmforgeError(f"a paged K/V cache keeps floating-point keys and values, got dtype={dtype}: fp32, bf16, "
                           "fp16 or fp8 (read in the compute dtype); int8/int4 KV needs a store with scales")


def as_kept(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t as a cache of `dtype` keeps it, in t's dtype: a step's own new keys and values are attended rounded
    as the cache holds them, so a prompt computed whole, in chunks or read back after a prefix hit sees the
    same numbers (a cache narrower than the model: EngineConfig.kv_cache_dtype)."""
    return t if t.dtype == dtype else t.to(dtype).to(t.dtype)


class PagedCache(_Hooked):
    """The base of paged cache kinds (PagedKVCache, PagedLatentCache, a CacheStore's own): `attend` (or
    `attend_latent`) per layer, `pools()` / `layer_pools()` (the tensors copy_blocks, move_slots and compact
    move slot by slot: override them where a kind keeps per-block data, e.g. quantization scales),
    `block_size`, `num_blocks`, `device`, `kernel` (None: no decode kernel reads it)."""

    kernel = None
    first_key = 0
    """keys at slots below this are never attended, but by the query at that very slot (a cache whose first
    entries hold no real key: an EAGLE head's begin entry, lmforge.infer.draft.PagedDraftHead); > 0 runs
    the reference attention paths (the kernels do not take it)"""

    def _kernel(self, kernel, args, kw, which: str = "kernel") -> torch.Tensor | None:
        """The kernel's output; None (and the reference from now on, with a warning) if it fails to run.
        which: the attribute holding it ("kernel": decode, "prefill_kernel")."""
        try:
            return kernel(*args, **kw)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot compile here must not stop serving
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise  # inside a graph capture: the capture's own fallback handles it
            setattr(self, which, None)
            name = "decode kernel" if which == "kernel" else "prefill kernel"
            warnings.warn(f"paged {name} failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                          "using the reference attention", stacklevel=3)
            return None

    @staticmethod
    def _write(pool: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> None:
        """new (N, ...) -> pool slots (flat index block * block_size + offset)."""
        _raw(pool.view(-1, *pool.shape[2:])).index_copy_(0, slots, _raw(new.to(pool.dtype)))

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy-on-write: block src's contents into block dst, in every layer's pools."""
        if not pairs:
            return
        src, dst = to_device([[s for s, _ in pairs], [d for _, d in pairs]], self.device)
        for pool in map(_raw, self.pools()):
            pool.index_copy_(0, dst, pool.index_select(0, src))

    def move_slots(self, src: list[int], dst: list[int]) -> None:
        """Copy the keys/values (latents) at flat slots src to slots dst in every layer: compacts a tree
        step's accepted path (lmforge.model.meta.accepted_slots)."""
        if not src:
            return
        s, d = to_device([src, dst], self.device)
        for pool in map(_raw, self.pools()):
            flat = pool.view(-1, *pool.shape[2:])
            flat.index_copy_(0, d, flat.index_select(0, s))

    def compact(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """KV-policy eviction (lmforge.infer.kv.policy): the keys/values (latents) at flat slots src move to
        flat slots dst. src (M,) for every layer and head alike, or (L, heads, M) per layer and kv head
        (heads 1: the layer's every head; latent caches have one); dst (M,) for every layer and head alike,
        or (L, heads, M) like src (an unordered compaction fills each head's own evicted slots). Everything
        moved is read before anything is written (one gather and one write per pool), so sources and
        destinations may overlap."""
        for layer, pools in enumerate(self.layer_pools()):
            s = src if src.dim() == 1 else src[layer]
            d = dst if dst.dim() == 1 else dst[layer]
            rows = s.dim() == 1 or s.shape[0] == 1  # whole rows: every head of a slot alike
            heads = None if rows else torch.arange(s.shape[0], device=s.device)
            for pool in map(_raw, pools):
                flat = pool.view(-1, *pool.shape[2:])  # (slots, KV, hd) or (slots, r)
                if rows:
                    moved = flat.index_select(0, s.reshape(-1))
                else:  # (M, KV, hd): kv head h's keys from its own slots s[h]
                    moved = flat[s.t(), heads]
                if d.dim() == 1 or (rows and d.shape[0] == 1):
                    flat.index_copy_(0, d.reshape(-1), moved)
                else:  # kv head h's keys to its own slots d[h]
                    flat.index_put_((d.t(), heads), moved)

    def compacted(self, seq_id: int, keep, old_num_slots: int) -> None:
        """A KV policy compacted sequence seq_id (lmforge.infer.kv.policy), after its keys moved: of its
        old_num_slots slots, new slot i holds the key of old slot keep[..., i] (KVPolicy.compacted's form: a host
        list, or an (L, heads, K) tensor on the device). Called for every applied plan, also when nothing was
        copied (whole blocks changed hands in the block table). For a cache that keeps per-sequence state by
        slot (a store's full-precision buffer of recent keys); the built-in caches keep none."""

    def key_pools(self) -> list[torch.Tensor]:
        """The pools holding rotated (RoPE) keys, one per layer (`rotate_keys`); none by default."""
        return []

    def rotate_keys(self, slots: torch.Tensor, delta: torch.Tensor, rotate) -> None:
        """Turn the keys at flat slots (M,) by delta (M,) positions in every layer (a KV policy re-assigning
        positions within the cache: lmforge.infer.kv.policy); rotate(keys, delta) is the model's key_rotation().
        Computed in fp32 and written back in the pool's dtype (each turn rounds the key once more)."""
        for pool in self.key_pools():
            flat = _raw(pool.view(-1, *pool.shape[2:]))
            keys = flat.index_select(0, slots).view(pool.dtype).float()
            flat.index_copy_(0, slots, _raw(rotate(keys, delta).to(pool.dtype)))

    def hook_for(self, layer: int, seq_ids: tuple[int, ...]):
        """The score hook of one call of attention whose probability rows are these sequences' (a decode
        group's rows, or one prefill chunk): `hook_seq_ids` names them while the hook runs."""
        if self.score_hook is None:
            return None

        def hook(p: torch.Tensor) -> None:
            self.hook_seq_ids = seq_ids
            self.score_hook(layer, p)
        return hook

    hook_seq_ids: tuple[int, ...] = ()
    """the engine's ids of the sequences whose rows the score hook's current call receives (a KV policy
    splits its observations by them: lmforge.infer.kv.policy)"""

    @staticmethod
    def _prefills(meta):
        """(sequence index, query start, query count, context length) of each prefill chunk."""
        cu = meta.cu_seqlens_q
        for i in range(meta.num_decodes, len(meta.query_lens_host)):
            yield i, cu[i], meta.query_lens_host[i], meta.context_lens_host[i]

    @staticmethod
    def _chunk_mask(meta, i: int, start: int, n: int, ctx: int, window: int, device):
        """Sequence i's prefill chunk's mask: its n queries are the last n of its ctx keys, a causal chain
        whose last meta.tree_size(i, n) tokens may form a tree (a speculative chunk: pending token + tree)."""
        t = meta.tree_size(i, n)
        if t == 0:
            return contiguous_mask(n, ctx, window, device)

        def build() -> torch.Tensor:  # (n, ctx): the chain's rows, then the tree's
            parents = meta.parents_for(len(meta.slot_mapping))[0, start + n - t:start + n].to(device)
            tree = tree_visible(parents, ctx, window)
            if t == n:
                return tree
            slots = torch.arange(ctx, device=device)  # a chain token's slot is its position
            return torch.cat((visible(slots[ctx - n:ctx - t], slots, window), tree))
        return meta.derived(("tree", start, ctx, window), build)  # built by the first layer, kept for the rest


def _skip_first(mask, n: int, ctx: int, first: int, device) -> torch.Tensor:
    """A chunk's mask (None, "causal" or (n, ctx) bool; its n queries at slots ctx - n ..) without the keys
    below slot `first`, but each query's own (PagedCache.first_key)."""
    j, own = torch.arange(ctx, device=device), torch.arange(ctx - n, ctx, device=device)[:, None]
    base = (j <= own) if mask is None or isinstance(mask, str) else mask
    return base & ((j >= first) | (j == own))


def prefill_layout(meta, block_size: int) -> dict:
    """The step's prefill chunks packed for a varlen kernel, built once per forward (meta.derived):
    cu_q/cu_k (P + 1,) int32 offsets of each chunk's queries (from the first prefill token) and of its
    keys, their longest query count, and `slots` (sum of context lengths,) the cache slot of every key
    of every chunk's context, in order (None when every chunk is a whole prompt: its keys are the fresh
    ones). One device index per step gathers all chunks' keys; only host lengths are read."""
    def build() -> dict:
        nd, dev = meta.num_decodes, meta.block_tables.device
        qlens, ctx = meta.query_lens_host[nd:], meta.context_lens_host[nd:]
        cu_q = torch.tensor([0, *qlens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        cu_k = torch.tensor([0, *ctx], dtype=torch.int32).cumsum(0, dtype=torch.int32)
        slots = None
        # host tensors reach the device without a stream sync (lmforge.utils.to_device)
        cu_q, cu_k = to_device(cu_q, dev), to_device(cu_k, dev)
        if qlens != ctx:
            total = sum(ctx)
            seq = torch.repeat_interleave(torch.arange(len(ctx), device=dev), to_device(list(ctx), dev),
                                          output_size=total)  # the chunk each key belongs to
            pos = torch.arange(total, device=dev) - cu_k.long()[seq]  # its position in the chunk
            slots = meta.block_tables[nd:].long()[seq, pos // block_size] * block_size + pos % block_size
        return dict(cu_q=cu_q, cu_k=cu_k, longest=max(qlens), slots=slots)
    return meta.derived("prefill", build)


class PagedKVCache(PagedCache):
    """prefill: how prefill chunks attend, 'auto' | 'kernel' | 'reference' (module docstring)."""

    decodes_tree_rows = True
    """decode rows with AttnMetadata.tree_rows are masked by them (the Triton decode kernel and the reference)"""
    attends_varlen = True
    """a step with AttnMetadata.varlen_tiles attends from device metadata alone (the varlen kernel where the decode
    kernel runs, else its reference): the CUDA graphs of steps holding prefill chunks (lmforge.infer.graphs)"""

    def __init__(self, spec: CacheSpec, num_blocks: int, block_size: int, device=None, dtype=None,
                 decode: str = "auto", prefill: str = "auto"):
        dtype = dtype or spec.dtype
        check_cache_dtype(dtype)
        self.block_size, self.num_blocks, self.device = block_size, num_blocks, torch.device(device or "cpu")
        # (a cache narrower than the model, EngineConfig.kv_cache_dtype: the kernels read it in q's dtype)
        self.kernel = decode_kernel(self.device, decode)  # resolved once: no import per layer call
        self.prefill_kernel, self.prefill_mode = prefill_kernel(self.device, prefill), prefill
        shape = lambda l: (num_blocks, block_size, l.kv_heads, l.head_dim)  # noqa: E731
        self.k = [pool_zeros(shape(l), self.device, dtype) for l in spec.layers]
        self.v = [pool_zeros(shape(l), self.device, dtype) for l in spec.layers]

    def pools(self) -> list[torch.Tensor]:
        return self.k + self.v

    def key_pools(self) -> list[torch.Tensor]:
        return [k for k in self.k if k.numel()]  # (a hybrid's state layers hold no keys)

    def layer_pools(self) -> list[tuple[torch.Tensor, ...]]:
        return list(zip(self.k, self.v))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttnSpec, meta
               ) -> torch.Tensor:
        """q (1, H, N, hd), k/v (1, KV, N, hd) of the step's flat row -> (1, H, N, hd)."""
        kc, vc = self.k[layer], self.v[layer]
        k, v = as_kept(k, kc.dtype), as_kept(v, vc.dtype)
        self._write(kc, k[0].transpose(0, 1), meta.slot_mapping)
        self._write(vc, v[0].transpose(0, 1), meta.slot_mapping)
        if meta.varlen_tiles is not None:
            return self._varlen(q, kc, vc, spec, meta)
        out = torch.empty_like(q)
        nd, hook = meta.num_decodes, self._probs_hook(layer)
        kernel = self.kernel if hook is None and not self.first_key else None
        kw = dict(scale=spec.scale, softcap=spec.softcap, window=spec.window, sinks=spec.sinks)
        # the kernel reads each row's own keys; the reference gathers a group's widest table, so it runs
        # over groups of rows of similar context length (meta.decode_groups)
        groups = meta.groups() if kernel is None or not nd else ((0, nd, meta.block_tables.shape[1]),)
        for lo, hi, width in groups:
            qd = q[0, :, lo:hi].transpose(0, 1).contiguous()  # (rows, H, hd)
            args = (qd, kc, vc, meta.block_tables[lo:hi, :width], meta.context_lens[lo:hi])
            tree = _tree_rows(meta, lo, hi)  # (rows of a token tree: their ancestor bits)
            od = self._kernel(kernel, args, kw if tree is None else {**kw, "tree": tree}) if kernel is not None else None
            if od is None:
                rows_hook = hook and self.hook_for(layer, meta.seq_ids_host[lo:hi])
                n_keys, first = width * self.block_size, self.first_key  # built once per step, window and group
                mask = meta.derived(("decode_mask", lo, hi, n_keys, spec.window, first),
                                    lambda: decode_mask(args[4], n_keys, spec.window, first, tree))
                od = paged_decode_reference(*args, **kw, probs_hook=rows_hook, first_key=first, tree=tree, mask=mask)
            out[0, :, lo:hi] = od.transpose(0, 1)
        if nd < len(meta.query_lens_host):
            self._prefill(layer, q, k, v, spec, meta, out, hook)
        return out

    def _varlen(self, q, kc, vc, spec: AttnSpec, meta) -> torch.Tensor:
        """Every token of the row as a query of its chunk, from device metadata alone (AttnMetadata.varlen_tiles):
        the varlen kernel where the decode kernel runs, else its reference (no score hook: such steps never
        replay graphs)."""
        from lmforge.kernels.paged_varlen import paged_varlen_attention, paged_varlen_reference

        if self.first_key:
            raise LmforgeError("a cache with first_key > 0 (a draft head's) has no varlen path")
        cu, tile_seq, tile_q0 = meta.varlen_tiles
        args = (q[0].transpose(0, 1).contiguous(), kc, vc, meta.block_tables, cu, meta.context_lens)
        kw = dict(scale=spec.scale, softcap=spec.softcap, window=spec.window, sinks=spec.sinks)
        out = self._kernel(paged_varlen_attention, (*args, (tile_seq, tile_q0)), kw) if self.kernel else None
        if out is None:
            out = paged_varlen_reference(*args, **kw)
        return out.transpose(0, 1)[None]

    def _prefill(self, layer: int, q, k, v, spec: AttnSpec, meta, out: torch.Tensor, hook) -> None:
        """Every prefill chunk of the step: one varlen kernel call, or the per-sequence reference."""
        kc, vc, nd = self.k[layer], self.v[layer], meta.num_decodes
        fa = self.prefill_kernel if hook is None and meta.tree_parents is None and not self.first_key else None
        if fa is not None:
            reason = fa.unsupported(q, k, v)
            if reason is not None and self.prefill_mode == "kernel":
                raise LmforgeError(f"prefill attention 'kernel': {reason}")
            fa = None if reason is not None else fa
        if fa is not None:
            lay = prefill_layout(meta, self.block_size)
            if lay["slots"] is None:
                ki, vi = k[:, :, nd:], v[:, :, nd:]
            else:  # (1, KV, sum ctx, hd) views of one gather per pool
                ki = kc.view(-1, *kc.shape[2:])[lay["slots"]].to(q.dtype)[None].transpose(1, 2)
                vi = vc.view(-1, *vc.shape[2:])[lay["slots"]].to(q.dtype)[None].transpose(1, 2)
            kw = dict(causal=True, scale=spec.scale, window=spec.window, softcap=spec.softcap, sinks=spec.sinks,
                      cu_seqlens=lay["cu_q"], max_seqlen=lay["longest"], cu_seqlens_k=lay["cu_k"])
            o = self._kernel(fa.flash_attention, (q[:, :, nd:], ki, vi), kw, "prefill_kernel")
            if o is not None:
                out[:, :, nd:] = o
                return
        for i, start, n, ctx in self._prefills(meta):
            if ctx == n:  # a whole prompt: its keys are the fresh ones
                ki, vi = k[:, :, start:start + n], v[:, :, start:start + n]
            else:
                ki = gather(kc, meta.block_tables[i], ctx).transpose(0, 1)[None].to(q.dtype)
                vi = gather(vc, meta.block_tables[i], ctx).transpose(0, 1)[None].to(q.dtype)
            mask = self._chunk_mask(meta, i, start, n, ctx, spec.window, q.device)
            if self.first_key:
                mask = _skip_first(mask, n, ctx, self.first_key, q.device)
            hook_i = hook and self.hook_for(layer, meta.seq_ids_host[i:i + 1])
            out[:, :, start:start + n] = attend_with(q[:, :, start:start + n], ki, vi, mask, spec, hook_i)


class PagedLatentCache(PagedCache):
    """MLA's latents in blocks: decode tokens attend through the absorbed path (MQA over latents: the Triton
    kernel lmforge.kernels.paged_latent where `decode` resolves to it, else the model's own absorbed math over
    gathered latents), prefill chunks through the per-head expansion (lmforge.model.layers.mla), one sequence
    at a time (`prefill` is accepted for the common signature: MLA's query/key width differs from its value
    width, which the flash kernel does not take). A step with AttnMetadata.varlen_tiles (the CUDA graphs of
    steps holding prefill chunks) attends every token through the absorbed path from device metadata alone."""

    decodes_tree_rows = True
    """decode rows with AttnMetadata.tree_rows: their mask (absorbed path)"""
    attends_varlen = True
    """steps with AttnMetadata.varlen_tiles: paged_latent_attention's varlen rows (or its reference)"""

    def __init__(self, spec: CacheSpec, num_blocks: int, block_size: int, device=None, dtype=None,
                 decode: str = "auto", prefill: str = "auto"):
        dtype = dtype or spec.dtype
        check_cache_dtype(dtype)
        self.block_size, self.num_blocks, self.device = block_size, num_blocks, torch.device(device or "cpu")
        self.kernel = decode_kernel(self.device, decode, "paged_latent")
        self.c = [pool_zeros((num_blocks, block_size, l.latent_rank), self.device, dtype) for l in spec.layers]
        self.kr = [pool_zeros((num_blocks, block_size, l.rope_dim), self.device, dtype) for l in spec.layers]

    def pools(self) -> list[torch.Tensor]:
        return self.c + self.kr

    def key_pools(self) -> list[torch.Tensor]:
        return self.kr  # (the latents carry no position)

    def layer_pools(self) -> list[tuple[torch.Tensor, ...]]:
        return list(zip(self.c, self.kr))

    def attend_latent(self, layer: int, mla, q_nope, q_rope, c_kv, k_rope, spec: AttnSpec, meta) -> torch.Tensor:
        """q_nope/q_rope (1, H, N, .), c_kv (1, N, r), k_rope (1, 1, N, d_r) -> (1, H, N, d_v)."""
        cc, kc = self.c[layer], self.kr[layer]
        c_kv, k_rope = as_kept(c_kv, cc.dtype), as_kept(k_rope, kc.dtype)
        self._write(cc, c_kv[0], meta.slot_mapping)
        self._write(kc, k_rope[0, 0], meta.slot_mapping)
        if meta.varlen_tiles is not None:
            return self._varlen(layer, mla, q_nope, q_rope, spec, meta)
        out = q_nope.new_empty(*q_nope.shape[:3], mla.d_v)
        nd, hook = meta.num_decodes, self._probs_hook(layer)
        if nd:
            od = None
            if self.kernel is not None and hook is None and not self.first_key:
                ql = mla.absorb_query(q_nope[0, :, :nd].transpose(0, 1)).contiguous()  # (nd, H, r)
                qr = q_rope[0, :, :nd].transpose(0, 1).contiguous()
                kw = dict(scale=spec.scale, softcap=spec.softcap, window=spec.window, tree=_tree_rows(meta, 0, nd))
                lat = self._kernel(self.kernel, (ql, qr, cc, kc, meta.block_tables[:nd], meta.context_lens[:nd]), kw)
                od = None if lat is None else mla.expand_latent(lat).transpose(0, 1)  # (H, nd, d_v)
            if od is not None:
                out[0, :, :nd] = od
            # else the model's absorbed math over gathered latents, per group of rows of similar context length
            # (meta.decode_groups: a group gathers its widest table, not the batch's)
            for lo, hi, width in (meta.groups() if od is None else ()):
                tables = meta.block_tables[lo:hi, :width].long()
                c = cc[tables].flatten(1, 2).to(c_kv.dtype)  # (rows, S, r)
                kr = kc[tables].flatten(1, 2).to(c_kv.dtype)[:, None]  # (rows, 1, S, d_r)
                mask = decode_mask(meta.context_lens[lo:hi], c.shape[1], spec.window, self.first_key,
                                   _tree_rows(meta, lo, hi))
                qn = q_nope[0, :, lo:hi].transpose(0, 1)[:, :, None]
                qr = q_rope[0, :, lo:hi].transpose(0, 1)[:, :, None]
                hook_d = hook and self.hook_for(layer, meta.seq_ids_host[lo:hi])
                out[0, :, lo:hi] = mla.absorbed(qn, qr, c, kr, mask, spec, hook_d)[:, :, 0].transpose(0, 1)
        for i, start, n, ctx in self._prefills(meta):
            if ctx == n:
                c, kr = c_kv[:, start:start + n], k_rope[:, :, start:start + n]
            else:
                c = gather(cc, meta.block_tables[i], ctx)[None].to(c_kv.dtype)
                kr = gather(kc, meta.block_tables[i], ctx)[None, None].to(c_kv.dtype)
            mask = self._chunk_mask(meta, i, start, n, ctx, spec.window, q_nope.device)
            if self.first_key:
                mask = _skip_first(mask, n, ctx, self.first_key, q_nope.device)
            sl = slice(start, start + n)
            hook_i = hook and self.hook_for(layer, meta.seq_ids_host[i:i + 1])
            out[:, :, sl] = mla.naive(q_nope[:, :, sl], q_rope[:, :, sl], c, kr, mask, spec, hook_i)
        return out

    def _varlen(self, layer: int, mla, q_nope, q_rope, spec: AttnSpec, meta) -> torch.Tensor:
        """Every token of the row as a query of its chunk through the absorbed path, from device metadata alone
        (AttnMetadata.varlen_tiles): the kernel's varlen rows where the decode kernel runs, else its reference."""
        from lmforge.kernels.paged_latent import latent_rows, paged_latent_attention, paged_latent_reference

        if self.first_key:
            raise LmforgeError("a cache with first_key > 0 (a draft head's) has no varlen path")
        cu = meta.varlen_tiles[0]
        ql = mla.absorb_query(q_nope[0].transpose(0, 1)).contiguous()  # (N, H, r)
        qr = q_rope[0].transpose(0, 1).contiguous()
        args = (ql, qr, self.c[layer], self.kr[layer], meta.block_tables, meta.context_lens)
        kw = dict(scale=spec.scale, softcap=spec.softcap, window=spec.window, cu_q=cu)
        if self.kernel:  # each row's (sequence, own slot), once per step for every layer
            rows = meta.derived("latent_rows", lambda: latent_rows(meta.block_tables, meta.context_lens, cu, len(ql)))
            lat = self._kernel(paged_latent_attention, args, {**kw, "rows": rows})
        else:
            lat = None
        if lat is None:
            lat = paged_latent_reference(*args, **kw)
        return mla.expand_latent(lat).transpose(0, 1)[None]


class CacheStore:
    """How the engine's paged cache keeps keys and values (EngineConfig.kv_cache). None there = the
    default: PagedKVCache / PagedLatentCache at EngineConfig.kv_cache_dtype. A store for quantized or
    compressed K/V (per-token int8 with scales, KIVI, Lexico's sparse codes) subclasses this:
      build(spec, num_blocks, block_size, device, dtype, decode, prefill, max_seqs) -> its cache object (a
                                    PagedCache); max_seqs: the most sequences running at once (rows of its
                                    per-sequence state)
      bytes_per_token(spec, dtype)  what a token takes in the pool: the engine sizes it by this
      bytes_per_sequence(spec, dtype)  what one sequence's own state takes beside its blocks (a buffer of
                                    recent keys in full precision: Lexico, KIVI's residual); the pool's budget
                                    leaves max_num_seqs of it aside (config.pool_blocks). Default 0
      unsupported(feature)          why it cannot serve a feature, or None: 'kernel_step' (the batch-1 Triton
                                    step reads K/V pools itself), 'cuda_graphs', 'kv_policy' (compaction moves
                                    slots one by one), 'prefix_caching', 'draft' (speculative decoding rewinds
                                    slots); the engine refuses an explicit request for one with this reason
                                    and leaves the default-on ones off
    and opts in, by class attribute, to what its cache must be written for:
      graph_safe = True        its attend computes right on CUDA-graph steps (lmforge.infer.graphs). Those
                               replay one captured forward, so AttnMetadata carries device tensors only
                               (slot_mapping, block_tables, context_lens, positions); its host fields are
                               placeholders fixed at capture: query_lens_host = context_lens_host = (1,) * B'
                               (B' the padded bucket), seq_ids_host = () - no sequence ids, so per-sequence
                               state keyed by them is not found. False (default): graphs stay off, and
                               cuda_graphs=True is a one-line error
      calls_score_hook = True  its attend passes self.hook_for(layer, seq_ids) (PagedCache) as the probability
                               hook of each attention it computes (a decode group's rows, each prefill chunk),
                               as PagedKVCache.attend does; a KV policy with needs_scores (H2O, SnapKV) is
                               refused without it
    Its cache is told of per-sequence events (keyed by AttnMetadata.seq_ids_host): fork(parent, child),
    release(seq_id), preempt(seq_id) where it has them (Engine._cache_event), and a KV policy's compactions
    (PagedCache.compacted(seq_id, keep, old_num_slots), after the keys moved, also when only block-table entries
    changed hands). A policy selects slots; compressing what a slot holds is the store's business
    (docs/kv_policies.md). Steps holding prefill chunks run eagerly with a store (its attend never sees
    AttnMetadata.varlen_tiles). Models with recurrent-state layers keep the default cache."""

    graph_safe: bool = False
    """its cache reads only device metadata where a CUDA-graph step runs it (above); False keeps graphs off"""
    calls_score_hook: bool = False
    """its cache's attend calls the score hook (hook_for) as the built-in caches do; False refuses policies
    with needs_scores"""

    def build(self, spec: CacheSpec, num_blocks: int, block_size: int, device, dtype, decode: str, prefill: str,
              max_seqs: int):
        raise NotImplementedError

    def bytes_per_token(self, spec: CacheSpec, dtype: torch.dtype) -> int:
        return spec.bytes_per_token(dtype)

    def bytes_per_sequence(self, spec: CacheSpec, dtype: torch.dtype) -> int:
        return 0

    def unsupported(self, feature: str) -> str | None:
        return None


def new_paged_cache(spec: CacheSpec, num_blocks: int, block_size: int, device=None, dtype=None,
                    decode: str = "auto", prefill: str = "auto", max_seqs: int = 256, store: CacheStore | None = None):
    """max_seqs: the most sequences running at once (rows of recurrent state, models with state layers; a store's
    per-sequence state); store: a CacheStore that builds the cache instead of the default kinds."""
    if store is not None:
        dtype = dtype or spec.dtype
        return store.build(spec, num_blocks, block_size, device, dtype, decode, prefill, max_seqs=max_seqs)
    if spec.has_state:  # Mamba / hybrids: state rows beside the blocks, one cache object (lmforge.infer.kv.state)
        from lmforge.infer.kv.state import new_state_cache

        return new_state_cache(spec, num_blocks, block_size, device, dtype, decode, prefill, max_seqs)
    kind = PagedLatentCache if spec.latent else PagedKVCache
    return kind(spec, num_blocks, block_size, device, dtype, decode, prefill)
