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



def test_stages_keep_the_residual_dtype_under_autocast():
    """TrainConfig.bf16_residual (Transformer.residual_dtype): the first stage ran its own copy of the trunk's
    front without the cast, so a pipelined run kept an fp32 residual stream that one process keeps in bf16."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=40, d_model=48, n_layers=2, n_heads=4, max_seq_len=16, tie_embeddings=False,
                      attn_impl="math")
    model = Transformer(cfg).eval()
    model.residual_dtype = torch.bfloat16
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = split_stage(model, 0, 2)(ids)
        got = split_stage(model, 1, 2)(h)
        want = model(ids)
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=0)
