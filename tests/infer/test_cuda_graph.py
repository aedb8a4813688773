"""CUDA graphs: the engine's decode graphs (lmforge.infer.graphs) and the static-cache decoder give the
engine's eager tokens; graphs themselves on GPU."""

from __future__ import annotations

import pytest
import torch
from .infer_helpers import tiny_model

from lmforge.infer.cuda_graph import GraphDecoder
from lmforge.infer.decoders import left_pad
from lmforge.infer.llm import LLM
from lmforge.infer.sampling import SamplingParams

PROMPTS = ["Hello there", "a", "The quick brown fox", "xyz", "12"]
SP = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def graph_greedy(dec: GraphDecoder, prompts: list[list[int]], n: int, device="cpu") -> list[list[int]]:
    """Left-padded batch on the static cache: prefill, then n - 1 greedy steps."""
    ids, pad = left_pad(prompts, device=device)
    toks = [dec.prefill(ids, pad).argmax(-1)]
    for _ in range(n - 1):
        toks.append(dec.step(toks[-1]).argmax(-1))
    return torch.stack(toks, 1).tolist()


def test_static_decoder_matches_engine(arch, tok):
    model = tiny_model(arch)
    engine = LLM(model, tok).generate(PROMPTS, SP)
    static = graph_greedy(GraphDecoder(model, 8, 64, use_graphs=False, kernels=False),
                          [tok.encode(p) for p in PROMPTS], SP.max_tokens)
    assert static == [o.token_ids for o in engine]


def test_repeated_kv_heads_give_the_same_logits():
    model = tiny_model("llama")  # 4 query heads, 2 kv heads
    ids = torch.randint(0, 257, (2, 7))
    pad = torch.tensor([0, 3])
    outs = []
    for repeat in (False, True):
        dec = GraphDecoder(model, 2, 16, use_graphs=False, repeat_kv=repeat)
        outs.append(torch.stack([dec.prefill(ids, pad), dec.step(torch.tensor([5, 6])), dec.step(torch.tensor([7, 8]))]))
    assert dec.cache.k.shape[2] == 4
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_tokens_match_plain_path(tok):
    model = tiny_model("llama").cuda()
    plain = LLM(model, tok, cuda_graphs=False).generate(PROMPTS, SP)
    graphs = graph_greedy(GraphDecoder(model, 8, 64), [tok.encode(p) for p in PROMPTS], 10, "cuda")  # bucket 8
    assert graphs == [o.token_ids for o in plain]
    dec = GraphDecoder(model, 1, 64, repeat_kv=True, compile=False)
    ids = torch.tensor([tok.encode("Hello there")], device="cuda")
    out = [int(dec.prefill(ids, torch.zeros(1, dtype=torch.long, device="cuda")).argmax())]
    for _ in range(9):
        out.append(int(dec.step(torch.tensor(out[-1:], device="cuda")).argmax()))
    assert out == plain[0].token_ids


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_decode_graphs_match_eager(tok):
    model = tiny_model("llama").cuda()
    prompts = PROMPTS * 3  # 15 rows: bucket 16, rows finishing at different steps
    eager = LLM(model, tok, cuda_graphs=False).generate(prompts, SP)
    llm = LLM(model, tok, cuda_graphs=True)
    graphs = llm.generate(prompts, SP)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]
    assert any(e.graph is not None for e in llm.engine.runner.graphs.entries.values())


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
