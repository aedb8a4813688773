"""Triton grouped GEMM and dropless MoE dispatch (lmforge/kernels/moe.py) against the per-expert loop:
outputs and gradients of the inputs, the expert weights and the router (probabilities and weights)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lmforge.kernels import decode
from lmforge.kernels import moe as km
from lmforge.model.config import ModelConfig, MoEConfig
from lmforge.model.layers.moe import MoE, glu_fused, grouped_mm_loop, grouped_mm_torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not km.available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")
BASE = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, max_seq_len=64, mlp="moe")


# row tiles of 16 (an expert's rows span several, the last partly filled) swept in groups of 8 (GROUP_M) of the
# grid's cdiv(M, 16) + E tiles: one partial group (the first two cases), one whole, and the last case's 9 real
# tiles in a whole group and a partial one
@pytest.mark.parametrize("counts", [[5, 0, 17, 1], [0, 0, 3, 0], [40, 2, 0, 9], [60, 37, 0, 30]])
def test_grouped_mm_matches_per_expert_matmuls(counts):
    E, out_dim, in_dim = len(counts), 24, 40
    counts = torch.tensor(counts, device=DEV)
    x = torch.randn(int(counts.sum()), in_dim, device=DEV)
    w = torch.randn(E, out_dim, in_dim, device=DEV)
    dy = torch.randn(x.shape[0], out_dim, device=DEV)
    res = []
    for fn in (grouped_mm_loop, km.grouped_mm):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi, counts)
        y.backward(dy)
        res.append((y, xi.grad, wi.grad))
    for got, want in zip(res[1], res[0]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def _pair(activation: str, **kw) -> tuple[MoE, MoE]:
    cfg = dataclasses.replace(BASE, activation=activation, moe=MoEConfig(
        **{"n_experts": 5, "top_k": 2, "d_expert": 16, "dispatch": "loop", **kw}))
    ref = MoE(cfg, 0).to(DEV)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
    fast = km.TritonMoE(cfg, 0).to(DEV)
    fast.load_state_dict(ref.state_dict())
    fast.dispatch = "grouped"
    return ref, fast


@pytest.mark.parametrize("w_shape,counts", [((3, 8, 12), [4, 0, 6]), ((3, 8, 20), [4, 0, 6]), ((3, 8, 16), [4, 6])])
def test_grouped_mm_refuses_mismatched_shapes(w_shape, counts):
    """w's input width or counts' length unlike x's and w's: refused in one line (the kernel read past w or
    counts: NaN or plausible numbers)."""
    x = torch.randn(10, 16, device=DEV)
    with pytest.raises(ValueError, match="grouped_mm takes x \\(M, in\\), w \\(E, out, in\\) and counts \\(E,\\)"):
        km.grouped_mm(x, torch.randn(*w_shape, device=DEV), torch.tensor(counts, device=DEV))


def test_grouped_mm_bf16_matches_fp32_loop():
    """bf16 operands, uneven groups with an empty expert: the result and both gradients in bf16, within its
    rounding of the fp32 loop (in Triton's interpreter, whose bf16 tl.dot multiplies raw bits, through fp32)."""
    counts = torch.tensor([9, 0, 20, 3], device=DEV)
    x = torch.randn(32, 40, device=DEV).to(torch.bfloat16).requires_grad_()
    w = torch.randn(4, 24, 40, device=DEV).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(32, 24, device=DEV)
    y = km.grouped_mm(x, w, counts)
    got = (y, *torch.autograd.grad(y, (x, w), dy.to(y.dtype)))
    xf, wf = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yf = grouped_mm_loop(xf, wf, counts)
    want = (yf, *torch.autograd.grad(yf, (xf, wf), dy))
    for g, r in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), r, atol=2e-2 * r.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("activation,kw,gemm", [("swiglu", {}, "triton"), ("swiglu", {}, "torch"),
                                                ("swiglu", dict(expert_bias=True), "loop"),
                                                ("gelu", dict(expert_bias=True, n_shared=1), "triton"),
                                                ("swiglu", dict(capacity_factor=0.75), "triton"),
                                                ("swiglu", {}, "plain MoE, triton")])
def test_triton_moe_matches_loop(activation, kw, gemm):
    """Every grouped matmul under TritonMoE's Triton dispatch steps, and the Triton GEMM under the plain
    MoE's torch dispatch (model.moe.gemm='triton' without apply_fused_kernels)."""
    ref, fast = _pair(activation, **kw)
    if gemm.startswith("plain"):
        fast.__class__ = MoE
    fast.gemm = gemm.split()[-1]
    x = torch.randn(2, 11, 32, device=DEV)
    grads = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.square().sum().backward()
        grads.append([y, xi.grad] + [p.grad for p in m.parameters()])
    names = ["y", "x"] + [n for n, _ in ref.named_parameters()]
    for name, got, want in zip(names, grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda s: f"{name}: {s}")


def test_triton_moe_auto_gemm():
    """gemm 'auto': torch._grouped_mm where it runs without a host sync (CPU; sm90/sm100 in bf16), else Triton."""
    from lmforge.model.layers.moe import grouped_mm_sync_free, grouped_mm_torch

    _, fast = _pair("swiglu")
    x = torch.randn(4, 32, device=DEV)
    assert fast._gemm(x) is (grouped_mm_torch if grouped_mm_sync_free(x) else km.grouped_mm)
    fast.gemm = "loop"
    assert fast._gemm(x).__name__ == "grouped_mm_loop"


def test_triton_dispatch_router_probability_gradients():
    """The un-permutation weights the expert outputs by the router's probabilities: their gradient
    (what trains the router) equals the loop's."""
    ref, fast = _pair("swiglu")
    x = torch.randn(13, 32, device=DEV)
    idx = torch.randint(0, 5, (13, 2), device=DEV)
    keep = torch.ones_like(idx, dtype=torch.bool)
    w = torch.rand(13, 2, device=DEV)
    grads = []
    for run in (ref.experts_loop, fast.experts_grouped):
        wi = w.clone().requires_grad_()
        run(x, idx, wi, keep).sin().sum().backward()
        grads.append(wi.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(top_k=3, norm_topk=False), dict(top_k=1),
                                dict(score="sigmoid", routed_scale=2.5), dict(score="sigmoid", norm_topk=False),
                                dict(n_experts=40, top_k=6, router_bias=True)])
def test_fused_routing_matches_moe_route(kw):
    """TritonMoE.route (one kernel after the router's matmul, forward and backward) == MoE.route: ids, weights,
    scores, and the router's gradients through the weights and the scores (the balancing losses' path),
    with a nonzero aux-loss-free bias choosing the experts, over rows that do not fill a program's block."""
    ref, fast = _pair("swiglu", **kw)
    with torch.no_grad():
        ref.e_bias.normal_(0, 0.05)
        fast.e_bias.copy_(ref.e_bias)
    x = torch.randn(77, 32, device=DEV)
    out = []
    for m in (ref, fast):
        m.zero_grad()
        idx, w, scores, logits = m.route(x)
        (w.sin().sum() + (scores * torch.linspace(0, 3, scores.shape[1], device=DEV)).square().sum()).backward()
        out.append((idx, w, scores, logits.float(), m.router.weight.grad.clone()))
    (ri, rw, rs, rl, rg), (fi, fw, fs, fl, fg) = out
    assert fi.dtype == torch.long and torch.equal(fi, ri)
    for got, want in ((fw, rw), (fs, rs), (fl, rl), (fg, rg)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    x.requires_grad_()
    fast.route(x)[1].sum().backward()  # only the weights' gradient (the scores unused)
    x2 = x.detach().clone().requires_grad_()
    ref.route(x2)[1].sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_fused_routing_falls_back_where_it_does_not_apply():
    """Expert groups and training noise keep MoE.route (the kernel does neither): same ids and weights."""
    for kw in (dict(n_groups=5, topk_groups=2, n_experts=10), dict(noisy=True)):
        ref, fast = _pair("swiglu", **kw)
        x = torch.randn(9, 32, device=DEV)
        torch.manual_seed(0)
        want = ref.route(x)
        torch.manual_seed(0)
        got = fast.route(x)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_swiglu_is_the_triton_kernel_eager_and_under_compile_unless_switched_off(monkeypatch):
    """TritonMoE's SwiGLU: the Triton kernel in eager mode and under torch.compile on a GPU (not with the CPU
    interpreter, which Dynamo cannot trace); with the module's kernel_under_compile off, the plain expression
    Inductor fuses under compile (the bench's comparison row). All give the same values and gradients."""
    if not km.available(DEV):
        pytest.skip("needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")
    layer = _pair("swiglu")[1]
    gu = torch.randn(24, 64, device=DEV, requires_grad=True)
    calls = []
    apply = km._FusedSwiGLU.apply
    monkeypatch.setattr(km._FusedSwiGLU, "apply", lambda t: calls.append(1) or apply(t))
    eager = layer._act("swiglu", gu)
    assert calls == [1]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(layer._act("swiglu", gu), eager)
    under = [1, 1] if DEV == "cuda" else [1]
    assert calls == under and km.TritonMoE.kernel_under_compile is True  # the kernel under compile too (GPU)
    layer.kernel_under_compile = False
    traced = layer._act("swiglu", gu)
    assert calls == under  # not the Triton kernel
    torch.testing.assert_close(traced, eager)
    g1, = torch.autograd.grad(eager.square().sum(), gu)
    g2, = torch.autograd.grad(traced.square().sum(), gu)
    torch.testing.assert_close(g2, g1)


def test_fused_swiglu_hands_the_kernel_whole_tensors(monkeypatch):
    """_FusedSwiGLU passes the kernel gate|up and dgate|dup as whole tensors with the up half's column offset,
    never views of their halves (a user kernel writing into views is functionalized into copies under
    torch.compile); values and gradients equal the plain expression's."""
    if not km.available(DEV):
        pytest.skip("needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")
    gu = torch.randn(24, 2 * 48, device=DEV, requires_grad=True)
    seen = []
    launch = km._swiglu_launch
    monkeypatch.setattr(km, "_swiglu_launch", lambda *a, **kw: seen.append((a, kw)) or launch(*a, **kw))
    h = km._FusedSwiGLU.apply(gu)
    dgu, = torch.autograd.grad(h.square().sum(), gu)
    (fa, fkw), (ba, bkw) = seen
    whole = lambda t: t.shape == gu.shape and t.data_ptr() == t.untyped_storage().data_ptr()  # noqa: E731
    assert fa[0] is fa[1] and whole(fa[0]) and fa[0].data_ptr() == gu.data_ptr()
    assert fkw == dict(backward=False, n=48, u_off=48)
    assert ba[0] is ba[1] and ba[4] is ba[5] and whole(ba[4]) and bkw == dict(backward=True, n=48, u_off=48, du_off=48)
    # the kernel itself gets the gradient once, as dgate's pointer (dup written through it at the offset); a
    # tensor handed as two written arguments is cloned for one of them under torch.compile
    from lmforge.kernels import swiglu as ks

    launches = []
    kernel = ks._swiglu_kernel

    class Spy:
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((a, kw)) or kernel[grid](*a, **kw)

    monkeypatch.setattr(ks, "_swiglu_kernel", Spy())
    torch.autograd.grad(km._FusedSwiGLU.apply(gu).square().sum(), gu)
    (_, fwd_kw), (bwd, bwd_kw) = launches
    assert not fwd_kw["DU_IN_DG"] and bwd_kw["DU_IN_DG"]
    assert bwd[5] is not bwd[4] and bwd[5] is bwd[0]  # du_ptr: a tensor the kernel only reads
    ref = gu.detach().clone().requires_grad_()
    want = glu_fused("swiglu", ref)
    torch.testing.assert_close(h, want)
    torch.testing.assert_close(dgu, torch.autograd.grad(want.square().sum(), ref)[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_swiglu_under_torch_compile_gpu():
    """The Triton SwiGLU inside a torch.compile'd function (Inductor wraps the user kernel and functionalizes
    what it writes): values and gradients equal eager's - both halves of dgate|dup - and the generated code
    clones neither gate|up nor its gradient."""
    from torch._inductor.utils import run_and_get_code

    gu = torch.randn(512, 2 * 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dh = torch.randn(512, 384, device="cuda", dtype=torch.bfloat16)

    def f(t):
        h = km._FusedSwiGLU.apply(t)
        return torch.autograd.grad(h, t, dh)[0], h

    want = f(gu)
    ref = gu.detach().float().requires_grad_()
    h_ref = glu_fused("swiglu", ref)
    torch.testing.assert_close(want[1].float(), h_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(want[0].float(), torch.autograd.grad(h_ref, ref, dh.float())[0], atol=5e-2, rtol=2e-2)

    compiled = torch.compile(km._FusedSwiGLU.apply, fullgraph=True)
    x = gu.detach().clone().requires_grad_()

    def step():
        h = compiled(x)
        (h.float() * dh.float()).sum().backward()  # compiles the backward graph
        return h

    got_h, code = run_and_get_code(step)
    torch.testing.assert_close(got_h, want[1])
    torch.testing.assert_close(x.grad, want[0])
    assert not any("clone" in c for c in code), "a functionalization copy is left in the compiled code"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_bf16_gpu():
    E, d, de = 8, 1024, 1536
    counts = torch.tensor([700, 0, 1300, 5, 2048, 333, 17, 900], device="cuda")
    x = torch.randn(int(counts.sum()), d, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(E, de, d, device="cuda") / d ** 0.5).to(torch.bfloat16)
    dy = torch.randn(x.shape[0], de, device="cuda", dtype=torch.bfloat16)
    res = []
    for fn in (grouped_mm_loop, km.grouped_mm, grouped_mm_torch):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xi, wi, counts)
        y.backward(dy)
        res.append((y, xi.grad, wi.grad))
    for fast in res[1:]:
        for got, want in zip(fast, res[0]):
            torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * want.abs().max().item(), rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls,gemm", [(km.TritonMoE, "triton"), (km.TritonMoE, "auto"), (MoE, "torch")])
def test_moe_has_no_host_sync_gpu(cls, gemm):
    """Dropless forward and backward under bf16 autocast never wait on the GPU: counts stay on the device
    (torch._grouped_mm only where it runs CUTLASS; TritonMoE's 'auto' picks Triton elsewhere)."""
    from lmforge.model.layers.moe import grouped_mm_sync_free

    if gemm == "torch" and not grouped_mm_sync_free(torch.zeros(1, device="cuda", dtype=torch.bfloat16)):
        pytest.skip("torch._grouped_mm reads the offsets on the host off sm90/sm100")
    cfg = dataclasses.replace(BASE, d_model=256, moe=MoEConfig(n_experts=8, top_k=2, d_expert=512))
    layer = cls(cfg, 0).cuda()
    layer.gemm = gemm
    x = torch.randn(2, 128, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        layer(x).float().sum().backward()  # warm-up: Triton autotuning synchronises
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            layer(x).float().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_apply_fused_kernels_keeps_loss_and_gradients():
    """A model with RMSNorm, QK-norm, SwiGLU and MoE blocks: the same loss and gradients after the swap."""
    import copy

    from lmforge.kernels.fused_ce import fused_lm_loss
    from lmforge.kernels.training import apply_fused_kernels
    from lmforge.model.transformer import Transformer
    from lmforge.train.loss import lm_loss

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, qk_norm=True,
                      mlp="moe", moe=MoEConfig(n_experts=4, top_k=2, d_expert=16, dense_layers=1))
    ref = Transformer(cfg).to(DEV)
    fast = copy.deepcopy(ref)
    swapped = apply_fused_kernels(fast)
    assert sum(".mlp" in n and "blocks.1" in n for n in swapped) == 1  # the MoE layer
    assert any("q_norm" in n for n in swapped) and "final_norm" in swapped
    x, y = torch.randint(0, 64, (2, 9), device=DEV), torch.randint(0, 64, (2, 9), device=DEV)
    losses = [lm_loss(ref(x), y, 1e-3)[0], fused_lm_loss(fast, x, y, 1e-3, chunk_size=8)[0]]
    for m, loss in zip((ref, fast), losses):
        (loss + m.aux_loss()).backward()  # aux_loss: the MoE layer's balancing losses (weight 0 here)
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=lambda s: f"{name}: {s}")


def test_apply_fused_kernels_falls_back_with_notice(monkeypatch, capsys):
    from lmforge.kernels.training import apply_fused_kernels
    from lmforge.model.transformer import Transformer

    if torch.cuda.is_available():
        pytest.skip("the fallback is for devices without Triton support")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU without the interpreter: no Triton device
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    assert apply_fused_kernels(model) == []
    why = decode._NO_TRITON or "TRITON_INTERPRET=1 runs the kernels on CPU, for tests"  # (not "install the extra")
    assert capsys.readouterr().err == (f"fused kernels not applied: each Triton kernel needs a CUDA GPU and Triton "
                                       f"({why}), got device cpu; the plain layers run instead\n")
    assert type(model.final_norm).__name__ == "RMSNorm"


def test_the_fused_kernels_notice_of_an_nproc_launch_is_said_once(monkeypatch, capsys):
    """`lmforge train --nproc 2 --fused-kernels true` on a CPU printed "fused kernels not applied: ..." once per
    process; the processes of one launch say a line they print alike once (lmforge.parallel.reports)."""
    from lmforge.kernels.training import apply_fused_kernels
    from lmforge.model.transformer import Transformer
    from lmforge.parallel.reports import shared_reports

    if torch.cuda.is_available():
        pytest.skip("the fallback is for devices without Triton support")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with shared_reports():  # (the launcher's folder; each call stands for one process of the launch)
        for _ in range(2):
            apply_fused_kernels(Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                                                        max_seq_len=16)))
    assert capsys.readouterr().err.count("fused kernels not applied") == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gemm", ["auto", "triton", "torch"])
def test_triton_moe_matches_loop_bf16_autocast_gpu(gemm):
    cfg = dataclasses.replace(BASE, d_model=256, activation="swiglu", moe=MoEConfig(
        n_experts=8, top_k=2, d_expert=512, dispatch="loop"))
    torch.manual_seed(0)
    ref = MoE(cfg, 0).cuda()
    with torch.no_grad():  # the modules leave init to the model (fresh CUDA memory can hold NaN)
        for p in ref.parameters():
            p.normal_(0, 0.05)
    fast = km.TritonMoE(cfg, 0).cuda()
    fast.load_state_dict(ref.state_dict())
    fast.dispatch, fast.gemm = "grouped", gemm
    x = torch.randn(4, 256, 256, device="cuda")
    grads = []
    for m in (ref, fast):
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(xi)
        y.float().square().mean().backward()
        grads.append([y.float(), xi.grad] + [p.grad for p in m.parameters()])
    names = ["y", "x"] + [n for n, _ in ref.named_parameters()]
    for name, got, want in zip(names, grads[1], grads[0]):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, atol=3e-2 * scale, rtol=3e-2, msg=lambda s: f"{name}: {s}")


def test_apply_fused_kernels_sets_rope_fn():
    """A module that calls RoPE through a `rope_fn` attribute gets the Triton kernel (and keeps its output)."""
    from lmforge.kernels import rope as kp
    from lmforge.kernels.training import apply_fused_kernels
    from lmforge.model.layers.rope import RotaryEmbedding, apply_rope

    class Rotated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rot = RotaryEmbedding(8, max_seq_len=8)
            self.rope_fn = apply_rope

        def forward(self, x):
            return self.rope_fn(x, *self.rot.cos_sin(torch.arange(4, device=x.device).expand(1, 4), 4), "half")

    m = Rotated().to(DEV)
    x = torch.randn(1, 2, 4, 8, device=DEV)
    want = m(x)
    assert apply_fused_kernels(m, kinds=("rope",)) == [""] and m.rope_fn is kp.rope
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
