"""Fused linear + cross-entropy (lmforge/kernels/fused_ce.py) against F.cross_entropy(h @ W.T) / lm_loss:
loss, gradients of h and W, with ignored targets, z-loss and several chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmforge.kernels import fused_ce as kc

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not kc.available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def _run(fn, h, w, y):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss, ce = fn(h, w, y)
    loss.backward()
    return loss, ce, h.grad, w.grad


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("chunk", [None, 7])
def test_fused_ce_matches_cross_entropy(z_loss, chunk):
    N, d, V = 20, 16, 300
    h = torch.randn(2, N // 2, d, device=DEV)
    w = torch.randn(V, d, device=DEV) / d ** 0.5
    y = torch.randint(0, V, (2, N // 2), device=DEV)
    y[0, :3] = -100
    want = _run(lambda a, b, t: kc.linear_cross_entropy_ref(a, b, t, z_loss), h, w, y)
    got = _run(lambda a, b, t: kc.fused_linear_cross_entropy(a, b, t, z_loss, chunk_size=chunk), h, w, y)
    plain = F.cross_entropy((h @ w.T).flatten(0, 1), y.flatten())  # the independent definition of `ce`
    torch.testing.assert_close(got[1], plain, atol=1e-5, rtol=1e-5)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_fused_ce_all_targets_ignored_gives_zero_gradients(z_loss):
    """A batch with no counted target (all prompt, all padding): the loss is NaN (0 / 0) as F.cross_entropy's,
    and the gradients are zeros as F.cross_entropy's - not NaN, which would poison accumulated gradients."""
    h, w = torch.randn(6, 16, device=DEV), torch.randn(40, 16, device=DEV)
    y = torch.full((6,), -100, device=DEV)
    want = _run(lambda a, b, t: kc.linear_cross_entropy_ref(a, b, t, z_loss), h, w, y)
    got = _run(lambda a, b, t: kc.fused_linear_cross_entropy(a, b, t, z_loss, chunk_size=4), h, w, y)
    assert got[0].isnan() and want[0].isnan()
    for g, r in zip(got[2:], want[2:]):
        assert torch.equal(r, torch.zeros_like(r))
        torch.testing.assert_close(g, r, atol=0, rtol=0)


def test_fused_ce_computes_only_the_gradients_wanted():
    """Under no_grad (evaluation) only the logits' GEMM runs; with a frozen LM head (LoRA) no dW GEMM and no
    fp32 dW buffer: counted in matmul FLOPs (the CE kernel itself is not a matmul), with the same values."""
    from torch.utils.flop_counter import FlopCounterMode

    N, d, V = 12, 16, 50
    h, w = torch.randn(N, d, device=DEV), torch.randn(V, d, device=DEV)
    y = torch.randint(0, V, (N,), device=DEV)
    gemm = 2 * N * d * V
    want = _run(lambda a, b, t: kc.linear_cross_entropy_ref(a, b, t), h, w, y)
    for grad_h, grad_w, gemms in ((False, False, 1), (True, False, 2), (True, True, 3)):
        hh, ww = h.clone().requires_grad_(grad_h), w.clone().requires_grad_(grad_w)
        with FlopCounterMode(display=False) as count, torch.set_grad_enabled(grad_h or grad_w):
            loss, _ = kc.fused_linear_cross_entropy(hh, ww, y, chunk_size=5)
        assert count.get_total_flops() == gemms * gemm
        torch.testing.assert_close(loss, want[0], atol=1e-5, rtol=1e-5)
        if grad_h:
            loss.backward()
            torch.testing.assert_close(hh.grad, want[2], atol=1e-5, rtol=1e-5)
            assert ww.grad is None if not grad_w else torch.allclose(ww.grad, want[3], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # tensors that require grad, under no_grad: the logits' GEMM alone
        with FlopCounterMode(display=False) as count:
            kc.fused_linear_cross_entropy(h.requires_grad_(), w.requires_grad_(), y)
    assert count.get_total_flops() == gemm


def test_fused_lm_loss_matches_model_logits():
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.train.loss import lm_loss

    model = Transformer(ModelConfig(vocab_size=96, d_model=32, n_layers=1, n_heads=2, max_seq_len=16)).to(DEV)
    x = torch.randint(0, 96, (2, 8), device=DEV)
    y = torch.randint(0, 96, (2, 8), device=DEV)
    want = lm_loss(model(x), y, 1e-3)
    got = kc.fused_lm_loss(model, x, y, 1e-3, chunk_size=5)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5)
    # a LoRA adapter on the head: the fused path reads the bare weight, so it refuses instead of dropping B A
    from lmforge.adapt.lora import LoRAConfig, apply_lora
    from lmforge.errors import ConfigError

    apply_lora(model, LoRAConfig(r=2, alpha=4, targets=("lm_head",)))
    with pytest.raises(ConfigError, match="lm_head is a LoRALinear"):
        kc.fused_lm_loss(model, x, y)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_ce_bf16_autocast_gpu():
    N, d, V = 4096, 1024, 32768
    h = torch.randn(N, d, device="cuda")
    w = torch.randn(V, d, device="cuda") / d ** 0.5
    y = torch.randint(0, V, (N,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = _run(lambda a, b, t: kc.linear_cross_entropy_ref(a, b, t, 1e-4), h, w, y)
        got = _run(lambda a, b, t: kc.fused_linear_cross_entropy(a, b, t, 1e-4, chunk_size=1024), h, w, y)
    torch.testing.assert_close(got[0], want[0], atol=1e-3, rtol=1e-3)
    for g, r in zip(got[2:], want[2:]):
        torch.testing.assert_close(g, r, atol=2e-3 * r.abs().max().item(), rtol=2e-2)


def test_fused_ce_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"weight \(10, 5\)"):
        kc.fused_linear_cross_entropy(torch.randn(3, 4, device=DEV), torch.randn(10, 5, device=DEV),
                                      torch.zeros(3, dtype=torch.long, device=DEV))


def test_fused_objective_matches_lm_objective():
    """FusedLMObjective is LMObjective with the fused head: same loss, metrics and gradients (MoE aux included)."""
    import copy

    from lmforge.model.config import ModelConfig, MoEConfig
    from lmforge.model.transformer import Transformer
    from lmforge.train.loss import LMObjective

    cfg = ModelConfig(vocab_size=80, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, mlp="moe",
                      moe=MoEConfig(n_experts=4, top_k=2, d_expert=16, aux_loss=0.01))
    ref = Transformer(cfg).to(DEV)
    fused = copy.deepcopy(ref)
    batch = {"input_ids": torch.randint(0, 80, (2, 8), device=DEV), "targets": torch.randint(0, 80, (2, 8), device=DEV)}
    batch["targets"][0, :2] = -100
    pairs = ((LMObjective(1e-3), ref), (kc.FusedLMObjective(1e-3, chunk_size=6), fused))
    outs = [obj.loss(m, batch) for obj, m in pairs]
    for loss, _ in outs:
        loss.backward()
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)
    assert outs[1][1].keys() == outs[0][1].keys() >= {"loss", "aux_loss", "moe/load_max_over_mean"}
    for a, b in zip(ref.parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-4)
