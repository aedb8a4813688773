"""Fused q/k/v and gate/up projections (lmforge.model.layers.fused): the same function, the same
initial weights and the same checkpoint names as the unfused model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model.config import PRESETS, ModelConfig, MoEConfig, MTPConfig
from lmforge.model.transformer import Transformer
from lmforge.model.upcycle import upcycle
from lmforge.checkpoint import _state_for_save, load_weights

CONFIGS = {
    "llama_gqa_swiglu": dict(PRESETS["llama-tiny"].__dict__, vocab_size=97, d_model=64, n_heads=4, n_kv_heads=2),
    "gpt2_bias_gelu": dict(PRESETS["gpt2-small"].__dict__, vocab_size=97, d_model=48, n_layers=2, n_heads=4),
    "qwen2_qkv_bias_mqa": dict(PRESETS["llama-tiny"].__dict__, vocab_size=97, d_model=64, n_heads=4, n_kv_heads=1,
                               qkv_bias=True, qk_norm=True),
}


def _pair(name: str) -> tuple[Transformer, Transformer]:
    kw = CONFIGS[name]
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(**kw))
    torch.manual_seed(0)
    fused = Transformer(ModelConfig(**dict(kw, fused_proj=True)))
    with torch.no_grad():  # non-zero biases, so a mis-stacked bias would show
        for t in plain.state_dict().values():
            t.add_(torch.randn_like(t) * 0.05)
    fused.load_state_dict(plain.state_dict())
    return plain.eval(), fused.eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_model_computes_the_same_logits(name):
    plain, fused = _pair(name)
    assert fused.blocks[0].attn.wqkv is not None and fused.blocks[0].attn.wq is None
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), plain(ids), atol=1e-5, rtol=1e-5)
    assert fused.num_params() == plain.num_params()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_state_dict_keeps_the_unfused_names(name):
    plain, fused = _pair(name)
    a, b = plain.state_dict(), fused.state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    back = Transformer(plain.cfg)
    back.load_state_dict(b)  # a fused model's state_dict loads into an unfused model, strict
    for k, t in back.state_dict().items():
        assert torch.equal(t, a[k])


def test_fused_config_starts_from_the_same_weights_and_trains_the_same():
    kw = CONFIGS["llama_gqa_swiglu"]
    torch.manual_seed(3)
    plain = Transformer(ModelConfig(**kw))
    torch.manual_seed(3)
    fused = Transformer(ModelConfig(**dict(kw, fused_proj=True)))
    for k, t in plain.state_dict().items():
        assert torch.equal(t, fused.state_dict()[k]), k
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(2))
    losses = []
    for m in (plain, fused):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-4


def test_fused_checkpoint_round_trip(tmp_path):
    from safetensors.torch import save_file

    plain, fused = _pair("gpt2_bias_gelu")
    (tmp_path / "ck").mkdir()
    save_file(_state_for_save(fused), str(tmp_path / "ck" / "model.safetensors"))  # split parts share no memory
    other = Transformer(dataclasses.replace(fused.cfg))
    load_weights(other, tmp_path / "ck")
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(ids), plain(ids), atol=1e-5, rtol=1e-5)


def test_upcycling_a_fused_model_is_refused():
    dense = Transformer(ModelConfig(**dict(CONFIGS["llama_gqa_swiglu"], fused_proj=True)))
    with pytest.raises(ConfigError, match="fused_proj=false"):
        upcycle(dense, MoEConfig(n_experts=4, top_k=2))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_copy_leaves_the_model_alone(name):
    """Inference fuses a copy: same logits; the model keeps its Parameter objects, values, state_dict
    keys and unfused modules; the copy shares every weight it did not stack."""
    from lmforge.model.layers.fused import fused_copy

    plain, _ = _pair(name)
    params = {n: (p, p.detach().clone()) for n, p in plain.named_parameters()}
    keys = list(plain.state_dict())
    copy = fused_copy(plain)
    assert copy.blocks[0].attn.wqkv is not None and plain.blocks[0].attn.wqkv is None
    assert plain.blocks[0].attn.wq is not None
    now = dict(plain.named_parameters())
    assert set(now) == set(params) and list(plain.state_dict()) == keys
    for n, (p, value) in params.items():
        assert now[n] is p and torch.equal(p.detach(), value), n
    assert copy.tok_emb.weight is plain.tok_emb.weight and copy.blocks[0].attn.wo.weight is plain.blocks[0].attn.wo.weight
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(copy(ids), plain(ids), atol=1e-5, rtol=1e-5)
    assert set(copy.state_dict()) == set(keys)  # the copy still saves under the unfused names


def test_copies_of_a_model_that_just_trained_share_its_tensors():
    """A forward with grad leaves non-leaf tensors on modules (MoE's aux loss, MTP's loss), which deepcopy
    refuses: the inference copies (fused_copy, the engine's kernel view) share them instead, and still
    leave the model's classes alone."""
    from lmforge.kernels.decode import available
    from lmforge.kernels.training import kernel_view
    from lmforge.model.layers.fused import fused_copy

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**dict(CONFIGS["llama_gqa_swiglu"], mtp=MTPConfig(depth=1),
                                           moe=MoEConfig(n_experts=4, top_k=2, d_expert=32))))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    model(ids).sum().backward()
    assert model.aux_loss().grad_fn is not None  # non-leaf tensors held by modules
    classes = [type(m) for m in model.modules()]
    copies = [fused_copy(model)] + ([kernel_view(model)] if available("cpu") else [])
    model.eval()
    with torch.no_grad():
        want = model(ids)
        for c in copies:
            torch.testing.assert_close(c.eval()(ids), want, atol=1e-4, rtol=1e-4)
    assert [type(m) for m in model.modules()] == classes
