"""linear_groups / tied_weights: for every architecture family, folding a per-channel scale into each group
reported foldable leaves the model's outputs unchanged, folding one reported not foldable changes them (tied
head, post-norm residual), and the groups cover every linear weight once."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from lmforge.errors import LmforgeError
from lmforge.model.config import MLAConfig, ModelConfig, MoEConfig, MTPConfig
from lmforge.model.structure import _fold, fold_scale, group_weight, linear_groups, tied_weights
from lmforge.model.transformer import Transformer

_MLA = dict(attention="mla", rope_layout="interleaved",
            mla=MLAConfig(kv_lora_rank=12, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8))
_MOE = dict(mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, d_expert=24, n_shared=1, capacity_factor=0.0))
FAMILIES = {
    "llama": dict(n_kv_heads=2),
    "llama-fused": dict(n_kv_heads=2, fused_proj=True),
    "gpt2-tied": dict(pos_emb="learned", norm="layernorm", activation="gelu_tanh", bias=True, tie_embeddings=True),
    "post-norm": dict(norm_position="post", norm="layernorm", bias=True),
    "sandwich-tied": dict(norm_position="sandwich", activation="geglu_tanh", tie_embeddings=True, embed_scale=4.0),
    # Gemma's (1 + w) gains (norm_offset): a fold divides the gain, not w
    "gemma-offset": dict(norm_position="sandwich", activation="geglu_tanh", embed_scale=4.0, norm_offset=1.0),
    "parallel": dict(block="parallel", norm="layernorm", activation="gelu"),
    "moe-shared": dict(**_MOE),
    # Qwen2-MoE: the shared expert's sigmoid gate reads norm2's output as well
    "moe-gated-shared": dict(mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, d_expert=24, n_shared=2, shared_gate=True,
                                                      capacity_factor=0.0)),
    "moe-noisy-dense-first": dict(mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, d_expert=24, noisy=True,
                                                           dense_layers=1, capacity_factor=0.0)),
    "mla": dict(**_MLA),
    "mla-no-q-lora": dict(**{**_MLA, "mla": dataclasses.replace(_MLA["mla"], q_lora_rank=0)}),
    "deepseek-mtp": dict(**_MLA, **_MOE, mtp=MTPConfig(depth=1)),
    "mtp-parallel-post": dict(norm_position="post", mtp=MTPConfig(depth=2, kind="parallel")),
    "no-final-norm": dict(final_norm=False),
}


def tiny(family: str) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, init_std=0.1),
                         **FAMILIES[family]})
    model = Transformer(cfg).double().eval()
    with torch.no_grad():  # norms away from ones and zeros, so a fold that misses one shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def outputs(model: Transformer, ids: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        if model.mtp is not None:
            main, heads = model.forward_mtp(ids)
            return [main, *heads]
        return [model(ids)]


def scale_for(model: Transformer, group) -> torch.Tensor:
    """A random positive scale the group can take: under GQA (group.repeat), one per KV group."""
    lo, hi = group.columns or (0, group_weight(model, group.linears[0]).shape[-1])
    r, d = group.repeat or (1, hi - lo)
    s = torch.rand((hi - lo) // r, dtype=torch.float64) + 0.5
    return s.view(-1, 1, d).expand(-1, r, d).flatten()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_folding_a_scale_into_each_foldable_group_keeps_the_outputs(family):
    model = tiny(family)
    ids = torch.randint(0, 64, (2, 9))
    want = outputs(model, ids)
    groups = linear_groups(model)
    assert any(g.foldable for g in groups)
    for g in groups:
        if g.foldable:
            fold_scale(model, g, scale_for(model, g))
            # fp32 tolerance: the norms compute in fp32 whatever the model's dtype
            torch.testing.assert_close(outputs(model, ids), want, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{family} {g}: {m}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_group_reported_not_foldable_is_refused_and_would_change_the_outputs(family):
    model = tiny(family)
    ids = torch.randint(0, 64, (2, 9))
    want = outputs(model, ids)
    for g in (g for g in linear_groups(model) if g.norms and not g.foldable):
        with pytest.raises(LmforgeError, match="cannot fold"):
            fold_scale(model, g, scale_for(model, g))
        folded = tiny(family)
        _fold(folded, g, scale_for(folded, g))
        assert not all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(outputs(folded, ids), want)), g


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_groups_cover_every_linear_weight_once(family):
    model = tiny(family)
    want = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    want |= {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in ("w_gate", "w_up", "w_down")}
    seen = [(n, g.columns) for g in linear_groups(model) for n in g.linears]
    assert len(seen) == len(set(seen))
    assert {n for n, _ in seen} == want


def test_tied_head_and_embedding():
    model = tiny("gpt2-tied")
    assert tied_weights(model) == [("tok_emb.weight", "lm_head.weight")]
    assert tied_weights(tiny("llama")) == []
    head = linear_groups(model)[-1]
    assert head.norms == ("final_norm",) and head.linears == ("lm_head",) and "tied" in head.notes
    assert not head.foldable


def test_what_the_groups_say_for_parallel_post_norm_moe_and_mtp():
    groups = {g.linears: g for g in linear_groups(tiny("parallel"))}
    par = groups[("blocks.0.attn.wq", "blocks.0.attn.wk", "blocks.0.attn.wv", "blocks.0.mlp.up")]
    assert par.norms == ("blocks.0.norm1",) and "parallel" in par.notes
    post = {g.linears: g for g in linear_groups(tiny("post-norm"))}
    assert post[("blocks.0.attn.wq", "blocks.0.attn.wk", "blocks.0.attn.wv")].norms == ()  # reads the embeddings
    assert post[("blocks.1.attn.wq", "blocks.1.attn.wk", "blocks.1.attn.wv")].norms == ("blocks.0.norm2",)
    moe = next(g for g in linear_groups(tiny("moe-shared")) if "router" in g.notes)
    assert moe.linears[0] == "blocks.0.mlp.router" and "blocks.0.mlp.shared.up" in moe.linears
    head = linear_groups(tiny("deepseek-mtp"))[-1]
    assert head.norms == ("final_norm", "mtp.norms.0") and head.foldable


def test_fold_scale_refuses_a_quantized_weight():
    model = tiny("llama")
    group = linear_groups(model)[0]
    lin = model.blocks[0].attn.wq
    lin.weight = nn.Parameter(lin.weight.detach().to(torch.int8), requires_grad=False)
    with pytest.raises(LmforgeError, match="before quantizing"):
        fold_scale(model, group, scale_for(model, group))


def test_a_fold_keeps_an_offset_norms_bf16_gains_precise():
    """(offset + w) / s - offset is taken in fp32: in bf16, 1 + w rounds w to the gain's coarse steps near 1, which
    the offset form exists to avoid (a fold by s = 1 changed 63 of 64 weights, median 16%)."""
    model = tiny("gemma-offset").to(torch.bfloat16)
    group = next(g for g in linear_groups(model) if g.foldable and g.norms)
    norm = model.get_submodule(group.norms[0])
    with torch.no_grad():
        norm.weight.copy_(torch.randn_like(norm.weight) * 1e-2)  # w near 0: gains near 1
    before = norm.weight.detach().clone()
    width = group_weight(model, group.linears[0]).shape[-1] if group.columns is None else \
        group.columns[1] - group.columns[0]
    fold_scale(model, group, torch.ones(width, dtype=torch.float64))
    assert torch.equal(norm.weight, before)
