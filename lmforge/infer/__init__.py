"""Generation: sampling parameters and logits processors, the LLM engine (batched, KV-cached), beam
search, speculative decoding, chat templates, and a CUDA-graph decode path for GPUs."""
