"""MLA over quantized projections: absorbed decode reads wkv_b's matrix off any bias-free linear-like layer
(kept until its weights change) and equals the naive path; plain_linear refuses tensor-subclass weights, so the
paths that read .weight leave them alone. A stand-in quantized Linear (int8 codes and scales in buffers, no
.weight) and a stand-in packed weight (a tensor subclass refusing view/cat) keep these tests free of
quantization libraries."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lmforge.model.config import MLAConfig, ModelConfig
from lmforge.model.layers.fused import fused_copy, plain_linear
from lmforge.model.layers.mla import MLA, MLACache
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.byte import ByteTokenizer

from ..int8_linear import Int8Linear

CFG = ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, attention="mla",
                  rope_layout="interleaved", n_kv_heads=None, init_std=0.1,
                  mla=MLAConfig(kv_lora_rank=12, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6))


def _swap(model: nn.Module, make) -> nn.Module:
    for name, m in list(model.named_modules()):
        if type(m) in (nn.Linear, Int8Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, make(m))
    return model


def quantized_pair(seed: int = 0) -> tuple[Transformer, Transformer]:
    """(every projection but the head as Int8Linear, the same function with plain nn.Linear)."""
    torch.manual_seed(seed)
    q = _swap(Transformer(CFG).eval(), Int8Linear)

    def plain(m: Int8Linear) -> nn.Linear:
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(m.dequantized())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        return lin
    return q, _swap(copy.deepcopy(q), plain)


def count_naive(monkeypatch) -> dict[str, int]:
    calls = {"naive": 0}
    naive = MLA.naive

    def counted(self, *a, **k):
        calls["naive"] += 1
        return naive(self, *a, **k)
    monkeypatch.setattr(MLA, "naive", counted)
    return calls


def cached_decode(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of a prefill of `prompt` tokens, then one token at a time through MLACache."""
    cache = MLACache.for_model(model, ids.shape[0], ids.shape[1])
    out = [model(ids[:, :prompt], cache=cache)]
    out += [model(ids[:, t:t + 1], cache=cache) for t in range(prompt, ids.shape[1])]
    return torch.cat(out, 1)


def test_absorb_query_and_expand_latent_with_quantized_wkv_a_and_wkv_b():
    """The paged varlen path (the CUDA-graph prefill) calls these directly: no .weight on wkv_a or wkv_b."""
    q, ref = quantized_pair()
    a, b = q.blocks[0].attn, ref.blocks[0].attn
    q_nope, lat = torch.randn(5, a.H, a.d_nope), torch.randn(5, a.H, a.r)
    torch.testing.assert_close(a.absorb_query(q_nope), b.absorb_query(q_nope), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.expand_latent(lat), b.expand_latent(lat), rtol=1e-5, atol=1e-6)


def test_quantized_wkv_b_decodes_absorbed_equal_to_the_naive_path(monkeypatch):
    q, _ = quantized_pair()
    ids = torch.randint(0, 260, (2, 10))
    calls = count_naive(monkeypatch)
    with torch.no_grad():
        want = q(ids)  # no cache: the naive path, which calls wkv_b
        calls["naive"] = 0
        got = cached_decode(q, ids, 4)
    assert calls["naive"] == CFG.n_layers  # the prefill alone; the 6 decode steps are absorbed
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_matrix_is_read_once_per_weight_version():
    """Decode steps reuse wkv_b's matrix; an in-place change of its codes or scales (an optimizer step,
    load_state_dict, Engine.update_weights) is seen at the next step."""
    q, _ = quantized_pair()
    wkv_b, calls = q.blocks[0].attn.wkv_b, []
    wkv_b.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    ids = torch.randint(0, 260, (1, 9))
    with torch.no_grad():
        cached_decode(q, ids, 3)
        assert len(calls) == 1 + 1  # the prefill's naive call, one read for the 6 decode steps
        wkv_b.scales.mul_(1.5)
        calls.clear()
        got = cached_decode(q, ids, 3)
        assert len(calls) == 1 + 1
        want = q(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lora_over_quantized_wkv_a_and_wkv_b_decodes_absorbed_and_follows_adapters_disabled(monkeypatch):
    """QLoRA: the matrix read off LoRA over a quantized base includes B A; switching the adapters off (a flag,
    no tensor changes) is seen by the kept matrix."""
    from lmforge.adapt.lora import LoRAConfig, adapters_disabled, apply_lora

    q, _ = quantized_pair()
    apply_lora(q, LoRAConfig(r=2, alpha=4, targets=("wkv_a", "wkv_b")))
    with torch.no_grad():
        for name, p in q.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    ids = torch.randint(0, 260, (2, 8))
    calls = count_naive(monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(cached_decode(q, ids, 3), q(ids), rtol=1e-5, atol=1e-5)
        with adapters_disabled(q):
            torch.testing.assert_close(cached_decode(q, ids, 3), q(ids), rtol=1e-5, atol=1e-5)
    assert calls["naive"] == 4 * CFG.n_layers  # full forwards and prefills only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_greedy_decode_of_a_quantized_mla_model_equals_the_plain_model(dtype, monkeypatch):
    """The same tokens as the dequantized model (in bf16 too, where naive and absorbed round differently)."""
    from lmforge.infer.llm import LLM
    from lmforge.infer.sampling import SamplingParams

    q, ref = (m.to(dtype) for m in quantized_pair())
    prompts, params = [[1, 2, 3, 4, 5, 6], [9, 8, 7]], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    calls = count_naive(monkeypatch)
    got = [o.token_ids for o in LLM(q, ByteTokenizer()).generate(prompts, params)]
    assert calls["naive"] == len(prompts) * CFG.n_layers  # the prefills; every decode step absorbed
    want = [o.token_ids for o in LLM(ref, ByteTokenizer()).generate(prompts, params)]
    assert got == want


def test_engine_update_weights_reaches_the_kept_matrix():
    from lmforge.infer.llm import LLM
    from lmforge.infer.sampling import SamplingParams

    q, ref = quantized_pair()
    llm, prompt = LLM(q, ByteTokenizer()), [[1, 2, 3, 4, 5, 6]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    llm.generate(prompt, params)
    with torch.no_grad():
        for block, other in zip(q.blocks, ref.blocks):
            block.attn.wkv_b.qweight.neg_()
            other.attn.wkv_b.weight.neg_()
    llm.engine.update_weights()
    want = LLM(ref, ByteTokenizer()).generate(prompt, params)
    assert [o.token_ids for o in llm.generate(prompt, params)] == [o.token_ids for o in want]


class PackedWeight(torch.Tensor):
    """A stand-in for a quantized tensor subclass (torchao's): computes through F.linear, refuses to be
    reshaped or stacked as a plain matrix."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("view", "reshape", "cat", "split", "chunk"):
            raise NotImplementedError(f"{func.__name__} of a packed weight")
        if getattr(func, "__name__", "") in ("detach", "requires_grad_"):  # stays packed (nn.Parameter needs it)
            return super().__torch_function__(func, types, args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():  # results of computing with it are plain tensors
            return func(*args, **(kwargs or {}))


def _pack(lin: nn.Linear) -> nn.Linear:
    lin.weight = nn.Parameter(lin.weight.detach().as_subclass(PackedWeight), requires_grad=False)
    return lin


def test_plain_linear_refuses_tensor_subclass_and_integer_weights():
    lin = nn.Linear(4, 3)
    assert plain_linear(lin)
    assert not plain_linear(_pack(nn.Linear(4, 3)))
    codes = nn.Linear(4, 3, bias=False)
    codes.weight = nn.Parameter(torch.zeros(3, 4, dtype=torch.int8), requires_grad=False)
    assert not plain_linear(codes)


def test_mla_decode_with_a_packed_wkv_b_weight():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    ids = torch.randint(0, 260, (2, 8))
    with torch.no_grad():
        want = model(ids)
        for b in model.blocks:
            _pack(b.attn.wkv_b)
        torch.testing.assert_close(cached_decode(model, ids, 3), want, rtol=1e-5, atol=1e-5)


def test_fused_copy_leaves_packed_projections_unfused():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32)
    model = Transformer(cfg).eval()
    _pack(model.blocks[0].attn.wq)
    ids = torch.randint(0, 64, (1, 7))
    fused = fused_copy(model)
    assert fused.blocks[0].attn.wqkv is None and fused.blocks[1].attn.wqkv is not None
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), model(ids), rtol=1e-5, atol=1e-5)
