"""The paged decode reference (gather blocks, then grouped attention) against math_attention over each
row's keys laid out contiguously; the engine's paged cache with a score hook sees the probabilities; the
Triton decode kernel in the engine and its fallback; the block pool's KV utilisation with shared blocks."""

from __future__ import annotations

import pytest
import torch

from lmforge.infer.kv.paged import paged_decode_reference
from lmforge.model.layers.attention import math_attention, visible


@pytest.mark.parametrize("kw", [dict(), dict(window=5), dict(softcap=2.0), dict(sinks=True)])
def test_paged_decode_reference_equals_contiguous_attention(kw):
    torch.manual_seed(0)
    nb, bs, KV, hd, H, B = 24, 4, 2, 8, 6, 3
    kc, vc = torch.randn(nb, bs, KV, hd), torch.randn(nb, bs, KV, hd)
    tables = torch.stack([torch.randperm(nb)[:6] for _ in range(B)]).int()
    lens = torch.tensor([3, 21, 9], dtype=torch.int32)
    q = torch.randn(B, H, hd)
    if kw.get("sinks"):
        kw = dict(sinks=torch.randn(H))
    got = paged_decode_reference(q, kc, vc, tables, lens, scale=0.3, **kw)
    for b in range(B):
        n = int(lens[b])
        k = kc[tables[b].long()].flatten(0, 1)[:n].transpose(0, 1)[None]  # (1, KV, n, hd)
        v = vc[tables[b].long()].flatten(0, 1)[:n].transpose(0, 1)[None]
        mask = visible(torch.tensor([n - 1]), torch.arange(n), kw.get("window", 0))
        want = math_attention(q[b][None, :, None], k, v, mask, scale=0.3, softcap=kw.get("softcap", 0.0),
                              sinks=kw.get("sinks"))[0, :, 0]
        torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5)


def test_score_hook_sees_attention_probabilities(tok):
    """A KV policy's hook on the paged cache gets every layer's probabilities (rows sum to one)."""
    from lmforge.infer.engine import Engine, EngineConfig
    from lmforge.infer.sampling import SamplingParams

    from .infer_helpers import tiny_model

    engine = Engine(tiny_model("llama"), tok, EngineConfig(block_size=4))
    seen = []
    engine.runner.cache.score_hook = lambda layer, p: seen.append((layer, p.shape, float(p.sum(-1).mean())))
    engine.add_request("hello", SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert {layer for layer, _, _ in seen} == {0, 1}
    assert all(abs(total - 1) < 1e-5 for _, _, total in seen)
    assert seen[0][1] == (1, 4, 5, 5) and seen[-1][1][2] == 1  # prefill (1, H, T, S), then a decode row


MLA = dict(attention="mla", rope_layout="interleaved", n_kv_heads=None)


@pytest.mark.parametrize("arch,config", [("llama", dict(cuda_graphs=True)), ("mla", dict(block_size=4)),
                                         ("mla", dict(block_size=4, chunked_prefill=True, max_num_batched_tokens=4))])
def test_every_cache_kind_and_step_path_shows_the_hook_each_layers_probabilities(tok, arch, config):
    """KV policies see attention on every path: MLA's latent caches (absorbed decode, naive prefill) call the
    hook too, and a hooked cache runs the eager step (a replayed graph or the kernel step would hide it)."""
    from lmforge.infer.engine import Engine, EngineConfig
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model.config import MLAConfig

    from .infer_helpers import tiny_model

    extra = dict(MLA, mla=MLAConfig(kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                    v_head_dim=8)) if arch == "mla" else {}
    engine = Engine(tiny_model("llama", **extra), tok, EngineConfig(**config))
    seen = []
    engine.runner.cache.score_hook = lambda layer, p: seen.append((layer, p.shape[2], float(p.sum(-1).mean())))
    engine.add_request("hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    one_query = [layer for layer, t, _ in seen if t == 1]  # 3 decodes (+ "hello"'s last chunk of 1 in 4 + 1)
    assert one_query == [0, 1] * (4 if config.get("chunked_prefill") else 3)
    assert all(abs(total - 1) < 1e-5 for _, _, total in seen)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_hooked_cache_runs_the_eager_step_on_a_gpu(tok):
    """On a GPU the default engine decodes through the batch-1 kernel step and replayed CUDA graphs, where
    attention runs outside the cache's attend: with a score hook set, every decode step's layers reach it."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    from .infer_helpers import full_greedy, tiny_model

    model = tiny_model("llama").cuda()
    engine = Engine(model, tok)
    seen = []
    engine.runner.cache.score_hook = lambda layer, p: seen.append(layer) if p.shape[2] == 1 else None
    rid = engine.add_request("hello", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert seen == [0, 1] * 5 and done[rid].token_ids == full_greedy(model, tok.encode("hello"), 6)


def test_caches_learn_each_rows_sequence_and_its_forks_and_releases(tok):
    """Per-sequence state (a KV policy's, an SSM's) is keyed by AttnMetadata.seq_ids_host; the engine tells
    the cache of forks (n samples share the prompt's state) and of every finished or aborted sequence."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    from .infer_helpers import tiny_model

    engine = Engine(tiny_model("llama"), tok)
    cache, events, rows = engine.runner.cache, [], []
    cache.fork = lambda parent, child: events.append(("fork", parent, child))
    cache.release = lambda seq_id: events.append(("release", seq_id))
    real = engine.runner.prepare
    engine.runner.prepare = lambda *a, **k: (lambda out: rows.append(out[1].seq_ids_host) or out)(real(*a, **k))
    three = engine.add_request("abc", SamplingParams(n=3, max_tokens=3, ignore_eos=True, seed=0))
    one = engine.add_request("xyz", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    parent, other = (engine.requests[r].seqs[0].seq_id for r in (three, one))
    kids = [s.seq_id for s in engine.requests[three].seqs[1:]]
    assert rows[0] == (parent, other) and set(rows[1]) == {parent, other, *kids}
    assert events == [("fork", parent, kids[0]), ("fork", parent, kids[1])]
    engine.abort(one)
    while engine.has_unfinished():
        engine.step()
    assert sorted(events[2:]) == sorted(("release", s) for s in (other, parent, *kids))


def test_engine_through_the_triton_decode_kernel(tok):
    """decode_attention='kernel' (Triton's interpreter on CPU): the engine's tokens equal the reference's."""
    pytest.importorskip("lmforge.kernels.paged_attention")
    from lmforge.infer.engine import EngineConfig
    from lmforge.infer.llm import LLM
    from lmforge.infer.sampling import SamplingParams
    from lmforge.kernels.decode import available

    from .infer_helpers import tiny_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not available(dev):
        pytest.skip("needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")
    model = tiny_model("llama", sliding_window=5, attn_softcap=20.0).to(dev)  # fp32: the two must agree exactly
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = ["hello", "a longer prompt"]
    want = LLM(model, tok, config=EngineConfig(decode_attention="reference", cuda_graphs=False)).generate(prompts, sp)
    for graphs in (False, True):  # on a GPU, True replays captured graphs around the kernel
        llm = LLM(model, tok, config=EngineConfig(decode_attention="kernel", block_size=4, cuda_graphs=graphs))
        assert [o.token_ids for o in llm.generate(prompts, sp)] == [o.token_ids for o in want]


def test_a_failing_decode_kernel_falls_back_to_the_reference(tok):
    """A kernel that cannot run here (e.g. does not compile) warns once; serving goes on, same tokens."""
    from lmforge.infer.engine import Engine
    from lmforge.infer.sampling import SamplingParams

    from .infer_helpers import tiny_model

    model = tiny_model("llama")
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)

    def run(kernel):
        engine = Engine(model, tok)
        engine.runner.cache.kernel = kernel
        rid = engine.add_request("hello", sp)
        out = None
        while engine.has_unfinished():
            out = next((o for o in engine.step() if o.request_id == rid), out)
        return out.token_ids, engine.runner.cache.kernel

    def broken(*args, **kwargs):
        raise RuntimeError("does not compile")

    want, _ = run(None)
    with pytest.warns(UserWarning, match="paged decode kernel failed .*does not compile"):
        got, left = run(broken)
    assert got == want and left is None


def _utilization(pool, lengths: dict[int, int], tables: dict[int, list[int]]) -> float:
    """Reference: the distinct blocks the sequences hold, each filled to the furthest any holder wrote
    (sequence i holds lengths[i] tokens in tables[i]), over their slots."""
    bs, fill = pool.block_size, {}
    for i, table in tables.items():
        for j, b in enumerate(table):
            fill[b] = max(fill.get(b, 0), min(bs, max(0, lengths[i] - j * bs)))
    return sum(fill.values()) / (len(fill) * bs)


def test_pool_utilization_counts_shared_blocks_once():
    """A prefix hit and a fork share blocks: utilisation stays the held fraction of distinct slots (the
    sum of sequence lengths would give 26 tokens for 20 slots here), and the peak keeps its value."""
    from lmforge.infer.blocks import BlockPool

    pool = BlockPool(16, 4)
    tables, lengths = {0: []}, {0: 10}
    pool.append(tables[0], 0, 10)  # blocks of 4, 4, 2 tokens
    for b, key in zip(tables[0], pool.block_keys(list(range(10)))):
        pool.register(b, key)
    assert pool.utilization == _utilization(pool, lengths, tables) == 10 / 12
    hits = pool.lookup(list(range(8)) + [50, 51, 52])  # a second prompt sharing the first 8 tokens
    for b in hits:
        pool.hold(b)
    tables[1], lengths[1] = list(hits), 11
    pool.append(tables[1], 8, 3)
    assert len(hits) == 2 and pool.num_used == 4
    assert pool.utilization == _utilization(pool, lengths, tables) == 13 / 16
    tables[2], lengths[2] = pool.fork(tables[0]), 11  # an n > 1 sample of the first: shares all 3 blocks
    pool.append(tables[2], 10, 1)  # its first own token: copy-on-write of the shared tail block
    assert pool.num_used == 5 and pool.utilization == _utilization(pool, lengths, tables) == 16 / 20
    assert sum(lengths.values()) / (pool.num_used * 4) > 1  # what counting per sequence would claim
    for t in tables.values():
        pool.release(t)
    assert pool.num_used == 0 and pool.tokens_held == 0 and pool.utilization == 0
    assert (pool.peak_used, pool.peak_utilization) == (5, 16 / 20)
    again = pool.lookup(list(range(8)) + [9])  # idle cached blocks come back full
    for b in again:
        pool.hold(b)
    assert pool.tokens_held == 8 and pool.utilization == 1.0


def test_engine_kv_utilization_at_peak_with_shared_prefixes_and_samples(tok):
    """Requests sharing a prefix, each with n=3 samples: the engine reports the peak's utilisation (<= 1),
    equal to the reference computed from every running sequence's blocks after each schedule (summing
    sequence lengths instead gives > 1). No sliding window here: tables hold no null entries."""
    from lmforge.infer.engine import Engine, EngineConfig
    from lmforge.infer.sampling import SamplingParams

    from .infer_helpers import tiny_model

    engine = Engine(tiny_model("llama"), tok, EngineConfig(block_size=4, max_num_batched_tokens=32))
    schedule, peak = engine.scheduler.schedule, [0, 0.0, 0.0]

    def watched():
        batch = schedule()
        n = {id(s): k for s, k in batch.chunks}
        seqs, used = engine.scheduler.running, engine.pool.num_used
        lengths = {i: s.num_computed + n.get(id(s), 0) for i, s in enumerate(seqs)}
        util = _utilization(engine.pool, lengths, {i: s.block_table for i, s in enumerate(seqs)})
        if used >= peak[0]:
            peak[:] = used, util, sum(lengths.values()) / (used * 4)  # the last: per-sequence counting
        return batch

    engine.scheduler.schedule = watched
    shared = "a system prompt all share. "
    for i, own in enumerate(["first", "second one", "3"]):
        engine.add_request(shared + own, SamplingParams(n=3, temperature=1.0, seed=i, max_tokens=9, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    st = engine.stats()
    assert st["prefix_hit_blocks"] > 0 and st["used_blocks"] == 0
    assert st["peak_used_blocks"] == peak[0]
    assert st["kv_utilization_at_peak"] == pytest.approx(peak[1]) and 0.5 < peak[1] <= 1 < peak[2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_paged_decode_reference_reads_a_narrower_cache_in_the_query_dtype(dtype):
    """A cache kept narrower than the compute (bf16 / fp8 keys under an fp32 model: the simplest KV compression)
    is read in q's dtype, as the prefill path reads it; before, the decode reference's bmm raised a dtype error."""
    torch.manual_seed(0)
    kc, vc = torch.randn(8, 4, 2, 8).to(dtype), torch.randn(8, 4, 2, 8).to(dtype)
    tables = torch.tensor([[3, 1, 5], [0, 2, 7]], dtype=torch.int32)
    lens, q = torch.tensor([9, 12], dtype=torch.int32), torch.randn(2, 4, 8)
    got = paged_decode_reference(q, kc, vc, tables, lens, scale=0.3)
    want = paged_decode_reference(q, kc.float(), vc.float(), tables, lens, scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_engine_on_an_fp8_paged_cache_writes_forks_and_decodes(tok):
    """An fp8 K/V pool (index_copy_ has no fp8 kernel on a CPU: pools move as bytes) runs a chunked, forked (n = 2,
    copy-on-write) request through the engine, and its log-probs stay near the fp32 cache's."""
    from lmforge.infer.engine import Engine, EngineConfig
    from lmforge.infer.kv.paged import PagedKVCache
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model.cache import CacheSpec

    from .infer_helpers import tiny_model

    model = tiny_model("llama")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0, n=2)
    outs = {}
    for dtype in (torch.float32, torch.float8_e4m3fn):
        engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=8))
        engine.runner.cache = PagedKVCache(CacheSpec.of(model), engine.runner.cache.num_blocks, 4, dtype=dtype)
        engine.add_request("hello there, cache", params)
        while engine.has_unfinished():
            outs[dtype] = engine.step()
    fp32, fp8 = (outs[d][0].outputs for d in (torch.float32, torch.float8_e4m3fn))
    assert [o.token_ids for o in fp8] == [o.token_ids for o in fp32]
    assert max(abs(a - b) for o8, o32 in zip(fp8, fp32) for a, b in zip(o8.logprobs, o32.logprobs)) < 0.05


def test_an_integer_paged_cache_dtype_is_refused():
    """int8 K/V pools would truncate every key on write (no scales): refused in one line."""
    from lmforge.errors import LmforgeError
    from lmforge.infer.kv.paged import PagedKVCache

    from .infer_helpers import tiny_model

    with pytest.raises(LmforgeError, match="int8/int4 KV needs a store with scales"):
        PagedKVCache(tiny_model("llama").cache_spec(), 8, 4, dtype=torch.int8)


class SkipFirst:
    """The reference for PagedCache.first_key = 1: no cache, each query sees its causal keys but key 0 (unless
    it is that query's own), for both attention kinds."""
    length = 0

    @staticmethod
    def mask(T: int) -> torch.Tensor:
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        return (j <= i) & ((j >= 1) | (j == i))

    def attend(self, layer, q, k, v, spec, meta=None):
        from lmforge.model.layers.attention import attend_with

        return attend_with(q, k, v, self.mask(q.shape[2]), spec)

    def attend_latent(self, layer, mla, q_nope, q_rope, c_kv, k_rope, spec, meta=None):
        return mla.naive(q_nope, q_rope, c_kv, k_rope, self.mask(q_nope.shape[2]), spec)


@pytest.mark.parametrize("arch", ["llama", "mla"])
def test_first_key_hides_the_first_slots_on_every_reference_path(tok, arch):
    """A paged cache with first_key = 1 (a draft head's begin entry, lmforge.infer.draft): the engine's prefill
    chunks and decode rows equal a forward that masks key 0 for every later query, K/V and MLA latents."""
    from lmforge.infer.engine import Engine, EngineConfig
    from lmforge.infer.sampling import SamplingParams

    from .infer_helpers import greedy_with_attention, tiny_model

    kw = {}
    if arch == "mla":
        from lmforge.model.config import MLAConfig

        kw = dict(attention="mla", rope_layout="interleaved", n_kv_heads=None,
                  mla=MLAConfig(kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8))
    model = tiny_model("llama", init_std=0.3, **kw)
    prompt = torch.randint(1, 250, (11,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = Engine(model, tok, EngineConfig(block_size=4, max_num_batched_tokens=5))  # chunks of 5
    engine.runner.cache.first_key = 1
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0))
    while engine.has_unfinished():
        out = next((o for o in engine.step() if o.finished), None)
    want, lps = greedy_with_attention(model, prompt, 6, SkipFirst())
    assert out.outputs[0].token_ids == want
    assert out.outputs[0].logprobs == pytest.approx(lps, abs=1e-4)
