"""An EAGLE-style head whose KV cache lives in the engine's block pool (lmforge.infer.draft.PagedDraftHead,
with tests/infer/eagle_toy.py's PagedEagle): its proposals equal the plain contiguous head's (CachedEagle,
recomputing its whole history from a full forward's features; with or without the begin entry) at every
round, chains and trees, greedy and sampled (each round replayed from the sequence's generator state), also
for a sequence resuming after a prefix hit from the feature kept with the hit's last block; the engine's
greedy output with it is the target's under chunked prefill, n = 2 forks, preemption (the head rebuilt from
features handed again, or resumed from a hit), prefix caching, an abort and batches of several sequences.
Async scheduling does not apply: any draft turns it off."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.blocks import BlockPool
from lmforge.infer.detok import IdTokenizer
from lmforge.infer.draft import PagedDraftHead
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.features import Features, FeatureStream
from lmforge.infer.processors import build_processors
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import DraftItem
from lmforge.infer.token_tree import DraftTree

from .eagle_toy import CachedEagle, PagedEagle, growing_rounds
from .infer_helpers import full_greedy, tiny_model
from .test_eagle_hidden import PROMPTS, reference, run_all, trained_toy
from .test_engine_api import NoCacheSpec

WIDTHS = (2, 2, 1)


def heads(model, widths, begin: bool = False):
    """(the contiguous reference recomputing its history, the paged head), with the same weights; begin: the
    paged head's later pairs see its begin entry, and the reference has one."""
    fitted, out = trained_toy(model, widths=widths), []
    for make in (lambda: CachedEagle(model, widths, cached=False, begin=begin),
                 lambda: PagedEagle(model, widths, begin_entry=begin)):
        torch.manual_seed(0)  # the same block in both
        head = make()
        head.load_state_dict(fitted.state_dict(), strict=False)
        out.append(head)
    return out


def same_proposal(item: DraftItem, gen_state, answer, ref: CachedEagle, feats: torch.Tensor) -> None:
    """answer (the paged head's) equals what ref proposes for item's context from feats (positions 0 ..
    len(ctx) - 2), drawing from a generator in gen_state: its first k drafts (a tree's first k nodes, the ones
    the engine keeps) and their q rows."""
    gen = None
    if gen_state is not None:
        gen = torch.Generator()
        gen.set_state(gen_state)
    ref.release(item.seq_id)  # (a history from position 0 each time)
    drafts, q = ref.propose(list(item.ctx), item.k, item.procs, item.greedy, gen,
                            hidden=Features(item.seq_id, 0, feats))
    got, got_q = answer
    if isinstance(drafts, DraftTree):
        drafts, got = drafts.first(item.k), got.first(item.k)
        assert (got.tokens, got.parents) == (drafts.tokens, drafts.parents)
    else:
        assert got == drafts
    if not item.greedy:
        torch.testing.assert_close(got_q[:len(got)], q[:len(got)], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("widths,fused,begin", [(None, False, False), (WIDTHS, False, False), (None, True, False),
                                                (None, False, True), (WIDTHS, False, True)])
def test_paged_head_proposes_what_the_contiguous_head_proposes(widths, fused, begin):
    """Three rounds for four sequences of different lengths in one BlockPool (one sampled, budgets 1 to the
    tree's size): each propose_batch call runs one catch-up forward and one per draft depth over the pool's
    blocks, and answers what the contiguous head answers one sequence at a time, recomputing its history
    (fused: the head's `fuse` maps two layers' features to its input, EAGLE-3's fc, before the pairs)."""
    model = tiny_model("llama", init_std=0.1)
    ref, head = heads(model, widths, begin)
    d = model.cfg.d_model
    if fused:
        head.fuse = torch.nn.Linear(2 * d, d)
    pool = BlockPool(80, 4)
    paged = PagedDraftHead(head, pool.num_blocks, 4, "cpu")
    g = torch.Generator().manual_seed(3)
    tables = [[] for _ in range(4)]
    for t in tables:
        pool.append(t, 0, 64)
    feats = torch.randn(4, 40, 2 * d if fused else d, generator=g)
    with torch.no_grad():
        inputs = head.fuse(feats)  # what the reference's pairs take
    sampled = build_processors(SamplingParams(temperature=0.8))
    gen = torch.Generator().manual_seed(7)
    size = ref.tree_size if widths else 3
    for rnd in growing_rounds(g, feats):
        items = [DraftItem(b, ctx, (size, 2, size, 1)[b], sampled if b == 2 else [], b != 2,
                           gen if b == 2 else None, hidden, tables[b]) for b, ctx, hidden in rnd]
        state, forwards = gen.get_state(), paged.forwards  # item 2's draws are replayed from it
        answers = paged.propose_batch(items)
        assert paged.forwards - forwards == (len(widths) if widths else size)
        for it, answer in zip(items, answers):
            same_proposal(it, None if it.greedy else state, answer, ref, inputs[it.seq_id, :len(it.ctx) - 1])


def test_a_prefix_hit_resumes_from_the_feature_kept_with_its_last_block():
    """Sequence b shares sequence a's first two blocks (the prefix cache's hit): its stream resumes at
    position 8 from the feature the head kept for block 1 (a's position 7) and its catch-up starts at slot 8;
    its (sampled) proposal equals the contiguous reference over its whole context."""
    model = tiny_model("llama", init_std=0.1)
    ref, head = heads(model, None)
    pool = BlockPool(40, 4)
    paged = PagedDraftHead(head, pool.num_blocks, 4, "cpu")
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 24, model.cfg.d_model, generator=g)
    feats[1, :8] = feats[0, :8]  # the same tokens before position 8: the same features
    ctx_a = torch.randint(1, 257, (11,), generator=g).tolist()
    ctx_b = ctx_a[:8] + torch.randint(1, 257, (5,), generator=g).tolist()
    table_a = []
    pool.append(table_a, 0, 16)
    paged.propose_batch([DraftItem(0, ctx_a, 3, [], True, None, Features(0, 0, feats[0, :10]), table_a)])
    table_b = pool.fork(table_a[:2])
    pool.append(table_b, 8, 8)
    stream = FeatureStream()
    stream.resume(8, paged.block_feature[table_b[1]])
    stream.push(8, feats[1, 8:12])
    gen, sampled = torch.Generator().manual_seed(9), build_processors(SamplingParams(temperature=0.8))
    item = DraftItem(1, ctx_b, 3, sampled, False, gen, stream.take(1, len(ctx_b)), table_b)
    assert item.hidden.start == 7
    state = gen.get_state()
    same_proposal(item, state, paged.propose_batch([item])[0], ref, feats[1, :12])


@pytest.mark.parametrize("widths,prefix_caching,graphs", [(None, True, False), (WIDTHS, True, False),
                                                           (None, False, False), (None, True, True),
                                                           (WIDTHS, False, True)])
def test_engine_with_a_paged_head_equals_plain_decoding(widths, prefix_caching, graphs):
    """Five requests (a shared prefix, n = 2, a seeded sampled one, a 21-token prompt in chunks of 7, one
    aborted) on a pool small enough to preempt: greedy outputs are the target's; every round's proposal is
    the contiguous reference's from a full forward's features; preempted sequences are handed their features
    again from position 0 and the head rebuilds its entries (with prefix caching off, the blocks they lived in
    are truly gone); with it on, sequences admitted on a hit (preempted ones too) resume their features from
    the one kept with the hit's last block, and their proposals still equal the reference; the head's cache
    has the target's blocks and every block comes back. graphs: the target's verify chunks and the head's
    rounds and catch-up chunks run on static buffers (CUDA graphs on a GPU), trees as rows with tree bits."""
    model = tiny_model("llama", init_std=0.1)
    ref, head = heads(model, widths)
    greedy = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    reqs = [(PROMPTS[0], greedy), (PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2)),
            (PROMPTS[2], SamplingParams(temperature=0.8, seed=4, max_tokens=12, ignore_eos=True)),
            (PROMPTS[3], greedy)]
    config = EngineConfig(block_size=4, num_kv_tokens=40, max_num_batched_tokens=7, prefix_caching=prefix_caching,
                          cuda_graphs=graphs)
    engine = Engine(model, IdTokenizer(257), config, draft=head, num_draft_tokens=3)
    paged = engine.draft_head
    assert paged.runner.cache.k[0].shape[0] == engine.pool.num_blocks + 1  # the target's block ids (+ padding)
    rounds, calls, propose_batch = [], [], paged.propose_batch

    def watch(items):
        states = [it.gen.get_state() if it.gen is not None else None for it in items]
        forwards, answers = paged.forwards, propose_batch(items)
        calls.append((len(items), max(it.k for it in items), paged.forwards - forwards))
        rounds.extend(zip([DraftItem(**{**vars(it), "ctx": list(it.ctx)}) for it in items], states, answers))
        return answers

    paged.propose_batch = watch
    aborted = engine.add_request(PROMPTS[3][:8], greedy)
    for _ in range(6):
        engine.step()
    engine.abort(aborted)
    outs = run_all(engine, reqs)
    for (p, sp), out in zip(reqs, outs):
        if sp.greedy:
            assert all(o.token_ids == full_greedy(model, p, sp.max_tokens) for o in out.outputs)
    st = engine.stats()
    assert st["preemptions"] > 0 and (st["prefix_hit_blocks"] > 0) == prefix_caching and engine.pool.num_used == 0
    assert sum(o.metrics["accepted"] for o in outs) > 0 and max(n for n, _, _ in calls) >= 2
    for n, k, forwards in calls:  # one catch-up, then one forward per draft depth
        assert forwards == (len(widths) if widths else k) or (widths and 1 <= forwards < len(widths))
    starts = {}
    for item, state, answer in rounds:
        starts.setdefault(item.seq_id, []).append(item.hidden.start)
        same_proposal(item, state, answer, ref, reference(model, item.ctx)[:len(item.ctx) - 1])
    if prefix_caching:  # a sequence admitted on a prefix hit: its first features after the cached blocks
        assert any(s[0] > 0 for s in starts.values())
    else:  # a preempted sequence's head rebuilt from position 0
        assert any(0 in s[1:] for s in starts.values())
    assert len(starts) == 6  # 5 requests, one with n = 2
    if graphs:  # the head's own rounds (single pairs) and catch-up chunks (several) ran on its static buffers
        used = [key for key in paged.runner.graphs.entries if key[2] and key[2][0] == "pairs"]
        assert used and (widths or max(key[0] for key in used) >= 2)
        if widths:  # the head's tree rounds and the target's tree verify chunks as rows with tree bits
            assert any(key[3] for key in used) and any(key[3] for key in engine.runner.graphs.entries)


def test_paged_head_refusals():
    model = tiny_model("llama", init_std=0.1)
    with pytest.raises(ConfigError, match="keeps its cache in the engine's paged pool.*has no cache_spec"):
        Engine(NoCacheSpec(model), IdTokenizer(257), draft=PagedEagle(model))
    mistral = tiny_model("llama", sliding_window=8)
    with pytest.raises(ConfigError, match="sliding-window model \\(window 8\\)"):
        Engine(mistral, IdTokenizer(257), EngineConfig(num_kv_tokens=256), draft=PagedEagle(mistral))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_head_rounds_equal_the_eager_head():
    """On a GPU the head's rounds replay captured graphs whose output buffer the next replay overwrites: the
    tokens, the drafts accepted and the head's forwards equal the engine without graphs (fp32)."""
    model = tiny_model("llama", init_std=0.1)
    _, head = heads(model, None)
    model.cuda()
    head.cuda()
    greedy = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    reqs = [(PROMPTS[0], greedy), (PROMPTS[1], greedy), (PROMPTS[3], greedy),  # (the toy head's drafts are
            (PROMPTS[2], SamplingParams(temperature=0.8, seed=4, max_tokens=12, ignore_eos=True))]  # accepted here)
    got = []
    for graphs in (False, True):
        config = EngineConfig(block_size=4, num_kv_tokens=40, max_num_batched_tokens=7, cuda_graphs=graphs)
        engine = Engine(model, IdTokenizer(257), config, draft=head, num_draft_tokens=3)
        outs = run_all(engine, reqs)
        got.append(([o.outputs[0].token_ids for o in outs], [o.metrics["accepted"] for o in outs],
                    engine.draft_head.forwards))
    head_graphs = engine.draft_head.runner.graphs  # (the head's cache attends on the reference path: first_key)
    assert head_graphs.failed is None and all(e.graph is not None for e in head_graphs.entries.values())
    assert got[0] == got[1] and sum(got[0][1]) > 0
