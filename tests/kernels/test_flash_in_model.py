"""attn_impl="triton": a Transformer on the Triton FlashAttention-2 kernel gives the SDPA model's logits and
gradients (CPU: Triton's interpreter), for plain causal rows, sliding windows and packed documents."""

import dataclasses

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.meta import AttnMetadata, packed_positions
from lmforge.model.transformer import Transformer

pytest.importorskip("triton")


@pytest.mark.parametrize("extra,packed", [(dict(), False), (dict(sliding_window=5), False), (dict(), True)])
def test_triton_attention_model_matches_sdpa(extra, packed):
    cfg = ModelConfig(vocab_size=64, d_model=128, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32, **extra)
    torch.manual_seed(0)
    ref = Transformer(cfg)
    fast = Transformer(dataclasses.replace(cfg, attn_impl="triton"))
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 64, (1, 16))
    kw = {}
    if packed:
        doc = torch.tensor([[0] * 6 + [1] * 10])
        kw = dict(positions=packed_positions(doc), meta=AttnMetadata.packed(doc))
    out_ref, out_fast = ref(ids, **kw), fast(ids, **kw)
    torch.testing.assert_close(out_fast, out_ref, atol=2e-4, rtol=2e-4)
    out_ref.square().mean().backward()
    out_fast.square().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=2e-4, rtol=2e-3, msg=name)
