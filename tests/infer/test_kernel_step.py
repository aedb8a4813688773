"""The batch-1 Triton kernel decode step (lmforge/infer/kernel_step.py) computes the model's decode step:
same logits as the model's full forward (paged cache) and as the plain decoder (static cache, through
GraphDecoder), and it never changes the model it is given. On CPU the kernels run in Triton's
interpreter (tests/conftest.py), on a GPU for real (and inside a CUDA graph)."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.infer.cuda_graph import GraphDecoder
from lmforge.infer.decoders import PlainDecoder
from lmforge.infer.kernel_step import KernelStep, PagedKV, unsupported
from lmforge.kernels import decode as kd
from lmforge.kernels.decode import available
from lmforge.kernels.tuning import KernelConfigs

from .infer_helpers import tiny_model

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def _greedy(decoder, prompt: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    logits = decoder.prefill(prompt, torch.zeros(1, dtype=torch.long, device=prompt.device))
    toks, all_logits = [int(logits.argmax())], [logits.clone()]
    for _ in range(n - 1):
        logits = decoder.step(torch.tensor(toks[-1:], device=prompt.device))
        toks.append(int(logits.argmax()))
        all_logits.append(logits.clone())  # graph and kernel paths reuse one output buffer
    return toks, all_logits


def _snapshot(model) -> tuple:
    """What 'unchanged' means: the same Parameter objects under the same names, equal values, the same
    state_dict keys and the unfused modules still in place."""
    params = {n: (id(p), p.detach().clone()) for n, p in model.named_parameters()}
    return params, sorted(model.state_dict()), [b.attn.wqkv is None and b.mlp.gate_up is None for b in model.blocks]


def _assert_unchanged(model, snap) -> None:
    params, keys, unfused = snap
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (ident, value) in params.items():
        assert id(now[n]) == ident and torch.equal(now[n].detach(), value), n
    assert sorted(model.state_dict()) == keys
    assert [b.attn.wqkv is None and b.mlp.gate_up is None for b in model.blocks] == unfused == [True] * len(unfused)


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_kernel_step_on_static_cache_matches_the_model(kv_heads):
    model = tiny_model("llama", n_heads=4, n_kv_heads=kv_heads, d_model=64, head_dim=16).to(DEV)
    snap = _snapshot(model)
    prompt = torch.randint(0, 257, (1, 9), generator=torch.Generator().manual_seed(kv_heads)).to(DEV)
    ref_toks, ref_logits = _greedy(PlainDecoder(model, 1, 40), prompt, 5)
    dec = GraphDecoder(model, 1, 40, use_graphs=DEV == "cuda", kernels=True)
    assert dec.kernel_step is not None
    dec.kernel_step.configs = _coarse(dec.kernel_step)
    toks, logits = _greedy(dec, prompt, 5)
    assert toks == ref_toks
    torch.testing.assert_close(torch.cat(logits), torch.cat(ref_logits), atol=1e-4, rtol=1e-4)
    _assert_unchanged(model, snap)


def _paged_kv(model, n_positions: int, block_size: int, seed: int) -> PagedKV:
    """A pool with more blocks than the sequence needs, handed out in shuffled order."""
    c = model.cfg
    need = -(-n_positions // block_size)
    pool = need + 3
    g = torch.Generator().manual_seed(seed)
    table = torch.randperm(pool, generator=g)[:need + 1].to(torch.int32)[None].to(DEV)  # one spare column
    new = lambda: torch.randn(pool, block_size, c.kv_heads, c.hd, generator=g).to(DEV)  # noqa: E731
    return PagedKV(k=[new() for _ in range(c.n_layers)], v=[new() for _ in range(c.n_layers)], block_table=table)


@pytest.mark.parametrize("arch", [
    dict(n_kv_heads=2),
    dict(n_kv_heads=1, sliding_window=3, attn_sinks=True, attn_softcap=3.0),  # Mistral / gpt-oss attention
])
def test_kernel_step_on_paged_cache_matches_the_full_forward(arch):
    """step(token, position) token by token = the model's logits at every position of one forward."""
    model = tiny_model("llama", n_heads=4, d_model=64, head_dim=16, **arch).to(DEV)
    if model.blocks[0].attn.sinks is not None:
        with torch.no_grad():
            for b in model.blocks:
                b.attn.sinks.normal_()
    snap = _snapshot(model)
    ids = torch.randint(0, 257, (1, 8), generator=torch.Generator().manual_seed(2)).to(DEV)
    with torch.no_grad():
        want = model(ids)[0]  # (T, V)
    step = KernelStep(model, _paged_kv(model, 8, 4, seed=3))
    step.configs = _coarse(step)
    got = [step.step(ids[0, t:t + 1], torch.tensor([t], device=DEV)).clone() for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(got), want, atol=1e-4, rtol=1e-4)
    _assert_unchanged(model, snap)
    # the kernels read the model's own weights: no stacked copy exists
    assert step.layers[0][1][0].data_ptr() == model.blocks[0].attn.wq.weight.data_ptr()
    assert step.layers[0][4][1].data_ptr() == model.blocks[0].mlp.up.weight.data_ptr()


def _coarse(step: KernelStep) -> KernelConfigs:
    """Few programs per kernel (the interpreter's time grows with them); two attention slices."""
    pick = {"gemv": (32, 256, 8), "add": (8, 1024, 8, 1), "qkv_rope": (8, 512, 4), "attend": (2, 16, 4)}
    configs = KernelConfigs()
    for key in step.keys():
        configs = configs.with_config(key, pick[key[0]])
    return configs


def test_unsupported_models_are_named_and_refused():
    gpt2 = tiny_model("gpt2")
    assert "RMSNorm" in unsupported(gpt2) or "positions" in unsupported(gpt2) or "biases" in unsupported(gpt2)
    assert unsupported(tiny_model("llama")) is None
    with pytest.raises(LmforgeError, match="kernel step cannot run"):
        GraphDecoder(gpt2, 1, 16, use_graphs=False, kernels=True)
    assert GraphDecoder(gpt2, 1, 16, use_graphs=False).kernel_step is None  # auto: general path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="tuning times CUDA graphs")
def test_tuning_saves_configs_and_keeps_the_logits(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(tmp_path))
    model = tiny_model("llama", n_heads=4, n_kv_heads=2, d_model=64, head_dim=16).cuda()
    ids = torch.randint(0, 257, (1, 9), generator=torch.Generator().manual_seed(5)).cuda()
    with torch.no_grad():
        want = model(ids)[0]
    step = KernelStep(model, _paged_kv(model, 9, 16, seed=4), autotune=True)
    step.tune(max_candidates=2)  # what capture() does on first use, with fewer candidates
    assert list(tmp_path.glob("*.json")) and KernelStep(model, step.kv).configs == step.configs  # loaded
    step.capture()
    got = [step.replay(ids[0, t:t + 1], torch.tensor([t], device="cuda")).clone() for t in range(9)]
    torch.testing.assert_close(torch.cat(got).float(), want.float(), atol=1e-3, rtol=1e-3)
