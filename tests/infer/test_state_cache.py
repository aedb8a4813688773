"""The recurrent-state cache seam (lmforge.infer.kv.state, lmforge.model.cache.recur) on the one engine: a
pure recurrent model and a hybrid (attention + recurrent layers) give the tokens and log-probs of their
full no-cache forward under concurrent requests, chunked prefill, preemption, n seeded samples, aborts,
async scheduling and the static-buffer decode step; the options that cannot work are one-line errors; no
state row leaks; docs/state_caches.md runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lmforge.errors import ConfigError, LmforgeError
from lmforge.infer.config import pool_blocks
from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.sampling import SamplingParams
from lmforge.model.cache import CacheSpec, KVCache, LayerCacheSpec, state_runs
from lmforge.model.meta import AttnMetadata, packed_positions

from ..test_readme import fenced
from .state_models import SelectiveRecurrence, tiny_state_model

KINDS = ("ssm", "hybrid")


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_state_model(kind) for kind in KINDS}


def reference(model, prompt: list[int], max_tokens: int, stop: int | None = None):
    """Greedy tokens and their log-probs by the model's full no-cache forward at every step."""
    ids, lps, dev = list(prompt), [], next(model.parameters()).device
    with torch.no_grad():
        for _ in range(min(max_tokens, model.max_seq_len - len(prompt))):
            logp = model(torch.tensor([ids], device=dev))[0, -1].float().log_softmax(-1)
            ids.append(int(logp.argmax()))
            lps.append(float(logp[ids[-1]]))
            if ids[-1] == stop:
                break
    return ids[len(prompt):], lps


def run(engine: Engine, requests, abort_after: dict | None = None) -> dict:
    """Add (prompt, params) requests, step to the end (aborting request i after abort_after[i] steps); checks
    at every step that the running sequences never outnumber the state rows."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    done, steps = {}, 0
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
        steps += 1
        assert len(engine.scheduler.running) <= engine.config.max_num_seqs
        for i, at in (abort_after or {}).items():
            if at == steps and ids[i] in engine.requests:
                done[ids[i]] = engine.abort(ids[i])
    return {i: done[rid] for i, rid in enumerate(ids)}


def no_leak(engine: Engine) -> None:
    cache = engine.runner.cache
    assert not cache.slot_of and cache.num_free_slots == engine.config.max_num_seqs
    assert engine.pool.num_used == 0


def greedy_mix(model, lengths=(1, 3, 7, 12, 19, 26), stops: bool = False):
    """Requests of several prompt lengths (a 1-token prompt is scheduled as a decode), greedy, log-probs on;
    with stops, every other one ends at a token its reference produces (async scheduling then computes a
    token too many and drops it)."""
    g = torch.Generator().manual_seed(len(lengths))
    out = []
    for i, n in enumerate(lengths):
        prompt = torch.randint(1, 250, (n,), generator=g).tolist()
        max_tokens = 4 + 3 * (i % 4)
        stop = reference(model, prompt, max_tokens)[0][2] if stops and i % 2 else None
        out.append((prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=0,
                                           stop_token_ids=(stop,) if stop is not None else ())))
    return out


CONFIGS = {
    "chunks+preemption": dict(block_size=4, max_num_batched_tokens=8, num_kv_tokens=48, max_num_seqs=4),
    "async": dict(block_size=4, max_num_batched_tokens=16, num_kv_tokens=64, max_num_seqs=3, async_scheduling=True),
    "static decode": dict(block_size=4, max_num_batched_tokens=12, max_num_seqs=4, cuda_graphs=True),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_engine_equals_the_full_forward(kind, config, models, tok):
    model = models[kind]
    mix = greedy_mix(model, stops=config == "async")
    engine = Engine(model, tok, EngineConfig(**CONFIGS[config]))
    done = run(engine, mix)
    for i, (prompt, sp) in enumerate(mix):
        want, lps = reference(model, prompt, sp.max_tokens, (sp.stop_token_ids or (None,))[0])
        out = done[i].outputs[0]
        assert out.token_ids == want, (kind, config, i)
        assert out.logprobs == pytest.approx(lps, abs=1e-4)
    assert engine.async_scheduling == (config == "async")
    if config == "chunks+preemption":  # a pure state model's pool holds every sequence (pool_blocks)
        assert (engine.stats()["preemptions"] > 0) == (kind == "hybrid")
    if config == "static decode":
        assert engine.runner.graphs.entries  # decode-only steps ran in the static buffers
    no_leak(engine)


class Recompute(nn.Module):
    """The same model without cache_spec(): the engine runs it on its recompute runner (every step from
    token 0, no cache), the reference path with the same samplers and seeded streams."""

    def __init__(self, model):
        super().__init__()
        self.model, self.max_seq_len, self.vocab_size = model, model.max_seq_len, model.vocab_size

    def forward(self, ids, positions=None, cache=None, meta=None):
        return self.model(ids)


@pytest.mark.parametrize("kind", KINDS)
def test_seeded_samples_fork_the_state_and_equal_the_recompute_engine(kind, models, tok):
    """n samples copy the parent's state after its prefill; each equals its own stream run without a cache,
    while other requests crowd the engine (chunks, preemption; max_num_seqs bounds the running samples)."""
    model = models[kind]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 250, (n,), generator=g).tolist() for n in (9, 17, 4)]
    mix = [(prompts[0], SamplingParams(temperature=1.0, n=3, max_tokens=8, seed=7, ignore_eos=True, logprobs=0)),
           (prompts[1], SamplingParams(temperature=0.8, top_k=40, n=2, max_tokens=6, seed=1, ignore_eos=True)),
           (prompts[2], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))]
    want = run(Engine(Recompute(model), tok, EngineConfig(max_num_seqs=8)), mix)
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=6, num_kv_tokens=28, max_num_seqs=3))
    got = run(engine, mix)
    for i in range(len(mix)):
        assert [o.token_ids for o in got[i].outputs] == [o.token_ids for o in want[i].outputs], i
    assert len({tuple(o.token_ids) for o in got[0].outputs}) == 3  # the samples differ
    assert got[0].outputs[0].logprobs == pytest.approx(want[0].outputs[0].logprobs, abs=1e-4)
    assert (engine.stats()["preemptions"] > 0) == (kind == "hybrid")
    no_leak(engine)


@pytest.mark.parametrize("kind", KINDS)
def test_beam_search_forks_rows_and_equals_the_recompute_engine(kind, models, tok):
    """Each round forks the next beams (their parents' rows copied) before dropping the old ones; the
    scheduler holds 2 x beam_width rows per search: the second search waits while the first holds 6 of 7."""
    model = models[kind]
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 250, (n,), generator=g).tolist() for n in (7, 12, 5)]
    mix = [(prompts[0], SamplingParams(beam_width=3, n=2, temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)),
           (prompts[1], SamplingParams(beam_width=2, temperature=0, max_tokens=5, ignore_eos=True)),
           (prompts[2], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))]
    want = run(Engine(Recompute(model), tok, EngineConfig(max_num_seqs=16)), mix)
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=32, max_num_seqs=7))
    got = run(engine, mix)
    for i in range(len(mix)):
        assert [o.token_ids for o in got[i].outputs] == [o.token_ids for o in want[i].outputs], i
        for a, b in zip(got[i].outputs, want[i].outputs):
            assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-4)
    assert len(got[0].outputs) == 2
    no_leak(engine)


@pytest.mark.parametrize("kind", KINDS)
def test_aborted_rows_are_reused_from_zero(kind, models, tok):
    """Aborts mid-decode and mid-prefill free their rows; the requests admitted into them start from a
    zeroed state (two rows, so every later request reuses one) and match the reference."""
    model = models[kind]
    mix = greedy_mix(model, lengths=(5, 14, 30, 8, 2, 11))
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=8, max_num_seqs=2))
    rows = set()
    real = engine.runner.cache.start
    engine.runner.cache.start = lambda chunks: (real(chunks), rows.update(engine.runner.cache.slot_of.values()))
    done = run(engine, mix, abort_after={0: 3, 2: 6})
    assert rows == {0, 1}
    for i, (prompt, sp) in enumerate(mix):
        out = done[i].outputs[0]
        if i in (0, 2):
            assert out.finish_reason == "abort" and len(out.token_ids) < sp.max_tokens
        else:
            assert out.token_ids == reference(model, prompt, sp.max_tokens)[0], i
    no_leak(engine)


def test_prefix_caching_is_off_and_prompt_logprobs_follow_the_chunks(models, tok):
    """A cached block holds keys, not the state after them: without state snapshots (the default,
    tests/infer/test_state_prefix.py) a repeated prompt is computed again. Its prompt log-probs, taken chunk
    by chunk, are the full forward's."""
    model = models["hybrid"]
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=8))
    prompt = list(range(40, 61))
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, prompt_logprobs=0)
    first, second = run(engine, [(prompt, sp)]), run(engine, [(prompt, sp)])
    assert not engine.pool.prefix_caching and engine.stats()["prefix_hit_blocks"] == 0
    assert first[0].outputs[0].token_ids == second[0].outputs[0].token_ids == reference(model, prompt, 5)[0]
    with torch.no_grad():
        full = model(torch.tensor([prompt]))[0].log_softmax(-1)
    got = [entry[t] for entry, t in zip(second[0].prompt_logprobs[1:], prompt[1:])]
    assert got == pytest.approx([float(full[i, t]) for i, t in enumerate(prompt[1:])], abs=1e-4)


def test_what_state_models_refuse_is_a_one_line_error(models, tok):
    model = models["ssm"]
    with pytest.raises(ConfigError, match="kernel step implements attention") as e:  # (drafts: test_state_speculative)
        Engine(model, tok, EngineConfig(kernel_step=True))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="set state_snapshots > 0") as e:  # (it ran, with no prefix caching)
        Engine(model, tok, EngineConfig(prefix_caching=True))
    assert "\n" not in str(e.value)
    assert Engine(model, tok, EngineConfig(prefix_caching=True, state_snapshots=1)).pool.prefix_caching
    engine = Engine(model, tok, EngineConfig(max_num_seqs=2))
    for sp, match in ((SamplingParams(beam_width=2, temperature=0, max_tokens=4), "4 recurrent-state rows at once"),
                      (SamplingParams(n=3, max_tokens=4, seed=0), "n=3 samples each keep a recurrent state row")):
        with pytest.raises(LmforgeError, match=match) as e:
            engine.add_request("hi", sp)
        assert "\n" not in str(e.value)
    assert not engine.requests
    with pytest.raises(LmforgeError, match="KVCache keeps no recurrent state"):
        model(torch.tensor([[1, 2]]), cache=KVCache(1, 1, 1, 4, 8))
    with pytest.raises(LmforgeError, match="cannot score a candidate tree"):
        model(torch.tensor([[1, 2]]), cache=engine.runner.cache, meta=AttnMetadata.tree([-1, 0]))
    with pytest.raises(LmforgeError, match="state_shapes"):
        LayerCacheSpec(kind="state", state_shapes=((4, 0),))


def test_spec_of_a_hybrid_and_the_pool_sizing(models):
    """State layers hold no per-token numbers and a fixed number per sequence; the pool leaves room for
    max_num_seqs + 1 state rows before it counts blocks."""
    spec = models["hybrid"].cache_spec()
    E = 2 * 32
    assert [layer.kind for layer in spec.layers] == ["state", "full", "state"] and spec.has_state
    assert not spec.latent and spec.bytes_per_token() == 2 * 2 * 8 * 4  # the attention layer: k and v, 2 heads of 8
    assert spec.bytes_per_sequence() == 2 * (E * 3 + E * 4) * 4
    assert spec.bytes_per_sequence(torch.bfloat16) == 2 * 7 * E * 2
    wide = LayerCacheSpec(kind="state", state_shapes=((2**20,),), state_dtype=torch.float32)  # 4 MiB a sequence
    big = CacheSpec(layers=(wide, LayerCacheSpec(kind="full", kv_heads=1024, head_dim=128)), dtype=torch.bfloat16,
                    max_seq_len=4096, vocab_size=8)
    assert big.bytes_per_sequence() == 4 * 2**20 and big.bytes_per_token() == 2**19
    blocks = pool_blocks(EngineConfig(max_num_seqs=100, block_size=16), big, torch.device("cpu"), 4096)
    assert blocks == (2**30 - 101 * 4 * 2**20) // 2**19 // 16
    ssm = models["ssm"].cache_spec()
    assert ssm.bytes_per_token() == 0 and pool_blocks(EngineConfig(max_num_seqs=2, block_size=8), ssm,
                                                      torch.device("cpu"), 96) == 2 * 96 // 8


def test_each_state_tensor_keeps_its_own_dtype():
    """state_dtypes: one dtype per state tensor (Mamba as vLLM keeps it: conv in the model's dtype, ssm in
    fp32); None entries fall back to state_dtype, then the cache's. The pools and bytes_per_sequence agree."""
    from lmforge.infer.kv.state import new_state_cache

    shapes = ((6, 2), (6, 4))
    for kw, want in ((dict(state_dtypes=(None, torch.float32)), (torch.bfloat16, torch.float32)),
                     (dict(state_dtype=torch.float32), (torch.float32, torch.float32)),
                     (dict(state_dtype=torch.float32, state_dtypes=(torch.bfloat16, None)),
                      (torch.bfloat16, torch.float32)),
                     ({}, (torch.bfloat16, torch.bfloat16))):
        layer = LayerCacheSpec(kind="state", state_shapes=shapes, **kw)
        spec = CacheSpec(layers=(layer, layer), dtype=torch.bfloat16, max_seq_len=32, vocab_size=8)
        cache = new_state_cache(spec, 2, 4, max_seqs=3)
        assert [[p.dtype for p in cache.states[i]] for i in (0, 1)] == [list(want)] * 2, kw
        row = sum(p[0].numel() * p.element_size() for pools in cache.states.values() for p in pools)
        assert spec.bytes_per_sequence() == row == 2 * (12 * want[0].itemsize + 24 * want[1].itemsize)  # 6x2, 6x4
    with pytest.raises(LmforgeError, match="one torch.dtype or None per state_shapes entry"):
        LayerCacheSpec(kind="state", state_shapes=shapes, state_dtypes=(torch.float32,))


def test_a_pure_state_models_blocks_are_bookkeeping_whatever_num_kv_tokens_says(models, tok):
    """Nothing is stored per token, so the pool holds max_num_seqs sequences of max_seq_len, each in whole
    blocks: a request longer than num_kv_tokens is served, and concurrent ones are never preempted."""
    model = models["ssm"]
    for kv_tokens in (None, 40):
        assert pool_blocks(EngineConfig(max_num_seqs=3, block_size=8, num_kv_tokens=kv_tokens), model.cache_spec(),
                           torch.device("cpu"), 97) == 3 * 13  # 97 tokens: 13 blocks of 8
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=8, num_kv_tokens=40, max_num_seqs=3))
    assert engine.pool.num_blocks == 3 * 96 // 4
    mix = greedy_mix(model, lengths=(50, 30, 44))  # 54, 37, 54 tokens: 14, 10, 14 blocks; the budget is 10
    done = run(engine, mix)
    for i, (prompt, sp) in enumerate(mix):
        assert done[i].outputs[0].token_ids == reference(model, prompt, sp.max_tokens)[0], i
    assert engine.stats()["preemptions"] == 0
    no_leak(engine)


def test_the_state_cache_serves_both_kinds_in_one_object(models, tok):
    engine = Engine(models["hybrid"], tok, EngineConfig(max_num_seqs=3, num_kv_tokens=64, block_size=8))
    cache = engine.runner.cache
    assert sorted(cache.states) == [0, 2] and cache.k[1].shape == (9, 8, 2, 8)
    assert [tuple(p.shape) for p in cache.states[0]] == [(4, 64, 3), (4, 64, 4)]  # 3 rows + the null row
    assert cache.null_slot == 3


@pytest.mark.parametrize("kind", KINDS)
def test_packed_training_rows_run_each_document_from_zero(kind, models):
    """Packed rows (meta.doc_ids, as SFT/DPO packing passes them; no cache): each document's logits and
    gradients are those of the document run alone; its state never leaks into the next document."""
    model = models[kind]
    g = torch.Generator().manual_seed(4)
    lens = ((5, 5, 9), (12, 7))  # two documents of one length in a row: scanned together
    docs = [[torch.randint(1, 250, (n,), generator=g) for n in row] for row in lens]
    ids = torch.stack([torch.cat(row) for row in docs])
    doc_ids = torch.stack([torch.cat([torch.full((len(d),), j) for j, d in enumerate(row)]) for row in docs])
    packed = model(ids, positions=packed_positions(doc_ids), meta=AttnMetadata.packed(doc_ids))
    with torch.no_grad():
        alone = torch.stack([torch.cat([model(d[None])[0] for d in row]) for row in docs])
    assert torch.allclose(packed, alone, atol=1e-5)
    mixer = next(m for m in model.modules() if isinstance(m, SelectiveRecurrence))
    grads = []
    for out in (packed[0, 7], model(docs[0][1][None])[0, 2]):  # a token of the row's second document
        model.zero_grad(set_to_none=True)
        out.sum().backward(retain_graph=True)
        grads.append(mixer.in_proj.weight.grad.clone())
    model.zero_grad(set_to_none=True)
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(LmforgeError, match="cannot score a candidate tree"):
        model(torch.tensor([[1, 2]]), meta=AttnMetadata.tree([-1, 0]))


def test_recur_runs_decodes_together_and_chunks_by_length():
    """recur's varlen runs against the layer run row by row from the stored states: the decodes (and a
    one-token chunk after them) in one scan, neighbouring chunks of one length in one scan, others alone."""
    torch.manual_seed(0)
    layer = SelectiveRecurrence(0, 8, 16, 3, 3)
    spec = CacheSpec(layers=(LayerCacheSpec(kind="state", state_shapes=layer.state_shapes()),), dtype=torch.float32,
                     max_seq_len=32, vocab_size=8)
    from lmforge.infer.kv.state import new_state_cache

    cache = new_state_cache(spec, 2, 4, max_seqs=6)
    cache.start([(10 + i, True, None) for i in range(6)])
    for pool in cache.states[0]:
        pool[:6].normal_()  # states carried from earlier steps
    before = [p.clone() for p in cache.states[0]]
    lens, slots = (1, 1, 1, 5, 5, 2), (2, 0, 5, 1, 4, 3)  # two decodes, then chunks of 1, 5, 5 and 2 tokens
    x = torch.randn(1, sum(lens), 8)
    meta = AttnMetadata(query_lens_host=lens, num_decodes=2, state_slots=torch.tensor(slots))
    assert state_runs(meta) == [(0, 3, 0, 1), (3, 5, 3, 5), (5, 6, 13, 2)]
    scans = []
    real = layer.scan
    layer.scan = lambda x, states: (scans.append(tuple(x.shape[:2])), real(x, states))[1]
    with torch.no_grad():
        y = layer(x, cache, meta)
        assert scans == [(3, 1), (2, 5), (1, 2)]
        start = 0
        for slot, n in zip(slots, lens):
            want, new = real(x[:, start:start + n], tuple(p[slot:slot + 1] for p in before))
            assert torch.allclose(y[:, start:start + n], want, atol=1e-6)
            assert all(torch.allclose(p[slot], s[0], atol=1e-6) for p, s in zip(cache.states[0], new))
            start += n
    cache.start([(12, True, None)])  # a sequence starting over finds its row zeroed
    assert all(not p[cache.slot_of[12]].any() for p in cache.states[0]) and cache.states[0][0][0].any()


def test_the_guide_runs(tok):
    """docs/state_caches.md's python blocks run in one namespace (their asserts check the engine against
    the no-cache forward)."""
    path = Path(__file__).resolve().parents[2] / "docs" / "state_caches.md"
    scope: dict = {}
    blocks = fenced("python", path.read_text())
    assert blocks
    for code in blocks:
        exec(compile(code, str(path), "exec"), scope)
    assert scope["out"].token_ids == scope["want"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", KINDS)
def test_on_a_gpu_with_every_default_backend(kind, tok):
    """On a GPU the defaults turn on async scheduling, captured CUDA graphs, the fused-kernel view and the
    Triton attention kernels where Triton is (the hybrid's attention layer): still the full forward's tokens."""
    model = tiny_state_model(kind).cuda()
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=4))
    assert engine.async_scheduling
    mix = greedy_mix(model, stops=True)
    done = run(engine, mix)
    for i, (prompt, sp) in enumerate(mix):
        want, lps = reference(model, prompt, sp.max_tokens, (sp.stop_token_ids or (None,))[0])
        assert done[i].outputs[0].token_ids == want, i
        assert done[i].outputs[0].logprobs == pytest.approx(lps, abs=1e-3)
    graphs = engine.runner.graphs  # on where the Triton decode kernel is (EngineConfig.cuda_graphs)
    assert graphs is None or any(e.graph is not None for e in graphs.entries.values())  # replayed, not eager
    no_leak(engine)
