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


def variant_model(name: str):
    model = tiny_model("llama", **VARIANTS[name], init_std=0.3)
    if name == "sinks":
        with torch.no_grad():
            for b in model.blocks:
                b.attn.sinks.normal_()
    return model


def reference(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        logits = model(torch.tensor([ids]))[0, len(prompt) - 1:-1]
    return ids[len(prompt):], logits


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
