"""Forked sequences never write into a block another sequence holds (lmforge.infer.blocks copy-on-write).

The case that broke it: a speculative request's last prefill chunk reserves room for drafts, so the parent's
block table already holds a block past its tokens when its n samples fork; every sample then wrote its own keys
at the same positions of that one shared block (2026-12-06 sweep, B2). Each sample's reported log-probs must equal
a plain forward of prompt + that sample's tokens, whatever the drafter, the step budget or the model kind."""

from __future__ import annotations

import pytest
import torch
from .infer_helpers import tiny_model
from .state_models import tiny_state_model

from lmforge.infer.blocks import BlockPool
from lmforge.infer.engine import EngineConfig
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.token_tree import TreeDrafter

PROMPT = "prompt 0 prompt 0 "  # 18 byte tokens: with block_size 4 and 4 drafts, the room reaches a block past it
CHUNKED = dict(block_size=4, max_num_batched_tokens=12)  # the prompt is prefilled in two chunks


def _forward_error(model, prompt_ids: list[int], completion) -> float:
    """Largest |engine log-prob - plain forward log-prob| over one sample's tokens."""
    ids = list(prompt_ids) + list(completion.token_ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].float().log_softmax(-1)
    P = len(prompt_ids)
    assert len(completion.logprobs) == len(completion.token_ids)
    return max(abs(lp - ref[P + i - 1, t].item()) for i, (t, lp) in enumerate(zip(completion.token_ids,
                                                                                    completion.logprobs)))


def _sampled(n: int = 2, **kw) -> SamplingParams:
    return SamplingParams(**{**dict(temperature=0.8, seed=1, n=n, max_tokens=14, logprobs=0, ignore_eos=True), **kw})


def _no_block_held(pool: BlockPool) -> bool:
    return pool.num_free == pool.num_blocks and not any(pool.ref)


# the block pool ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [8, 6])  # block-aligned prompt; a partly filled last block
def test_fork_of_a_table_with_reserved_room_writes_privately(tokens):
    """A table holding room past its tokens (drafts' lookahead) forks: each holder's next write gets private
    blocks for the whole written range - the reserved block included, fresh (nothing of it to copy), and the
    partly filled tail copied - and the parent, once alone, writes in place."""
    pool, room = BlockPool(8, 4), 4
    parent = []
    pool.append(parent, 0, tokens + room)  # the last prefill chunk and its draft room: 3 blocks
    assert len(parent) == 3 and pool.num_free == 5
    child = pool.fork(parent)
    assert all(pool.ref[b] == 2 for b in parent)
    partial = tokens % 4 != 0
    assert pool.needed(child, tokens, room) == 1 + partial  # the reserved block (and the shared tail)
    copies = pool.try_append(child, tokens, room)  # the pending token and 3 drafts
    assert child[0] == parent[0] and child[2] != parent[2]  # the full prompt block stays shared
    assert copies == ([(parent[1], child[1])] if partial else [])  # only slots holding its keys are copied
    assert (child[1] != parent[1]) == partial
    first = tokens // 4
    assert not set(child[first:]) & set(parent[first:])  # no block of the written range is shared
    assert all(pool.ref[b] == 1 for b in child[first:] + parent[first:])
    assert pool.try_append(parent, tokens, room) == [] and len(parent) == 3  # written in place now
    pool.release(child)
    pool.release(parent)
    assert _no_block_held(pool)


def test_try_append_counts_every_shared_block_it_writes():
    """can_append (the scheduler's room check) counts a private block per shared block of the written range:
    with too few free blocks nothing changes."""
    pool = BlockPool(4, 4)
    parent = []
    pool.append(parent, 0, 4 + 8)  # a full block, then two reserved ones
    child = pool.fork(parent)
    assert pool.num_free == 1 and pool.needed(child, 4, 8) == 2 and not pool.can_append(child, 4, 8)
    before = (list(child), list(pool.ref), pool.num_free)
    assert pool.try_append(child, 4, 8) is None
    assert (list(child), list(pool.ref), pool.num_free) == before
    assert pool.try_append(child, 4, 4) == [] and child[1] not in parent and child[2] == parent[2]
    pool.release(child)
    pool.release(parent)
    assert _no_block_held(pool)


def test_a_block_named_for_the_prefix_cache_is_never_written():
    """A block a prefix key names is read as it is by later prompts: a write into it goes to a copy."""
    pool = BlockPool(4, 4)
    table = []
    pool.append(table, 0, 4)
    named = table[0]
    pool.register(named, 7)
    copies = pool.try_append(table, 2, 1)  # (no path should ask this; if one does, the cache stays intact)
    assert copies == [(named, table[0])] and table[0] != named and pool.cached[7] == named
    pool.release(table)
    assert _no_block_held(pool)


# the engine -------------------------------------------------------------------------------------------------
def _drafter(name: str):
    small = tiny_model("llama", seed=5, n_layers=1, d_model=16, n_heads=2, n_kv_heads=2)
    return {"ngram": "ngram", "model": small, "tree": TreeDrafter(small, widths=(2, 2))}[name]


@pytest.mark.parametrize("draft,graphs", [("ngram", False), ("model", False), ("tree", False), ("model", True)])
def test_samples_of_a_chunked_speculative_prompt_match_the_forward(tok, draft, graphs):
    target = tiny_model("llama")
    extra = dict(cuda_graphs=True, graph_prefill_tokens=16) if graphs else {}
    llm = LLM(target, tok, config=EngineConfig(**CHUNKED, **extra), draft=_drafter(draft), num_draft_tokens=4)
    prompts = [PROMPT, PROMPT + "x"]
    outs = llm.generate(prompts, _sampled())
    for p, out in zip(prompts, outs):
        assert len({tuple(c.token_ids) for c in out.outputs}) == 2  # the samples differ (their keys do)
        for c in out.outputs:
            assert _forward_error(target, tok.encode(p), c) < 1e-5, (draft, p, c.index)
    assert _no_block_held(llm.engine.pool)


def test_four_samples_with_a_wider_block(tok):
    target = tiny_model("llama")
    llm = LLM(target, tok, config=EngineConfig(block_size=8, max_num_batched_tokens=10), draft="ngram",
              num_draft_tokens=4)
    prompt = PROMPT + "abcd"  # 22 tokens in chunks of 10, 10, 2: the room reaches the 4th block
    out = llm.generate(prompt, _sampled(n=4))[0]
    for c in out.outputs:
        assert _forward_error(target, tok.encode(prompt), c) < 1e-5, c.index
    assert _no_block_held(llm.engine.pool)


def test_hybrid_state_model_samples_match_the_forward(tok):
    """Attention blocks of a model with recurrent-state layers (their state rows fork separately)."""
    model = tiny_state_model("hybrid")
    llm = LLM(model, tok, config=EngineConfig(**CHUNKED, max_num_seqs=8), draft="ngram")
    prompts = [PROMPT, PROMPT + "x"]
    for p, out in zip(prompts, llm.generate(prompts, _sampled())):
        for c in out.outputs:
            assert _forward_error(model, tok.encode(p), c) < 1e-4, (p, c.index)
    assert _no_block_held(llm.engine.pool)


def test_next_turn_reads_uncorrupted_prefix_blocks(tok):
    """Each sample's blocks are named for prefix caching: the next turn of its conversation hits them."""
    target = tiny_model("llama")
    llm = LLM(target, tok, config=EngineConfig(**CHUNKED), draft="ngram")
    out = llm.generate(PROMPT, _sampled())[0]
    for c in out.outputs:
        turn = tok.encode(PROMPT) + c.token_ids
        nxt = llm.generate([turn], SamplingParams(temperature=0, max_tokens=6, logprobs=0, ignore_eos=True))[0]
        assert nxt.metrics["num_cached_tokens"] >= 24  # its own tokens' blocks, read from the cache
        assert _forward_error(target, turn, nxt.outputs[0]) < 1e-5, c.index


def test_no_block_leaks_with_preemptions_and_aborts(tok):
    """A tight pool (preemptions), n = 1..3 samples with drafts, two requests aborted mid-way: the others match
    the forward and every block is free again afterwards."""
    target = tiny_model("llama")
    llm = LLM(target, tok, config=EngineConfig(**CHUNKED, num_kv_tokens=48), draft=_drafter("model"),
              num_draft_tokens=4)
    eng = llm.engine
    start = eng.pool.num_free
    prompts = [("p%d " % i) * (3 + i) for i in range(6)]
    rids = [eng.add_request(p, _sampled(n=1 + i % 3, seed=i, max_tokens=12)) for i, p in enumerate(prompts)]
    finals, steps = {}, 0
    while eng.has_unfinished():
        for o in eng.step(finished_only=True):
            finals[o.request_id] = o
        steps += 1
        if steps == 3:
            eng.abort(rids[1])
            eng.abort(rids[4])
    assert eng.stats()["preemptions"] > 0
    for i, rid in enumerate(rids):
        if i in (1, 4):
            continue
        for c in finals[rid].outputs:
            assert _forward_error(target, tok.encode(prompts[i]), c) < 1e-5, (i, c.index)
    assert eng.pool.num_free == start and not any(eng.pool.ref)
