"""The batch-1 Triton kernel decode step (lmforge/infer/kernel_step.py) computes the model's decode step:
same logits as the model on the static cache, same greedy tokens as the plain path. On CPU the kernels
run in Triton's interpreter (tests/conftest.py), on a GPU for real (and inside a CUDA graph)."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.cuda_graph import GraphDecoder
from lmforge.infer.engine import PlainDecoder
from lmforge.infer.kernel_step import unsupported
from lmforge.kernels.decode import available

from .infer_helpers import tiny_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def _greedy(decoder, prompt: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    logits = decoder.prefill(prompt, torch.zeros(1, dtype=torch.long, device=prompt.device))
    toks, all_logits = [int(logits.argmax())], [logits.clone()]
    for _ in range(n - 1):
        logits = decoder.step(torch.tensor(toks[-1:], device=prompt.device))
        toks.append(int(logits.argmax()))
        all_logits.append(logits.clone())  # graph and kernel paths reuse one output buffer
    return toks, all_logits


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_kernel_step_matches_the_model(kv_heads):
    model = tiny_model("llama", n_heads=4, n_kv_heads=kv_heads, d_model=64, head_dim=16).to(DEV)
    prompt = torch.randint(0, 257, (1, 9), generator=torch.Generator().manual_seed(kv_heads)).to(DEV)
    ref_toks, ref_logits = _greedy(PlainDecoder(model, 1, 40), prompt, 6)
    dec = GraphDecoder(model, 1, 40, use_graphs=DEV == "cuda", kernels=True)
    assert dec.kernel_step is not None
    toks, logits = _greedy(dec, prompt, 6)
    assert toks == ref_toks
    torch.testing.assert_close(torch.cat(logits), torch.cat(ref_logits), atol=1e-4, rtol=1e-4)


def test_unsupported_models_are_named_and_refused():
    gpt2 = tiny_model("gpt2")
    assert "RMSNorm" in unsupported(gpt2) or "positions" in unsupported(gpt2) or "biases" in unsupported(gpt2)
    assert unsupported(tiny_model("llama")) is None
    with pytest.raises(LmforgeError, match="kernel step cannot run"):
        GraphDecoder(gpt2, 1, 16, use_graphs=False, kernels=True)
    assert GraphDecoder(gpt2, 1, 16, use_graphs=False).kernel_step is None  # auto: general path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="step-level tuning times CUDA graphs")
def test_step_tuning_keeps_the_tokens():
    model = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16).cuda()
    prompt = torch.randint(0, 257, (1, 9), generator=torch.Generator().manual_seed(5)).cuda()
    ref_toks, _ = _greedy(PlainDecoder(model, 1, 40), prompt, 6)
    dec = GraphDecoder(model, 1, 40, kernels=True)
    dec.prefill(prompt, torch.zeros(1, dtype=torch.long, device="cuda"))
    assert dec.kernel_step.tune(dec.cache.view(1), reps=2)  # one timing per candidate of each shape
    toks, _ = _greedy(dec, prompt, 6)
    assert toks == ref_toks
