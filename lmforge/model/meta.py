"""AttnMetadata: how the tokens of one forward are laid out, passed explicitly down the model.

The model never keeps layout in module state (nano-vllm's global `Context` is the counter-example): the
caller builds one `AttnMetadata` per forward and passes it as `model(ids, positions, cache=..., meta=...)`;
every attention layer hands it, with its q, k, v, to the cache (or to the cache-free attention used in
training), which is the one place that turns it into masks.

Fields so far:
  doc_ids   (B, T) int: packed training rows. A token attends only to earlier tokens of the same
            document (no cross-document attention), so a packed row gives the same per-token outputs
            as its documents run one by one, provided positions restart at 0 per document
            (`packed_positions`).
The inference engine adds what paged decoding needs (per-sequence query/key lengths, slot mapping, block
tables); tree masks for Medusa/EAGLE come later, through the same object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttnMetadata:
    doc_ids: torch.Tensor | None = None
    """(B, T) document index of each token in a packed row; None = one document per row"""

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


def packed_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that restart at 0 where the document id changes along each row."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # index of the most recent document start at or before each token
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx
