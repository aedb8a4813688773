"""Tokenization into the trainer's memory-mapped token shards (`lmforge.data.shards`): one token shard
per pipeline shard, documents separated by the tokenizer's end-of-text id."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import check
from lmforge.data.document import Document
from lmforge.data.shards import TokenShardWriter
from lmforge.data.stage import StageContext


@dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    """tokenizer: a spec for `lmforge.tokenizer.load.load_tokenizer` ("byte" or a tokenizer directory);
    out_dir: where `<shard>.bin` files go (relative to the pipeline's output directory)."""

    tokenizer: str = "byte"
    out_dir: str = "tokens"
    doc_sep: bool = True

    def __post_init__(self) -> None:
        check(bool(self.tokenizer), "tokenize.tokenizer must be set (e.g. 'byte' or a tokenizer directory)")


@functools.lru_cache(maxsize=2)
def _tokenizer(spec: str) -> Any:
    from lmforge.tokenizer.load import load_tokenizer

    return load_tokenizer(spec)


def tokenize(cfg: TokenizeConfig, docs: list[Document], ctx: StageContext) -> list[Document]:
    """Write the batch's documents to `<out_dir>/<shard>.bin`; records `meta.num_tokens`."""
    tok = _tokenizer(cfg.tokenizer)
    sep = getattr(tok, "eot_id", None) if cfg.doc_sep else None
    out = Path(cfg.out_dir)
    path = (out if out.is_absolute() else ctx.workdir / out) / f"{ctx.shard}.bin"
    with TokenShardWriter(path, vocab_size=tok.vocab_size, tokenizer=cfg.tokenizer, doc_sep=sep) as w:
        for d in docs:
            ids = tok.encode(d.text)
            w.add_document(ids)
            d.meta["num_tokens"] = len(ids)
    ctx.count("tokenize.tokens", w.num_tokens)
    return docs
