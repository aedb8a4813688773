"""The kernels take the layouts and values their references take, or refuse them in one line: strided weights and
index tensors, out-of-range targets, fp16 sums past 65504, empty dims (a random sweep in Triton's interpreter found
each of these giving silent wrong numbers, garbage reads or memory corruption). On CPU the kernels run in Triton's
interpreter (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels.decode import available

from .test_paged_attention import _paged
from .test_paged_latent import _decode
from .test_paged_varlen import CHUNKS, _step

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not available(DEV), reason="needs triton: a GPU, or TRITON_INTERPRET=1 on CPU")


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with every stride doubled: a view of a tensor twice as wide along the last dim."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def test_fused_ce_refuses_targets_outside_the_vocabulary_and_bad_chunks():
    """A target outside [0, V) that is not ignore_index (a padding id of -1 with ignore_index -100) read another
    row's logit: a finite, wrong loss. It fails as F.cross_entropy does; ignore_index itself is fine."""
    from lmforge.kernels.fused_ce import fused_linear_cross_entropy

    h, w = torch.randn(5, 4, device=DEV), torch.randn(10, 4, device=DEV)
    for bad in (-1, 10):
        with pytest.raises(RuntimeError, match="outside \\[0, 10\\) and is not ignore_index=-100"):
            fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3, bad], device=DEV))
    loss, ce = fused_linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 3, -100], device=DEV))
    want = torch.nn.functional.cross_entropy(h @ w.T, torch.tensor([0, 1, 2, 3, -100], device=DEV))
    torch.testing.assert_close(ce, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_size must be a positive number of rows"):
        fused_linear_cross_entropy(h, w, torch.zeros(5, dtype=torch.long, device=DEV), chunk_size=-1)


def test_fused_ce_fp16_weight_gradient_does_not_overflow():
    """fp16: a chunk's sum of (p - onehot) h over 256 rows of |h| ~ 400 passes 65504 before the 1/n scaling; the
    weight gradient is accumulated in fp32 (it was -inf), equal to the fp64 gradient. (300 rows: two chunks;
    the interpreter runs a program per row.)"""
    from lmforge.kernels.fused_ce import fused_linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = (torch.randn(300, 4, generator=g) + torch.tensor([400.0, 0, 0, 0])).half().to(DEV)
    w = (torch.randn(8, 4, generator=g) * 0.01).half().to(DEV).requires_grad_()
    y = torch.zeros(300, dtype=torch.long, device=DEV)
    fused_linear_cross_entropy(h, w, y, chunk_size=256)[0].backward()
    w64 = w.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(h.double() @ w64.T, y).backward()
    assert torch.isfinite(w.grad).all()
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=0.2, rtol=2e-3)


def test_rmsnorm_reads_a_strided_weight_and_refuses_an_empty_row():
    from lmforge.kernels import rmsnorm as kr

    x, w = torch.randn(4, 8, device=DEV), torch.randn(8, device=DEV)
    torch.testing.assert_close(kr.rms_norm(x, strided(w)), kr.rms_norm_ref(x, w, 1e-5), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="0 < D <= 65536"):
        kr.rms_norm(torch.randn(4, 0, device=DEV), torch.randn(0, device=DEV))


def test_swiglu_refuses_shapes_it_would_read_past():
    from lmforge.kernels.swiglu import swiglu

    g = torch.randn(4, 8, device=DEV)
    for up in (torch.randn(8, device=DEV), g[:, :4]):
        with pytest.raises(ValueError, match="gate and up of one shape"):
            swiglu(g, up)


def test_rope_of_no_heads_is_empty():
    from lmforge.kernels.rope import rope

    x = torch.randn(2, 0, 3, 8, device=DEV)
    cos, sin = torch.randn(1, 3, 4, device=DEV), torch.randn(1, 3, 4, device=DEV)
    assert rope(x, cos, sin).shape == (2, 0, 3, 8)


def test_grouped_mm_reads_strided_int32_counts():
    """int32 counts that are a strided view were read as if contiguous: wrong counts past M rows, stores out of
    bounds (the interpreter aborted). Equal to the per-expert matmuls now."""
    from lmforge.kernels.moe import grouped_mm

    c = torch.tensor([3, 0, 5], dtype=torch.int32, device=DEV)
    counts = torch.stack([c, c + 7], 1)[:, 0]
    x, w = torch.randn(8, 16, device=DEV), torch.randn(3, 16, 16, device=DEV)
    want = torch.cat([x[:3] @ w[0].T, x[3:] @ w[2].T])
    torch.testing.assert_close(grouped_mm(x, w, counts), want, atol=1e-4, rtol=1e-4)


def test_paged_decode_reads_strided_tables_lengths_and_sinks():
    """A column-major block table, a strided context_lens and strided sinks were read as if laid out plainly (max
    errors 1.3, 2.6 and 0.6): equal to the reference on the contiguous ones now."""
    from lmforge.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    q, k, v, tables, lens = _paged(3, 8, 2, 16, 8, [5, 17, 30])
    sinks = torch.randn(8, device=DEV)
    want = paged_decode_attention_ref(q, k, v, tables, lens, scale=0.25, sinks=sinks)
    got = paged_decode_attention(q, k, v, tables.t().contiguous().t(), strided(lens), scale=0.25,
                                 sinks=strided(sinks))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_paged_varlen_reads_strided_index_tensors():
    from lmforge.kernels.paged_varlen import (paged_varlen_attention, paged_varlen_reference, varlen_programs,
                                              varlen_tiles)

    q, k, v, tables, cu, ctx = _step(4, 2, 16, 8, CHUNKS, seed=3)
    tiles = tuple(torch.tensor(t, dtype=torch.int32, device=DEV)
                  for t in varlen_tiles([n for n, _ in CHUNKS], varlen_programs(len(q), 8)))
    want = paged_varlen_reference(q, k, v, tables, cu, ctx, scale=0.25)
    got = paged_varlen_attention(q, k, v, tables.t().contiguous().t(), strided(cu), strided(ctx),
                                 tuple(strided(t) for t in tiles), scale=0.25)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(DEV == "cuda", reason="on a GPU the check is a device-side assert, which ends the CUDA context")
def test_grouped_mm_refuses_counts_that_do_not_sum_to_the_rows():
    """counts summing past x's rows wrote past the kernel's output ('double free or corruption' in the
    interpreter); fewer left rows unwritten. Both are refused, on the device, naming what must hold."""
    from lmforge.kernels import moe
    from lmforge.model.layers.moe import grouped_mm_loop

    x, w = torch.randn(11, 13), torch.randn(3, 7, 13)
    for counts in ([4, 0, 9], [4, 0, 5]):
        with pytest.raises(RuntimeError, match="^grouped_mm: counts must sum to the rows of x"):
            moe.grouped_mm(x, w, torch.tensor(counts))
    torch.testing.assert_close(moe.grouped_mm(x, w, torch.tensor([4, 0, 7])),
                               grouped_mm_loop(x, w, torch.tensor([4, 0, 7])))


def test_a_negative_softcap_or_window_is_refused_by_every_attention_entry_point():
    """The paged kernels, their references and math_attention cap and window only where the value is > 0: a
    softcap or window of -1 ran silently as none. Each refuses it in one line naming itself and the value (the
    engine's callers pass the model config's values, checked >= 0 there)."""
    from lmforge.errors import ConfigError
    from lmforge.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref
    from lmforge.kernels.paged_latent import paged_latent_attention, paged_latent_reference
    from lmforge.kernels.paged_varlen import paged_varlen_attention, paged_varlen_reference, varlen_tiles
    from lmforge.model.layers.attention import attention, math_attention

    paged, latent = _paged(2, 2, 2, 16, 16, [5, 9]), _decode(2, 2, 8, 4, 16, [5, 9])
    varlen = _step(2, 2, 16, 16, CHUNKS)
    tiles = tuple(torch.tensor(t, dtype=torch.int32, device=DEV) for t in varlen_tiles([n for n, _ in CHUNKS]))
    calls = {"paged_decode_attention": lambda **kw: paged_decode_attention(*paged, scale=0.25, **kw),
             "paged_decode_attention_ref": lambda **kw: paged_decode_attention_ref(*paged, scale=0.25, **kw),
             "paged_latent_attention": lambda **kw: paged_latent_attention(*latent, scale=0.25, **kw),
             "paged_latent_reference": lambda **kw: paged_latent_reference(*latent, scale=0.25, **kw),
             "paged_varlen_attention": lambda **kw: paged_varlen_attention(*varlen, tiles, scale=0.25, **kw),
             "paged_varlen_reference": lambda **kw: paged_varlen_reference(*varlen, scale=0.25, **kw)}
    for name, call in calls.items():
        with pytest.raises(ConfigError, match=rf"^{name}: softcap=-1.0 must be >= 0 \(0 = no capping\)$"):
            call(softcap=-1.0)
        with pytest.raises(ConfigError, match=rf"^{name}: window=-1 must be >= 0 \(0 = no window\)$"):
            call(window=-1)
        call(softcap=0.0, window=0)  # (off, as before)
    q = torch.randn(1, 2, 3, 8)
    for name, call in (("math_attention", math_attention), ("attention", attention)):
        with pytest.raises(ConfigError, match=rf"^{name}: softcap=-30.0 must be >= 0 \(0 = no capping\)$"):
            call(q, q, q, "causal", scale=0.35, softcap=-30.0)


def test_one_ampere_check_for_every_triton_path(monkeypatch):
    """The kernel step, the training kernels and FlashAttention each had their own compute-capability check and
    wording; kernels.decode.pre_ampere is the one they call."""
    import torch

    from lmforge.kernels.decode import pre_ampere

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert pre_ampere("cuda:0") == "needs a GPU of compute capability >= 8.0 (Ampere), and Tesla T4 has 7.5"
    assert pre_ampere("cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert pre_ampere("cuda:0") is None
