"""Every map stage leaves the objects inside a document's meta alone: run_stage's retry snapshot is a shallow copy
of meta (stage.py), so a stage that appended to a meta list or set a key of a meta dict in place would change the
snapshot too, and a retried batch would start from the half-done state."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from lmforge.config import from_dict
from lmforge.data.document import Document
from lmforge.data.stage import StageContext, run_stage
from lmforge.data.stages import STAGES

FASTTEXT = str(Path(__file__).parent / "fasttext" / "softmax.bin")
TEXTS = ["Contact me at bob@example.com or 555-123-4567, IP 10.0.0.1.\nThe quick brown fox jumps over the lazy dog. "
         * 5, "lorem ipsum\n" * 30, "short", "日本語のテキスト。" * 40,
         "the match goal team coach league season striker keeper stadium fans referee penalty.\n" * 3]


def tiny_lm():
    """A perplexity model spec ("module:factory"): an untrained one-layer Transformer and the byte tokenizer."""
    import torch

    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.byte import ByteTokenizer
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)), ByteTokenizer()


def _options(name: str, tmp_path: Path) -> dict:
    """Each map stage's options for a run on the CPU with the test fixtures (a stage added to STAGES needs an entry)."""
    (tmp_path / "eval.jsonl").write_text(json.dumps({"q": "the quick brown fox jumps over the lazy dog"}) + "\n")
    return {"extract": {}, "langid": {}, "pii": {}, "gopher": {}, "c4": {}, "fineweb": {},
            "mix": {"weights": {"x.*": 2.5}},
            "perplexity": {"model": f"{__name__}:tiny_lm", "context": 64},
            "quality": {"model": FASTTEXT, "label": "sport"},
            "toxicity": {"model": FASTTEXT, "label": "sport"}, "nsfw": {"model": FASTTEXT, "label": "sport"},
            "decontam": {"eval_paths": [str(tmp_path / "eval.jsonl")], "ngram": 4},
            "tokenize": {"tokenizer": "byte", "out_dir": "tokens"}}[name]


@pytest.mark.parametrize("name", [n for n, s in STAGES.items() if s.kind == "map"])
def test_map_stage_does_not_mutate_meta_values_in_place(name, tmp_path):
    if name == "extract":
        pytest.importorskip("resiliparse")
    spec = STAGES[name]
    cfg = from_dict(spec.config, _options(name, tmp_path), name)
    docs = [Document(id=str(i), text="" if name == "extract" else t,
                     raw=f"<html><body><p>{t}</p></body></html>".encode() if name == "extract" else None,
                     meta={"source": "x.jsonl", "errors": ["prior"], "pii": {"email": 1}, "tags": ["a"],
                           "nested": {"l": [1], "d": {"k": "v"}}})
            for i, t in enumerate(TEXTS)]
    values = [dict(d.meta) for d in docs]  # the very objects the snapshot would share
    before = copy.deepcopy(values)
    out = run_stage(spec, cfg, docs, StageContext(workdir=tmp_path / "work", shard="s0"))
    assert values == before
    # the stage did act on the batch (rejected, rewrote, scored or counted something): the check above saw a run
    assert len(out) != len(docs) or any(d.drop or d.text != t or d.meta != v for d, t, v in zip(out, TEXTS, before))
