"""lmforge: the whole life of a large language model, from scratch on PyTorch.

The public names below are imported lazily on first use, so `import lmforge` is cheap and has no side
effects (no torch import, no threads, no files).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "LmforgeError": "lmforge.errors",
    "ModelConfig": "lmforge.model.config",
    "Transformer": "lmforge.model.transformer",
    "register_model": "lmforge.model.registry",
    "build_model": "lmforge.model.registry",
    "KVCache": "lmforge.model.cache",
    "TrainConfig": "lmforge.train.config",
    "DataConfig": "lmforge.train.config",
    "OptimConfig": "lmforge.optim.config",
    "tokenize_to_shards": "lmforge.data.tokenize",
    "Trainer": "lmforge.train.trainer",
    "ByteTokenizer": "lmforge.tokenizer.byte",
    "load_tokenizer": "lmforge.tokenizer.load",
    "Tokenizer": "lmforge.tokenizer.bpe",
    "train_bpe": "lmforge.tokenizer.train",
    "LLM": "lmforge.infer.llm",
    "SamplingParams": "lmforge.infer.sampling",
}

__all__ = sorted([*_EXPORTS, "train"]) + ["__version__"]


def lazy_attribute(namespace: dict[str, Any], table: dict[str, str], name: str) -> Any:
    """A package's module-level __getattr__ for names imported on first use: `name` from the module `table` names
    for it, kept in the package's `namespace` (its globals()) so the next lookup is a plain one; lmforge's public
    names here, the optimizer classes in lmforge.optim."""
    if name not in table:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    value = namespace[name] = getattr(importlib.import_module(table[name]), name)
    return value


def __getattr__(name: str) -> Any:
    if name == "train":  # the package lmforge.train is callable: lf.train(cfg)
        return importlib.import_module("lmforge.train")
    return lazy_attribute(globals(), _EXPORTS, name)


def __dir__() -> list[str]:
    return __all__
