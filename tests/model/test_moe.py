"""Mixture of experts: grouped dispatch == per-expert loop; routing equals a dense all-experts reference;
capacity dropping; balancing losses vs their formulas; aux-loss-free bias; upcycling; model hooks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.model.layers.moe import MoE, load_uncounted, update_expert_biases
from lmforge.model.transformer import Transformer
from lmforge.model.upcycle import upcycle

BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, mlp="moe")


def _moe(activation="swiglu", **kw) -> MoE:
    torch.manual_seed(0)
    cfg = dataclasses.replace(BASE, activation=activation,
                              moe=MoEConfig(**{"n_experts": 4, "top_k": 2, "d_expert": 16, **kw}))
    m = MoE(cfg, 0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _dense_reference(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by a dense (N, E) gate that is zero off the top-k."""
    flat = x.reshape(-1, x.shape[-1])
    scores = m.router(flat).float()
    scores = scores.softmax(-1) if m.m.score == "softmax" else scores.sigmoid()
    top = scores.topk(m.k, -1)
    w = top.values / top.values.sum(-1, keepdim=True) if m.m.norm_topk else top.values
    gate = torch.zeros_like(scores).scatter(1, top.indices, w * m.m.routed_scale)
    outs = torch.stack([m.experts.expert(flat, e) for e in range(m.E)], 1)  # (N, E, d)
    y = (gate[..., None] * outs).sum(1)
    if m.shared is not None:
        y = y + m.shared(flat)
    return y.view_as(x)


@pytest.mark.parametrize("kw", [dict(), dict(score="sigmoid", routed_scale=2.5, n_shared=1),
                                dict(norm_topk=False, expert_bias=True, router_bias=True)])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "swiglu_oss"])
def test_routing_matches_dense_reference_and_dispatches_agree(kw, activation):
    m = _moe(activation, **kw)
    x = torch.randn(3, 7, 32, requires_grad=True)
    want = _dense_reference(m, x)
    m.dispatch = "grouped"
    got = m(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    g_grouped = [x.grad.clone()] + [p.grad.clone() for p in m.parameters()]
    x.grad = None
    m.zero_grad()
    m.dispatch = "loop"
    loop = m(x)
    torch.testing.assert_close(loop, got, rtol=1e-5, atol=1e-5)
    loop.square().sum().backward()
    for a, b in zip(g_grouped, [x.grad] + [p.grad for p in m.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
@pytest.mark.parametrize("counts", [[3, 0, 7], [0, 0, 10], [4, 4, 2]])
def test_grouped_mm_torch_matches_per_expert_matmuls(counts):
    """torch._grouped_mm (offsets from the counts, on the device) against one matmul per expert: outputs
    and the gradients of its backward's grouped matmuls (dX, and dW over the same offsets)."""
    from lmforge.model.layers.moe import grouped_mm_loop, grouped_mm_torch

    x, w, counts = torch.randn(10, 8), torch.randn(3, 16, 8), torch.tensor(counts)
    dy = torch.randn(10, 16)
    want = torch.cat([x[a:b] @ w[e].T for e, (a, b) in enumerate(zip([0, *counts.cumsum(0)], counts.cumsum(0)))])
    res = []
    for fn in (grouped_mm_loop, grouped_mm_torch):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi, counts)
        y.backward(dy)
        res.append((y, xi.grad, wi.grad))
    torch.testing.assert_close(res[0][0], want)
    for got, ref in zip(res[1], res[0]):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gemm", ["torch", "loop"])
@pytest.mark.parametrize("tokens", [9, 40])  # 36 rows: gate and up one grouped matmul each; 160: stacked
@pytest.mark.parametrize("activation,kw", [("swiglu", dict(expert_bias=True, n_shared=1)),
                                           ("gelu", dict(expert_bias=True)), ("swiglu_oss", dict(norm_topk=False)),
                                           ("swiglu", dict(capacity_factor=0.6))])
def test_grouped_gemms_match_loop_dispatch(gemm, activation, kw, tokens):
    """The sorted dispatch on each grouped matmul (model.moe.gemm) = the per-expert loop: outputs, input and
    every parameter's gradient (router included, through the combine's weights); with fewer routed rows
    than the weights hold (E x d = 128) gate and up run separately, with more over their stacked copy."""
    if gemm == "torch" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    m = _moe(activation, **kw)
    x = torch.randn(2, tokens, 32)
    res = []
    for dispatch in ("loop", "grouped"):
        m.dispatch, m.gemm = dispatch, gemm
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.sin().sum().backward()
        res.append([y, xi.grad] + [p.grad.clone() for p in m.parameters()])
    names = ["y", "x"] + [n for n, _ in m.named_parameters()]
    for name, got, want in zip(names, res[1], res[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda s: f"{name}: {s}")


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_grouped_dispatch_under_bf16_autocast():
    """Under autocast the rows are gathered and multiplied in bf16 (weights cast once, stacked), the output
    returns in the residual's dtype and the gradients in the parameters' fp32: close to the loop's."""
    m = _moe("swiglu")
    x = torch.randn(2, 16, 32)
    res = []
    for dispatch in ("loop", "grouped"):
        m.dispatch = dispatch
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        res.append([y] + [p.grad for p in m.parameters()])
    assert res[1][0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in res[1][1:])
    for got, want in zip(res[1], res[0]):
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_inference_with_matching_dtype_copies_no_expert_weights(monkeypatch):
    """A decode step (few rows, weights already in the activations' dtype) must not stack every expert's
    gate and up weights (a copy of all of them per layer per step): StackCast is not called, and the
    output is the loop's; a training-sized batch still takes the stacked matmul."""
    from lmforge.model.layers import moe as moe_mod

    m = _moe("swiglu", expert_bias=True).eval()
    calls = []
    stack = moe_mod.StackCast.apply
    monkeypatch.setattr(moe_mod.StackCast, "apply", lambda *a: calls.append(1) or stack(*a))
    x = torch.randn(4, 1, 32)  # 4 sequences decoding one token each
    with torch.no_grad():
        m.dispatch = "loop"
        want = m(x)
        m.dispatch = "grouped"
        got = m(x)
    assert calls == []
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        m(torch.randn(2, 40, 32))
    assert calls == [1]


def test_gemm_choice_and_errors(monkeypatch):
    from lmforge.errors import ConfigError
    from lmforge.model.layers.moe import grouped_mm_loop, grouped_mm_torch, pick_gemm

    x = torch.randn(4, 32)
    if hasattr(torch, "_grouped_mm"):
        assert pick_gemm("auto", x, (32, 16)) is grouped_mm_torch  # CPU fp32, rows of 16-byte multiples
    assert pick_gemm("auto", x, (32, 6)) is grouped_mm_loop  # 24-byte rows: _grouped_mm refuses them
    assert pick_gemm("auto", x.double(), (32, 16)) is grouped_mm_loop
    with pytest.raises(ConfigError, match="gemm='auto' or 'loop'"):
        pick_gemm("torch", x, (32, 6))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="needs Triton on a CUDA device"):
        pick_gemm("triton", x, (32, 16))
    with pytest.raises(ConfigError, match="model.moe.gemm"):
        MoEConfig(gemm="cutlass")
    # torch 2.8's _grouped_mm ran only bf16 on sm90 (elsewhere it raised): auto must not pick it there
    monkeypatch.setattr(torch, "__version__", "2.8.0+cpu")
    assert pick_gemm("auto", x, (32, 16)) is grouped_mm_loop
    with pytest.raises(ConfigError, match="torch >= 2.9 off sm90 bf16 .*torch 2.8.0"):
        pick_gemm("torch", x, (32, 16))


def test_capacity_drops_late_tokens_and_dropless_keeps_all():
    m = _moe(capacity_factor=0.5)
    x = torch.randn(1, 16, 32)
    cap = m.capacity(16)
    assert cap == math.ceil(0.5 * 16 * 2 / 4)
    idx, *_ = m.route(x.view(-1, 32))
    keep = m._keep_mask(idx)
    for e in range(4):  # at most `cap` kept per expert, and they are the earliest assignments
        pos = torch.where((idx == e).reshape(-1))[0]
        kept = keep.reshape(-1)[pos]
        assert kept.sum() == min(cap, len(pos)) and kept[: int(kept.sum())].all()
    m.dispatch = "loop"
    loop = m(x)
    m.dispatch = "grouped"
    torch.testing.assert_close(m(x), loop, rtol=1e-5, atol=1e-5)
    assert float(m.last_stats["dropped"]) == pytest.approx(1 - float(keep.float().mean()))
    assert _moe(capacity_factor=0.0).capacity(16) is None
    # evaluation and generation run dropless: a token's output must not depend on its batch-mates (in the
    # inference engine a prompt's greedy tokens changed with the other requests, the chunking and the step)
    m.eval()
    assert m.capacity(16) is None
    dropless = _moe(capacity_factor=0.0).eval()
    torch.testing.assert_close(m(x), dropless(x))
    torch.testing.assert_close(m(x[:, :3]), dropless(x)[:, :3])


def test_balance_losses_match_formulas():
    m = _moe(aux_loss=0.1, z_loss=0.01, seq_aux_loss=0.05)
    x = torch.randn(2, 5, 32)
    m(x)
    flat = x.view(-1, 32)
    logits = m.router(flat)
    p = logits.softmax(-1)
    idx = p.topk(2, -1).indices
    f = torch.bincount(idx.reshape(-1), minlength=4).float() / idx.numel()
    switch = 4 * (f * p.mean(0)).sum()  # Fedus et al. eq. 4 (f over the N·k assignments)
    z = torch.logsumexp(logits, -1).square().mean()
    seq = 0.0
    for b in range(2):
        hit = torch.bincount(idx.view(2, 10)[b], minlength=4).float()
        seq += ((hit * 4 / (2 * 5)) * p.view(2, 5, 4)[b].mean(0)).sum() / 2
    want = 0.1 * switch + 0.01 * z + 0.05 * seq
    torch.testing.assert_close(m.last_aux, want, rtol=1e-5, atol=1e-6)


def test_aux_free_bias_moves_once_per_step_by_the_whole_steps_load():
    """DeepSeek-V3 §2.1.2: the bias moves once per optimizer step, by the sign of the step's whole load (every
    micro-batch), not after each forward; forwards without gradients (evaluations, old log-probs) and eval mode
    count nothing."""
    m = _moe(score="sigmoid", bias_update_rate=0.01).train()
    loads = []
    for _ in range(3):  # three micro-batches of one step
        m(torch.randn(4, 8, 32))
        loads.append(m.last_stats["load"] * 4 * 8 * 2)  # assignments per expert
        assert torch.equal(m.e_bias, torch.zeros(4))  # nothing moves before the step ends
    with torch.no_grad():
        m(torch.randn(4, 8, 32))
    m.eval()
    m(torch.randn(4, 8, 32))
    assert update_expert_biases(m) == 1
    n = sum(loads)
    assert torch.equal(m.e_bias, 0.01 * torch.sign(n.mean() - n))
    assert not torch.equal(torch.sign(n.mean() - n), torch.sign(loads[0].mean() - loads[0]))  # the test's point
    assert m.step_load.tolist() == [0, 0, 0, 0]
    assert "step_load" not in m.state_dict()
    update_expert_biases(m)  # no forward since: the bias moves by sign(0) = 0
    assert torch.equal(m.e_bias, 0.01 * torch.sign(n.mean() - n))


def test_aux_free_bias_counts_exactly_in_a_bf16_model():
    """The step's counts stay integers when the model is cast to bf16 (summed in bf16, counts past 256 rounded
    and could flip the sign of an expert's move)."""
    m = _moe(score="sigmoid", bias_update_rate=0.01).train().to(torch.bfloat16)
    loads = []
    for _ in range(40):
        m(torch.randn(16, 32, 32, dtype=torch.bfloat16))
        loads.append(m.last_stats["load"].double() * 16 * 32 * 2)
    n = torch.stack(loads).sum(0).round()
    assert m.step_load.dtype == torch.long and m.step_load.tolist() == n.long().tolist() and n.max() > 4096
    update_expert_biases(m)
    assert m.e_bias.tolist() == (0.01 * torch.sign(n.mean() - n)).float().tolist()


def test_aux_free_bias_with_activation_checkpointing_routes_the_recompute_as_the_forward():
    """A recomputed forward (activation checkpointing) routes with the bias the forward used, so gradients equal
    the plain forward's; it counts its tokens twice, which leaves the sign of the update unchanged."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(4, 8, 32)
    grads, biases = [], []
    for ac in (False, True):
        m = _moe(score="sigmoid", bias_update_rate=0.01).train()
        m.e_bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
        y = checkpoint(m, x, use_reentrant=False) if ac else m(x)
        y.square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
        update_expert_biases(m)
        biases.append(m.e_bias.clone())
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert torch.equal(biases[0], biases[1])


def test_forwards_under_load_uncounted_add_nothing_to_the_steps_load():
    """load_uncounted (the Trainer's context for a rank's Repeated rows) leaves the step's load as it was
    through the forward, the backward and an activation-checkpoint recompute, and the rest still counts."""
    from torch.utils.checkpoint import checkpoint

    m = _moe(score="sigmoid", bias_update_rate=0.01).train()
    m(torch.randn(4, 8, 32))
    counted = m.step_load.clone()
    assert counted.sum() == 4 * 8 * 2
    with load_uncounted(m):
        checkpoint(m, torch.randn(16, 8, 32), use_reentrant=False).square().sum().backward()
    assert torch.equal(m.step_load, counted)
    m(torch.randn(4, 8, 32))
    assert m.step_load.sum() == 2 * 4 * 8 * 2


def test_balancing_bias_stays_fp32_in_a_bf16_model():
    """model.to(bf16) rounded e_bias: past |0.5| a 1e-3 step is under half a bf16 step, so the bias stopped
    moving (HF keeps DeepSeek-V3's e_score_correction_bias in fp32 too)."""
    m = _moe(score="sigmoid", bias_update_rate=1e-3).train().to(torch.bfloat16)
    assert m.e_bias.dtype == torch.float32 and m.experts.w_up.dtype == torch.bfloat16
    m.e_bias.fill_(0.75)
    m.step_load.copy_(torch.tensor([10, 0, 0, 0]))
    update_expert_biases(m)
    assert m.e_bias.tolist() == pytest.approx([0.749, 0.751, 0.751, 0.751], abs=1e-6)
    m(torch.randn(2, 4, 32, dtype=torch.bfloat16))  # routes with the fp32 bias


def test_compiled_fp32_moe_on_cpu_equals_eager():
    """torch._grouped_mm runs eagerly on CPU in fp32, but its meta function (what torch.compile traces) takes
    bf16 only: a compiled fp32 MoE raised "Expected inputs of BF16 type"; 'auto' now takes the loop there. The
    aot_eager backend traces forward and backward through those meta functions as Inductor does, without its
    code generation (seconds on a CPU)."""
    m = _moe(score="sigmoid").train()
    x = torch.randn(2, 8, 32, requires_grad=True)
    want = m(x)
    got = torch.compile(m, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_noisy_gating_only_in_training():
    m = _moe(noisy=True)
    x = torch.randn(2, 8, 32)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    assert not torch.allclose(a, m(x))


def test_model_aux_loss_stats_and_flops():
    cfg = dataclasses.replace(BASE, d_ff=32,
                              moe=MoEConfig(n_experts=4, top_k=1, d_expert=32, aux_loss=0.01, dense_layers=1))
    model = Transformer(cfg)
    assert type(model.blocks[0].mlp).__name__ == "MLP" and isinstance(model.blocks[1].mlp, MoE)
    model(torch.randint(0, 64, (2, 8)))
    aux = model.aux_loss()
    aux.backward()
    assert aux.item() > 0 and model.blocks[1].mlp.router.weight.grad.abs().sum() > 0
    stats = model.moe_stats()
    assert sum(stats[f"moe/load_e{i}"] for i in range(4)) == pytest.approx(1.0)
    assert stats["moe/aux_loss"] == pytest.approx(aux.item()) and stats["moe/dropped_frac"] == 0.0
    dense = Transformer(dataclasses.replace(cfg, mlp="dense"))
    # one of 4 experts active: the same matmul FLOPs as a dense model with d_ff = d_expert (+ router)
    router = 2 * 32 * 4
    assert model.flops_per_token(8, training=False) == dense.flops_per_token(8, training=False) + router
    assert Transformer(dataclasses.replace(cfg, mlp="dense")).aux_loss() is None
    assert set(model.param_roles().values()) <= {"embedding", "head", "matrix", "vector"}


def test_upcycled_model_equals_dense():
    torch.manual_seed(0)
    dense = Transformer(dataclasses.replace(BASE, mlp="dense")).eval()
    moe = upcycle(dense, MoEConfig(n_experts=4, top_k=2)).eval()
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(moe(ids), dense(ids), rtol=1e-5, atol=1e-5)
    noisy = upcycle(dense, MoEConfig(n_experts=4, top_k=2), noise_std=0.01)
    assert not torch.equal(noisy.blocks[0].mlp.experts.w_up[0], noisy.blocks[0].mlp.experts.w_up[1])


def test_upcycling_copies_the_mtp_modules_experts_too():
    from lmforge.model.config import MTPConfig

    torch.manual_seed(0)
    dense = Transformer(dataclasses.replace(BASE, mlp="dense", mtp=MTPConfig(depth=1))).eval()
    moe = upcycle(dense, MoEConfig(n_experts=4, top_k=2)).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        (main, extra), (want_main, want_extra) = moe.forward_mtp(ids), dense.forward_mtp(ids)
    torch.testing.assert_close(main, want_main, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(extra[0], want_extra[0], rtol=1e-5, atol=1e-5)  # its experts were random before


def test_expert_counts_compiled_equal_bincount():
    """_count's compiled form (a one-hot sum: Inductor's int64 index_add_ is a slow sort-based index_put_ on
    GPUs) counts as the eager index_add_ and bincount do."""
    from lmforge.model.layers.moe import _count

    ids = torch.randint(0, 6, (200,))
    compiled = torch.compile(lambda i: _count(i, 8), fullgraph=True)
    for got in (_count(ids, 8), compiled(ids)):
        assert got.dtype == torch.long and torch.equal(got, torch.bincount(ids, minlength=8))


def test_compiled_loop_gemm_moe_compiles_once_whatever_the_routing():
    """A compiled fp32 MoE on the loop GEMM ('auto' on a CPU): the frame after counts.tolist()'s graph break
    guarded on every expert's count and recompiled at each new routing, up to dynamo's recompile limit (found
    2026-12-05). The loop now runs outside the graph: as many graphs after 8 steps as after 2."""
    from torch._dynamo.utils import counters

    from lmforge.model.config import ModelConfig, MoEConfig
    from lmforge.model.transformer import Transformer

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, mlp="moe",
                                moe=MoEConfig(n_experts=4, top_k=2, n_shared=1, score="sigmoid", expert_bias=True)))
    for b in m.blocks:
        b.compile(backend="aot_eager")  # dynamo's guards and graphs are tested, not Inductor's code
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    graphs = []
    for step in range(8):
        x = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(step))
        m(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
        graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert graphs[1] == graphs[-1], graphs


def test_top1_with_norm_topk_gates_by_one_and_warns_once():
    """top_k=1 with norm_topk renormalises the one weight to exactly 1 (as HF Mixtral/Qwen-MoE at top_k=1), so the
    LM loss gives the router no gradient; a training run's config says so once and names norm_topk=false (Switch's
    gate, the softmax probability), which does give it one."""
    import warnings
    grads = {}
    for norm in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = _moe(top_k=1, norm_topk=norm)
        x = torch.randn(2, 8, 32)
        m(x).square().sum().backward()
        grads[norm] = m.router.weight.grad.abs().sum().item()
    assert grads[True] < 1e-6 * grads[False]  # rounding of p / p: ~1e-7 of the Switch gate's gradient
    from lmforge.model.config import ModelConfig
    from lmforge.train.config import DataConfig, TrainConfig

    def run(**moe):  # (a training run's config says it; building the model to serve a HF checkpoint does not)
        model = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, mlp="moe", moe=MoEConfig(**moe))
        return TrainConfig(model=model, data=DataConfig(train=("a.bin",)))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            run(n_experts=4, top_k=1)
        run(n_experts=4, top_k=1, norm_topk=False)
        run(n_experts=4, top_k=2)
        MoEConfig(n_experts=4, top_k=1)
    assert len(caught) == 1 and "model.moe.norm_topk=false" in str(caught[0].message)
    assert caught[0].filename == __file__
