"""bf16 / fp16 HF checkpoints: what transformers computes in the checkpoint's dtype, lmforge computes too."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.model.transformer import Transformer

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemma_embedding_scale_is_rounded_to_the_checkpoint_dtype(tmp_path, dtype):
    """Gemma multiplies its embeddings by sqrt(d_model) rounded to their dtype (bf16: sqrt(48) = 6.93 -> 6.9375);
    lmforge multiplied by the exact value, so every bf16 Gemma 2 (d_model 3584: 59.87 -> 59.75) started its
    residual stream 0.2% off transformers' (found 2026-12-06)."""
    cfg = transformers.Gemma2Config(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=12, sliding_window=4)
    torch.manual_seed(0)
    hf = transformers.Gemma2ForCausalLM(cfg).to(dtype).eval()
    hf.save_pretrained(tmp_path)
    seen = {}

    def layer0_input(module, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hf.model.layers[0].register_forward_pre_hook(layer0_input, with_kwargs=True)
    ids = torch.randint(0, 96, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf(ids)
        ours = Transformer.from_pretrained(tmp_path)
        x, _ = ours.block_inputs(ids)
    assert ours.tok_emb.weight.dtype == dtype and ours.cfg.embed_scale == math.sqrt(48)
    assert torch.equal(x, seen["x"])  # bit for bit: the same rounding
