"""Offset-parametrised RMSNorm gains (ModelConfig.norm_offset): Gemma's (1 + w) norms store w and add the 1 in
fp32, as transformers does. Stored as the sum 1 + w, a bf16 gain kept only bf16's step at 1 (2^-7) of w: bf16
Gemma logits strayed further from the fp32 ones than transformers' bf16 logits do (found 2026-12-06)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from lmforge.kernels import rmsnorm as kr
from lmforge.model.config import ModelConfig
from lmforge.model.layers.norm import RMSNorm
from lmforge.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
GEMMAS = {"gemma": ("GemmaConfig", "GemmaForCausalLM", COMMON),
          "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(COMMON, sliding_window=8))}


def _gemma_dir(name: str, path):
    """A tiny fp32 Gemma whose norm weights w ~ N(0, 1) (real Gemmas' gains lie far from 1), saved to path."""
    cfg_cls, model_cls, kw = GEMMAS[name]
    cfg = getattr(transformers, cfg_cls)(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():
        for n, t in hf.state_dict().items():
            if "norm" in n:
                t.copy_(torch.randn_like(t))
    hf.save_pretrained(path)
    return hf, getattr(transformers, model_cls)


@pytest.mark.parametrize("name", sorted(GEMMAS))
def test_bf16_gemma_is_as_close_to_fp32_as_transformers_bf16(name, tmp_path):
    hf, cls = _gemma_dir(name, tmp_path / "hf")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        theirs = cls.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16, attn_implementation="eager")(ids).logits
        ours_model = Transformer.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
        ours = ours_model(ids)
    err = lambda x: ((x.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert ours_model.cfg.norm_offset == 1.0
    assert err(ours) <= err(theirs)  # before: 11% (Gemma) and 14% (Gemma 2) further off than transformers' bf16
    # the stored w is the checkpoint's, rounded to bf16 once (not 1 + w rounded, minus 1), and export gives it back
    want = {n: t.to(torch.bfloat16) for n, t in hf.state_dict().items() if "norm" in n}
    assert torch.equal(ours_model.blocks[0].norm1.weight, want["model.layers.0.input_layernorm.weight"])
    ours_model.save_pretrained(tmp_path / "lm")
    back = load_file(tmp_path / "lm" / "model.safetensors")
    for n, t in want.items():
        assert torch.equal(back[n], t), n


def test_an_lmforge_gemma_checkpoint_without_norm_offset_still_exports_gemmas_w(tmp_path):
    """Checkpoints written before norm_offset hold the whole gain 1 + w at offset 0: the export still subtracts 1."""
    hf, cls = _gemma_dir("gemma2", tmp_path / "hf")
    new = Transformer.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    old = Transformer(dataclasses.replace(new.cfg, norm_offset=0.0))
    state = {k: v + 1 if "norm" in k else v for k, v in new.state_dict().items()}  # the gains 1 + w
    old.load_state_dict(state)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(old(ids), new(ids), atol=1e-5, rtol=1e-5)
    old.save_pretrained(tmp_path / "lm")
    back = cls.from_pretrained(tmp_path / "lm", attn_implementation="eager").float().eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_offset_norms_initialise_to_a_gain_of_one():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, norm_offset=1.0, qk_norm=True)
    model = Transformer(cfg)
    assert torch.equal(model.blocks[1].norm2.weight, torch.zeros(32))
    assert torch.equal(model.final_norm.gain(), torch.ones(32))
    assert torch.equal(model.blocks[0].attn.q_norm.weight, torch.ones(8))  # QK-norms keep plain gains
    with pytest.raises(Exception, match="norm_offset"):
        ModelConfig(norm="layernorm", norm_offset=1.0)


@pytest.mark.skipif(not kr.available("cpu"), reason="needs triton's CPU interpreter (TRITON_INTERPRET=1)")
def test_fused_rmsnorm_applies_the_offset():
    """FusedRMSNorm (lmforge.kernels.apply_fused_kernels) hands the kernels offset + w: values and w's gradient
    match the plain layer's."""
    ref = RMSNorm(48, eps=1e-6, offset=1.0)
    with torch.no_grad():
        ref.weight.normal_(0, 0.5)
    fused = kr.FusedRMSNorm(48, eps=1e-6, offset=1.0)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 48).to(torch.bfloat16)
    dy = torch.randn(3, 7, 48).to(torch.bfloat16)
    outs = []
    for m in (ref, fused):
        y = m(x)
        y.float().backward(dy.float())
        outs.append((y, m.weight.grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-3, rtol=1e-3)
