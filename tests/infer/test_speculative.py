"""Speculative decoding on the engine is exact: greedy equals target greedy (with stop strings and
logprobs kept, many requests at once); sampled tokens follow the target's law."""

from __future__ import annotations


import pytest
import torch
from .infer_helpers import NoCacheSpec, full_greedy, tiny_model

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.detok import IdTokenizer
from lmforge.infer.engine import Engine
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.infer.speculative import NGramDrafter, speculative_generate, verify


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_greedy_reproduces_target_greedy(arch, tok, draft):
    target = tiny_model(arch)
    drafter = tiny_model(arch, seed=5, n_layers=1) if draft == "model" else "ngram"
    llm = LLM(target, tok, draft=drafter, num_draft_tokens=3)
    p = "abcabcabc"
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert out.token_ids == full_greedy(target, tok.encode(p), 20)
    m = out.metrics
    assert m["target_forwards"] <= 20 and 0 <= m["acceptance_rate"] <= 1
    assert m["tokens_per_forward"] == pytest.approx(20 / m["target_forwards"])
    # the drafting counts and the request's own: no "seconds", which only speculative_generate measures (every engine
    # request reported 'seconds': 0.0, printed so in docs/inference.md)
    assert sorted(m) == ["acceptance_rate", "accepted", "drafted", "num_cached_tokens", "num_generated_tokens",
                         "num_prompt_tokens", "target_forwards", "time_to_first_token_s", "tokens_per_forward"]


def test_self_draft_accepts_everything(tok):
    target = tiny_model("llama")
    llm = LLM(target, tok, draft=target, num_draft_tokens=4)
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=21, ignore_eos=True))[0]
    assert out.metrics["acceptance_rate"] == 1.0 and out.metrics["target_forwards"] == 5


def test_verify_output_follows_target_distribution():
    """One position, drafts from q: the emitted token's frequencies match p (not q)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.5, 0.1, 0.1, 0.3]])
    counts = torch.zeros(4)
    N = 8000
    for _ in range(N):
        x = int(torch.multinomial(q[0], 1, generator=g))
        a, t = verify(p, q, [x], g)
        counts[x if a == 1 else t] += 1
    torch.testing.assert_close(counts / N, p[0], atol=0.02, rtol=0)


@pytest.mark.parametrize("widths", [(4, 4), (6, 5)])
def test_sampled_sequences_follow_target_distribution(widths):
    """End to end on a 4-token vocabulary: the law of the first two sampled tokens equals the target's,
    computed exactly by enumeration (chi-square, 15 dof, p = 0.001 threshold). (6, 5): target and draft padded
    past the tokenizer's 4 ids to different widths (fit_vocab)."""
    V = 4
    target = tiny_model("llama", vocab_size=widths[0], init_std=0.3)
    draft = tiny_model("llama", vocab_size=widths[1], seed=3, n_layers=1, init_std=0.3)
    prompt = [1, 2]
    with torch.no_grad():
        p1 = target(torch.tensor([prompt]))[0, -1, :V].softmax(-1)  # (the sampler never draws ids past V)
        exact = torch.zeros(V, V)
        for a in range(V):
            exact[a] = p1[a] * target(torch.tensor([prompt + [a]]))[0, -1, :V].softmax(-1)
    N = 700
    engine = Engine(target, IdTokenizer(V), draft=draft, num_draft_tokens=2)
    for i in range(N):  # all at once: one batch of speculative sequences, each on its own seeded stream
        # 3 tokens: the prefill samples the first, the second (and maybe third) come through a draft
        engine.add_request(prompt, SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, seed=i))
    counts = torch.zeros(V, V)
    accepted = 0
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                counts[o.token_ids[0], o.token_ids[1]] += 1
                accepted += o.metrics["accepted"]
    expected = exact * N
    chi2 = float(((counts - expected) ** 2 / expected.clamp(min=1e-9)).sum())
    assert chi2 < 37.7, chi2
    assert 0 < accepted < N  # drafts are sometimes accepted, sometimes rejected


def test_ngram_lookup():
    d = NGramDrafter(max_n=3, vocab_size=10)
    assert d.lookup([1, 2, 3, 4, 5, 1, 2, 3], 2) == [4, 5]
    assert d.lookup([7, 1, 9, 1], 3) == [9, 1]
    assert d.lookup([1, 2, 3], 2) == []
    drafts, q = d.propose([5, 6, 5], 2, [], True, None)
    assert drafts == [6, 5] and q.sum(-1).tolist() == [1.0, 1.0] and q[0, 6] == 1


def _only(allowed: list[int]):
    def f(ids, row):
        out = torch.full_like(row, float("-inf"))
        out[allowed] = row[allowed]
        return out
    return f


@pytest.mark.parametrize("draft", ["ngram", "model", "mtp"])
def test_penalized_and_processed_requests_run_plain_beside_speculative_ones(tok, draft):
    """Requests with penalties or logits_processors were refused on an engine with a drafter, so a server needed
    a second engine for them (found 2026-12-06): they run without speculation beside the speculative requests of
    the same engine (as beam searches do), with the outputs of the same requests on an engine without one."""
    from lmforge.infer.engine import EngineConfig
    from lmforge.model.config import MTPConfig

    target = tiny_model("llama", init_std=0.3, **(dict(mtp=MTPConfig(kind="parallel", depth=2)) if draft == "mtp"
                                                   else {}))
    drafter = tiny_model("llama", seed=5, n_layers=1, init_std=0.3) if draft == "model" else draft
    prompts = ["abcabcabcabc", "the cat and the cat and the", "xyz xyz xyz", "hello hello"]
    common = dict(max_tokens=12, ignore_eos=True, logprobs=2)
    asks = [SamplingParams(temperature=0, repetition_penalty=1.5, **common),
            SamplingParams(temperature=0.8, seed=7, n=2, frequency_penalty=0.8, presence_penalty=0.5, **common),
            SamplingParams(temperature=0, logits_processors=(_only(tok.encode("abc ")),), **common),
            SamplingParams(temperature=0, **common)]  # speculative, in the same steps
    config = EngineConfig(block_size=4, max_num_batched_tokens=16)
    want = LLM(target, tok, config=config).generate(prompts, asks)
    llm = LLM(target, tok, config=config, draft=drafter, num_draft_tokens=3)
    got = llm.generate(prompts, asks)
    for w, g in zip(want, got):
        assert len(w.outputs) == len(g.outputs)
        for a, b in zip(w.outputs, g.outputs):
            assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
            assert [sorted(t) for t in a.top_logprobs] == [sorted(t) for t in b.top_logprobs]
    assert all("drafted" not in g.metrics for g in got[:3]) and got[3].metrics["drafted"] > 0
    assert set(got[2].token_ids) <= set(tok.encode("abc "))
    with pytest.raises(ConfigError, match="penalties"):  # speculative_generate's stats exist only speculating
        speculative_generate(target, NGramDrafter(vocab_size=257), [1, 2, 3], SamplingParams(
            repetition_penalty=1.3, max_tokens=3), 3, set(), 128)


def test_mtp_heads_as_draft(tok):
    from lmforge.model.config import MTPConfig

    target = tiny_model("llama", mtp=MTPConfig(kind="parallel", depth=2))
    llm = LLM(target, tok, draft="mtp", num_draft_tokens=3)
    out = llm.generate("abcab", SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))[0]
    assert out.token_ids == full_greedy(target, tok.encode("abcab"), 15)
    assert out.metrics["acceptance_rate"] >= 1 / 3 - 1e-9  # the main head's draft is always the target's
    with pytest.raises(ConfigError, match="parallel MTP"):
        LLM(tiny_model("llama"), tok, draft="mtp").generate("x", SamplingParams(temperature=0, max_tokens=2))


def test_batched_speculative_keeps_stop_strings_and_logprobs(tok):
    """Many prompts at once through the draft model, with stop strings, stop tokens, logprobs and n = 2:
    the same outputs as the engine without a draft."""
    target = tiny_model("llama", init_std=0.3)
    drafter = tiny_model("llama", seed=5, n_layers=1, init_std=0.3)
    prompts = ["abcabcabc", "hello", "xyz xyz", "q"]
    plain = LLM(target, tok).generate(prompts, SamplingParams(temperature=0, max_tokens=14, ignore_eos=True))
    stop = plain[0].text[5:7]
    sp = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop=(stop,), logprobs=2, n=2,
                        stop_token_ids=(plain[3].token_ids[6],))
    want = LLM(target, tok).generate(prompts, sp)
    got = LLM(target, tok, draft=drafter, num_draft_tokens=3).generate(prompts, sp)
    for w, g in zip(want, got):
        for a, b in zip(w.outputs, g.outputs):
            assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
            assert [sorted(t) for t in a.top_logprobs] == [sorted(t) for t in b.top_logprobs]
    assert got[0].outputs[0].finish_reason == "stop" and sum(g.metrics["accepted"] for g in got) > 0


def test_speculative_generate_wrapper(tok):
    target = tiny_model("llama")
    toks, st = speculative_generate(target, NGramDrafter(vocab_size=257), [1, 2, 3, 1, 2], SamplingParams(
        temperature=0, max_tokens=9, ignore_eos=True), 3, set(), 128)
    assert toks == full_greedy(target, [1, 2, 3, 1, 2], 9) and st.target_forwards <= 9


def test_draft_model_drafts_for_the_batch_under_preemption(tok):
    """The draft model keeps a paged cache on the target's block ids and drafts for every sequence in one
    forward per round; a small pool forces preemptions (the draft restarts), prefixes are shared, n = 2."""
    from lmforge.infer.engine import EngineConfig

    target = tiny_model("llama", init_std=0.3)
    drafter = tiny_model("llama", seed=5, n_layers=1, init_std=0.3)
    prompts = ["abcabcabc", "abcabcxyz", "hello", "q"]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, n=2)
    want = LLM(target, tok).generate(prompts, sp)
    config = EngineConfig(block_size=4, num_kv_tokens=48, max_num_batched_tokens=10)
    llm = LLM(target, tok, draft=drafter, num_draft_tokens=3, config=config)
    got = llm.generate(prompts, sp)
    assert [[o.token_ids for o in r.outputs] for r in got] == [[o.token_ids for o in r.outputs] for r in want]
    assert llm.engine.draft_model is not None and llm.engine.stats()["preemptions"] > 0
    assert sum(r.metrics["accepted"] for r in got) > 0 and llm.engine.pool.num_used == 0


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_draft_room_never_passes_the_requests_last_token(tok, draft):
    """A request that fits the pool exactly (9 prompt + 6 new tokens in one 16-slot block) runs with drafts
    too: the scheduler reserved room for k drafts past max_tokens, which add_request had not sized for,
    and the step failed with "could not fit any sequence"."""
    from lmforge.infer.engine import EngineConfig

    target = tiny_model("llama")
    drafter = tiny_model("llama", seed=5, n_layers=1) if draft == "model" else draft
    p = "abcabcabc"
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(target, tok, config=EngineConfig(block_size=16, num_kv_tokens=16), draft=drafter, num_draft_tokens=4)
    assert llm.generate(p, params)[0].token_ids == full_greedy(target, tok.encode(p), 6)


def test_a_drafter_that_is_a_module_is_run_as_a_drafter(tok):
    """Medusa / EAGLE heads are modules with propose(): the engine runs them as drafters, not as a draft
    model (which they are not: they have no cache_spec forward of their own)."""

    class Heads(torch.nn.Module):
        def __init__(self, vocab):
            super().__init__()
            self.head = torch.nn.Linear(4, vocab)  # stands in for trained heads
            self.calls, self.accepted = 0, []

        def propose(self, ctx, k, procs, greedy, gen):
            self.calls += 1
            drafts = [ctx[-1]] * k  # guess: the last token repeats
            return drafts, torch.nn.functional.one_hot(torch.tensor(drafts), self.head.out_features).float()

        def accept(self, seq_id, ctx_len):
            self.accepted.append((seq_id, ctx_len))

    target, heads = tiny_model("llama"), Heads(257)
    want = full_greedy(target, tok.encode("aaab"), 10)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    assert LLM(target, tok, draft=heads, num_draft_tokens=2).generate("aaab", greedy)[0].token_ids == want
    with pytest.raises(ConfigError, match="draft must be None, 'ngram', 'mtp', a draft model or a drafter, got 'ngrams'"):
        LLM(target, tok, draft="ngrams")
    engine = Engine(target, tok, draft=heads, num_draft_tokens=2)
    assert engine.draft_model is None
    rid = engine.add_request("aaab", SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done[rid].token_ids == full_greedy(target, tok.encode("aaab"), 10) and heads.calls > 0


def test_a_shared_drafter_is_told_which_sequence_accepted_and_old_accept_is_refused(tok):
    """One drafter object serves every sequence: accept(seq_id, ctx_len) names the sequence, whose verified
    context then has ctx_len tokens (its tokens so far but the pending one); accept(ctx_len) is refused."""

    class Last:
        def __init__(self):
            self.seen, self.accepted = {}, []

        def propose(self, ctx, k, procs, greedy, gen):
            drafts = [ctx[-1]] * k
            return drafts, torch.nn.functional.one_hot(torch.tensor(drafts, dtype=torch.long), 257).float()

        def accept(self, seq_id, ctx_len):
            self.accepted.append((seq_id, ctx_len))

    target, drafter = tiny_model("llama"), Last()
    engine = Engine(target, tok, draft=drafter, num_draft_tokens=2)
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, n=2)
    prompts = [tok.encode("aaab"), tok.encode("xy")]
    for p in prompts:
        engine.add_request(p, sp)
    while engine.has_unfinished():
        engine.step()
    ids = {sid for sid, _ in drafter.accepted}
    assert len(ids) == 4  # 2 requests x n = 2, each under its own id
    for sid in ids:  # each sequence's contexts grow; the last verified one is at most prompt + 5 tokens
        lens = [n for s, n in drafter.accepted if s == sid]
        assert lens == sorted(lens) and len(set(lens)) == len(lens) and lens[-1] <= max(map(len, prompts)) + 5

    class Old(Last):
        def accept(self, ctx_len):
            pass

    with pytest.raises(ConfigError, match=r"Old.accept\(ctx_len\): a drafter object is shared by every sequence, "
                                          r"so the engine calls accept\(seq_id, ctx_len\)"):
        Engine(target, tok, draft=Old())


def test_tree_acceptance_rate_is_per_depth_not_per_node(tok):
    """A tree's drafted count is its nodes, acceptance_rate accepted / depth reachable per round (a chain's
    length): a draft equal to the target accepts whole paths, rate 1, as the same chain would."""
    from lmforge.infer.token_tree import TreeDrafter

    target = tiny_model("llama")
    greedy = SamplingParams(temperature=0, max_tokens=13, ignore_eos=True)
    tree = LLM(target, tok, draft=TreeDrafter(target, widths=(2, 2, 1))).generate("hello", greedy)[0].metrics
    chain = LLM(target, tok, draft=target, num_draft_tokens=3).generate("hello", greedy)[0].metrics
    assert tree["acceptance_rate"] == chain["acceptance_rate"] == 1.0
    assert tree["tokens_per_forward"] == chain["tokens_per_forward"] == 13 / 4
    # nodes (widths (2, 2, 1), then (1, 2, 1) and (1, 1, 1) where room is short: TreeDrafter.fit) vs chain
    # tokens, over 3 verify rounds of 3 + 1 tokens; per node the rate would read 9 / 18
    assert tree["accepted"] == chain["accepted"] == chain["drafted"] == 9 and tree["drafted"] == 10 + 5 + 3


def _count_chunk_runs(graphs) -> list[int]:
    """Wrap graphs.run to record the longest chunk of every batch it runs."""
    seen, run = [], graphs.run

    def counting(batch, late=None, **kw):
        seen.append(max(n for _, n in batch.chunks))
        return run(batch, late, **kw)

    graphs.run = counting
    return seen


@pytest.mark.parametrize("draft", ["self", "ngram"])
def test_verify_chunks_and_draft_rounds_replay_the_decode_graphs(arch, tok, draft):
    """With graphs on (eager static buffers on a CPU), a verify chunk (the pending token and its k drafts)
    runs as k + 1 rows of its sequence, and the draft model's rounds and catch-up chunks run on its own
    graphs: greedy tokens equal the target's full-forward greedy for several requests of different lengths
    and block tables over several blocks (block size 4). The target drafting for itself accepts every draft,
    so every row's logits are used; prompt lookup accepts some."""
    from lmforge.infer.engine import EngineConfig

    target = tiny_model(arch, init_std=0.3)
    drafter = tiny_model(arch, init_std=0.3) if draft == "self" else "ngram"
    prompts = ["abcabcabc", "hello", "q", "xyxyxyxyxyxy"]
    budgets = [17, 9, 12, 14]
    llm = LLM(target, tok, config=EngineConfig(cuda_graphs=True, block_size=4), draft=drafter, num_draft_tokens=4)
    seen = _count_chunk_runs(llm.engine.runner.graphs)
    drafted = _count_chunk_runs(llm.engine.draft_model.runner.graphs) if draft == "self" else None
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in budgets])
    assert [o.token_ids for o in outs] == [full_greedy(target, tok.encode(p), n) for p, n in zip(prompts, budgets)]
    if draft == "self":  # verify chunks of k + 1 = 5 tokens: rows beyond the 4 sequences
        assert max(seen) == 5 and all(r.metrics["acceptance_rate"] == 1.0 for r in outs)
        assert max(key[0] for key in llm.engine.runner.graphs.entries) >= 8
    else:  # (lookup finds no match in some models' outputs)
        assert (max(seen) > 1) == (sum(r.metrics["drafted"] for r in outs) > 0)
    if drafted is not None:
        assert drafted and max(drafted) > 1  # catch-up chunks as rows too


def test_state_models_keep_verify_chunks_off_the_decode_graphs(tok):
    """A recurrent state advances token by token within one row: its verify chunks stay on the eager path."""
    from .state_models import tiny_state_model

    from lmforge.infer.engine import EngineConfig

    target = tiny_state_model("hybrid")
    llm = LLM(target, tok, config=EngineConfig(cuda_graphs=True, block_size=4), draft="ngram", num_draft_tokens=3)
    assert llm.engine.runner.graphs.chunk_rows == 1
    p = "abcabcabc"
    out = llm.generate(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == full_greedy(target, tok.encode(p), 12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("draft", ["self", "ngram", "tree"])
def test_captured_verify_graphs_equal_the_eager_engine(tok, draft):
    """On a GPU the verify chunks (token trees too) and the draft model's rounds replay captured graphs: greedy
    tokens (fp32) equal the engine without graphs, for a batch and for one sequence."""
    from lmforge.infer.engine import EngineConfig
    from lmforge.infer.token_tree import TreeDrafter

    target = tiny_model("llama", init_std=0.3).cuda()
    drafter = {"self": target, "ngram": "ngram", "tree": TreeDrafter(target, (2, 2, 1))}[draft]
    prompts = ["abcabcabc", "hello", "q", "xyxyxyxyxyxy"]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eager = LLM(target, tok, config=EngineConfig(cuda_graphs=False), draft=drafter, num_draft_tokens=4)
    llm = LLM(target, tok, config=EngineConfig(cuda_graphs=True), draft=drafter, num_draft_tokens=4)
    seen = _count_chunk_runs(llm.engine.runner.graphs)
    want = [o.token_ids for o in eager.generate(prompts, sp)]
    assert [o.token_ids for o in llm.generate(prompts, sp)] == want
    assert llm.generate(prompts[0], sp)[0].token_ids == want[0]
    assert max(seen) > 1 and all(e.graph is not None for e in llm.engine.runner.graphs.entries.values())


@pytest.mark.parametrize("variant", ["sliding", "sinks", "mla", "mla-sliding", "moe"])
def test_verify_rows_on_the_decode_graphs_for_attention_variants(tok, variant):
    """Verify chunks as rows (static buffers) over sliding windows, sinks, MLA latents and MoE layers: the target
    drafting for itself (every row's logits used) gives the full forward's greedy tokens."""
    from .test_attention_variants import VARIANTS

    from lmforge.infer.engine import EngineConfig

    target = tiny_model("llama", init_std=0.3, **VARIANTS[variant])
    prompts, n = ["abcabcabc", "hello there", "q"], 15
    llm = LLM(target, tok, config=EngineConfig(cuda_graphs=True, block_size=4), draft=target, num_draft_tokens=3)
    seen = _count_chunk_runs(llm.engine.runner.graphs)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    assert [o.token_ids for o in outs] == [full_greedy(target, tok.encode(p), n) for p in prompts]
    assert max(seen) == 4


@pytest.mark.parametrize("variant", ["llama", "gpt2", "mqa-softcap", "mla", "qk-norm", "sliding"])
def test_token_tree_verify_rows_on_the_decode_graphs(tok, variant):
    """A token tree's verify chunk as rows (static buffers): each node's row sees the context and its own
    ancestors through AttnMetadata.tree_rows (the reference decode path's mask); greedy tokens equal the full
    forward's, a tree drafted by the target itself (its greedy path is always in the tree) and by a weaker draft,
    and the tree steps ran on entries of their own (key[3]). A sliding window keeps trees eager (a node's slot
    is not its position)."""
    from .test_attention_variants import VARIANTS

    from lmforge.infer.engine import EngineConfig
    from lmforge.infer.token_tree import TreeDrafter

    arch, extra = (variant, {}) if variant in ("llama", "gpt2", "mqa-softcap") else ("llama", VARIANTS[variant])
    target = tiny_model(arch, init_std=0.3, **extra)
    prompts, n = ["abcabcabc", "hello there", "q"], 15
    for draft in (target, tiny_model(arch, seed=5, n_layers=1, init_std=0.3, **extra)):
        llm = LLM(target, tok, config=EngineConfig(cuda_graphs=True, block_size=4), draft=TreeDrafter(draft, (2, 2, 1)))
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        assert [o.token_ids for o in outs] == [full_greedy(target, tok.encode(p), n) for p in prompts]
        assert any(key[3] for key in llm.engine.runner.graphs.entries) == (variant != "sliding")
        if draft is target:  # the whole greedy path accepted each round: deepest nodes' rows used
            assert all(o.metrics["acceptance_rate"] == 1.0 for o in outs)


def test_verify_rows_on_graphs_are_capped():
    """Chunks as rows: up to max_num_seqs x (k + 1) rows (a power of two), at most MAX_CHUNK_ROWS (larger steps run
    eagerly); decode-only batches keep max_num_seqs rows."""
    from lmforge.infer.engine import Engine, EngineConfig
    from lmforge.infer.graphs import MAX_CHUNK_ROWS
    from lmforge.tokenizer.byte import ByteTokenizer

    target = tiny_model("llama")
    for seqs, rows in ((4, 32), (256, MAX_CHUNK_ROWS)):
        engine = Engine(target, ByteTokenizer(), EngineConfig(cuda_graphs=True, max_num_seqs=seqs, num_kv_tokens=512),
                        draft="ngram", num_draft_tokens=4)
        g = engine.runner.graphs
        assert (g.chunk_rows, g.max_rows, g.max_batch) == (5, rows, seqs)


def test_token_tree_rows_through_the_triton_decode_kernel(tok):
    """The tree rows' ancestor bits read by the Triton decode kernel (Triton's interpreter on a CPU): greedy tokens
    equal the full forward's, the target drafting for itself (every node's row used)."""
    from lmforge.kernels.decode import available

    from lmforge.infer.engine import EngineConfig
    from lmforge.infer.token_tree import TreeDrafter

    if not available("cuda" if torch.cuda.is_available() else "cpu"):
        pytest.skip("needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")
    target = tiny_model("llama", init_std=0.3, d_model=64).to("cuda" if torch.cuda.is_available() else "cpu")
    config = EngineConfig(cuda_graphs=True, block_size=4, decode_attention="kernel", prefill_attention="reference")
    llm = LLM(target, tok, config=config, draft=TreeDrafter(target, (2, 2, 1)))
    prompts, n = ["abcabcabc", "hello"], 9
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    assert [o.token_ids for o in outs] == [full_greedy(target.cpu(), tok.encode(p), n) for p in prompts]
    assert llm.engine.runner.cache.kernel is not None and any(key[3] for key in llm.engine.runner.graphs.entries)
    assert all(o.metrics["acceptance_rate"] == 1.0 for o in outs)


@pytest.mark.parametrize("variant", ["llama", "sliding", "mla"])
def test_tree_drafter_on_the_pool_drafts_treedrafters_trees(tok, variant):
    """A TreeDrafter on a paged engine drafts on the pool (PagedDraftModel with its fit: one tree-masked forward
    per depth over the nodes so far, on the draft's graphs where the cache reads tree rows) and proposes exactly
    the trees TreeDrafter's recomputing loop builds from the same contexts (greedy; room-fitted widths near the
    end included); after verification the draft's accepted keys move with the target's, so its next catch-up
    starts after them (sliding windows drop blocks behind the target's next query)."""
    from .test_attention_variants import VARIANTS

    from lmforge.infer.draft import PagedDraftModel
    from lmforge.infer.engine import EngineConfig
    from lmforge.infer.token_tree import TreeDrafter

    extra = {} if variant == "llama" else VARIANTS[variant]
    target = tiny_model("llama", init_std=0.3, **extra)
    drafter = TreeDrafter(tiny_model("llama", seed=5, n_layers=1, init_std=0.3, **extra), (2, 2, 1))
    llm = LLM(target, tok, config=EngineConfig(cuda_graphs=True, block_size=4), draft=drafter)
    paged = llm.engine.draft_model
    assert isinstance(paged, PagedDraftModel) and paged.fit == drafter.fit
    rounds, trees, starts = [], paged._trees, []

    def checked(items, views, widths):
        starts.extend(views[it[0].seq_id].num_computed for it in items)
        out = trees(items, views, widths)
        for seq, k, procs, greedy in items:
            want, _ = drafter.propose(list(seq.tokens), k, procs, greedy, None)
            rounds.append((out[seq.seq_id][0].tokens, out[seq.seq_id][0].parents) == (want.tokens, want.parents))
        return out

    paged._trees = checked
    prompts, n = ["abcabcabc", "hello there", "q"], 15
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    assert [o.token_ids for o in outs] == [full_greedy(target, tok.encode(p), n) for p in prompts]
    assert len(rounds) > 6 and all(rounds)
    assert max(starts) > 12  # catch-ups resumed after accepted nodes, not from 0
    tree_graphs = any(key[3] for key in paged.runner.graphs.entries)
    assert tree_graphs == (variant != "sliding")  # (trees on sliding windows stay eager: a node's slot is not its position)


@pytest.mark.parametrize("k", [1.5, "4", True])
def test_num_draft_tokens_that_is_no_int_is_refused_when_built(tok, k):
    # (1.5 was taken, and the first drafted step failed with "TypeError: slice indices must be integers")
    with pytest.raises(ConfigError, match=f"num_draft_tokens must be an int >= 0, got {k!r}$"):
        LLM(tiny_model(), tok, draft="ngram", num_draft_tokens=k)


class _Guess:
    """A user's drafter object answering `mode`'s way: the last token repeated as drafts, q uniform."""

    def __init__(self, mode: str, vocab: int = 257):
        self.mode, self.vocab = mode, vocab

    def propose(self, ctx, k, procs, greedy, gen):
        drafts = [ctx[-1]] * (k + 40 if self.mode == "too_many" else k)
        q = torch.full((len(drafts), self.vocab), 1.0 / self.vocab)
        return {"too_many": (drafts, q), "tensor": (torch.tensor(drafts), q), "q_none": (drafts, None),
                "id_past_vocab": ([self.vocab + 5] * k, q), "negative_id": ([-1] * k, q),
                "float_id": ([1.5] * k, q), "q_of_3": (drafts, q[:, :3]), "no_pair": drafts * 2}[self.mode]


@pytest.mark.parametrize("mode", ["too_many", "tensor", "q_none"])
def test_a_drafters_extra_drafts_tensor_or_missing_q_at_temperature_0_still_give_greedy(tok, mode):
    # (too_many: an IndexError in the runner's slots; tensor: "Boolean value of Tensor ... is ambiguous";
    # q_none: "'NoneType' object has no attribute 'to'", though a greedy chain needs no q, as a greedy tree does not)
    target = tiny_model("llama")
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    out = LLM(target, tok, draft=_Guess(mode), num_draft_tokens=2).generate("aaab", greedy)[0]
    assert out.token_ids == full_greedy(target, tok.encode("aaab"), 10)


@pytest.mark.parametrize("mode, temperature, match", [
    ("q_none", 1.0, r"_Guess's proposal: a sampled request verifies drafts against the distribution each was drawn "
                    r"from, but q is None; set temperature=0, or return q \(len\(drafts\), V\)$"),
    ("id_past_vocab", 0, r"_Guess's proposal has token id 262, outside the model's vocabulary \[0, 257\)$"),
    ("negative_id", 1.0, r"_Guess's proposal has token id -1, outside the model's vocabulary \[0, 257\)$"),
    ("float_id", 0, r"_Guess's proposal: drafts must be a list of token ids or a DraftTree, got \[1.5, 1.5\]$"),
    ("q_of_3", 1.0, r"_Guess's proposal: q must be \(len\(drafts\), V\) = \(2, 257\), the distribution each draft "
                    r"was drawn from, got \(2, 3\)$"),
    ("no_pair", 0, r"_Guess's proposal must be a pair \(drafts, q\), got \[(\d+, ){3}\d+\]$")])
def test_a_drafters_malformed_answer_is_refused_with_the_fix(tok, mode, temperature, match):
    # (each failed deep in the engine: IndexError from the embedding or from indexing p, a shape mismatch in
    # verify, "take() takes 4 positional arguments")
    params = SamplingParams(temperature=temperature, max_tokens=6, ignore_eos=True, seed=0)
    with pytest.raises(LmforgeError, match=match):
        LLM(tiny_model("llama"), tok, draft=_Guess(mode), num_draft_tokens=2).generate("aaab", params)


@pytest.mark.parametrize("draft_vocab", [280, 320])
@pytest.mark.parametrize("shape", ["chain", "tree", "reference"])
def test_a_draft_padded_to_another_width_drafts_for_the_same_tokenizer(tok, draft_vocab, shape):
    """Qwen2.5's small and large models pad the same 151,665 ids to 151,936 and 152,064 rows: a draft whose
    vocabulary differs from the target's only in rows past the tokenizer's ids drafts (its logits fitted to the
    target's width, ids past the tokenizer's masked as the target's sampler masks them) and greedy output stays the
    target's; one lacking tokenizer ids is refused. Here the draft is the target itself at another width: every
    draft is accepted. (Any width but the target's was refused: "the draft model's vocabulary (280) differs from
    the target's (300)".) reference: a target without cache_spec, whose chains the ModelDrafter loop drafts."""
    from lmforge.infer.token_tree import TreeDrafter

    target, draft = tiny_model("llama", vocab_size=300), tiny_model("llama", vocab_size=draft_vocab, seed=5)
    rows, mine = min(300, draft_vocab), draft.state_dict()
    draft.load_state_dict({k: v if v.shape == mine[k].shape else torch.cat([v[:rows], mine[k][rows:]])
                           for k, v in target.state_dict().items()})
    plain = LLM(target, tok)
    if shape == "reference":
        target = NoCacheSpec(target)
    drafter = TreeDrafter(draft, widths=(2, 2)) if shape == "tree" else draft
    llm = LLM(target, tok, draft=drafter, num_draft_tokens=3)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    for p in ("abcabc", "zzz"):
        out = llm.generate(p, greedy)[0]
        assert out.token_ids == plain.generate(p, greedy)[0].token_ids
        assert out.metrics["acceptance_rate"] == 1.0
    bias = SamplingParams(temperature=0.8, max_tokens=6, seed=0, logit_bias={299: -5.0})  # an id past the draft's 280
    assert len(llm.generate("abc", bias)[0].token_ids) == 6
    with pytest.raises(ConfigError, match=r"the draft model's vocabulary \(200\) differs from the target's \(300\) "
                                          r"and lacks ids of the tokenizer's 257"):
        LLM(target, tok, draft=tiny_model("llama", vocab_size=200), num_draft_tokens=3)


def test_a_drafter_factory_needs_the_vocabulary_and_take_names_the_drafter_only_when_it_refuses(tok, monkeypatch):
    """DrafterFactory's vocab_size is required (its default 0 refused every draft: no id is below 0); take built its
    error's "<drafter>'s proposal" for every sequence at every step, only to raise with it."""
    from lmforge.infer.speculative import DrafterFactory, Speculative

    with pytest.raises(TypeError, match="vocab_size"):
        DrafterFactory(lambda seq: None)
    monkeypatch.setattr(Speculative, "_who", lambda self, seq: pytest.fail("named a drafter that answered well"))
    target = tiny_model("llama")
    out = LLM(target, tok, draft="ngram", num_draft_tokens=3).generate(
        "abcabcabc", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == full_greedy(target, tok.encode("abcabcabc"), 12) and out.metrics["target_forwards"] < 12


class _Delegate:
    """A user's drafter object that drafts as prompt lookup does (valid answers, yet a user's: checked)."""

    def __init__(self, vocab: int = 257):
        self.inner = NGramDrafter(vocab_size=vocab)

    def propose(self, ctx, k, procs, greedy, gen):
        return self.inner.propose(ctx, k, procs, greedy, gen)


def test_lmforges_own_drafters_skip_takes_checks_a_users_drafter_is_still_checked(tok, monkeypatch):
    """Speculative.take checked every answer of every drafter at every step (~4.5 us a sequence, ~1 ms of host time a
    step at 256 sequences); prompt lookup and a draft model (lmforge's own: DrafterFactory.trusted) answer validly by
    construction and are taken unchecked, a user's drafter object is checked still - a bad id refused - and every
    greedy output is the target's."""
    from lmforge.infer.speculative import Speculative

    checked = []
    real = Speculative._checked
    monkeypatch.setattr(Speculative, "_checked", lambda self, seq, budget, answer: checked.append(seq.seq_id) or
                        real(self, seq, budget, answer))
    target = tiny_model("llama")
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = full_greedy(target, tok.encode("abcabcabc"), 12)
    for draft, model in (("ngram", target), (tiny_model("llama", seed=5, n_layers=1), NoCacheSpec(target))):
        out = LLM(model, tok, draft=draft, num_draft_tokens=3).generate("abcabcabc", greedy)[0]
        assert out.token_ids == want and out.metrics["drafted"] > 0 and checked == []
    out = LLM(target, tok, draft=_Delegate(), num_draft_tokens=3).generate("abcabcabc", greedy)[0]
    assert out.token_ids == want and out.metrics["drafted"] > 0 and len(checked) >= 5  # (a step with room: one each)
    with pytest.raises(LmforgeError, match=r"_Guess's proposal has token id 262, outside the model's vocabulary"):
        LLM(target, tok, draft=_Guess("id_past_vocab"), num_draft_tokens=3).generate("abcabcabc", greedy)


def test_mtp_heads_draft_no_id_past_the_tokenizer():
    """MTP heads (and an EAGLE-style head) read logits at the target's width, padding rows included (Qwen: 151,665
    tokenizer ids, 151,936 rows): they drafted padding ids, always rejected, and gave them probability in q. The
    engine's vocab_limit masks them, as the sampler's and a draft model's (sampler.fit_vocab)."""
    from lmforge.infer.speculative import MTPDrafter
    from lmforge.model.config import MTPConfig

    target = tiny_model("llama", vocab_size=264, mtp=MTPConfig(kind="parallel", depth=2))
    real = target.forward_mtp

    def padded(x):  # the padding rows 260 / 261 scoring highest
        main, heads = real(x)
        return (main.index_fill(-1, torch.tensor([260]), 50.0),
                [h.index_fill(-1, torch.tensor([261]), 50.0) for h in heads])

    target.forward_mtp = padded
    with torch.no_grad():
        assert MTPDrafter(target).propose([1, 2, 3], 3, [], True, None)[0] == [260, 261, 261]  # unmasked
        drafts, q = MTPDrafter(target, 257).propose([1, 2, 3], 3, [], True, None)
        assert all(t < 257 for t in drafts) and float(q[:, 257:].sum()) == 0.0
        _, q = MTPDrafter(target, 257).propose([1, 2, 3], 3, [], False, torch.Generator().manual_seed(0))
        assert float(q[:, 257:].sum()) == 0.0 and torch.allclose(q.sum(-1), torch.ones(3))
