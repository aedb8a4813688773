"""Sizing the caches of models with recurrent-state layers (lmforge.infer.config.pool_blocks, sequence_bytes):
the state rows are checked against the cache budget whatever num_kv_tokens says, a pure state model's
bookkeeping pool is bounded, and a hybrid whose attention layers all slide (Samba) frees blocks behind the
window as Mistral does."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.config import STATE_ONLY_TOKENS, pool_blocks
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.sampling import SamplingParams
from lmforge.model.cache import CacheSpec, LayerCacheSpec
from lmforge.model.layers.block import Block

from .state_models import HybridLM
from .test_state_cache import no_leak, reference, run

CPU = torch.device("cpu")
WIDE = LayerCacheSpec(kind="state", state_shapes=((2**20,),), state_dtype=torch.float32)  # 4 MiB a sequence
ATTN = LayerCacheSpec(kind="full", kv_heads=8, head_dim=64)  # 2 KiB a token in bf16


def spec(*layers, max_seq_len: int = 4096) -> CacheSpec:
    return CacheSpec(layers=layers, dtype=torch.bfloat16, max_seq_len=max_seq_len, vocab_size=8)


def test_state_rows_that_do_not_fit_are_one_line_naming_them():
    """301 rows of 4 MiB pass a CPU's 1 GiB: refused for a pure state model (it allocated them unchecked) and a
    hybrid (it blamed the KV cache), with num_kv_tokens too (it skipped the check)."""
    for layers, row, rows in (((WIDE, WIDE), "8.0 MiB", "2.35 GiB"), ((WIDE, ATTN), "4.0 MiB", "1.18 GiB")):
        for kv_tokens in (None, 64):
            with pytest.raises(LmforgeError, match=rf"^the per-sequence state does not fit: 301 recurrent-state rows "
                               rf"\(max_num_seqs 150 \+ 1 \+ state_snapshots 150\) of {row} = {rows}, over 1.00 "
                               r"GiB \(a CPU's cache budget\); lower max_num_seqs or state_snapshots$"):
                pool_blocks(EngineConfig(max_num_seqs=150, state_snapshots=150, num_kv_tokens=kv_tokens),
                            spec(*layers), CPU, 4096)
    with pytest.raises(LmforgeError, match=r"\(max_num_seqs 300 \+ 1\) of 8.0 MiB = 2.35 GiB, over 1.00 GiB \(a CPU's "
                                          r"cache budget\); lower max_num_seqs$"):  # no snapshots: none to lower
        pool_blocks(EngineConfig(max_num_seqs=300), spec(WIDE, WIDE), CPU, 4096)
    # 121 rows of 8 MiB fit; the hybrid's pool gets what they leave (2 KiB a token)
    fits = EngineConfig(max_num_seqs=100, state_snapshots=20, block_size=16)
    assert pool_blocks(fits, spec(WIDE, WIDE), CPU, 4096) == 100 * 4096 // 16
    assert pool_blocks(fits, spec(WIDE, ATTN), CPU, 4096) == (2**30 - 121 * 4 * 2**20) // 2048 // 16
    assert pool_blocks(dataclasses.replace(fits, num_kv_tokens=64), spec(WIDE, ATTN), CPU, 4096) == 4


def test_snapshots_count_only_where_prefix_caching_keeps_them():
    """The engine keeps no snapshots without prefix caching: they are not set aside then."""
    config = EngineConfig(max_num_seqs=200, state_snapshots=60)  # 261 rows of 4 MiB: over 1 GiB
    with pytest.raises(LmforgeError, match="261 recurrent-state rows"):
        pool_blocks(config, spec(WIDE, ATTN), CPU, 4096)
    off = dataclasses.replace(config, prefix_caching=False)
    assert pool_blocks(off, spec(WIDE, ATTN), CPU, 4096) == (2**30 - 201 * 4 * 2**20) // 2048 // 16


def test_a_pure_state_models_bookkeeping_pool_is_bounded():
    """max_num_seqs full-length sequences of blocks, at most STATE_ONLY_TOKENS of them, at least one sequence."""
    small = LayerCacheSpec(kind="state", state_shapes=((64, 3), (64, 16)))
    assert STATE_ONLY_TOKENS == 2**23
    for max_seq_len, blocks in ((4096, 256 * 256), (32768, 2**19), (262144, 2**19), (2**24, 2**20)):
        assert pool_blocks(EngineConfig(), spec(small, max_seq_len=max_seq_len), CPU, max_seq_len) == blocks


def samba(window: int = 6) -> HybridLM:
    """A Samba-like hybrid (Ren et al. 2024): recurrent layers between attention layers that all slide."""
    torch.manual_seed(0)
    model = HybridLM(pattern="sasa")
    model.cfg = dataclasses.replace(model.cfg, sliding_window=window)
    for i, kind in enumerate(model.pattern):
        if kind == "a":
            model.layers[i] = Block(model.cfg, i)
    with torch.no_grad():  # weights large enough that greedy choices are clear (no near-ties)
        for name, p in model.named_parameters():
            if p.dim() == 2 and "A_log" not in name:
                p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("config", [dict(block_size=2, max_num_batched_tokens=7, num_kv_tokens=40, max_num_seqs=4),
                                    dict(block_size=4, max_num_batched_tokens=7, num_kv_tokens=48, max_num_seqs=3,
                                         state_snapshots=4)])
def test_a_hybrid_whose_attention_all_slides_frees_blocks_behind_the_window(config, tok):
    """State layers keep no keys, so the window is the attention layers': a 48-token request needs 8 blocks of
    2, not 24 (refused by a 20-block pool before), and sequences are not preempted for blocks behind it."""
    model = samba()
    assert [layer.window for layer in model.cache_spec().layers] == [0, 6, 0, 6]
    engine = Engine(model, tok, EngineConfig(**config))
    assert engine.window == 6
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 250, (n,), generator=g).tolist() for n in (2, 9, 15, 23)]
    greedy = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, logprobs=0)
    done = run(engine, [(p, greedy) for p in prompts * 2])  # twice: the second round meets cached blocks
    for i, prompt in enumerate(prompts * 2):
        want, lps = reference(model, prompt, greedy.max_tokens)
        assert done[i].outputs[0].token_ids == want, i
        assert done[i].outputs[0].logprobs == pytest.approx(lps, abs=1e-4)
    assert engine.stats()["preemptions"] == 0
    assert engine.pool.peak_used <= config["max_num_seqs"] * (-(-(6 + 7) // config["block_size"]) + 1)
    no_leak(engine)


def test_a_pure_state_model_has_no_window(tok):
    from .state_models import tiny_state_model

    assert Engine(tiny_state_model("ssm"), tok, EngineConfig(max_num_seqs=2)).window == 0
