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
                         through block_tables[i]; its queries are its last query_lens[i] keys (positions
                         context_lens[i] - query_lens[i] ...). slot_mapping gives each new token's flat cache
                         slot (block * block_size + offset). Host-side copies of the lengths (`*_host`)
                         let caches loop over sequences without reading the device.
logits_indices (either layout): flat indices into the B*T tokens where logits are wanted; the model
applies its output head only there (a prefill then never materialises T x V logits).
Tree masks for Medusa/EAGLE come later, through the same object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttnMetadata:
    doc_ids: torch.Tensor | None = None
    """(B, T) document index of each token in a packed row; None = one document per row"""
    positions: torch.Tensor | None = None
    """(B, T) position of each token; the model uses it when no positions argument is given"""
    logits_indices: torch.Tensor | None = None
    """(M,) flat token indices whose logits the model returns, as (1, M, V); None = every token"""
    # the engine's varlen layout (B = 1) -------------------------------------------------------------
    slot_mapping: torch.Tensor | None = None
    """(N,) int64 flat cache slot each new token's key/value is written to"""
    block_tables: torch.Tensor | None = None
    """(S, max_blocks) int32 cache blocks of each sequence (rows padded with block 0, never read)"""
    context_lens: torch.Tensor | None = None
    """(S,) int32 keys each sequence attends over after this step's writes"""
    query_lens_host: tuple[int, ...] = ()
    """new tokens of each sequence this step (host copy); their sum is N"""
    context_lens_host: tuple[int, ...] = ()
    num_decodes: int = 0
    """the first num_decodes sequences have exactly one query each (decode steps)"""
    decode_groups: tuple[tuple[int, int, int], ...] = ()
    """(first row, end row, block-table width) of decode rows sorted by context length, for caches that
    gather a group's blocks (the padded width then follows the group, not the batch); () = one group"""
    block_size: int = 0

    @classmethod
    def packed(cls, doc_ids: torch.Tensor) -> "AttnMetadata":
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be (B, T), got shape {tuple(doc_ids.shape)}")
        return cls(doc_ids=doc_ids)

    def doc_mask(self) -> torch.Tensor | None:
        """(B, 1, T, T) bool, True = attend: causal and within the same document; None without doc_ids."""
        if self.doc_ids is None:
            return None
        T = self.doc_ids.shape[1]
        same = self.doc_ids[:, :, None] == self.doc_ids[:, None, :]  # (B, T, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=self.doc_ids.device).tril()
        return (same & causal)[:, None]

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
