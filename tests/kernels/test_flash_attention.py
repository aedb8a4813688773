"""FlashAttention-2 (lmforge/kernels/flash_attention.py) and its tiled PyTorch reference against the plain
math attention (fp32). Without a GPU the kernels run in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), at small shapes in fp32; the `gpu` tests run bf16/fp16 at real sizes."""

from __future__ import annotations

import warnings

import pytest
import torch

from lmforge.errors import ConfigError, LmforgeError
from lmforge.kernels import decode
from lmforge.kernels import flash_attention as fa
from lmforge.kernels.flash_reference import flash_attention_ref, flash_attention_ref_backward, visible
from lmforge.model.layers.attention import math_attention
from lmforge.model.meta import AttnMetadata, cu_seqlens_from_doc_ids

needs_triton = pytest.mark.skipif(fa.triton is None or (not torch.cuda.is_available() and not fa.interpreting()),
                                  reason="needs triton (the `kernels` extra): a GPU, or TRITON_INTERPRET=1 on CPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 inputs: exact dots in the interpreter, tf32 tensor-core dots on a GPU
TOL_OUT, TOL_GRAD = (2e-5, 5e-5) if DEV == "cpu" else (5e-3, 1e-2)


@pytest.fixture(autouse=True)
def fresh_notices():
    """The fallback notice is once per reason: forget the ones an earlier test gave."""
    decode.fallback_notice.__wrapped__.cache_clear()


def _inputs(B, H, KV, N, hd, dtype=torch.float32, device=DEV, seed=0, heads_inner=False):
    g = torch.Generator().manual_seed(seed)
    if heads_inner:  # (B, N, H, hd) transposed: the model's layout after its projections
        q = torch.randn(B, N, H, hd, generator=g).transpose(1, 2)
    else:
        q = torch.randn(B, H, N, hd, generator=g)
    k, v = torch.randn(B, KV, N, hd, generator=g), torch.randn(B, KV, N, hd, generator=g)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]


def _math(q, k, v, *, causal, window=0, softcap=0.0, scale=None, doc_ids=None):
    """The plain formula (fp32 inside) as fp64, with the layer's masks built the ordinary way (bool tensors)."""
    N = q.shape[2]
    mask = "causal" if causal else None
    if doc_ids is not None:
        mask = AttnMetadata.packed(doc_ids).doc_mask()
    if window > 0:
        pos = torch.arange(N, device=q.device)
        mask = visible(pos, pos, True, window) & (mask if doc_ids is not None else True)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return math_attention(q.double(), k.double(), v.double(), mask, scale=scale, softcap=softcap).double()


def _grads(out, inputs, do):
    return torch.autograd.grad(out, inputs, do.to(out.dtype))


def _assert_matches(got, want, inputs, tol_out=TOL_OUT, tol_grad=TOL_GRAD):
    """Outputs, then gradients for one random dO, each relative to its largest value (dK, dV of GQA
    sum over query heads)."""
    torch.testing.assert_close(got.double(), want, atol=tol_out, rtol=tol_out)
    do = torch.randn_like(got).double()  # got's layout: TMA reads dO in the same memory order as q
    for g, w in zip(_grads(got, inputs, do), _grads(want, inputs, do)):
        top = max(w.abs().max().item(), 1.0)
        torch.testing.assert_close(g.double() / top, w.double() / top, atol=tol_grad, rtol=tol_grad)


# (B, H, KV, N, causal, window, softcap): MHA non-causal; GQA causal over partial tiles; MQA with a
# window narrower than a tile; soft-capping
CASES = [(2, 2, 2, 48, False, 0, 0.0), (1, 4, 2, 70, True, 0, 0.0), (1, 3, 1, 77, True, 20, 0.0),
         (1, 2, 1, 50, True, 0, 4.0)]


@needs_triton
@pytest.mark.parametrize("B,H,KV,N,causal,window,softcap,dq_mode,tma", [c + ("kernel", False) for c in CASES]
                         + [CASES[1] + ("atomic", True), CASES[2] + ("atomic", False), CASES[3] + ("kernel", True)])
def test_kernel_outputs_and_gradients_match_math(B, H, KV, N, causal, window, softcap, dq_mode, tma):
    """Every variant; `tma` runs the tile loads through tensor descriptors (Hopper's TMA on a GPU)."""
    q, k, v = _inputs(B, H, KV, N, 64, heads_inner=causal, seed=N)
    want = _math(q, k, v, causal=causal, window=window, softcap=softcap, scale=0.2)
    got = fa.flash_attention(q, k, v, causal=causal, window=window, softcap=softcap, scale=0.2, dq_mode=dq_mode,
                             tma=tma)
    _assert_matches(got, want, (q, k, v))


@needs_triton
def test_packed_documents_match_per_document_masks():
    """cu_seqlens over two rows: documents of 13, 20 and 7 tokens, then one of 40, with a sliding window;
    equal to the math attention under the model's own packed-document mask."""
    doc_ids = torch.tensor([[0] * 13 + [1] * 20 + [2] * 7, [0] * 40], device=DEV)
    q, k, v = _inputs(2, 2, 1, 40, 64, heads_inner=True)
    want = _math(q, k, v, causal=True, window=6, doc_ids=doc_ids)
    meta = AttnMetadata.packed(doc_ids)
    got = fa.flash_attention_for_model(q, k, v, "causal", scale=64 ** -0.5, window=6, documents=meta.documents())
    cu, longest = meta.documents()
    assert cu.tolist() == [0, 13, 33, 40, 80] and longest == 40 and meta.documents()[0] is cu  # once per forward
    _assert_matches(got, want, (q, k, v))
    tiled = fa.flash_attention(q, k, v, scale=64 ** -0.5, window=6, cu_seqlens=cu, tma=True)  # reads past documents
    _assert_matches(tiled, _math(q, k, v, causal=True, window=6, doc_ids=doc_ids), (q, k, v))


@needs_triton
@pytest.mark.parametrize("window,softcap,sinks", [(0, 0.0, False), (6, 3.0, False), (0, 0.0, True)])
def test_key_lengths_put_queries_at_the_end_of_their_keys(window, softcap, sinks):
    """cu_seqlens_k (chunked prefill over cached contexts): document i's queries are the last of its keys,
    bottom-right causal; a whole prompt (5 of 5), a decode-like single query (1 of 30), a chunk (20 of
    45) - equal to the math attention per document with `visible` at those positions."""
    qlens, klens = [5, 1, 20, 7], [5, 30, 45, 7]
    q, k, v = (t.detach() for t in _inputs(1, 4, 2, sum(klens), 64))
    q = q[:, :, :sum(qlens)]
    sink = torch.randn(4, device=DEV) if sinks else None
    cu_q, cu_k = (torch.tensor([0, *n]).cumsum(0).to(DEV) for n in (qlens, klens))
    with torch.no_grad():
        got = fa.flash_attention(q, k, v, scale=0.3, window=window, softcap=softcap, cu_seqlens=cu_q,
                                 cu_seqlens_k=cu_k, sinks=sink)
    want = []
    for i, (nq, nk) in enumerate(zip(qlens, klens)):
        ks = slice(int(cu_k[i]), int(cu_k[i + 1]))
        mask = visible(torch.arange(nk - nq, nk, device=DEV), torch.arange(nk, device=DEV), True, window)
        want.append(math_attention(q[:, :, int(cu_q[i]):int(cu_q[i + 1])].double(), k[:, :, ks].double(),
                                   v[:, :, ks].double(), mask, scale=0.3, softcap=softcap, sinks=sink))
    torch.testing.assert_close(got.double(), torch.cat(want, 2), atol=TOL_OUT, rtol=TOL_OUT)
    with pytest.raises(ConfigError, match="cu_seqlens_k must rise"):
        fa.flash_attention(q, k, v, cu_seqlens=cu_q, cu_seqlens_k=cu_k.flip(0))
    with pytest.raises(ConfigError, match="forward only"):
        fa.flash_attention(q.requires_grad_(), k, v, cu_seqlens=cu_q, cu_seqlens_k=cu_k)


@needs_triton
def test_bf16_matches_math():
    """bf16 inputs (the training dtype), packed documents with an empty and a 1-token one, a window and GQA:
    outputs and gradients in bf16 within bf16's rounding of the fp32 math (in Triton's interpreter, whose
    bf16 tl.dot multiplies raw bits, through the fp32 kernels)."""
    q, k, v = _inputs(1, 4, 2, 30, 64, dtype=torch.bfloat16, heads_inner=True)
    doc_ids = torch.tensor([[0] + [1] * 12 + [2] * 17], device=DEV)
    want = _math(q, k, v, causal=True, window=7, softcap=8.0, scale=0.2, doc_ids=doc_ids)
    got = fa.flash_attention(q, k, v, window=7, softcap=8.0, scale=0.2,
                             cu_seqlens=torch.tensor([0, 0, 1, 13, 30], device=DEV))
    assert got.dtype == torch.bfloat16
    _assert_matches(got, want, (q, k, v), tol_out=2e-2, tol_grad=3e-2)


@needs_triton
def test_sinks_outputs_and_gradients_match_math():
    """Learned sinks (gpt-oss) start the online softmax; their gradient -Σ e^(sink - L) D is checked too."""
    q, k, v = _inputs(1, 4, 2, 40, 64, heads_inner=True)
    sinks = torch.randn(4, device=DEV, requires_grad=True)
    want = math_attention(q.double(), k.double(), v.double(), "causal", scale=0.2, sinks=sinks.double())
    got = fa.flash_attention(q, k, v, scale=0.2, sinks=sinks)
    _assert_matches(got, want, (q, k, v, sinks))


@needs_triton
def test_saves_only_inputs_output_and_logsumexp():
    q, k, v = _inputs(1, 2, 1, 40, 64)
    out = fa.flash_attention(q, k, v, causal=True)
    saved = out.grad_fn.saved_tensors
    assert [t.data_ptr() for t in saved[:4]] == [t.data_ptr() for t in (q, k, v, out)] and len(saved) == 5
    lse = saved[4]  # (B, H, N) fp32: logsumexp of each query's scaled, masked scores - nothing N × N
    assert lse.shape == (1, 2, 40) and lse.dtype == torch.float32
    s = (q.double() @ k.double().transpose(-1, -2)) * 64 ** -0.5
    s = s.masked_fill(~torch.ones(40, 40, dtype=torch.bool, device=DEV).tril(), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=TOL_OUT, rtol=TOL_OUT)


@pytest.mark.parametrize("causal,window,softcap,blocks", [(True, 0, 0.0, (16, 16)), (False, 0, 3.0, (32, 8)),
                                                          (True, 9, 0.0, (8, 32))])
def test_tiled_reference_matches_math(causal, window, softcap, blocks):
    """The PyTorch tiled algorithm (forward and Algorithm 2), GQA with packed documents."""
    q, k, v = _inputs(2, 4, 2, 37, 8, device="cpu")
    doc_ids = torch.tensor([[0] * 20 + [1] * 17, [0] * 37])
    cu = cu_seqlens_from_doc_ids(doc_ids) if causal else None
    want = _math(q, k, v, causal=causal, window=window, softcap=softcap, doc_ids=doc_ids if causal else None)
    o, lse = flash_attention_ref(q.detach(), k.detach(), v.detach(), causal=causal, window=window,
                                 softcap=softcap, cu_seqlens=cu, block_m=blocks[0], block_n=blocks[1])
    torch.testing.assert_close(o.double(), want, atol=1e-6, rtol=1e-5)
    do = torch.randn_like(want)
    got = flash_attention_ref_backward(do, q.detach(), k.detach(), v.detach(), o, lse, causal=causal, window=window,
                                       softcap=softcap, cu_seqlens=cu, block_m=blocks[1], block_n=blocks[0])
    for g, w in zip(got, _grads(want, (q, k, v), do)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_tiled_reference_skips_empty_documents():
    """Empty documents in cu_seqlens, one at the very end (starting at B·N, past the last row: it raised an
    IndexError), give the per-document math attention."""
    q, k, v = _inputs(2, 2, 1, 12, 8, device="cpu")
    cu = torch.tensor([0, 5, 5, 12, 24, 24])
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [2] * 12])
    want = _math(q, k, v, causal=True, doc_ids=doc_ids)
    o, lse = flash_attention_ref(q.detach(), k.detach(), v.detach(), cu_seqlens=cu, block_m=4, block_n=4)
    torch.testing.assert_close(o.double(), want, atol=1e-6, rtol=1e-5)
    do = torch.randn_like(want)
    got = flash_attention_ref_backward(do, q.detach(), k.detach(), v.detach(), o, lse, cu_seqlens=cu, block_m=4,
                                       block_n=4)
    for g, w in zip(got, _grads(want, (q, k, v), do)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("hd,dtype,match", [(96, torch.float32, "head dims"), (64, torch.float64, "dtype")])
def test_unsupported_inputs_raise_one_line_or_fall_back(hd, dtype, match):
    """The fallback's notice says what it does once, not "use attn_impl='sdpa'; using attn_impl='sdpa'"."""
    q, k, v = _inputs(1, 2, 2, 8, hd, dtype=dtype)
    with pytest.raises(LmforgeError, match=match) as err:
        fa.flash_attention(q, k, v)
    assert "\n" not in str(err.value)
    with pytest.warns(UserWarning, match=match) as rec:
        got = fa.flash_attention_for_model(q, k, v, "causal", scale=0.3)
    assert [str(r.message).count("attn_impl='sdpa'") for r in rec] == [1]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(got, want)


@needs_triton
def test_fallback_keeps_packed_documents_apart():
    """attn_impl='triton' on packed rows where the kernel cannot run (head dim 96): the SDPA fallback attends
    within each document (and the window), as the kernel would - not across documents with plain causal."""
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [2] * 12], device=DEV)
    q, k, v = (t.detach() for t in _inputs(2, 2, 2, 12, 96))
    with pytest.warns(UserWarning, match="got 96"):
        got = fa.flash_attention_for_model(q, k, v, "causal", scale=0.3, window=4,
                                           documents=(cu_seqlens_from_doc_ids(doc_ids), 12))
    torch.testing.assert_close(got.double(), _math(q, k, v, causal=True, window=4, scale=0.3, doc_ids=doc_ids),
                               atol=TOL_OUT, rtol=TOL_OUT)
    assert fa._doc_ids(torch.tensor([0, 0, 1, 1, 4]), 1, 4).tolist() == [[1, 3, 3, 3]]  # empty documents own nothing


def test_fallback_takes_the_packed_mask_the_metadata_keeps(monkeypatch):
    """The layers of one forward share an AttnMetadata, whose doc_mask() is built once: the SDPA fallback takes it
    from there (it rebuilt the (B, 1, T, T) mask from cu_seqlens at every layer), and equals the math reference."""
    built = []
    doc_ids_of = fa._doc_ids
    monkeypatch.setattr(fa, "_doc_ids", lambda *a: built.append(a[1:]) or doc_ids_of(*a))
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [2] * 12])
    q, k, v = (t.detach() for t in _inputs(2, 2, 2, 12, 96))  # head dim 96: the kernel cannot run
    want = _math(q, k, v, causal=True, window=0, scale=0.3, doc_ids=doc_ids)
    meta = AttnMetadata.packed(doc_ids)
    masks = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for layer in range(3):
            got = fa.flash_attention_for_model(q, k, v, "causal", scale=0.3, documents=meta.documents(),
                                               doc_mask=lambda: masks.append(1) or meta.doc_mask())
            torch.testing.assert_close(got.double(), want, atol=TOL_OUT, rtol=TOL_OUT)
        assert built == [] and len(masks) == 3
        assert meta.doc_mask() is meta.doc_mask()  # (one tensor for the forward)
        # without the metadata's: rebuilt from cu_seqlens, same values
        got = fa.flash_attention_for_model(q, k, v, "causal", scale=0.3, documents=meta.documents())
    torch.testing.assert_close(got.double(), want, atol=TOL_OUT, rtol=TOL_OUT)
    assert built == [(2, 12)]
    assert ["got 96" in str(w.message) for w in seen] == [True]  # the fallback said once, not at every layer


@needs_triton
def test_model_entry_point_matches_the_layer_attention():
    """flash_attention_for_model is what attn_impl='triton' calls: all keys visible (mask None) runs the
    kernel; a cache (fewer queries than keys) falls back to SDPA with a warning; both equal attention()."""
    from lmforge.model.layers.attention import attention

    q, k, v = _inputs(1, 4, 2, 24, 64)
    got = fa.flash_attention_for_model(q, k, v, None, scale=0.3, softcap=2.0)
    assert got.grad_fn is not None and type(got.grad_fn).__name__ == "FlashAttentionBackward"
    want = attention(q, k, v, None, scale=0.3, softcap=2.0, impl="math")
    torch.testing.assert_close(got, want, atol=TOL_OUT, rtol=TOL_OUT)
    with pytest.warns(UserWarning, match="as many queries as keys"):
        got = fa.flash_attention_for_model(q[:, :, -3:], k, v, "causal", scale=0.3)
    torch.testing.assert_close(got, attention(q[:, :, -3:], k, v, "causal", scale=0.3, impl="math"),
                               atol=TOL_OUT, rtol=TOL_OUT)
    with warnings.catch_warnings():  # once: not again at every layer and step (another length here)
        warnings.simplefilter("error")
        fa.flash_attention_for_model(q[:, :, -2:], k, v, "causal", scale=0.3)


@needs_triton
def test_query_and_key_head_dims_must_agree():
    """q of hd 128 over k, v of hd 64 read past each key row (hd 64 over 128: half of it): refused in one line."""
    q, k, v = _inputs(1, 2, 2, 16, 128)
    for qq, kk, vv in ((q, k[..., :64], v[..., :64]), (q[..., :64], k, v)):
        with pytest.raises(LmforgeError, match="k, v \\(B, KV, N, hd\\)") as err:
            fa.flash_attention(qq, kk, vv)
        assert "\n" not in str(err.value)


@needs_triton
@pytest.mark.parametrize("cu,match", [([0, 5, 30], "rise from 0"), ([0, 12, 40], "crosses a row"),
                                      ([0, 20, 10, 40], "rise from 0")])
def test_bad_documents_are_named(cu, match):
    q, k, v = _inputs(2, 2, 2, 20, 64)
    with pytest.raises(ConfigError, match=match):
        fa.flash_attention(q, k, v, cu_seqlens=torch.tensor(cu))


@needs_triton
def test_a_negative_softcap_is_refused_naming_the_value():
    """The kernel caps only where softcap > 0: softcap=-30 ran with no capping, silently; the model config's error
    named neither the field nor the value."""
    from lmforge.model.config import ModelConfig

    q, k, v = _inputs(1, 2, 2, 8, 64)
    with pytest.raises(ConfigError, match=r"^flash_attention: softcap=-30.0 must be >= 0 \(0 = no capping\)$"):
        fa.flash_attention(q, k, v, softcap=-30.0)
    with pytest.raises(ConfigError, match=r"^model.logit_softcap must be >= 0 \(0 = no capping\), got -1.0$"):
        ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, logit_softcap=-1.0)


def test_without_a_gpu_or_interpreter_the_error_names_the_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _inputs(1, 2, 2, 8, 64, device="cpu")
    assert ("device cpu" if fa.triton is not None else "needs triton") in fa.unsupported(q, k, v)


def test_configs_fit_shared_memory_by_dtype():
    """The candidate lists are tuned for 2-byte dtypes and fit an H100/H200's 232,448 bytes as they are; in
    fp32 at hd 128 none of the forward's did (Triton's OutOfResources: 262,144 > 232,448 for (128, 64, 8, 3)
    on the H200), so their stages are lowered until the tiles fit."""
    limit = 232448
    assert fa.smem_bytes("fwd", (128, 64, 8, 3), 128, 4) == 262144
    for kind in ("fwd", "kv", "q"):
        for hd in fa.HEAD_DIMS:
            assert fa.fitting_configs(kind, hd, 2, limit) == list(fa.CONFIGS[kind][hd])
            fp32 = fa.fitting_configs(kind, hd, 4, limit)
            assert fp32 and all(fa.smem_bytes(kind, c, hd, 4) <= limit for c in fp32)
            assert len(set(fp32)) == len(fp32)
            assert {c[:3] for c in fp32} <= {c[:3] for c in fa.CONFIGS[kind][hd]}
    assert fa.fitting_configs("fwd", 128, 4, limit)[0] == (128, 64, 8, 2)
    # a GPU too small for any candidate keeps the smallest one-stage one (and the caller's fallback)
    assert fa.fitting_configs("fwd", 128, 4, 1024) == [(64, 64, 4, 1)]


# GPU: bf16/fp16 at real sizes against the fp32 math attention -------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hd,dtype,causal,window,softcap,KV,tma", [
    (128, torch.bfloat16, True, 0, 0.0, 2, True), (64, torch.bfloat16, False, 0, 0.0, 8, False),
    (128, torch.float16, True, 256, 30.0, 1, True), (64, torch.float16, True, 0, 0.0, 8, False),
    (64, torch.bfloat16, True, 0, 0.0, 8, True)])
def test_gpu_kernel_matches_math(hd, dtype, causal, window, softcap, KV, tma):
    q, k, v = _inputs(2, 8, KV, 1000, hd, dtype=dtype, heads_inner=hd == 128)  # TMA descriptors of both layouts
    want = _math(q, k, v, causal=causal, window=window, softcap=softcap)
    got = fa.flash_attention(q, k, v, causal=causal, window=window, softcap=softcap, tma=tma)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    _assert_matches(got, want, (q, k, v), tol, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hd", fa.HEAD_DIMS)
def test_gpu_fp32_runs_the_kernel(hd):
    """fp32 (tf32 dots) at both head dims: the kernel runs (its configs fit shared memory) and matches."""
    q, k, v = _inputs(1, 4, 2, 700, hd, dtype=torch.float32)
    want = _math(q, k, v, causal=True)
    _assert_matches(fa.flash_attention(q, k, v), want, (q, k, v), 2e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_packed_documents():
    doc_ids = torch.repeat_interleave(torch.arange(7), torch.tensor([300, 1, 129, 570, 64, 900, 84])).view(2, 1024)
    q, k, v = _inputs(2, 4, 2, 1024, 128, dtype=torch.bfloat16, heads_inner=True)
    want = _math(q, k, v, causal=True, doc_ids=doc_ids.cuda())
    got = fa.flash_attention_for_model(q, k, v, "causal", scale=128 ** -0.5,
                                       documents=AttnMetadata.packed(doc_ids.cuda()).documents())
    _assert_matches(got, want, (q, k, v), 2e-2, 2e-2)
    got = fa.flash_attention(q, k, v, cu_seqlens=cu_seqlens_from_doc_ids(doc_ids.cuda()), tma=True)
    _assert_matches(got, _math(q, k, v, causal=True, doc_ids=doc_ids.cuda()), (q, k, v), 2e-2, 2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_key_lengths_and_sinks():
    """The engine's prefill shape: 40 chunks of 1-300 queries over 1-1300 keys, hd 128, bf16, with sinks
    and a window, against the fp32 math attention per chunk; then sinks' gradient at a training shape."""
    g = torch.Generator().manual_seed(5)
    qlens = torch.randint(1, 300, (40,), generator=g)
    klens = qlens + torch.randint(0, 1000, (40,), generator=g) * (torch.arange(40) % 2)
    q, k, v = (t.detach() for t in _inputs(1, 16, 2, int(klens.sum()), 128, dtype=torch.bfloat16))
    q = q[:, :, :int(qlens.sum())]
    sinks = torch.randn(16, device=DEV)
    cu_q, cu_k = (torch.cat((n.new_zeros(1), n.cumsum(0))).to(DEV) for n in (qlens, klens))
    with torch.no_grad():
        got = fa.flash_attention(q, k, v, window=256, cu_seqlens=cu_q, cu_seqlens_k=cu_k, sinks=sinks)
    for i in range(40):
        nq, nk = int(qlens[i]), int(klens[i])
        ks = slice(int(cu_k[i]), int(cu_k[i + 1]))
        mask = visible(torch.arange(nk - nq, nk, device=DEV), torch.arange(nk, device=DEV), True, 256)
        want = math_attention(q[:, :, int(cu_q[i]):int(cu_q[i + 1])].float(), k[:, :, ks].float(),
                              v[:, :, ks].float(), mask, scale=128 ** -0.5, sinks=sinks)
        torch.testing.assert_close(got[:, :, int(cu_q[i]):int(cu_q[i + 1])].float(), want, atol=2e-2, rtol=2e-2)
    q, k, v = _inputs(2, 8, 2, 1000, 64, dtype=torch.bfloat16)
    sinks = torch.randn(8, device=DEV, requires_grad=True)
    want = math_attention(q.float(), k.float(), v.float(), "causal", scale=0.125, sinks=sinks).double()
    _assert_matches(fa.flash_attention(q, k, v, scale=0.125, sinks=sinks), want, (q, k, v, sinks), 2e-2, 2e-2)
