"""MaxLogitRecorder (per-head max attention logits, for MuonClip) against the logits the model's own
math attention passes to its softmax, and QK-clip wired through it caps the next forward's logits at tau."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.optim.muon import Muon
from lmforge.parallel.qk_logits import MaxLogitRecorder


class SoftmaxInputs(TorchFunctionMode):
    """Records the (B, H, T, S) tensors math attention hands to torch.softmax: the masked logits."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.softmax and args[0].dim() == 4:
            self.seen.append(args[0].detach().amax(dim=(0, 2, 3)))
        return func(*args, **kwargs)


@pytest.mark.parametrize("extra", [dict(), dict(n_kv_heads=2, sliding_window=4, layer_types=("sliding", "full")),
                                   dict(qk_norm=True, rope_layout="interleaved")])
def test_recorded_max_equals_the_softmax_inputs(extra):
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, attn_impl="math", **extra)
    torch.manual_seed(0)
    model = Transformer(cfg)
    rec = MaxLogitRecorder(model)
    ids = torch.randint(0, 64, (2, 12))
    with SoftmaxInputs() as mode:
        model(ids)
    got = [m for _, _, m, _ in rec.layers()]
    assert len(got) == len(mode.seen) == 2
    for a, b in zip(got, mode.seen):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_qk_clip_caps_the_next_forward_at_tau():
    """One layer, so the clipped layer sees the same input again: heads above tau land exactly on it."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, max_seq_len=16, attn_impl="math")
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for b in model.blocks:
            b.attn.wq.weight.mul_(20)  # make the logits large
    rec = MaxLogitRecorder(model)
    ids = torch.randint(0, 64, (2, 12))
    model(ids)
    before = torch.stack([m for _, _, m, _ in rec.layers()])
    tau = float(before.median())
    opt = Muon(model.parameters(), qk_clip_tau=tau)
    opt.clip_qk_(rec.layers())
    rec.reset()
    model(ids)
    after = torch.stack([m for _, _, m, _ in rec.layers()])
    torch.testing.assert_close(after, before.clamp(max=tau), rtol=1e-4, atol=1e-4)


def test_max_logits_all_reduced_over_fsdp2_ranks_and_clip_on_shards():
    """2 ranks, each half the batch: the all-reduced max equals one process's on the whole batch, and
    QK-clip applied to the FSDP2-sharded W_q, W_k equals the clip of the whole matrices."""
    from lmforge.optim.qk_clip import qk_clip_
    from lmforge.parallel.launch import run_local
    from tests.parallel import workers as w

    got = run_local(w.qk_clip_suite, 2, timeout=120, start_method="fork")[0]
    m = w.model()
    rec = MaxLogitRecorder(m)
    with torch.no_grad():
        m(w.batches()[0][0])
        want = [mx.clone() for _, _, mx, _ in rec.layers()]
        for wq, wk, mx, hd in rec.layers():
            assert bool((mx > w.TAU).any()) and bool((mx < w.TAU).any())
            qk_clip_(wq, wk, mx, w.TAU, hd)
    for a, b in zip(got["max"], want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name, p in m.named_parameters():
        torch.testing.assert_close(got["params"][name], p.detach(), rtol=1e-5, atol=1e-6)
