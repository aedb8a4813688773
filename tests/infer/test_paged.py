"""The paged decode reference (gather blocks, then grouped attention) against math_attention over each
row's keys laid out contiguously; the engine's paged cache with a score hook sees the probabilities."""

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
