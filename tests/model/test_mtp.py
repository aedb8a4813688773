"""Multi-token prediction: DeepSeek-V3 sequential modules follow eq. 21-25; parallel heads; the MTP loss
reaches aux_loss() in training; the main logits are unaffected."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lmforge.model.config import ModelConfig, MTPConfig
from lmforge.model.transformer import Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, mtp=MTPConfig(depth=2, loss_weight=0.5))


def test_sequential_mtp_follows_deepseek_v3_equations():
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        main, extra = model.forward_mtp(ids)
        torch.testing.assert_close(main, model(ids))
        assert [e.shape for e in extra] == [(2, 8, 64), (2, 7, 64)]
        h, rope = model.hidden(ids)
        prev = h
        for k, mod in enumerate(model.mtp.modules_, start=1):
            T = 9 - k
            x = mod.proj(torch.cat((mod.h_norm(prev[:, :T]), mod.e_norm(model.tok_emb(ids[:, k:]))), -1))
            prev = mod.block(x, (rope[0][:, :T], rope[1][:, :T]), "causal")
            torch.testing.assert_close(extra[k - 1], model.lm_head(model.mtp.norms[k - 1](prev)))


def test_mtp_loss_in_training_forward():
    torch.manual_seed(0)
    model = Transformer(CFG).train()
    ids = torch.randint(0, 64, (2, 9))
    model(ids)
    with torch.no_grad():
        _, extra = model.forward_mtp(ids)
    want = sum(F.cross_entropy(e[:, : 9 - k - 1].reshape(-1, 64), ids[:, k + 1:].reshape(-1))
               for k, e in enumerate(extra, start=1)) / 2 * 0.5
    loss = model.aux_loss()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert model.mtp.modules_[1].proj.weight.grad.abs().sum() > 0
    model.eval()
    model(ids)
    assert model.aux_loss() is None


def test_parallel_heads():
    model = Transformer(dataclasses.replace(CFG, mtp=MTPConfig(kind="parallel", depth=3))).eval()
    ids = torch.randint(0, 64, (1, 6))
    main, extra = model.forward_mtp(ids)
    assert len(extra) == 3 and all(e.shape == main.shape for e in extra)
    assert model.flops_per_token(6, training=True) > 3 * Transformer(dataclasses.replace(CFG, mtp=None)).flops_per_token(6, training=False)
    with pytest.raises(Exception, match="model.mtp"):
        Transformer(dataclasses.replace(CFG, mtp=None)).forward_mtp(ids)


def test_deepseek_v3_mtp_layers_round_trip_through_hf_format(tmp_path):
    from lmforge.model.config import MLAConfig, MoEConfig

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, attention="mla",
                      rope_layout="interleaved", mla=MLAConfig(kv_lora_rank=16, q_lora_rank=8, qk_nope_head_dim=8,
                                                               qk_rope_head_dim=4, v_head_dim=8, norm_eps=1e-6),
                      mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, d_expert=16, score="sigmoid", n_shared=1,
                                               dense_layers=1), mtp=MTPConfig(depth=1))
    model = Transformer(cfg).eval()
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.2.eh_proj.weight" in f.keys() and "model.layers.2.mlp.gate.weight" in f.keys()
    back = Transformer.from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        (m1, e1), (m2, e2) = model.forward_mtp(ids), back.forward_mtp(ids)
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(e1[0], e2[0])
