"""Cache kinds the engine allocates (lmforge.model.cache describes the interface and the model-side
kinds): paged K/V blocks and paged MLA latents, both over one pre-allocated block pool."""

from lmforge.infer.kv.paged import PagedKVCache, PagedLatentCache, new_paged_cache, paged_decode_reference

__all__ = ["PagedKVCache", "PagedLatentCache", "new_paged_cache", "paged_decode_reference"]
