"""AttnMetadata: how the tokens of one forward are laid out, passed explicitly down the model.

The model never keeps layout in module state (nano-vllm's global `Context` is the counter-example): the
caller builds one `AttnMetadata` per forward and passes it as `model(ids, positions, cache=..., meta=...)`;
every attention layer hands it, with its q, k, v, to the cache (or to the cache-free attention used in
training), which is the one place that turns it into masks.

Two layouts use it:
  packed training rows   doc_ids (B, T): a token attends only to earlier tokens of its own document, so
                         a packed row gives the per-token outputs of its documents run one by one, provided
                         positions restart at 0 per document (`packed_positions`).
  the engine's varlen row  one flattened row (1, N) holding, back to back, the new tokens of several
                         sequences (vLLM / nano-vllm layout): decode tokens first (one each), then prefill
                         chunks. Sequence i owns query tokens [cu_seqlens_q[i], cu_seqlens_q[i+1]) and, after
                         this step's keys are written, context_lens[i] keys in the paged cache, found
                         through block_tables[i]; its queries are its last query_lens[i] keys (slots
                         context_lens[i] - query_lens[i] ...; slots are positions unless a KV policy evicted
                         keys, and then need not be in position order: lmforge.infer.kv.policy; queries keep
                         their positions in `positions`).
                         slot_mapping gives each new token's flat cache
                         slot (block * block_size + offset). Host-side copies of the lengths (`*_host`)
                         let caches loop over sequences without reading the device.
logits_indices (either layout): flat indices into the B*T tokens where logits are wanted; the model
applies its output head only there (a prefill then never materialises T x V logits).

Tree attention (Medusa, Cai et al. 2024 §2.1.2; EAGLE, Li et al. 2024): `tree_parents` lays a tree over
each sequence's new tokens, so one forward scores several candidate continuations. Token t's parent is
the index of another new token of its sequence (always an earlier one: trees are stored in topological
order), or -1 when t hangs off the context's last token. A new token sees the whole context and its own
ancestors among the new tokens (itself included), never its siblings or cousins; its position is the
context length plus its depth (`tree_positions`), which the caller passes as the model's positions.
Every attention kind (the cache-free DENSE, the contiguous KVCache, the paged caches' reference path)
turns this into its mask with `attention.tree_visible`, the window measured on those positions. Each
node's logits are then those of its root-to-node branch run alone.
A speculative step with a tree: (1) write the context's pending token and the candidate tree in one
forward, meta.tree_parents = the tree, positions = tree_positions; (2) verify the branches against the
logits and pick the longest accepted root-to-leaf path; (3) the tree's K/V sit in consecutive slots in
tree order, so the accepted path's slots are not contiguous: move them to the first len(path) slots
after the context (`KVCache.keep_path`, paged caches' `move_slots` with `accepted_slots`), then forget
the rest (the contiguous cache's length, the engine's sequence length). Later steps see a plain chain.
The engine runs these steps for drafters that propose trees (lmforge.infer.token_tree): in its varlen
row a chunk may be a chain ending in a tree (tree_sizes_host says how many tokens), so only the tree
part is walked and the other chunks of the step keep their causal masks.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

Built = TypeVar("Built")


@dataclass
class AttnMetadata:
    doc_ids: torch.Tensor | None = None
    """(B, T) document index of each token in a packed row; None = one document per row"""
    positions: torch.Tensor | None = None
    """(B, T) position of each token; the model uses it when no positions argument is given"""
    rope_lengths: torch.Tensor | None = None
    """(B, T) int64, or broadcastable: the context length each token's RoPE frequencies follow, read only where
    they depend on it (dynamic NTK, LongRoPE: lmforge.model.layers.rope): the engine's varlen row gives each token
    max(its sequence's prompt length, position + 1), context parallelism the whole sequence's length; None = each
    row's last position + 1"""
    logits_indices: torch.Tensor | None = None
    """(M,) flat token indices whose logits the model returns, as (1, M, V); None = every token"""
    hidden_indices: torch.Tensor | None = None
    """(H,) flat token indices whose hidden states a forward with return_hidden returns, as (1, H, D); None =
    at the logits positions (a drafter reading every new position's features: lmforge.infer.speculative)"""
    # the engine's varlen layout (B = 1) -------------------------------------------------------------
    slot_mapping: torch.Tensor | None = None
    """(N,) int64 flat cache slot each new token's key/value is written to"""
    block_tables: torch.Tensor | None = None
    """(S, max_blocks) int32 cache blocks of each sequence (rows padded with block 0, never read)"""
    context_lens: torch.Tensor | None = None
    """(S,) int32 keys each sequence attends over after this step's writes"""
    query_lens_host: tuple[int, ...] = ()
    """new tokens of each sequence this step (host copy); their sum is N. On CUDA-graph steps
    (lmforge.infer.graphs) the host fields are placeholders fixed at capture, the same for every replay: a decode
    graph's query_lens_host = context_lens_host = (1,) * B' (B' the padded bucket), seq_ids_host = (); a mixed
    step's all ()"""
    context_lens_host: tuple[int, ...] = ()
    """keys of each sequence after this step's writes (host copy of context_lens; a placeholder on graph steps)"""
    num_decodes: int = 0
    """the first num_decodes sequences have exactly one query each (decode steps)"""
    seq_ids_host: tuple[int, ...] = ()
    """the engine's id of each sequence (host copy): caches that keep per-sequence state (a KV policy's
    scores, an SSM's state rows, a CacheStore's buffers) key it by this; the engine names forks and finished
    sequences to them with the same ids (cache.fork / cache.release). () on CUDA-graph steps (a captured forward
    has no host values): state read there needs a device tensor (an SSM's rows: state_slots), and a CacheStore's
    cache runs under graphs only where it declares graph_safe (lmforge.infer.kv.paged.CacheStore)"""
    decode_groups: tuple[tuple[int, int, int], ...] = ()
    """(first row, end row, block-table width) of decode rows sorted by context length, for caches that
    gather a group's blocks (the padded width then follows the group, not the batch); () = one group"""
    block_size: int = 0
    state_slots: torch.Tensor | None = None
    """(S,) int64 the state-pool row of each sequence (models with recurrent-state layers,
    lmforge.infer.kv.state); a sequence starting from its first token finds its row zeroed"""
    drafted_host: tuple[int, ...] = ()
    """varlen row: how many of each sequence's new tokens are speculative drafts (0: none; () = no sequence
    has any): a recurrent layer keeps its state after each token of such a chunk, so the engine can keep
    the state after the accepted ones (lmforge.infer.kv.state)"""
    varlen_tiles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """the CUDA-graph layout of a step holding prefill chunks (lmforge.infer.graphs): (cu_q (S + 1,) int32 query
    offsets of each sequence in the flat row, tile sequence (P,) int32, tile first query (P,) int32): every token
    of the row is a query of its sequence's chunk, the last of its context_lens keys, attended from these device
    tensors, context_lens and block_tables alone (lmforge.kernels.paged_varlen.paged_varlen_attention); the
    host lengths are unset. Tokens past cu_q[-1] are padding (their outputs are zeros). None = other layouts"""
    # tree attention (either layout) ------------------------------------------------------------------
    tree_parents: torch.Tensor | None = None
    """(B, T) parent of each new token among its sequence's new tokens (in the varlen row: an index
    within its own chunk's tree, see tree_sizes_host), -1 = the context's last token; None = a causal chain"""
    tree_sizes_host: tuple[int, ...] = ()
    """varlen row: how many of each sequence's new tokens, at the end of its chunk, form its tree (0 = a
    chain chunk; the tokens before a tree are a chain whose last token is the tree's context end); () =
    every token of every chunk. The engine's speculative chunks end in a tree, other chunks keep their
    causal mask (and no per-token tree walk over a long prefill)"""
    tree_rows: tuple[torch.Tensor, torch.Tensor] | None = None
    """decode rows of a token tree (the CUDA-graph layout, lmforge.infer.graphs: each token of a verify chunk
    is a decode row): (start (S,) int64, bits (S,) int64): a row sees its keys below slot `start` and, at or
    beyond it, the tree slot start + i only where bit i of `bits` is set (its ancestors and itself; a row with
    start = its context length is a plain decode row). None = no tree rows"""
    # never passed, but an init field: dataclasses.replace (FSDP2's cast of forward inputs) copies every field
    _derived: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def packed(cls, doc_ids: torch.Tensor) -> "AttnMetadata":
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be (B, T), got shape {tuple(doc_ids.shape)}")
        return cls(doc_ids=doc_ids)

    @classmethod
    def tree(cls, parents: torch.Tensor | list[int], **kw) -> "AttnMetadata":
        """Metadata for B rows of T new tokens laid out as trees: parents (B, T) or one tree (T,)."""
        parents = torch.as_tensor(parents, dtype=torch.long)
        parents = parents[None] if parents.dim() == 1 else parents
        check_tree(parents)
        return cls(tree_parents=parents, **kw)

    def derived(self, name: Hashable, build: Callable[[], Built]) -> Built:
        """build(), computed at the first call of a forward and kept on this object: what layers derive
        from the layout (masks, cu_seqlens, gather indices) is built once per forward, not per layer.
        So a metadata object describes one forward: build a new one rather than change its fields."""
        if name not in self._derived:
            self._derived[name] = build()
        return self._derived[name]

    def parents_for(self, T: int) -> torch.Tensor:
        """tree_parents, checked against the forward's T new tokens per row."""
        if self.tree_parents.shape[-1] != T:
            raise ValueError(f"tree_parents holds {self.tree_parents.shape[-1]} tokens per row but the forward has "
                             f"{T}: give one parent per new token")
        return self.tree_parents

    def tree_size(self, i: int, n: int) -> int:
        """How many of sequence i's n new tokens (the last ones) form a tree (varlen row; 0: a chain)."""
        if self.tree_parents is None:
            return 0
        return self.tree_sizes_host[i] if self.tree_sizes_host else n

    def doc_mask(self) -> torch.Tensor | None:
        """(B, 1, T, T) bool, True = attend: causal and within the same document; None without doc_ids."""
        if self.doc_ids is None:
            return None

        def build():
            T = self.doc_ids.shape[1]
            same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]  # (B, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=self.doc_ids.device).tril()
            return (same & causal)[:, None]
        return self.derived("doc_mask", build)

    def documents(self) -> tuple[torch.Tensor, int] | None:
        """(cu_seqlens, longest document) of the packed rows for varlen kernels; None without doc_ids.
        Reading the longest length syncs with the device once per forward, not once per layer."""
        if self.doc_ids is None:
            return None

        def build():
            cu = cu_seqlens_from_doc_ids(self.doc_ids)
            return cu, int((cu[1:] - cu[:-1]).max())
        return self.derived("documents", build)

    def groups(self) -> tuple[tuple[int, int, int], ...]:
        if self.decode_groups or not self.num_decodes:
            return self.decode_groups
        return ((0, self.num_decodes, self.block_tables.shape[1]),)

    @property
    def cu_seqlens_q(self) -> list[int]:
        """Host offsets of each sequence's queries in the flat row: [0, q0, q0+q1, ...]."""
        out = [0]
        for n in self.query_lens_host:
            out.append(out[-1] + n)
        return out


def packed_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that restart at 0 where the document id changes along each row."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # index of the most recent document start at or before each token
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) document ids of packed rows -> (n_docs + 1,) int32 cumulative lengths over the B·N tokens; a
    document starts where the id changes and at every row start (the varlen kernels' layout)."""
    B, N = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = starts.flatten().nonzero().flatten()
    return torch.cat((idx, idx.new_tensor([B * N]))).to(torch.int32)


def check_tree(parents: torch.Tensor) -> None:
    """One-line error unless every parent is -1 or an earlier token of the same row (topological order)."""
    t = torch.arange(parents.shape[-1], device=parents.device)
    bad = (parents < -1) | (parents >= t)
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0]) % parents.shape[-1]
        raise ValueError(f"tree_parents: token {i} has parent {int(parents.flatten()[bad.flatten()][0])}; a "
                         "parent must be -1 (the context) or an earlier token: list tree nodes parents first")


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """(..., T) parents -> (..., T) depth of each token (roots: 0). Parents precede children."""
    depth = torch.zeros_like(parents)
    for t in range(1, parents.shape[-1]):
        p = parents[..., t]
        depth[..., t] = torch.where(p >= 0, depth.gather(-1, p.clamp(min=0)[..., None])[..., 0] + 1, 0)
    return depth


def tree_ancestors(parents: torch.Tensor) -> torch.Tensor:
    """(..., T) parents -> (..., T, T) bool: [t, u] = u is t or one of its ancestors."""
    T = parents.shape[-1]
    anc = torch.eye(T, dtype=torch.bool, device=parents.device).expand(*parents.shape, T).clone()
    for t in range(1, T):
        p = parents[..., t]
        from_parent = anc.gather(-2, p.clamp(min=0)[..., None, None].expand(*p.shape, 1, T))[..., 0, :]
        anc[..., t, :] |= from_parent & (p >= 0)[..., None]
    return anc


def tree_positions(parents: torch.Tensor, context_len: int | torch.Tensor) -> torch.Tensor:
    """Positions of tree tokens after context_len context tokens: context_len + depth."""
    return tree_depths(parents) + (context_len[..., None] if torch.is_tensor(context_len) else context_len)


def accepted_slots(parents: list[int], path: list[int], first_pos: int) -> tuple[list[int], list[int]]:
    """(src, dst) *positions* moving the accepted root-to-node `path` of a tree written from position
    `first_pos` (one per tree token, in tree order) to consecutive positions from first_pos; unchanged ones
    left out. A contiguous cache's slots are its positions; a paged cache maps each through the sequence's
    block table (table[p // block_size] * block_size + p % block_size) before `move_slots`: a tree that
    crosses a block boundary does not sit in consecutive flat slots."""
    for a, b in zip([-1] + path[:-1], path):
        if parents[b] != a:
            raise ValueError(f"accepted path {path}: token {b}'s parent is {parents[b]}, not {a}")
    moves = [(first_pos + t, first_pos + i) for i, t in enumerate(path) if t != i]
    return [s for s, _ in moves], [d for _, d in moves]
