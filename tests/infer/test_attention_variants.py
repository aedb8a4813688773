"""Issue 11 §0: every attention variant of the zoo through every cache kind gives the greedy tokens and
the logits of the full-recompute reference (fp32, CPU). The static cache (the CUDA-graph path, run
eagerly here) once applied sliding windows as if its queries were its last keys."""

from __future__ import annotations


import pytest
import torch

from lmforge.model.cache import KVCache, StaticKVCache
from lmforge.model.config import MLAConfig, MoEConfig
from lmforge.model.layers.mla import MLACache
from lmforge.model.layers.sliding import SlidingWindowCache

from .infer_helpers import tiny_model

MLA = dict(attention="mla", rope_layout="interleaved", n_kv_heads=None,
           mla=MLAConfig(kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))
VARIANTS = {
    "full": dict(),
    "sliding": dict(sliding_window=4),
    "window-pattern": dict(sliding_window=3, layer_types=("sliding", "full")),
    "sinks": dict(attn_sinks=True, sliding_window=5),
    "softcap": dict(attn_softcap=5.0, logit_softcap=10.0),
    "qk-norm": dict(qk_norm=True),
    "mla": MLA,
    "mla-sliding": {**MLA, "sliding_window": 4},
    "moe": dict(mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, capacity_factor=0.0)),
}
PROMPT = [5, 17, 99, 3, 42, 7, 11]
NEW = 10


def variant_model(name: str, **extra):
    model = tiny_model("llama", **VARIANTS[name], init_std=0.3, **extra)
    if name == "sinks":
        with torch.no_grad():
            for b in model.blocks:
                b.attn.sinks.normal_()
    return model


def reference(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    ids, dev = list(prompt), next(model.parameters()).device
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids], device=dev))[0, -1].argmax()))
        logits = model(torch.tensor([ids], device=dev))[0, len(prompt) - 1:-1]
    return ids[len(prompt):], logits.cpu()


def cached(model, prompt, n, cache, pad: int = 0) -> tuple[list[int], torch.Tensor]:
    """Greedy decode through `cache`, row 0 left-padded by `pad` slots where the cache supports it."""
    ids = torch.tensor([[0] * pad + prompt])
    positions = (torch.arange(ids.shape[1]) - pad).clamp(min=0)[None]
    out, logits = [], []
    with torch.no_grad():
        last = model(ids, positions, cache=cache)[0, -1]
        for i in range(n):
            logits.append(last)
            out.append(int(last.argmax()))
            last = model(torch.tensor([[out[-1]]]), torch.tensor([[len(prompt) + i]]), cache=cache)[0, -1]
    return out, torch.stack(logits)


def caches(model, name: str):
    L = len(PROMPT) + NEW + 3
    if name.startswith("mla"):
        return {"latent": (MLACache.for_model(model, 1, L), 0)}
    static = StaticKVCache.for_model(model, 1, 32)
    static.start([3])
    padded = KVCache.for_model(model, 1, L + 3)
    padded.set_padding([3])
    return {"contiguous": (KVCache.for_model(model, 1, L), 0), "contiguous-padded": (padded, 3),
            "static": (static, 3), "sliding": (SlidingWindowCache.for_model(model), 0)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_cache_kind_matches_full_recompute(name):
    model = variant_model(name)
    want_tokens, want_logits = reference(model, PROMPT, NEW)
    for kind, (cache, pad) in caches(model, name).items():
        tokens, logits = cached(model, PROMPT, NEW, cache, pad)
        assert tokens == want_tokens, kind
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4, msg=kind)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_paged_engine_matches_full_recompute(name, tok):
    """The engine's paged caches (K/V blocks or MLA latents), prefills in 5-token chunks, a second
    request hitting the first's cached prefix, decodes batched: tokens and logprobs of the reference."""
    check_engine(variant_model(name), tok)


@pytest.mark.parametrize("name", [n for n in VARIANTS if not n.startswith("mla")])
def test_paged_engine_batched_prefill_kernel_matches_full_recompute(name, tok):
    """The same with every step's prefill chunks in one varlen FlashAttention call (head_dim 64, the
    kernel's smallest), on the GPU where there is one (the kernel's fp32 dots in tf32 there: log-probs
    within 5e-3), else in Triton's interpreter on the CPU. MLA prefills stay per sequence (q/k and v widths
    differ)."""
    pytest.importorskip("triton")
    from lmforge.kernels.decode import available

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not available(dev):
        pytest.skip("needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")
    engine = check_engine(variant_model(name, head_dim=64).to(dev), tok, tol=1e-4 if dev == "cpu" else 5e-3,
                          prefill_attention="kernel")
    assert engine.runner.cache.prefill_kernel is not None  # it ran without failing over to the reference


def check_engine(model, tok, tol: float = 1e-4, **config):
    from lmforge.infer.engine import Engine, EngineConfig
    from lmforge.infer.sampling import SamplingParams

    prompts = [PROMPT, PROMPT[:5] + [1, 2, 3, 4, 5, 6]]
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=5, **config))
    sp = SamplingParams(temperature=0, max_tokens=NEW, logprobs=0, ignore_eos=True)
    ids = [engine.add_request(p, sp) for p in prompts]
    outs = {}
    while engine.has_unfinished():
        outs.update({o.request_id: o for o in engine.step()})
    for rid, prompt in zip(ids, prompts):
        want_tokens, want_logits = reference(model, prompt, NEW)
        want_lp = want_logits.log_softmax(-1).gather(-1, torch.tensor(want_tokens)[:, None])[:, 0]
        assert outs[rid].token_ids == want_tokens
        torch.testing.assert_close(torch.tensor(outs[rid].logprobs), want_lp, atol=tol, rtol=tol)
    assert engine.stats()["prefix_hit_blocks"] == 1
    return engine
