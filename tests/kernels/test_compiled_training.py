"""The fused training kernels under torch.compile, as the Trainer runs them by default (it compiles the
objective's loss): Dynamo traces the Triton kernels' autograd Functions into the graph. Same loss and
gradients as the plain eager model, and no graph break but at the fused head's chunk loop, which is kept out
of the graph on purpose (kernels.fused_ce._eager_head)."""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.kernels.fused_ce import FusedLMObjective
from lmforge.kernels.training import apply_fused_kernels
from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.model.transformer import Transformer
from lmforge.train.loss import LMObjective

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("mlp", ["swiglu", "moe"])
def test_fused_kernels_compiled_match_plain_eager(mlp):
    moe = dict(mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, d_expert=256, aux_loss=0.01)) if mlp == "moe" else {}
    cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=2, n_heads=4, max_seq_len=128, **moe)
    torch.manual_seed(0)
    ref = Transformer(cfg).cuda()
    fused = copy.deepcopy(ref)
    assert apply_fused_kernels(fused)
    x = torch.randint(0, cfg.vocab_size, (4, 128), device="cuda")
    batch = dict(input_ids=x, targets=torch.roll(x, -1, 1))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(FusedLMObjective(1e-4).loss)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want, _ = LMObjective(1e-4).loss(ref, batch)
        got, metrics = compiled(fused, batch)
    want.backward()
    got.backward()
    assert abs(got.item() - want.item()) < 2e-2, (got.item(), want.item())
    errors = {name: ((q.grad - p.grad).norm() / p.grad.norm()).item()
              for (name, p), q in zip(ref.named_parameters(), fused.parameters())}
    print(f"largest relative gradient errors: {sorted(errors.items(), key=lambda kv: -kv[1])[:3]}")
    # bf16 autocast on both sides, different kernels. Measured on an H200 (2026-12-02): dense <= 0.0084;
    # MoE 0.02 for most parameters and 0.075 for the router (bf16 near-ties route some tokens differently)
    assert max(errors.values()) < (0.12 if mlp == "moe" else 0.03), errors
    breaks = torch._dynamo.utils.counters["graph_break"]
    # the only breaks are lmforge.utils.compiler_disable's (torch's lazy disable wrapper lives in torch/_compile.py)
    assert all("compiler.disable" in reason or "torch/_compile.py" in reason for reason in breaks), dict(breaks)
