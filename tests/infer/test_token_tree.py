"""Token-tree speculative decoding (lmforge.infer.token_tree) on the engine. Greedy: the runner scores a
pending token + tree as one chunk of the flat batch (beside decode rows and chain chunks, after a chain
prefix), each node's logits equal its branch run alone; the accepted path's keys/values, moved to
consecutive slots, equal a plain prefill's; the engine with TreeDrafter emits exactly the target's greedy
tokens under chunked prefill, preemption, prefix caching, mixed batches and async scheduling. Sampled:
SpecInfer's multi-step speculative sampling keeps the target's distribution (Monte Carlo), and a faithful
draft's whole paths are accepted on the engine."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.detok import IdTokenizer
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.runner import PagedRunner
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.scheduler import Batch
from lmforge.infer.token_tree import DraftTree, TreeDrafter, greedy_path, sampled_path
from lmforge.model.meta import accepted_slots

from .infer_helpers import NoCacheSpec, full_greedy, run_requests, tiny_model
from .test_tree_attention import (
    MLA,
    OTHER,
    PARENTS,
    PATH,
    PROMPT,
    TOKENS,
    branch_logits,
    full_logits,
    model_for,
)

BS = 4
GREEDY = {"temperature": 0, "ignore_eos": True}
LONG = [7, 3, 250, 12, 12, 40, 41, 42, 5, 6]


def arch_model(name: str):
    """test_tree_attention's variants, GPT-2 (learned positions) and MLA without a window."""
    if name in ("gpt2", "mla"):
        return tiny_model(*(("gpt2",) if name == "gpt2" else ("llama",)), **(MLA if name == "mla" else {}), init_std=0.3)
    return model_for(name)


def gathered(runner: PagedRunner, table: list[int], n: int) -> list[torch.Tensor]:
    """Every pool's contents at a sequence's first n positions (K and V, or MLA latents and rope keys)."""
    slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(n)])
    return [pool.view(-1, *pool.shape[2:])[slots] for pool in runner.cache.pools()]


def plain_prefill(model, tokens: list[int], table: list[int], num_blocks: int) -> PagedRunner:
    """A fresh paged cache holding one causal prefill of tokens, written through this block table."""
    runner = PagedRunner(model, model.cache_spec(), num_blocks, BS, "cpu")
    ids, meta = runner.prepare(Batch(chunks=[(SimpleNamespace(tokens=tokens, num_computed=0, evicted=0, pos_shift=0, block_table=table,
                                                              seq_id=0), len(tokens))]), [])
    with torch.no_grad():
        model(ids, cache=runner.cache, meta=meta)
    return runner


@pytest.mark.parametrize("name", ["full", "sliding", "mla-sliding", "gpt2"])
def test_runner_scores_a_tree_chunk_beside_decodes_and_chains_then_compacts_it(name):
    """Step 1 prefills part of three prompts. Step 2 (one flat row): B decodes, A's chunk is the rest of its
    prompt (a chain) ending in its pending token + the tree (Batch.trees), C's is a chain prefill chunk.
    Every row equals a full recompute; after moving the accepted path, the cache holds what a plain
    prefill of prompt + path writes, and decoding on reads it as a contiguous sequence."""
    model = arch_model(name)
    P, T = len(PROMPT), len(TOKENS)
    runner = PagedRunner(model, model.cache_spec(), 12, BS, "cpu", prefill="reference")
    a = SimpleNamespace(tokens=list(PROMPT), num_computed=0, evicted=0, pos_shift=0, block_table=[0, 1, 2, 3], seq_id=0)
    b = SimpleNamespace(tokens=list(OTHER), num_computed=0, evicted=0, pos_shift=0, block_table=[4, 5], seq_id=1)
    c = SimpleNamespace(tokens=list(LONG), num_computed=0, evicted=0, pos_shift=0, block_table=[6, 7, 8], seq_id=2)

    def run(batch: Batch, rows):
        ids, meta = runner.prepare(batch, [(ch, back, None) for ch, back in rows])
        with torch.no_grad():
            out = model(ids, cache=runner.cache, meta=meta)[0]
        for s, n in batch.chunks:
            s.num_computed += n
        return out

    run(Batch(chunks=[(a, 3), (b, len(OTHER)), (c, 4)]), [])
    b.tokens.append(3)
    a.tokens += TOKENS
    tree = Batch(chunks=[(b, 1), (a, P - 3 + T), (c, len(LONG) - 4)], trees={0: DraftTree(TOKENS, PARENTS).chunk_parents()})
    got = run(tree, [(0, 0)] + [(1, back) for back in range(P - 3 + T - 1, -1, -1)] + [(2, 0)])
    torch.testing.assert_close(got[0], full_logits(model, OTHER + [3]), atol=1e-5, rtol=1e-5)
    for i, n in enumerate(range(4, P + 1)):  # A's chain rows, the last one its pending (root) token
        torch.testing.assert_close(got[1 + i], full_logits(model, PROMPT[:n]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1 + P - 3:1 + P - 3 + T], branch_logits(model), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[-1], full_logits(model, LONG), atol=1e-5, rtol=1e-5)

    runner.move_positions(a.block_table, *accepted_slots(PARENTS, PATH, P))
    accepted = PROMPT + [TOKENS[t] for t in PATH]
    plain = plain_prefill(model, accepted, a.block_table, 12)
    for moved, want in zip(gathered(runner, a.block_table, len(accepted)), gathered(plain, a.block_table, len(accepted))):
        torch.testing.assert_close(moved, want, atol=1e-5, rtol=1e-5)
    a.tokens, a.num_computed = accepted + [9], len(accepted)
    got = run(Batch(chunks=[(a, 1)]), [(0, 0)])
    torch.testing.assert_close(got[0], full_logits(model, accepted + [9]), atol=1e-5, rtol=1e-5)


def test_greedy_path_and_tree_checks():
    tree = DraftTree([11, 23, 8, 40, 2, 77, 31], PARENTS)  # 0 -> {1 -> {3, 4}, 2 -> 5 -> 6}
    # rows: the root, then node i at 1 + i; the target's argmax at each: 11 (node 0), 8 (node 2), 77, 31
    assert greedy_path(tree.tokens, tree.parents, [11, 8, 0, 77, 0, 0, 31, 5]) == PATH == [0, 2, 5, 6]
    assert greedy_path(tree.tokens, tree.parents, [11, 23, 0, 0, 0, 0, 0, 0]) == [0, 1]
    assert greedy_path(tree.tokens, tree.parents, [11, 40, 0, 0, 0, 0, 0, 0]) == [0]  # node 0's children: 23, 8
    assert greedy_path(tree.tokens, tree.parents, [99] * 8) == []
    assert tree.first(3) == DraftTree([11, 23, 8], [-1, 0, 0]) and tree.chunk_parents()[:4] == [-1, 0, 1, 1]
    with pytest.raises(ValueError, match="token 1 has parent 2"):
        DraftTree([1, 2, 3], [-1, 2, 0])
    with pytest.raises(ConfigError, match="widths must be positive ints"):
        TreeDrafter(tiny_model(), (3, 0))
    drafter = TreeDrafter(tiny_model(), (3, 2, 1))
    assert drafter.tree_size == 15  # with less room it narrows before it gets shallower
    assert [drafter.fit(k) for k in (15, 12, 8, 4, 2, 0)] == [(3, 2, 1), (2, 2, 1), (1, 2, 1), (1, 1, 1), (1, 1), ()]


def noisy_copy(model, scale: float):
    """A draft that mostly agrees with the target: its weights plus a little noise (short accepted paths)."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return draft


def run_all(engine: Engine, reqs) -> list:
    """(prompt, SamplingParams fields) requests, run to the end."""
    return run_requests(engine, [(p, SamplingParams(**kw)) for p, kw in reqs])


@pytest.mark.parametrize("name", ["full", "mla", "gpt2"])
def test_engine_tree_drafts_equal_target_greedy(name):
    """Six greedy tree-drafted requests (two sharing a prefix, one with log-probs) beside a beam search and
    a score-only request, on a pool small enough to preempt, with chunked prefill, prefix caching and async
    scheduling asked for: every greedy output is the target's own greedy continuation; log-probs equal the
    plain engine's; a copy of the target as draft accepts long paths, a noisy copy short ones."""
    model = arch_model(name)
    shared = [9, 8, 7, 6, 5, 4, 3, 2, 1]
    prompts = [PROMPT, OTHER, LONG, shared + [10], shared + [11, 12], [42]]
    reqs = [(p, dict(GREEDY, max_tokens=14, logprobs=2 if i == 1 else None)) for i, p in enumerate(prompts)]
    extra = [([3, 4, 5], dict(beam_width=2, max_tokens=5, **GREEDY)), (LONG, {"max_tokens": 0, "prompt_logprobs": 1})]
    config = EngineConfig(block_size=BS, num_kv_tokens=48, max_num_batched_tokens=24, async_scheduling=True)
    plain = run_all(Engine(model, IdTokenizer(257), EngineConfig(block_size=BS)), reqs + extra)
    per_forward = {}
    for draft in ("self", "noisy"):
        drafter = TreeDrafter(model if draft == "self" else noisy_copy(model, 0.05), (3, 2, 1))
        engine = Engine(model, IdTokenizer(257), config, draft=drafter)
        got = run_all(engine, reqs + extra)
        for (p, kw), out, want in zip(reqs, got, plain):
            assert out.outputs[0].token_ids == full_greedy(model, p, kw["max_tokens"]) == want.outputs[0].token_ids
        torch.testing.assert_close(got[1].outputs[0].logprobs, plain[1].outputs[0].logprobs, atol=1e-4, rtol=0)
        assert [o.token_ids for o in got[-2].outputs] == [o.token_ids for o in plain[-2].outputs]  # the beams
        assert got[-1].prompt_logprobs[0] is None and len(got[-1].prompt_logprobs) == len(LONG)
        for a, b in zip(got[-1].prompt_logprobs[1:], plain[-1].prompt_logprobs[1:]):  # the score-only request
            assert a == pytest.approx(b, abs=1e-4)
        assert not engine.async_scheduling  # asked for, but a draft's next step needs this one's tokens
        st = engine.stats()
        assert st["preemptions"] > 0 and st["prefix_hit_rate"] > 0 and engine.pool.num_used == 0
        m = [o.metrics for o in got[:len(reqs)]]
        per_forward[draft] = sum(x["accepted"] for x in m) / sum(x["target_forwards"] for x in m)
    assert per_forward["self"] > 1.5 > per_forward["noisy"] > 0  # depth 3: a perfect draft accepts up to 3


def recording(move, moves: list):
    """move_positions that also records each call's source positions."""
    def run(table, src, dst):
        moves.append(src)
        move(table, src, dst)
    return run


def test_moved_paths_leave_the_cache_a_plain_prefill_would():
    """Midway through an engine generation (paths accepted through second children too), the paged
    cache's contents at the sequence's computed positions equal a fresh prefill of its tokens."""
    for name in ("full", "mla"):  # (a sliding window's engine frees the blocks behind it)
        model = arch_model(name)
        engine = Engine(model, IdTokenizer(257), EngineConfig(block_size=BS), draft=TreeDrafter(noisy_copy(model, 0.05)))
        moves = []
        engine.runner.move_positions = recording(engine.runner.move_positions, moves)
        rid = engine.add_request(PROMPT, SamplingParams(**GREEDY, max_tokens=40))
        seq = engine.requests[rid].seqs[0]
        while len(moves) < 2 and engine.has_unfinished():
            engine.step()
        assert len(moves) == 2 and moves[-1], "no accepted path was moved"
        n = seq.num_computed
        plain = plain_prefill(model, seq.tokens[:n], seq.block_table, engine.pool.num_blocks)
        for got, want in zip(gathered(engine.runner, seq.block_table, n), gathered(plain, seq.block_table, n)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sampled_tree_verification_keeps_the_target_distribution():
    """SpecInfer's multi-step speculative sampling (sampled_path), by Monte Carlo on a 5-token vocabulary:
    children drawn from q (3 at the root, 2 below each, repeats allowed), a draft q far from the target p.
    The first emitted token is distributed as p at the root, and the second, when the path went on past
    the first, as p after that token - whatever q is."""
    g = torch.Generator().manual_seed(0)
    V, trials = 5, 12000
    p0 = torch.tensor([0.05, 0.4, 0.25, 0.2, 0.1])
    p1 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)  # p after token x: p1[x]
    q0 = torch.tensor([0.3, 0.05, 0.3, 0.05, 0.3])
    q1 = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    first, second = torch.zeros(V), torch.zeros(V, V)
    # every trial's tree drawn at once (the per-trial draws cost as much as sampled_path itself): nodes 0-2
    # the root's children, 3 + 2i and 4 + 2i node i's
    roots = torch.multinomial(q0, 3 * trials, replacement=True, generator=g).view(trials, 3)
    kids = torch.multinomial(q1[roots.flatten()], 2, replacement=True, generator=g).view(trials, 6)
    trees = torch.cat((roots, kids), 1).tolist()
    parents = [-1] * 3 + [0, 0, 1, 1, 2, 2]
    q_rows = torch.cat((q0.expand(trials, 3, V), q1[roots].repeat_interleave(2, 1)), 1)  # (trials, 9, V)
    p_rows = torch.cat((p0.expand(trials, 1, V), p1[roots],
                        torch.full((trials, 6, V), 1 / V)), 1)  # (trials, 10, V); after depth 2: not read here
    for tokens, p, q in zip(trees, p_rows, q_rows):
        path, nxt = sampled_path(DraftTree(tokens, parents), p, q, g)
        emitted = [tokens[i] for i in path] + [nxt]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[0], emitted[1]] += 1
    assert (first / trials - p0).abs().max() < 0.015
    for x in range(V):
        n = second[x].sum()
        if n > 800:
            assert (second[x] / n - p1[x]).abs().max() < 0.05, x
    assert second.sum() > trials / 3  # paths went on past the root's children often


def test_sampled_requests_draw_trees_and_a_faithful_draft_accepts_whole_paths():
    """Sampled requests on the engine with a TreeDrafter: children drawn from the draft's processed
    distribution and verified by sampled_path. A draft equal to the target accepts (all but surely) a whole
    depth-3 path per forward; a seeded request repeats; the log-probs are a full forward's at the emitted
    tokens; a drafter that gives a tree without its q for a sampled request is refused in one line."""
    model = tiny_model(init_std=0.3)
    sp = SamplingParams(temperature=0.9, top_k=20, seed=3, max_tokens=24, ignore_eos=True, logprobs=0)
    engine = Engine(model, IdTokenizer(257), EngineConfig(block_size=BS), draft=TreeDrafter(model, (3, 2, 1)))
    out = run_all(engine, [(PROMPT, {**vars(sp)})])[0]
    again = run_all(engine, [(PROMPT, {**vars(sp)})])[0]
    c = out.outputs[0]
    assert c.token_ids == again.outputs[0].token_ids and len(c.token_ids) == 24
    m = out.metrics
    # after the prefill's token, rounds of a whole path (3 accepted + 1 drawn): 23 tokens in 6 rounds
    assert m["target_forwards"] - 1 == 6 and m["accepted"] == 23 - 6
    with torch.no_grad():
        logp = model(torch.tensor([PROMPT + c.token_ids]))[0].log_softmax(-1)[len(PROMPT) - 1:-1]
    torch.testing.assert_close(torch.tensor(c.logprobs), logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0],
                               atol=1e-4, rtol=0)

    class NoQ(TreeDrafter):
        def propose(self, ctx, k, procs, greedy, gen):
            return super().propose(ctx, k, procs, True, gen)[0], None

    engine = Engine(model, IdTokenizer(257), EngineConfig(block_size=BS), draft=NoQ(model))
    engine.add_request([1, 2], SamplingParams(temperature=0.8, max_tokens=8))
    with pytest.raises(ConfigError, match="verifies drafts against .*but q is None; set temperature=0, or return q"):
        while engine.has_unfinished():
            engine.step()


def test_cacheless_models_are_refused_with_the_fix():
    model = tiny_model()
    with pytest.raises(ConfigError, match="a tree drafter needs a model with cache_spec"):
        Engine(NoCacheSpec(model), IdTokenizer(257), draft=TreeDrafter(model))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tree_steps_replay_tree_graphs_and_skip_the_kernel_step():
    """On the GPU defaults (CUDA graphs, the batch-1 kernel step, fused kernels, the prefill kernel) a step
    holding a tree replays the graphs' tree rows (TreeDrafter allows them) and never reaches the batch-1 kernel
    step (one row, no tree); the output is the target's greedy."""
    model = tiny_model("llama", init_std=0.3).cuda()
    engine = Engine(model, IdTokenizer(257), EngineConfig(block_size=BS), draft=TreeDrafter(model, (2, 2, 1)))
    seen = {"graphs": [], "kernel_step": []}  # per backend: whether each step it ran held a tree
    for name, log in seen.items():
        backend = getattr(engine.runner, name)
        run = backend.run
        backend.run = lambda batch, *a, run=run, log=log, **kw: (log.append(bool(batch.trees)), run(batch, *a, **kw))[1]
    reqs = [(PROMPT, dict(GREEDY, max_tokens=24)), (OTHER, dict(GREEDY, max_tokens=9))]
    got = run_all(engine, reqs)
    assert sum(o.metrics["accepted"] for o in got) > 10
    assert True in seen["graphs"] and True not in seen["kernel_step"]
    # two tokens: the prefill's, then a budget of no drafts - a plain one-row decode step, on a backend
    reqs.append(([5, 6, 7], dict(GREEDY, max_tokens=2)))
    before = {name: len(log) for name, log in seen.items()}
    got += run_all(engine, reqs[-1:])
    for (p, kw), out in zip(reqs, got):
        assert out.outputs[0].token_ids == full_greedy(model, p, kw["max_tokens"])
    plain = [t for name, log in seen.items() for t in log[before[name]:]]
    assert plain == [False, False]  # its prompt's rows and its one-row decode step (as on the H200, 2026-12-05)
    # a sampled request: trees drawn and verified on the device (its generator), whole paths accepted
    out = run_all(engine, [(PROMPT, dict(temperature=0.9, seed=5, max_tokens=24, ignore_eos=True))])[0]
    assert len(out.outputs[0].token_ids) == 24 and out.metrics["target_forwards"] - 1 <= 7


@pytest.mark.parametrize("vocab", [100])
def test_a_tree_drafters_model_of_another_vocabulary_is_refused_with_the_fix(vocab):
    # (a chain's draft model was checked; a TreeDrafter's was not: 100 rows failed the first step with
    # "IndexError: index out of range in self" on a target token id past them. A wider draft, its extra rows
    # past the tokenizer's ids, now drafts: test_speculative.py, test_a_draft_padded_to_another_width_...)
    with pytest.raises(ConfigError, match=rf"the draft model's vocabulary \({vocab}\) differs from the target's "
                                          r"\(257\).*use a draft with the target's tokenizer"):
        Engine(tiny_model(), IdTokenizer(257), draft=TreeDrafter(tiny_model(vocab_size=vocab), widths=(2,)))


def test_tree_widths_take_any_int_and_refuse_bools():
    # (numpy ints were refused as "not positive ints"; True passed and failed the first drafted step in topk)
    assert TreeDrafter(tiny_model(), widths=[np.int64(2), 1]).widths == (2, 1)
    with pytest.raises(ConfigError, match=r"TreeDrafter widths must be positive ints, one per depth, "
                                          r"e\.g\. \(3, 2, 1\); got \(True, 1\)"):
        TreeDrafter(tiny_model(), widths=(True, 1))
