"""The hidden-state seam for EAGLE-style drafters (lmforge.infer.features), with a toy EAGLE head
(eagle_toy.py). A drafter with uses_hidden_states="all" receives the features of exactly the verified
positions, each once and in order, equal to a full no-cache forward's (after the prefill, after accepted and
rejected verify steps, chains and trees, under chunked prefill, preemption, a shared prefix, n = 2, sampled
requests, the recompute runner); the engine's greedy output with it is the target's; hidden_layers features
equal the blocks' outputs seen by forward hooks (lmforge's Transformer and a HF model behind HFCausalLM)."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.detok import IdTokenizer
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.sampling import SamplingParams
from lmforge.model.meta import AttnMetadata

from .eagle_toy import BatchedEagle, CachedEagle, ToyEagle, growing_rounds
from .infer_helpers import full_greedy, run_requests, tiny_model
from .test_engine_api import NoCacheSpec


def block_outputs(blocks, run, layers) -> torch.Tensor:
    """The outputs of blocks[i] for i in layers, concatenated, seen by forward hooks during run()."""
    seen = {}
    hooks = [blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o[0] if isinstance(o, tuple)
                                                                                    else o))
             for i in set(layers)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([seen[i] for i in layers], -1)


def reference(model, tokens: list[int], layers=None) -> torch.Tensor:
    """(T, D) features of a full no-cache forward: the trunk through the final norm, or the blocks' outputs."""
    ids = torch.tensor([tokens])
    if layers is None:
        with torch.no_grad():
            return model.final_norm(model.hidden(ids)[0])[0]
    return block_outputs(model.blocks, lambda: model(ids), layers)[0]


def trained_toy(model, layers=None, widths=None, seed: int = 1) -> ToyEagle:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 257, (6,), generator=g).tolist() for _ in range(6)]
    return ToyEagle(model, layers, widths).fit([p + full_greedy(model, p, 24) for p in prompts])


run_all = run_requests  # (the tests here call it run_all)


G = torch.Generator().manual_seed(0)
SHARED = torch.randint(1, 257, (9,), generator=G).tolist()
PROMPTS = [SHARED + [5, 6, 7, 8], SHARED + [9], torch.randint(1, 257, (5,), generator=G).tolist(),
           torch.randint(1, 257, (21,), generator=G).tolist()]


@pytest.mark.parametrize("case", ["chain", "tree", "layers", "recompute", "graphs", "layers+graphs", "mixed",
                                  "layers+mixed"])
def test_drafter_gets_every_verified_feature_once_in_order(case):
    """Four requests (a shared prefix, n = 2, a seeded sampled one, a 21-token prompt in chunks of 7) on a pool
    that preempts: each sequence's features, handed step by step, are those of its whole verified context
    (accepted drafts' included, rejected ones' not); greedy outputs are the target's; every sequence's
    drafter state is released. "graphs": verify steps (and short chunks) run on the decode graphs' static
    buffers, which return every row's features (copied out of the buffer the next step overwrites); "mixed": steps
    holding prompt chunks too, on the mixed graphs (every token's features)."""
    model = tiny_model("llama", init_std=0.1, n_layers=3 if "layers" in case else 2)
    layers = (0, 2, 1) if "layers" in case else None
    toy = trained_toy(model, layers, (2, 2, 1) if case == "tree" else None)
    greedy = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    reqs = [(PROMPTS[0], greedy), (PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2)),
            (PROMPTS[2], SamplingParams(temperature=0.8, seed=4, max_tokens=12, ignore_eos=True)),
            (PROMPTS[3], greedy)]
    config = EngineConfig(block_size=4, num_kv_tokens=40, max_num_batched_tokens=7,
                          cuda_graphs="graphs" in case or "mixed" in case, graph_prefill_tokens=16 * ("mixed" in case))
    engine = Engine(NoCacheSpec(model) if case == "recompute" else model, IdTokenizer(257), config, draft=toy,
                    num_draft_tokens=3)
    outs = run_all(engine, reqs)
    if "graphs" in case:  # verify chunks ran there, asking for the features
        assert any(key[2] is not None and key[0] > 4 for key in engine.runner.graphs.entries)
    if "mixed" in case:  # steps holding prompt chunks ran there, asking for every token's features
        assert any(key[2] is not None for key in engine.runner.graphs.mixed_entries)
    for (p, sp), out in zip(reqs, outs):
        if sp.greedy:
            assert all(o.token_ids == full_greedy(model, p, sp.max_tokens) for o in out.outputs)
    assert len(toy.record) == 5  # 4 requests, one with n = 2
    for ctx, feats in toy.record.values():  # (propose checked that each hand-off starts where the last ended)
        torch.testing.assert_close(feats, reference(model, ctx, layers)[:len(ctx) - 1], atol=1e-5, rtol=1e-5)
    drafted = sum(o.metrics["drafted"] for o in outs)
    accepted = sum(o.metrics["accepted"] for o in outs)
    assert 0 < accepted < drafted  # verify steps that accepted drafts and steps that rejected some
    if case != "recompute":  # preempted sequences resumed from their own cached blocks, below what was handed on
        st = engine.stats()
        assert st["preemptions"] > 0 and st["prefix_hit_blocks"] > 0 and engine.pool.num_used == 0
    assert set(toy.record) <= set(toy.released) and len(set(toy.released)) == len(toy.released)
    assert not toy.state


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_graphs_hand_on_the_same_features():
    """On a GPU a verify step's features come out of a captured graph's output buffer, which the next replay
    overwrites: what the drafter was handed equals the engine without graphs (fp32), tokens too."""
    model = tiny_model("llama", init_std=0.1)
    fitted = trained_toy(model)
    model.cuda()
    got = []
    for graphs in (False, True):
        toy = copy.deepcopy(fitted).cuda()
        toy._target = (model,)
        engine = Engine(model, IdTokenizer(257), EngineConfig(block_size=4, cuda_graphs=graphs), draft=toy,
                        num_draft_tokens=3)
        outs = run_all(engine, [(p, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)) for p in PROMPTS])
        got.append(([o.outputs[0].token_ids for o in outs], toy.record))
    (want_ids, want), (ids, rec) = got
    assert ids == want_ids and want.keys() == rec.keys()
    for sid, (ctx, feats) in rec.items():
        assert ctx == want[sid][0]
        torch.testing.assert_close(feats, want[sid][1], atol=1e-4, rtol=1e-4)


def test_owed_features_are_computed_not_taken_from_the_prefix_cache():
    """Prefix caching with an 'all' drafter: a new request's prompt is computed, not taken from the cache
    (its features are owed; without that the stream would miss positions); the output is the target's and
    the features equal a full forward's."""
    model = tiny_model("llama", init_std=0.1)
    toy = trained_toy(model)
    engine = Engine(model, IdTokenizer(257), EngineConfig(block_size=4), draft=toy, num_draft_tokens=3)
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = run_all(engine, [(PROMPTS[0], sp)])[0]
    again = run_all(engine, [(PROMPTS[0], sp)])[0]
    assert first.outputs[0].token_ids == again.outputs[0].token_ids == full_greedy(model, PROMPTS[0], 8)
    assert engine.stats()["prefix_hit_blocks"] == 0
    for ctx, feats in toy.record.values():
        torch.testing.assert_close(feats, reference(model, ctx)[:len(ctx) - 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("widths", [None, (2, 2, 1)])
def test_a_head_with_its_own_kv_cache_rewound_to_features_start_drafts_as_if_recomputed(widths):
    """EAGLE's decoder layer attends to every earlier (feature, token) pair, so a real head keeps a KV cache
    per sequence: rewound each round to Features.start (the pairs it has verified), it proposes exactly what
    the same head recomputing its whole history proposes, round by round, across preemption (features
    already handed are not handed again: the drafter's own cache must, and can, outlive it), chunked
    prefill, n = 2, a sampled request and trees; greedy outputs are the target's. The batched head
    (propose_batch: one head forward per depth for all the step's sequences) proposes the same too."""
    model = tiny_model("llama", init_std=0.1)
    greedy = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    reqs = [(PROMPTS[0], greedy), (PROMPTS[1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2)),
            (PROMPTS[2], SamplingParams(temperature=0.8, seed=4, max_tokens=12, ignore_eos=True)),
            (PROMPTS[3], greedy)]
    runs, fitted = [], trained_toy(model, widths=widths)
    for kind in ("recompute", "cached", "batched"):
        torch.manual_seed(0)  # the same block in every head
        head = BatchedEagle(model, widths) if kind == "batched" else CachedEagle(model, widths, kind == "cached")
        head.load_state_dict(fitted.state_dict(), strict=False)  # fc / mlp from the fit; the block as drawn
        engine = Engine(model, IdTokenizer(257), EngineConfig(block_size=4, num_kv_tokens=40, max_num_batched_tokens=7),
                        draft=head, num_draft_tokens=3)
        batches = []
        if kind == "batched":
            head.propose = None  # the engine must not ask one sequence at a time
            head.propose_batch = lambda items, run=head.propose_batch, seen=batches: (
                seen.append((len(items), max(it.k for it in items))), run(items))[1]
        outs = run_all(engine, reqs)
        assert engine.stats()["preemptions"] > 0 and not head.caches and not head.state
        if kind == "batched":  # one call per step, for several sequences at once; forwards: catch-up + depths
            assert max(n for n, _ in batches) >= 2
            assert head.head_forwards == sum(len(widths) if widths else k for _, k in batches)
        runs.append((head.proposals, [[o.token_ids for o in out.outputs] for out in outs],
                     sum(o.metrics["accepted"] for o in outs)))
    (ref_props, ref_outs, _), *others = runs
    for props, outs, accepted in others:
        assert len(props) == 5 and outs == ref_outs and accepted > 0
        for sid, rounds in props.items():
            assert [r[:2] for r in rounds] == [r[:2] for r in ref_props[sid]]
            torch.testing.assert_close(torch.stack([r[2] for r in rounds]),
                                       torch.stack([r[2] for r in ref_props[sid]]), atol=1e-5, rtol=1e-5)
    for (p, sp), out in zip(reqs, ref_outs):
        if sp.greedy:
            assert all(toks == full_greedy(model, p, sp.max_tokens) for toks in out)


@pytest.mark.parametrize("widths", [None, (2, 2, 1)])
def test_propose_batch_equals_propose_per_sequence(widths):
    """Three rounds for four sequences of different lengths, one sampled (its own seeded stream), budgets
    1 to 3: BatchedEagle.propose_batch answers what CachedEagle.propose answers one sequence at a time (the
    first round pads short rows, later ones recompute cached pairs to fill the catch-up chunk)."""
    from lmforge.infer.processors import build_processors
    from lmforge.infer.speculative import DraftItem

    model = tiny_model("llama", init_std=0.1)
    fitted, heads = trained_toy(model, widths=widths), []
    for cls in (CachedEagle, BatchedEagle):
        torch.manual_seed(0)
        heads.append(cls(model, widths))
        heads[-1].load_state_dict(fitted.state_dict(), strict=False)
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(4, 40, model.cfg.d_model, generator=g)
    sampled = build_processors(SamplingParams(temperature=0.8))
    gens = [torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)]
    for rnd in growing_rounds(g, feats):
        items = [lambda gen, b=b, ctx=ctx, hidden=hidden: DraftItem(b, list(ctx), (3, 2, 3, 1)[b],
                                                                    sampled if b == 2 else [], b != 2, gen, hidden)
                 for b, ctx, hidden in rnd]
        one = [heads[0].propose(it.ctx, it.k, it.procs, it.greedy, it.gen, hidden=it.hidden)
               for it in (make(gens[0]) for make in items)]
        batched = heads[1].propose_batch([make(gens[1]) for make in items])
        for (d1, q1), (d2, q2) in zip(one, batched):
            assert d1 == d2
            torch.testing.assert_close(q1, q2, atol=1e-5, rtol=1e-5)
    for sid in range(4):
        torch.testing.assert_close(torch.stack([r[2] for r in heads[1].proposals[sid]]),
                                   torch.stack([r[2] for r in heads[0].proposals[sid]]), atol=1e-5, rtol=1e-5)
        assert [r[:2] for r in heads[1].proposals[sid]] == [r[:2] for r in heads[0].proposals[sid]]


# multi-layer features (EAGLE-3) ------------------------------------------------------------------------
def test_forward_returns_the_asked_blocks_outputs():
    model = tiny_model("llama", n_layers=3)
    ids = torch.randint(1, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    _, states = model(ids, return_hidden=(2, 0, 1))
    torch.testing.assert_close(states, block_outputs(model.blocks, lambda: model(ids), (2, 0, 1)), atol=0, rtol=0)
    # at logits_indices, or at hidden_indices when given (the final normed states too)
    flat = torch.randint(1, 250, (1, 12), generator=torch.Generator().manual_seed(1))
    meta = AttnMetadata(logits_indices=torch.tensor([3, 11]), hidden_indices=torch.tensor([0, 1, 5]))
    logits, states = model(flat, meta=meta, return_hidden=(1,))
    torch.testing.assert_close(states[0], reference(model, flat[0].tolist(), (1,))[[0, 1, 5]], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits[0], model(flat)[0, [3, 11]], atol=1e-5, rtol=0)
    _, final = model(flat, meta=meta, return_hidden=True)
    torch.testing.assert_close(final[0], reference(model, flat[0].tolist())[[0, 1, 5]], atol=1e-6, rtol=0)
    _, at_logits = model(flat, meta=AttnMetadata(logits_indices=torch.tensor([3, 11])), return_hidden=(0, 2))
    torch.testing.assert_close(at_logits[0], reference(model, flat[0].tolist(), (0, 2))[[3, 11]], atol=1e-6, rtol=0)
    for bad in [(3,), (), (-1,), ("a",), 2]:
        with pytest.raises(ConfigError, match="non-empty tuple of block indices in \\[0, 3\\)"):
            model(ids, return_hidden=bad)


def test_hf_model_layer_features_through_the_wrapper():
    transformers = pytest.importorskip("transformers")
    from lmforge.infer.hf_wrapper import HFCausalLM

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    wrapped = HFCausalLM(hf)
    ids = torch.randint(1, 250, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, states = wrapped(ids, return_hidden=(1, 0))
        _, final = wrapped(ids, return_hidden=True)
    torch.testing.assert_close(states, block_outputs(hf.model.layers, lambda: hf(ids), (1, 0)), atol=0, rtol=0)
    torch.testing.assert_close(hf.lm_head(final), logits, atol=1e-5, rtol=0)  # True: after the final norm
    with pytest.raises(ConfigError, match="last layer's output only after their final norm"):
        wrapped(ids, return_hidden=(2,))
    # on the engine (the recompute runner): the drafter's features equal the hooks' on a full forward
    toy = ToyEagle(tiny_model("llama"), hidden_layers=(0, 1))  # its head only needs embed/logits of 257 tokens
    prompt = [5, 9, 17, 33, 2]
    engine = Engine(wrapped, IdTokenizer(257), EngineConfig(block_size=4, max_num_batched_tokens=3), draft=toy,
                    num_draft_tokens=2)
    out = run_all(engine, [(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))])[0]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 5:].tolist()
    assert out.outputs[0].token_ids == want
    (ctx, feats), = toy.record.values()
    torch.testing.assert_close(feats, block_outputs(hf.model.layers, lambda: hf(torch.tensor([ctx])), (0, 1))[0, :-1],
                               atol=1e-5, rtol=1e-5)


class LastRowProbe(ToyEagle):
    """uses_hidden_states=True with hidden_layers: the (D,) features of the sampled row, at ctx[-2]."""

    uses_hidden_states = True

    def propose(self, ctx, k, procs, greedy, gen, hidden=None):
        self.record[len(self.record)] = (list(ctx), hidden.clone())
        return [], None


@pytest.mark.parametrize("graphs", [False, True, "mixed"])
def test_last_row_drafters_get_layer_features_and_bad_settings_are_refused(graphs):
    model = tiny_model("llama", n_layers=3)
    probe = LastRowProbe(model, hidden_layers=(2, 0))
    config = EngineConfig(block_size=4, cuda_graphs=bool(graphs), graph_prefill_tokens=32 * (graphs == "mixed"))
    engine = Engine(model, IdTokenizer(257), config, draft=probe, num_draft_tokens=2)
    run_all(engine, [(PROMPTS[0], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))])
    assert not graphs or any(key[2] == (2, 0) for key in engine.runner.graphs.entries)
    assert graphs != "mixed" or any(key[2] == (2, 0) for key in engine.runner.graphs.mixed_entries)
    assert len(probe.record) == 3  # after the prefill's token, before the 2nd, 3rd, 4th (the 5th has no room)
    for ctx, hidden in probe.record.values():
        torch.testing.assert_close(hidden, reference(model, ctx, (2, 0))[-2], atol=1e-5, rtol=1e-5)

    class Bad(LastRowProbe):
        uses_hidden_states = "every"

    with pytest.raises(ConfigError, match="uses_hidden_states must be False, True .* or 'all'.* got 'every'"):
        Engine(model, IdTokenizer(257), draft=Bad(model))
    with pytest.raises(ConfigError, match="hidden_layers must be a non-empty tuple of block indices in \\[0, 3\\)"):
        Engine(model, IdTokenizer(257), draft=LastRowProbe(model, hidden_layers=(3,)))
    off = LastRowProbe(model, hidden_layers=(1,))
    off.uses_hidden_states = False
    with pytest.raises(ConfigError, match="sets hidden_layers=\\(1,\\) but not uses_hidden_states"):
        Engine(model, IdTokenizer(257), draft=off)


def test_no_hidden_states_are_asked_for_without_such_a_drafter():
    """The engine asks the runner for nothing extra (no hidden states, no per-chunk features) unless the
    drafter reads them."""
    model = tiny_model("llama")
    for draft in (None, "ngram"):
        engine = Engine(model, IdTokenizer(257), EngineConfig(block_size=4), draft=draft)
        calls, execute = [], engine.runner.execute
        engine.runner.execute = lambda *a: (calls.append(a[4]), execute(*a))[1]
        run_all(engine, [(PROMPTS[1] * 2, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))])
        assert calls and calls == [None] * len(calls) and engine.hidden is None
