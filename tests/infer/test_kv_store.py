"""The cache-store seam (EngineConfig.kv_cache, lmforge.infer.kv.paged.CacheStore): a store builds the engine's
paged cache, says what a token takes in the pool and which features it cannot serve. The toy store here
keeps keys and values on a per-token int8 grid (simulated quantization: absmax scale per token and head);
its engine equals a full forward whose attention quantizes the same way, under chunks and prefix hits."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.config import pool_blocks
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.kv.paged import CacheStore, PagedKVCache
from lmforge.infer.sampling import SamplingParams
from lmforge.model.layers.attention import DENSE

from .infer_helpers import greedy_with_attention, run_requests, tiny_model


def int8_grid(x: torch.Tensor) -> torch.Tensor:
    """x (..., hd) on a symmetric int8 grid, one absmax scale per vector (per token and head)."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
    return (x / scale).round().clamp(-127, 127) * scale


class Int8Cache(PagedKVCache):
    def attend(self, layer, q, k, v, spec, meta):
        return super().attend(layer, q, int8_grid(k), int8_grid(v), spec, meta)


class Int8Store(CacheStore):
    graph_safe = True  # PagedKVCache's decode path reads device metadata only

    def __init__(self, refuse=()):
        self.refuse, self.built = refuse, 0

    def build(self, spec, num_blocks, block_size, device, dtype, decode, prefill, max_seqs):
        self.built += 1
        return Int8Cache(spec, num_blocks, block_size, device, dtype, decode, prefill)

    def bytes_per_token(self, spec, dtype):  # int8 codes + an fp32 scale per token and head
        return sum(2 * layer.kv_heads * (layer.head_dim + 4) for layer in spec.layers)

    def unsupported(self, feature):
        return f"a toy store without {feature}" if feature in self.refuse else None


class Int8Reference:
    length = 0

    def attend(self, layer, q, k, v, spec, meta=None):
        return DENSE.attend(layer, q, int8_grid(k), int8_grid(v), spec, meta)


def test_a_store_builds_the_cache_and_sizes_the_pool(tok):
    model = tiny_model("llama", init_std=0.3)
    g = torch.Generator().manual_seed(4)
    shared = torch.randint(1, 250, (10,), generator=g).tolist()
    prompts = [shared + torch.randint(1, 250, (n,), generator=g).tolist() for n in (3, 9)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    store = Int8Store(refuse=("kernel_step",))
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=6, kv_cache=store))
    assert store.built == 1 and isinstance(engine.runner.cache, Int8Cache) and engine.runner.kernel_step is None
    outs = []
    for wave in (prompts, prompts[:1]):  # the second wave reads the first's blocks
        outs += [o.outputs[0] for o in run_requests(engine, [(p, sp) for p in wave])]
    assert engine.stats()["prefix_hit_blocks"] > 0
    for prompt, out in zip(prompts + prompts[:1], outs):
        want, lps = greedy_with_attention(model, prompt, 8, Int8Reference())
        assert out.token_ids == want and out.logprobs == pytest.approx(lps, abs=1e-4)
    spec = model.cache_spec()
    wide = pool_blocks(EngineConfig(), spec, torch.device("cpu"), 10**7)
    narrow = pool_blocks(EngineConfig(kv_cache=Int8Store()), spec, torch.device("cpu"), 10**7)
    assert narrow == pytest.approx(wide * 4 * spec.layers[0].head_dim / (spec.layers[0].head_dim + 4), rel=1e-3)


def test_what_a_store_cannot_serve(tok):
    model = tiny_model("llama")
    store = Int8Store(refuse=("cuda_graphs", "prefix_caching", "draft"))
    engine = Engine(model, tok, EngineConfig(kv_cache=store))
    assert not engine.pool.prefix_caching and engine.runner.graphs is None  # default-on features: off
    for kw, what in ((dict(config=EngineConfig(kv_cache=store, cuda_graphs=True)), "cuda_graphs"),
                     (dict(config=EngineConfig(kv_cache=store), draft="ngram"), "draft")):
        with pytest.raises(ConfigError, match=f"cannot serve {what}: a toy store without {what}") as e:
            Engine(model, tok, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="kv_cache must be a lmforge.infer.kv.paged.CacheStore"):
        EngineConfig(kv_cache="int8")
    from .state_models import tiny_state_model

    with pytest.raises(ConfigError, match="no recurrent-state layers"):
        Engine(tiny_state_model("hybrid"), tok, EngineConfig(kv_cache=Int8Store()))


def test_a_store_keeps_mixed_steps_eager(tok):
    """A CacheStore's cache attends its own way (AttnMetadata.varlen_tiles need not be read): graph_prefill_tokens
    leaves its steps holding prefill chunks eager, while decode steps keep the graphs."""
    engine = Engine(tiny_model("llama", init_std=0.3), tok, EngineConfig(kv_cache=Int8Store(), cuda_graphs=True,
                                                                         graph_prefill_tokens=64, block_size=4))
    assert engine.runner.mixed_tokens == 0 and engine.runner.graphs.mixed_tokens == 0
    assert engine.runner.graphs is not None
