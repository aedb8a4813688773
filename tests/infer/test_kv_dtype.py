"""A K/V cache narrower than the model (EngineConfig.kv_cache_dtype): the engine attends over keys and values
rounded as the cache keeps them, the step's own new ones too, so its outputs equal a full forward whose
attention rounds every key and value to that dtype, whatever the schedule (whole prompts, chunks, prefix
hits, batch companions); the pool holds as many more tokens as the dtype is narrower."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.config import KV_DTYPES, pool_blocks
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.kv.paged import as_kept
from lmforge.infer.sampling import SamplingParams
from lmforge.model.cache import CacheSpec, LayerCacheSpec
from lmforge.model.layers.attention import DENSE

from .infer_helpers import greedy_with_attention, run_requests, tiny_model

MLA = dict(attention="mla", rope_layout="interleaved", n_kv_heads=None)


class Rounded:
    """The reference's attention: no cache, every key and value rounded to `dtype` first (after RoPE, as the
    engine's cache stores them)."""
    length = 0

    def __init__(self, dtype):
        self.dtype = dtype

    def attend(self, layer, q, k, v, spec, meta=None):
        return DENSE.attend(layer, q, as_kept(k, self.dtype), as_kept(v, self.dtype), spec, meta)

    def attend_latent(self, layer, mla, q_nope, q_rope, c_kv, k_rope, spec, meta=None):
        return DENSE.attend_latent(layer, mla, q_nope, q_rope, as_kept(c_kv, self.dtype), as_kept(k_rope, self.dtype),
                                   spec, meta)


def reference(model, prompt: list[int], n: int, dtype) -> tuple[list[int], list[float]]:
    return greedy_with_attention(model, prompt, n, Rounded(dtype))


def run(engine, prompts, sp):
    return [o.outputs[0] for o in run_requests(engine, [(p, sp) for p in prompts])]


def arch_model(arch: str):
    if arch == "mla":
        from lmforge.model.config import MLAConfig

        return tiny_model("llama", init_std=0.3, **MLA, mla=MLAConfig(kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8,
                                                                    qk_rope_head_dim=8, v_head_dim=8))
    return tiny_model("llama", init_std=0.3)


@pytest.mark.parametrize("arch", ["llama", "mla"])
@pytest.mark.parametrize("name", ["bf16", "fp8"])
def test_engine_equals_a_forward_over_rounded_keys_whatever_the_schedule(tok, arch, name):
    model = arch_model(arch)
    dtype = KV_DTYPES[name]
    g = torch.Generator().manual_seed(2)
    shared = torch.randint(1, 250, (9,), generator=g).tolist()
    prompts = [shared + torch.randint(1, 250, (n,), generator=g).tolist() for n in (4, 11, 2)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=0)
    want = [reference(model, p, 8, dtype) for p in prompts]
    for config in (dict(block_size=4), dict(block_size=4, max_num_batched_tokens=5)):  # whole, then in chunks
        engine = Engine(model, tok, EngineConfig(kv_cache_dtype=name, **config))
        assert all(k.dtype == dtype for k in engine.runner.cache.pools())
        got = run(engine, prompts, sp) + run(engine, prompts[:1], sp)  # the second wave hits the prefix cache
        assert engine.stats()["prefix_hit_blocks"] > 0
        for out, (tokens, lps) in zip(got, want + want[:1]):
            assert out.token_ids == tokens
            assert out.logprobs == pytest.approx(lps, abs=1e-4)
    plain = run(Engine(model, tok, EngineConfig(block_size=4)), prompts[:1], sp)[0]
    assert plain.logprobs != pytest.approx(want[0][1], abs=1e-6)  # the rounding is there to see


def test_the_pool_holds_as_many_more_tokens_as_the_cache_is_narrower():
    spec = CacheSpec(layers=(LayerCacheSpec(kind="full", kv_heads=8, head_dim=128),) * 4, dtype=torch.float32,
                     max_seq_len=10**6, vocab_size=8)
    blocks = {d: pool_blocks(EngineConfig(kv_cache_dtype=d), spec, torch.device("cpu"), 10**6)
              for d in ("fp32", "bf16", "fp8")}
    assert blocks["bf16"] == 2 * blocks["fp32"] and blocks["fp8"] == 4 * blocks["fp32"]


def test_refusals(tok):
    class NoCache(torch.nn.Module):  # a model without cache_spec(): the recompute runner, no cache to narrow
        def __init__(self, model):
            super().__init__()
            self.model, self.max_seq_len, self.vocab_size = model, model.cfg.max_seq_len, model.cfg.vocab_size

        def forward(self, ids, positions=None, cache=None, meta=None):
            return self.model(ids)

    with pytest.raises(ConfigError, match="kv_cache_dtype must be None"):
        EngineConfig(kv_cache_dtype="int8")
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="needs a model with cache_spec"):
        Engine(NoCache(model), tok, EngineConfig(kv_cache_dtype="bf16"))
    with pytest.raises(ConfigError, match="kernel_step=True"):
        Engine(model, tok, EngineConfig(kv_cache_dtype="bf16", kernel_step=True))


@pytest.mark.parametrize("arch", ["llama", "mla"])
@pytest.mark.parametrize("name", ["bf16", "fp8"])
def test_the_paged_kernels_read_a_narrower_cache(tok, name, arch):
    """decode_attention='kernel' (on a CPU through Triton's interpreter) over a bf16 or fp8 cache: the decode kernel
    (and, with graph_prefill_tokens, the varlen kernel of mixed steps; MLA: the latent kernel's decode and varlen
    rows) read the rounded keys in the model's dtype - the tokens and log-probs of a forward over rounded keys."""
    from lmforge.kernels.decode import available

    if not available("cpu"):
        pytest.skip("needs triton (TRITON_INTERPRET=1 on CPU)")
    model = arch_model(arch)
    prompts = [[5, 17, 99, 3, 42, 7, 11], [8, 1, 2]]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    want = [reference(model, p, 6, KV_DTYPES[name]) for p in prompts]
    for extra in (dict(), dict(cuda_graphs=True, graph_prefill_tokens=32)):
        engine = Engine(model, tok, EngineConfig(kv_cache_dtype=name, decode_attention="kernel", block_size=4, **extra))
        assert engine.runner.cache.kernel is not None
        for out, (tokens, lps) in zip(run(engine, prompts, sp), want):
            assert out.token_ids == tokens
            assert out.logprobs == pytest.approx(lps, abs=1e-4)
