"""MLA's latent cache through the Triton latent kernel in the engine (decode_attention='kernel'; on a CPU through
Triton's interpreter): decode rows, token-tree rows and the mixed steps' varlen rows give the full forward's greedy
tokens and log-probs, with the kernel counted; a wkv_b that is more than an nn.Linear (a LoRA adapter) is
absorbed through its matrix read off the module."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.kernels.decode import available

from .infer_helpers import full_greedy
from .test_attention_variants import variant_model
from .test_graph_prefill import PROMPTS, greedy, record_chunks

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def counted(monkeypatch):
    """Count the latent kernel's decode and varlen calls (the cache resolves the decode kernel when built)."""
    from lmforge.kernels import paged_latent as pl

    calls, kernel = {"decode": 0, "varlen": 0}, pl.paged_latent_attention

    def counting(*a, **kw):
        calls["varlen" if kw.get("cu_q") is not None else "decode"] += 1
        return kernel(*a, **kw)

    monkeypatch.setattr(pl, "paged_latent_attention", counting)
    return calls


@pytest.mark.parametrize("extra", [dict(cuda_graphs=False), dict(cuda_graphs=True, graph_prefill_tokens=48),
                                   dict(cuda_graphs=False, chunked_prefill=True, max_num_batched_tokens=8)])
def test_latent_kernel_serves_decode_and_mixed_steps(tok, monkeypatch, extra):
    model = variant_model("mla", d_model=64).to(DEV)
    calls = counted(monkeypatch)
    engine = Engine(model, tok, EngineConfig(block_size=4, decode_attention="kernel", max_num_seqs=4, **extra))
    assert engine.runner.cache.kernel is not None
    seen = record_chunks(engine.runner.graphs) if extra.get("graph_prefill_tokens") else None
    outs = greedy(engine, PROMPTS[:4], logprobs=0)
    assert [o.outputs[0].token_ids for o in outs] == [full_greedy(model, p, 8) for p in PROMPTS[:4]]
    # eager steps call the kernel per step and layer (a graph calls it when captured: a GPU's default)
    assert calls["decode"] >= (1 if extra["cuda_graphs"] else 8) * model.cfg.n_layers
    if seen is not None:
        assert seen and calls["varlen"] >= len(seen) * model.cfg.n_layers
    ref = Engine(model, tok, EngineConfig(block_size=4, decode_attention="reference", max_num_seqs=4, **extra))
    for got, want in zip(outs, greedy(ref, PROMPTS[:4], logprobs=0)):
        assert got.outputs[0].logprobs == pytest.approx(want.outputs[0].logprobs, abs=1e-4)


def test_latent_kernel_reads_token_tree_rows(tok, monkeypatch):
    """A TreeDrafter's trees verified on the latent cache: tree rows through the kernel's ancestor bits."""
    from lmforge.infer.token_tree import TreeDrafter

    target = variant_model("mla").to(DEV)
    calls = counted(monkeypatch)
    config = EngineConfig(cuda_graphs=True, block_size=4, decode_attention="kernel", max_num_seqs=4)
    llm = LLM(target, tok, config=config, draft=TreeDrafter(target, (2, 2, 1)))
    prompts, n = ["abcabcabc", "hello"], 7
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    assert [o.token_ids for o in outs] == [full_greedy(target, tok.encode(p), n) for p in prompts]
    assert any(key[3] for key in llm.engine.runner.graphs.entries) and calls["decode"]
    assert all(o.metrics["acceptance_rate"] == 1.0 for o in outs)


def test_an_adapted_wkv_b_is_absorbed_through_its_matrix(tok):
    """wkv_b under a LoRA adapter (nonzero B): the kernel path absorbs the adapted matrix (read off the module),
    the same tokens as the model's full forward, which calls the module."""
    from lmforge.adapt.lora import LoRAConfig, apply_lora

    model = variant_model("mla")
    apply_lora(model, LoRAConfig(r=4, targets=("wkv_b",)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3)
    model = model.to(DEV).eval()
    attn = model.blocks[0].attn
    w_uk, w_uv = attn._up_weights()
    full = (attn.wkv_b.weight + attn.wkv_b.delta_weight()).view(attn.H, -1, attn.r)
    torch.testing.assert_close(torch.cat((w_uk, w_uv), 1), full, atol=1e-6, rtol=1e-6)
    engine = Engine(model, tok, EngineConfig(block_size=4, decode_attention="kernel", cuda_graphs=True,
                                             graph_prefill_tokens=48, max_num_seqs=4))
    prompts = [PROMPTS[i] for i in (0, 2, 4)]  # 3, 9 and 1 tokens (the interpreter runs a varlen program per token)
    outs = greedy(engine, prompts)
    assert [o.outputs[0].token_ids for o in outs] == [full_greedy(model, p, 8) for p in prompts]
