"""The perplexity filter's windows against the scoring model's length: perplexity.context longer than the model's
max_seq_len is refused before any document is scored (RoPE would extrapolate silently; learned positions would fail
on the first long document with an error naming only the model)."""

from __future__ import annotations

import pytest
import torch

from lmforge.data.document import Document
from lmforge.data.perplexity import PerplexityConfig, perplexity, perplexity_filter
from lmforge.data.stage import StageContext
from lmforge.errors import ConfigError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.byte import ByteTokenizer

TEXT = "the cat sat on the mat and the dog sat on the log. " * 4  # 204 tokens: windows past 64 positions


@pytest.mark.parametrize("pos_emb", ["rope", "learned"])
def test_context_longer_than_the_model_is_refused_naming_the_field(pos_emb):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, max_seq_len=64,
                                    pos_emb=pos_emb)).eval()
    with pytest.raises(ConfigError, match=r"perplexity\.context=256 .* max_seq_len=64.* at most 64"):
        perplexity(model, ByteTokenizer(), TEXT, context=256)
    assert perplexity(model, ByteTokenizer(), TEXT, context=64) > 1  # a context that fits still scores


def test_the_stage_refuses_before_scoring_a_document(tmp_path):
    model = Transformer(ModelConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)).eval()
    model.save_pretrained(tmp_path)
    ByteTokenizer().save(tmp_path)
    docs = [Document(id="a", text=TEXT), Document(id="b", text="x")]
    with pytest.raises(ConfigError, match=r"perplexity\.context=256"):
        perplexity_filter(PerplexityConfig(model=str(tmp_path)), docs, StageContext())
    assert all("perplexity" not in d.meta and d.drop is None for d in docs)
