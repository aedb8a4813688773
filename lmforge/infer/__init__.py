"""Generation: one engine (engine.py: continuous batching over a paged KV cache, chunked prefill, prefix
caching, preemption) with its scheduler, block pool, runner (CUDA-graph and Triton kernel backends) and
batched per-row sampling; strategies on it (beam search, speculative decoding); the offline front door
(llm.py), an asyncio front (async_engine.py), a HF-model wrapper, chat templates and detokenization."""
