"""A pipeline's stages (lmforge.parallel.pp.split_stage) run in one process, chained by hand: together they are
the whole model."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.parallel.pp import split_stage


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stages_with_a_scaled_embedding_chain_to_the_whole_model(dtype):
    """Gemma's sqrt(d) embedding scale (rounded to the embeddings' dtype in Transformer.embed): the first stage
    raised AttributeError (the rounded scales lived on the Transformer only)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=48, n_layers=2, n_heads=4, max_seq_len=16, tie_embeddings=False,
                      embed_scale=48 ** 0.5, attn_impl="math")
    model = Transformer(cfg).to(dtype).eval()
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        got = split_stage(model, 1, 2)(split_stage(model, 0, 2)(ids))
        want = model(ids)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
