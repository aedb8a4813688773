"""Kernels called on a device Triton cannot run on (a fused model moved to the CPU, a direct call without a GPU)
run their PyTorch reference after a one-line warning, instead of failing in Triton's launcher ("0 active
drivers", or on None without the `kernels` extra)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from lmforge.kernels import decode, fused_ce, moe, rmsnorm, rope, swiglu
from lmforge.model.layers.moe import grouped_mm_loop
from lmforge.train.loss import lm_loss


@pytest.fixture(autouse=True)
def fresh_notices():
    """The notice is once per kernel: forget the ones an earlier test gave."""
    decode.fallback_notice.__wrapped__.cache_clear()


def _cases():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 16, generator=g), torch.randn(16, generator=g)
    gate, up = torch.randn(4, 24, generator=g), torch.randn(4, 24, generator=g)
    q, ang = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 5, 4, generator=g)
    h, head, y = torch.randn(6, 16, generator=g), torch.randn(30, 16, generator=g), torch.tensor([1, 2, -100, 4, 5, 29])
    xs, ws, counts = torch.randn(7, 16, generator=g), torch.randn(3, 8, 16, generator=g), torch.tensor([2, 0, 5])
    return [
        ("fused RMSNorm", lambda: rmsnorm.rms_norm(x, w, 1e-6),
         torch.nn.functional.rms_norm(x, (16,), w, 1e-6)),
        ("fused SwiGLU", lambda: swiglu.swiglu(gate, up), torch.nn.functional.silu(gate) * up),
        ("fused RoPE", lambda: rope.rope(q, ang.cos(), ang.sin(), "interleaved"),
         torch.view_as_real(torch.view_as_complex(q.reshape(2, 3, 5, 4, 2))
                            * torch.polar(torch.ones_like(ang), ang)[:, None]).flatten(-2)),
        ("fused linear \\+ cross-entropy", lambda: fused_ce.fused_linear_cross_entropy(h, head, y, 1e-2)[0],
         lm_loss(h @ head.T, y, 1e-2)[0]),
        ("grouped GEMM", lambda: moe.grouped_mm(xs, ws, counts), grouped_mm_loop(xs, ws, counts)),
    ]


@pytest.mark.parametrize("i", range(5))
def test_kernels_fall_back_to_their_reference_with_one_line(monkeypatch, i):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors without the interpreter: no Triton device
    name, run, want = _cases()[i]
    with pytest.warns(UserWarning, match=f"{name} needs a CUDA GPU and Triton .* got device cpu; using the PyTorch "
                                         "reference") as rec:
        got = run()
    assert all("\n" not in str(r.message) for r in rec)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _mixed_cases():
    """The five kernels on bf16 activations with fp32 weights (a bf16 model's master weights, or autocast),
    each with the inputs its gradient reaches."""
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    bf = torch.bfloat16
    x, w = r(3, 5, 16, dtype=bf), r(16)
    gate, up = r(4, 24, dtype=bf), r(4, 24)
    q, ang = r(2, 3, 5, 8, dtype=bf), torch.randn(2, 5, 4, generator=g)
    h, head, y = r(6, 16, dtype=bf), r(30, 16), torch.tensor([1, 2, -100, 4, 5, 29])
    xs, ws, counts = r(7, 16, dtype=bf), r(3, 8, 16), torch.tensor([2, 0, 5])
    return [
        (lambda: rmsnorm.rms_norm(x, w, 1e-6), (x, w)),
        (lambda: swiglu.swiglu(gate, up), (gate, up)),
        (lambda: rope.rope(q, ang.cos(), ang.sin(), "interleaved"), (q,)),
        (lambda: fused_ce.fused_linear_cross_entropy(h, head, y, 1e-2)[0], (h, head)),
        (lambda: moe.grouped_mm(xs, ws, counts), (xs, ws)),
    ]


def _run_mixed(i: int, autocast: bool) -> list[torch.Tensor]:
    """The output and the gradients of case i, the warning (if any) ignored."""
    run, inputs = _mixed_cases()[i]
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run()
    out.float().square().sum().backward()
    return [out] + [t.grad for t in inputs]


@pytest.mark.skipif(moe.triton is None, reason="compares with the kernels run in Triton's interpreter")
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("i", range(5))
def test_fallbacks_match_the_kernels_dtypes_and_gradients(monkeypatch, i, autocast):
    """bf16 activations with fp32 weights, with and without autocast: the fallback returns what the kernel
    (in the interpreter) returns - dtype, shape, values to bf16 rounding - and the same gradients (the grouped
    GEMM's fallback once raised "expected m1 and m2 to have the same dtype" without autocast)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    want = _run_mixed(i, autocast)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    got = _run_mixed(i, autocast)
    for g, k in zip(got, want):
        assert (g.dtype, g.shape) == (k.dtype, k.shape)
        assert ((g.float() - k.float()).norm() / k.float().norm()).item() < 2e-2  # bf16 rounding, not a bug


def test_the_notice_is_given_once_per_kernel_from_the_callers_line_also_compiled(monkeypatch):
    """A fallback runs at every call, its notice only at the first; inside torch.compile it is reported from the
    user's line, not from dynamo's frames."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w = torch.randn(2, 8), torch.randn(8)

    def f(x):
        return rmsnorm.rms_norm(x, w) * 2

    compiled = torch.compile(f, backend="eager")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(compiled(x), 2 * rmsnorm.rms_norm_ref(x, w, 1e-5))
        f(x)
        swiglu.swiglu(x, x)
    assert [(str(r.message).split(" needs")[0], r.filename) for r in rec] == [
        ("fused RMSNorm", __file__), ("fused SwiGLU", __file__)]


def test_the_notice_tells_a_too_old_triton_from_a_missing_one():
    """pyproject allows triton >= 3.0, but decode.py imports gdc_* (3.3): an old Triton is to be upgraded,
    not installed."""
    old = ImportError("cannot import name 'gdc_wait' from 'triton.language.extra.cuda'",
                      name="triton.language.extra.cuda")
    assert decode._no_triton(old) == ("the installed Triton is too old (cannot import name 'gdc_wait' from "
                                      "'triton.language.extra.cuda'): pip install -U 'triton>=3.3'")
    missing = ModuleNotFoundError("No module named 'triton'", name="triton")
    assert decode._no_triton(missing) == "Triton is not installed: pip install 'lmforge[kernels]'"


def test_the_interpreter_switch_is_read_in_one_place():
    """TRITON_INTERPRET is read by decode.interpreting() alone, at each call (moe once read it at import, and
    four modules had their own copy of the check)."""
    root = Path(decode.__file__).parents[1]
    reads = [(str(p.relative_to(root)), n) for p in sorted(root.rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"environ.*TRITON_INTERPRET", line)]
    assert [path for path, _ in reads] == ["kernels/decode.py"]


def test_kernel_step_asked_for_where_it_cannot_run_names_the_device(monkeypatch):
    """kernel_step=True on a CPU engine said 'triton is not available' with Triton installed, and judged by whether
    the machine had a GPU rather than by the engine's device (a CPU engine on a GPU machine went on to launch)."""
    from lmforge.errors import ConfigError
    from lmforge.infer.config import EngineConfig, use_kernel_step
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, the engine on its CPU
    model = Transformer(ModelConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=1, activation="swiglu"))
    why = decode._NO_TRITON or "TRITON_INTERPRET=1 runs the kernels on CPU, for tests"
    with pytest.raises(ConfigError) as err:
        use_kernel_step(EngineConfig(kernel_step=True), model, torch.device("cpu"))
    assert str(err.value) == ("kernel_step=True, but the batch-1 kernel step cannot run: it needs a CUDA GPU and "
                              f"Triton ({why}), got device cpu")
    assert decode.unavailable("cpu") == f"needs a CUDA GPU and Triton ({why}), got device cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert decode.unavailable("cpu") is None


def test_mla_with_the_triton_attention_says_once_that_it_runs_sdpa():
    """attn_impl='triton' on an MLA model ran SDPA without a word (the docs promise a one-line warning where the
    kernel cannot run); now one notice for every layer and call, and the SDPA model's logits."""
    import dataclasses

    from lmforge.model.config import MLAConfig, ModelConfig
    from lmforge.model.transformer import Transformer

    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=2, max_seq_len=32, attention="mla",
                      mla=MLAConfig(kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                    v_head_dim=16))
    torch.manual_seed(0)
    ref = Transformer(cfg)
    fast = Transformer(dataclasses.replace(cfg, attn_impl="triton"))
    fast.load_state_dict(ref.state_dict())
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for shape in ((2, 7), (1, 12)):
            ids = torch.randint(0, 64, shape)
            torch.testing.assert_close(fast(ids), ref(ids))
    assert [str(r.message) for r in rec] == ["attn_impl='triton' runs the FlashAttention kernel on mha/gqa layers, "
                                             "not on MLA's; using attn_impl='sdpa' for these calls"]
