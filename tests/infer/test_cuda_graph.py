"""The engine's CUDA-graph decode backend (lmforge.infer.graphs): decode-only steps in static buffers of a
(batch, block-table width) bucket give the full-recompute reference's greedy tokens. On a CPU the same
static-buffer step runs eagerly (cuda_graphs=True without a GPU), so the padding rows, the scratch block
and the bucketing are checked here; on a GPU the captured graphs are replayed."""

from __future__ import annotations

import pytest
import torch
from .infer_helpers import full_greedy, run_requests, tiny_model

from lmforge.infer.engine import Engine, EngineConfig
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams
from lmforge.utils import capture_cuda_graph

PROMPTS = ["Hello there", "a", "The quick brown fox", "xyz", "12"]
SP = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
BUDGETS = [10, 7, 4, 2, 9]


def run_budgets(engine, tok) -> list[list[int]]:
    """PROMPTS with BUDGETS new tokens each, greedy, run to the end: rows finish at different steps."""
    reqs = [(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)) for p, n in zip(PROMPTS, BUDGETS)]
    return [o.token_ids for o in run_requests(engine, reqs)]


def test_static_buffer_decode_matches_the_reference(arch, tok):
    """Five rows of different lengths and budgets with block size 4 (tables of 1 to 8 blocks): as rows
    finish the batch runs in buckets 8, 4, 2 and 1, with padding rows in each."""
    model = tiny_model(arch)
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, block_size=4))
    assert run_budgets(engine, tok) == [full_greedy(model, tok.encode(p), n) for p, n in zip(PROMPTS, BUDGETS)]
    assert {key[0] for key in engine.runner.graphs.entries} == {1, 2, 4, 8}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_decode_graphs_match_eager(tok):
    model = tiny_model("llama").cuda()
    prompts = PROMPTS * 3  # 15 rows: bucket 16, rows finishing at different steps
    eager = LLM(model, tok, cuda_graphs=False).generate(prompts, SP)
    llm = LLM(model, tok, cuda_graphs=True)
    graphs = llm.generate(prompts, SP)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]
    assert llm.generate(prompts[0], SP)[0].token_ids == eager[0].token_ids  # batch 1
    assert all(e.graph is not None for e in llm.engine.runner.graphs.entries.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_failed_capture_leaves_the_stream_random_draws_and_later_captures_working():
    """A capture that fails (a device sync inside it) raises, and the process goes on as before it: the same
    current stream, random draws outside graphs, and new captures (also of random ops). Plain torch.cuda.graph
    (torch 2.11, H200, 2026-12-05) left the capture stream current and every later randn failing."""
    stream, x = torch.cuda.current_stream(), torch.ones(8, device="cuda")
    with pytest.raises(RuntimeError):
        capture_cuda_graph(lambda: (x * 2, torch.cuda.synchronize()))
    assert torch.cuda.current_stream() == stream and not torch.cuda.is_current_stream_capturing()
    assert torch.randn(4, device="cuda").isfinite().all()
    graph, out = capture_cuda_graph(lambda: x * 3 + torch.rand_like(x) * 0)
    graph.replay()
    assert out.tolist() == [3.0] * 8


def test_decode_graph_entries_keep_every_tensor_they_read(tok):
    """A replayed graph reads raw addresses: every tensor its step reads must stay referenced by the
    entry after capture (the H200 run of 08:10 replayed freed context_lens / logits_indices)."""
    import gc
    import weakref

    llm = LLM(tiny_model("llama"), tok, cuda_graphs=True)
    llm.generate(PROMPTS, SP)
    entries = llm.engine.runner.graphs.entries
    assert entries
    for e in entries.values():
        m = e.meta
        refs = [weakref.ref(t) for t in (m.positions, m.slot_mapping, m.context_lens, m.logits_indices,
                                           m.block_tables)]
        gc.collect()
        assert all(r() is not None for r in refs)
        assert m.block_tables is e.tables and m.positions.data_ptr() == e.host[1].data_ptr()


def test_the_static_step_rebuilds_what_layers_derive_from_the_metadata(tok):
    """The static-buffer step reuses one AttnMetadata per bucket: what layers derive from it (meta.derived)
    must be rebuilt from the buffers at every step (and inside a capture), not read from the first one."""
    from torch import nn

    class Deriving(nn.Module):  # records what it derives from the step's context lengths
        def __init__(self, model):
            super().__init__()
            self.model, self.seen = model, []

        def cache_spec(self):
            return self.model.cache_spec()

        def forward(self, ids, positions=None, cache=None, meta=None):
            if meta is not None and meta.num_decodes == ids.shape[1]:
                self.seen.append(meta.derived("longest", lambda: int(meta.context_lens.max())))
            return self.model(ids, positions, cache, meta)

    model = Deriving(tiny_model("llama"))
    engine = Engine(model, tok, EngineConfig(block_size=4, cuda_graphs=True))
    engine.add_request("abc", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert engine.runner.graphs.entries and model.seen == [4, 5, 6, 7, 8]  # one per decode step, each its own


def test_every_bucket_writes_one_output_buffer(tok):
    """Buckets of 8, 4, 2 and 1 rows (and widths) return views of one logits buffer, sized for the largest bucket:
    captured graphs' outputs take one buffer's memory, not one per bucket; tokens stay the reference's."""
    model = tiny_model("llama")
    engine = Engine(model, tok, EngineConfig(cuda_graphs=True, block_size=4, max_num_seqs=8))
    assert run_budgets(engine, tok) == [full_greedy(model, tok.encode(p), n) for p, n in zip(PROMPTS, BUDGETS)]
    graphs = engine.runner.graphs
    (buf,) = graphs.outputs.values()
    assert buf.shape == (8, model.cfg.vocab_size) and len(graphs.entries) >= 4
    with torch.inference_mode():
        assert all(e.step().data_ptr() == buf.data_ptr() for e in graphs.entries.values())
