"""Transformer building blocks, one concept per file: norm, rope, position, attention, mlp."""
