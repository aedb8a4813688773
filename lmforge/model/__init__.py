"""Models: ModelConfig, the Transformer decoder and its layers, caches, HF checkpoint conversion."""
