"""attn_impl="triton": a Transformer on the Triton FlashAttention-2 kernel gives the SDPA model's logits and
gradients (on the GPU where there is one, else in Triton's interpreter on the CPU), for plain causal rows, sliding windows and packed documents (the
varlen kernel on cu_seqlens against the (T x T) document mask), with soft-caps and learned sinks."""

import dataclasses
import warnings

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.meta import AttnMetadata, packed_positions
from lmforge.model.transformer import Transformer

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
from lmforge.kernels.decode import available  # noqa: E402

pytestmark = pytest.mark.skipif(not available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")
# fp32 in the interpreter; on the GPU the kernel's fp32 dots run on tensor cores (tf32), as in test_flash_attention
TOL_OUT, TOL_GRAD = (2e-4, 2e-4) if DEV == "cpu" else (5e-3, 1e-2)


@pytest.mark.parametrize("extra,packed", [(dict(), False), (dict(sliding_window=5), False), (dict(), True),
                                          (dict(attn_sinks=True, sliding_window=4, attn_softcap=3.0), True)])
def test_triton_attention_model_matches_sdpa(extra, packed):
    cfg = ModelConfig(vocab_size=64, d_model=128, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32, **extra)
    torch.manual_seed(0)
    ref = Transformer(cfg).to(DEV)
    if cfg.attn_sinks:
        with torch.no_grad():
            ref.blocks[0].attn.sinks.normal_()
    fast = Transformer(dataclasses.replace(cfg, attn_impl="triton")).to(DEV)
    fast.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 64, (2, 16), device=DEV)
    kw = {}
    if packed:  # SFT rows: examples back to back, positions restarting per example
        doc = torch.tensor([[0] * 6 + [1] * 10, [0] * 3 + [1] * 9 + [2] * 4], device=DEV)
        kw = dict(positions=packed_positions(doc), meta=AttnMetadata.packed(doc))
    out_ref = ref(ids, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernel itself, not a fallback to SDPA
        out_fast = fast(ids, **kw)
    torch.testing.assert_close(out_fast, out_ref, atol=TOL_OUT, rtol=TOL_OUT)
    out_ref.square().mean().backward()
    out_fast.square().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=TOL_GRAD, rtol=max(TOL_GRAD, 2e-3), msg=name)
