"""Batch-1 decode kernels (lmforge/kernels/decode.py) against their plain references. Without a GPU they
run in Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import pytest
import torch

from lmforge.kernels import decode as kd

pytestmark = pytest.mark.skipif(not kd.available("cuda" if torch.cuda.is_available() else "cpu"),
                                reason="needs triton (the `kernels` extra): a GPU, or TRITON_INTERPRET=1 on CPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# ragged K (40 = 2.5 tiles of 16); whole tiles; ragged rows and K (88 = 5.5 tiles; one 128-wide masked tile)
@pytest.mark.parametrize("N,K", [(24, 40), (32, 64), (37, 88)])
@pytest.mark.parametrize("norm,glu,residual", [(False, False, False), (True, False, False), (True, True, False),
                                               (False, False, True)])
def test_gemv_matches_reference(N, K, norm, glu, residual):
    g = torch.Generator().manual_seed(N * K)
    x = torch.randn(K, generator=g).to(DEV)
    w = (torch.randn(2 * N if glu else N, K, generator=g) / K ** 0.5).to(DEV)
    gain = (1 + 0.1 * torch.randn(K, generator=g)).to(DEV) if norm else None
    r = torch.randn(N, generator=g).to(DEV) if residual else None
    want = kd.gemv_ref(x, w, norm=gain, glu=glu, residual=r)
    # a tile narrower than K (several loop steps, prefetched one ahead), one wider; prefetch off
    for config, prefetch in (((8, 16, 4), True), ((4, 1024, 4), True), ((8, 16, 4), False)):
        got = kd.gemv(x, w, norm=gain, glu=glu, residual=r.clone() if r is not None else None, config=config,
                      prefetch=prefetch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if glu:  # gate and up as two separate tensors (a model's unfused projections)
        gate, up = (t.clone() for t in w.chunk(2))
        torch.testing.assert_close(kd.gemv(x, gate, up=up, norm=gain, glu=True, config=(8, 16, 4)), want,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_residual_in_place(dtype):
    """fp32 residual: split-K atomic accumulation (_gemv_add_kernel); bf16: the plain kernel's epilogue."""
    x, w = torch.randn(328, device=DEV), torch.randn(24, 328, device=DEV).to(dtype)
    r0 = torch.randn(24, device=DEV).to(dtype)
    want = kd.gemv_ref(x, w, residual=r0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding step of values ~20
    configs = [(4, 64, 4, 3), (8, 1024, 4, 1), (2, 128, 4, 2)] if dtype == torch.float32 else [(4, 64, 4)]
    for config in configs:  # K splits whose strides leave ragged tails; one tile; prefetch on and off
        for prefetch in (True, False):
            r = r0.clone()
            kd.gemv(x, w, residual=r, out=r, config=config, prefetch=prefetch)
            torch.testing.assert_close(r, want, atol=tol, rtol=tol)


def _static_and_paged(KV, hd, S, g):
    """The same keys in a static cache row (KV, S, hd) and in a shuffled paged pool (blocks of 16)."""
    static = [torch.randn(KV, S, hd, generator=g) for _ in range(2)]
    n_blocks = S // 16
    table = torch.randperm(n_blocks + 2, generator=g)[:n_blocks].to(torch.int32)[None]
    paged = []
    for t in static:
        pool = torch.randn(n_blocks + 2, 16, KV, hd, generator=g)
        pool[table[0].long()] = t.permute(1, 0, 2).reshape(n_blocks, 16, KV, hd)
        paged.append(pool)
    return static, paged, table


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("layout", ["static", "paged"])
def test_qkv_rope_matches_reference(pad, layout):
    """Static layout: the cache row seen as one block with permuted strides, left padding shifts RoPE
    positions; paged: the new k, v land in block table[pos // 16] at pos % 16."""
    from lmforge.model.layers.rope import RotaryEmbedding

    H, KV, hd, S, pos, d = 4, 2, 16, 48, 29, 32
    g = torch.Generator().manual_seed(pad)
    rope = RotaryEmbedding(hd, 10000.0, max_seq_len=S).to(DEV)
    x = torch.randn(d, generator=g).to(DEV)
    w = (torch.randn((H + 2 * KV) * hd, d, generator=g) / d ** 0.5).to(DEV)
    gain = (1 + 0.1 * torch.randn(d, generator=g)).to(DEV)
    static, paged, table = _static_and_paged(KV, hd, S, g)
    if layout == "static":
        caches = [t.to(DEV) for t in static]
        view = lambda t: t.permute(1, 0, 2)[None]  # noqa: E731
        table = torch.zeros(1, 1, dtype=torch.int32)
    else:
        caches, view = [t.to(DEV) for t in paged], (lambda t: t)  # noqa: E731
    table = table.to(DEV)
    ref = [t.clone() for t in caches]
    q_ref = kd.qkv_rope_ref(x, w, gain, 1e-5, rope.cos_table, rope.sin_table, pos, pad, H, KV, view(ref[0]),
                            view(ref[1]), table)
    parts = tuple(t.clone() for t in w.split([H * hd, KV * hd, KV * hd]))  # separate wq, wk, wv tensors
    for config, prefetch, weights in (((4, 16, 4), True, w), ((8, 64, 4), True, parts), ((2, 16, 4), False, w)):
        k, v = caches[0].clone(), caches[1].clone()
        ctx = torch.zeros(1, dtype=torch.int32, device=DEV)
        q = kd.qkv_rope(x, weights, gain, 1e-5, rope.cos_table, rope.sin_table, torch.tensor([pos], device=DEV), H, KV,
                        view(k), view(v), table, ctx, pad=torch.tensor([pad], device=DEV) if pad else None,
                        config=config, prefetch=prefetch)
        torch.testing.assert_close(q, q_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k, ref[0], atol=1e-5, rtol=1e-5)  # slot pos written, the rest untouched
        torch.testing.assert_close(v, ref[1], atol=1e-5, rtol=1e-5)
        assert int(ctx) == pos + 1


@pytest.mark.parametrize("fused", [False, True])
def test_qkv_rope_with_qk_norm_matches_reference_and_the_model(fused):
    """QK-norm (Qwen3): each q and k head RMS-normalised with its gain before RoPE, one program per head;
    the reference equals the model's own attention block's q and k (RMSNorm, projection, QK-norm, RoPE)."""
    from lmforge.model.config import ModelConfig
    from lmforge.model.layers.rope import RotaryEmbedding, apply_rope
    from lmforge.model.transformer import Transformer

    torch.manual_seed(0)
    H, KV, hd, d, S, pos = 4, 2, 16, 32, 32, 11
    model = Transformer(ModelConfig(vocab_size=64, d_model=d, n_layers=1, n_heads=H, n_kv_heads=KV, head_dim=hd,
                                    qk_norm=True, max_seq_len=S))
    block, attn = model.blocks[0], model.blocks[0].attn
    with torch.no_grad():
        for g in (attn.q_norm.weight, attn.k_norm.weight, block.norm1.weight):
            g.normal_(1.0, 0.2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(d, generator=g)
    qk = (attn.q_norm.weight.detach(), attn.k_norm.weight.detach(), attn.q_norm.eps)
    w = torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]).detach()
    rope = RotaryEmbedding(hd, 10000.0, max_seq_len=S)
    static, paged, table = _static_and_paged(KV, hd, S, g)
    ref = [t.clone() for t in paged]
    q_ref = kd.qkv_rope_ref(x, w, block.norm1.weight.detach(), block.norm1.eps, rope.cos_table, rope.sin_table, pos, 0,
                            H, KV, ref[0], ref[1], table, qk_norm=qk)
    with torch.no_grad():  # the model's own path for the query: norm1, wq, q_norm, RoPE
        h = block.norm1(x[None, None])
        q_model = attn.q_norm(attn.wq(h).view(1, 1, H, hd)).transpose(1, 2)
        cos, sin = rope.cos_sin(torch.tensor([[pos]]))
        q_model = apply_rope(q_model, cos, sin).view(H, hd)
    torch.testing.assert_close(q_ref, q_model, atol=1e-5, rtol=1e-5)
    weights = w if fused else tuple(t.clone() for t in w.split([H * hd, KV * hd, KV * hd]))
    k, v = (t.clone().to(DEV) for t in paged)
    ctx = torch.zeros(1, dtype=torch.int32, device=DEV)
    key = kd.qkv_rope_key(H, KV, hd, d, w.dtype, qk_norm=True)
    assert key[-1] == "qk_norm" and all(c[0] == hd // 2 for c in kd.candidates(key))
    q = kd.qkv_rope(x.to(DEV), tuple(t.to(DEV) for t in weights) if not fused else weights.to(DEV),
                    block.norm1.weight.detach().to(DEV), block.norm1.eps, rope.cos_table.to(DEV),
                    rope.sin_table.to(DEV), torch.tensor([pos], device=DEV), H, KV, k, v, table.to(DEV), ctx,
                    qk_norm=tuple(t.to(DEV) if torch.is_tensor(t) else t for t in qk), config=(hd // 2, 16, 4))
    torch.testing.assert_close(q.cpu(), q_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.cpu(), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v.cpu(), ref[1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one program per head: BLOCK_N = 8"):
        kd.qkv_rope(x.to(DEV), w.to(DEV), block.norm1.weight.detach().to(DEV), block.norm1.eps, rope.cos_table.to(DEV),
                    rope.sin_table.to(DEV), torch.tensor([pos], device=DEV), H, KV, k, v, table.to(DEV), ctx,
                    qk_norm=tuple(t.to(DEV) if torch.is_tensor(t) else t for t in qk), config=(4, 16, 4))


def test_rope_cache_reference_equals_the_model_rope():
    """The reference rotation is the model's own apply_rope at position pos - pad."""
    from lmforge.model.layers.rope import RotaryEmbedding, apply_rope

    H, KV, hd = 4, 2, 8
    rope = RotaryEmbedding(hd, 500.0, max_seq_len=16)
    qkv = torch.randn((H + 2 * KV) * hd)
    k, v = torch.zeros(1, 16, KV, hd), torch.zeros(1, 16, KV, hd)
    q = kd.rope_cache_ref(qkv, rope.cos_table, rope.sin_table, 9, 2, H, KV, k, v, torch.zeros(1, 1, dtype=torch.int32))
    cos, sin = rope.cos_sin(torch.tensor([[7]]))
    want = apply_rope(qkv[: H * hd].view(1, H, 1, hd), cos, sin)  # (B, H, T, hd)
    torch.testing.assert_close(q, want.view(H, hd), atol=1e-6, rtol=1e-6)


def test_embed_and_bump():
    emb = torch.randn(11, 24, device=DEV)
    out = torch.zeros(24, device=DEV)
    counters = torch.arange(1, 9, dtype=torch.int32, device=DEV)
    kd.embed(torch.tensor([7], device=DEV), emb, out, zero=counters)
    torch.testing.assert_close(out, emb[7])
    assert counters.tolist() == [0] * 8  # the step's grid-barrier counters, reset by the same launch
    with pytest.raises(ValueError, match="power-of-two"):
        kd.embed(torch.tensor([7], device=DEV), emb, out, zero=counters[:6])
    pos = torch.tensor([5], device=DEV)
    x, w = torch.randn(24, device=DEV), torch.randn(9, 24, device=DEV)
    torch.testing.assert_close(kd.gemv(x, w, bump=pos), kd.gemv_ref(x, w), atol=1e-5, rtol=1e-5)
    assert int(pos) == 6  # incremented once, whatever the number of programs


def test_kernel_configs_round_trip_and_cache_path(tmp_path, monkeypatch):
    from lmforge.errors import ConfigError
    from lmforge.kernels.tuning import KernelConfigs, cache_path

    monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(tmp_path))
    key = kd.add_key(2048, 5632, torch.bfloat16)
    c = KernelConfigs(gpu="NVIDIA H200", model="llama-d2048").with_config(key, (4, 512, 4, 2))
    assert c.get(key) == (4, 512, 4, 2) and c.get(kd.add_key(1, 2, torch.bfloat16)) is None
    path = c.save()
    assert path == cache_path("NVIDIA H200", "llama-d2048") and path.parent == tmp_path
    assert KernelConfigs.cached("NVIDIA H200", "llama-d2048") == c
    assert KernelConfigs.cached("NVIDIA H100 80GB HBM3", "llama-d2048") is None  # per GPU model
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="delete it"):
        KernelConfigs.cached("NVIDIA H200", "llama-d2048")
    for bad in ((0, 4), (4, -1), (), (4, 2.0)):
        with pytest.raises(ConfigError, match="non-negative ints, the first positive"):
            KernelConfigs(table={"k": bad})
    akey = kd.attend_key(32, 4, 64)  # a 0 after the first entry is a flag's value: paged attention's "grouped"
    assert KernelConfigs().with_config(akey, (1, 512, 8, 0, 1)).get(akey) == (1, 512, 8, 0, 1)
    # every candidate the tuner may pick is an entry a set can hold (a 0 once failed a GPU run mid-tune)
    keys = [kd.gemv_key(5632, 2048, glu=True, norm=True, dtype=torch.bfloat16), kd.add_key(2048, 5632, torch.bfloat16),
            kd.qkv_rope_key(32, 4, 64, 2048, torch.bfloat16), kd.qkv_rope_key(16, 8, 128, 1024, torch.bfloat16, True),
            kd.attend_key(32, 4, 64)]
    for key in keys:
        for cand in kd.candidates(key):
            assert KernelConfigs().with_config(key, cand).get(key) == cand



def test_kernel_configs_refuse_a_file_in_another_format(tmp_path):
    """A dict without "configs", or with keys beside gpu/model/configs (the first tuner's flat {shape key: config}
    files, e.g. the old bench/configs/h100_kernel_decode_1b.json), is refused with the file named: it used to load
    as an empty set, and the step ran on default block shapes without a word."""
    import json

    from lmforge.errors import ConfigError
    from lmforge.kernels.tuning import KernelConfigs

    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({repr(kd.add_key(2048, 2048, torch.bfloat16)): [4, 256, 4, 4],
                                "('attend', 32, 4, 64, 400)": [32, 16, 1]}))
    with pytest.raises(ConfigError, match=r"flat\.json is not a KernelConfigs set.*no 'configs'.*unknown keys.*; "
                                          r"delete it to tune again"):
        KernelConfigs.load(flat)
    for bad, match in (({"gpu": "x", "model": "y"}, "no 'configs'"),
                       ({"configs": {}, "tuned": 1}, "unknown keys tuned"),
                       ([1, 2], "got a JSON list"), ({"configs": [1]}, "'configs' must map")):
        with pytest.raises(ConfigError, match=match):
            KernelConfigs.from_json(bad)
    good = KernelConfigs(gpu="g", model="m").with_config(kd.add_key(1, 2, torch.bfloat16), (4, 256, 4, 4))
    assert KernelConfigs.from_json(good.to_json()) == good
    assert KernelConfigs.from_json({"configs": {}}) == KernelConfigs()  # gpu and model may be left out


def test_shipped_kernel_configs_serve_where_the_cache_has_none(tmp_path, monkeypatch):
    """A set shipped with lmforge (lmforge/kernels/configs/) is used when the cache has no file for that GPU
    and model shape; a cached file (a user's own tune) wins over it. The shipped H200 set is the 1.1B Llama
    shape's, every entry one of its kernel's candidates."""
    from lmforge.infer.kernel_step import model_signature
    from lmforge.kernels import tuning
    from lmforge.kernels.tuning import KernelConfigs
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    monkeypatch.setenv("LMFORGE_KERNEL_CACHE", str(tmp_path / "cache"))
    with torch.device("meta"):  # TinyLlama's shape, no memory
        llama = Transformer(ModelConfig(pos_emb="rope", norm="rmsnorm", activation="swiglu", d_model=2048, n_layers=22,
                                        n_heads=32, n_kv_heads=4, d_ff=5632, vocab_size=32000)).to(torch.bfloat16)
    sig = model_signature(llama)
    shipped = KernelConfigs.cached("NVIDIA H200", sig)
    assert shipped is not None and shipped.gpu == "NVIDIA H200" and shipped.model == sig
    candidates = {repr(k): kd.candidates(k) for k in (
        kd.qkv_rope_key(32, 4, 64, 2048, torch.bfloat16), kd.attend_key(32, 4, 64),
        kd.add_key(2048, 2048, torch.bfloat16),
        kd.gemv_key(5632, 2048, glu=True, norm=True, dtype=torch.bfloat16), kd.add_key(2048, 5632, torch.bfloat16),
        kd.gemv_key(32000, 2048, norm=True, dtype=torch.bfloat16))}
    assert set(shipped.table) == set(candidates)
    assert all(shipped.table[k] in candidates[k] for k in candidates)
    assert KernelConfigs.cached("NVIDIA H100 80GB HBM3", sig) is None  # nothing shipped for it
    own = shipped.with_config(kd.attend_key(32, 4, 64), (2, 64, 8))
    own.save()
    assert KernelConfigs.cached("NVIDIA H200", sig) == own  # the cache first
    monkeypatch.setattr(tuning, "SHIPPED_DIR", tmp_path / "none")
    assert KernelConfigs.cached("NVIDIA H200", sig + "-x") is None

def test_coordinate_descent_finds_the_separable_optimum():
    from lmforge.kernels.tuning import KernelConfigs, coordinate_descent

    space = {("a",): ((1,), (2,), (3,)), ("b",): ((5,), (7,))}
    cost = lambda c: abs(c.get(("a",))[0] - 2) if c.get(("a",)) else 9  # noqa: E731
    seconds = lambda c: cost(c) + (0 if c.get(("b",)) == (7,) else 1)  # noqa: E731
    tuned, best = coordinate_descent(KernelConfigs(), space, seconds)
    assert tuned.get(("a",)) == (2,) and tuned.get(("b",)) == (7,) and best[repr(("b",))] == 0
    never = lambda c: float("inf")  # noqa: E731  (no candidate can run: the set is kept)
    assert coordinate_descent(tuned, space, never)[0] == tuned


def compile_for_hopper() -> dict[str, tuple[int, int]]:
    """Compile every kernel (defaults and the shapes of a 1B Llama step) for sm_90 with Triton's own
    ptxas, no GPU needed; {name: (registers, spill bytes)}. Run without TRITON_INTERPRET (a subprocess)."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lmforge.kernels import paged_attention as pa

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

    def build(fn, types: dict, consts: dict, warps: int) -> tuple[int, int]:
        sig = {n: "constexpr" if n in consts else types.get(n, "*bf16" if n.endswith("_ptr") else "i32")
               for n in fn.arg_names}
        # what Triton's launcher specializes on at run time: pointers and integers that are multiples of 16
        # (every shape, stride and weight offset of a 1B Llama step is)
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                   if n not in consts and (sig[n].startswith("*") or n in ("N", "K", "u_off", "k_off", "v_off")
                                           or n.startswith("s_"))}
        src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()}, attrs=aligned)
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            usage = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
        regs, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups()
        return int(regs), int(stack)

    out = {}
    attn = {"bt_ptr": "*i32", "ctx_ptr": "*i64", "start_ptr": "*i64", "count_ptr": "*i32", "part_o_ptr": "*fp32",
            "part_ml_ptr": "*fp32", "scale": "fp32", "softcap": "fp32", "tstart_ptr": "*i64", "tbits_ptr": "*i64"}
    for early, (splits, block, warps), qpp in ((True, kd.ATTEND_CONFIGS[0], 8), (False, (4, 32, 8), 8),
                                               (True, kd.ATTEND_CONFIGS[2][:3], 1)):
        for opts in (dict(SOFTCAP=False, WINDOW=False, SINKS=False, START=False),
                     dict(SOFTCAP=True, WINDOW=True, SINKS=True, START=True)):
            out[f"attend early={early} qpp={qpp} {opts['SINKS']}"] = build(pa._paged_attend_kernel, attn, dict(
                GROUP=8, QPP=qpp, GP=16, HD=64 if early else 128, HDP=64 if early else 128, BS=16, BLOCK_S=block,
                SPLITS=splits, EARLY=early, F32=False, PRECISION="tf32", PDL=True, STAGES=0, TREE=False, **opts), warps)
    for splits, block, warps, _, stages in ((1, 64, 4, 0, 2), (1, 64, 8, 0, 3)):
        # default_config's two choices on an H100/H200 (Triton's software pipeline over the key tiles), for
        # Qwen3-0.6B's attention (2 query heads per kv head, head dim 128)
        out[f"attend pipelined {block}x{warps} stages={stages}"] = build(pa._paged_attend_kernel, attn, dict(
            GROUP=2, QPP=2, GP=16, HD=128, HDP=128, BS=16, BLOCK_S=block, SPLITS=splits, EARLY=False, F32=False,
            PRECISION="tf32", PDL=True, STAGES=stages, SOFTCAP=False, WINDOW=False, SINKS=False, START=False,
            TREE=False), warps)
    bn, bk, warps = kd.GEMV_CONFIGS[0]
    for glu in (False, True):
        out[f"gemv glu={glu}"] = build(kd._gemv_kernel, {"x_ptr": "*fp32", "r_ptr": "*fp32", "bump_ptr": "*i64",
                                                        "eps": "fp32"},
                                       dict(NORM=True, GLU=glu, RESIDUAL=not glu, BUMP=not glu, BLOCK_N=bn, BLOCK_K=bk,
                                            PREFETCH=True, EVICT="evict_first", PDL=True), warps)
    bn, bk, warps, sk = kd.ADD_CONFIGS[0]
    out["add"] = build(kd._gemv_add_kernel, {"out_ptr": "*fp32"},
                       dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, PREFETCH=True, EVICT="evict_first", PDL=True), warps)
    bn, bk, warps = kd.GEMV_CONFIGS[0]
    out["qkv_rope"] = build(kd._qkv_rope_kernel, {"x_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                                                  "pos_ptr": "*i64", "pad_ptr": "*i64", "bt_ptr": "*i32",
                                                  "ctx_ptr": "*i32", "eps": "fp32"},
                            dict(HD=64, BS=16, PAD=True, QK_NORM=False, BLOCK_N=bn, BLOCK_K=bk, PREFETCH=True,
                                 EVICT="evict_first", PDL=True), warps)
    bk, warps = kd.QK_NORM_TILES[0]  # Qwen3-0.6B's head dim: one program per head, 64 rows per half
    out["qkv_rope qk_norm"] = build(kd._qkv_rope_kernel, {"x_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32",
                                                          "pos_ptr": "*i64", "pad_ptr": "*i64", "bt_ptr": "*i32",
                                                          "ctx_ptr": "*i32", "eps": "fp32", "qk_eps": "fp32"},
                                    dict(HD=128, BS=16, PAD=False, QK_NORM=True, BLOCK_N=64, BLOCK_K=bk, PREFETCH=True,
                                         EVICT="evict_first", PDL=True), warps)
    from lmforge.kernels import decode_layer as dl

    for config in dl.LAYER_CONFIGS[:1]:  # the persistent layer at a 1B Llama's shape, every phase and barrier
        bq, bo, bg, bd, bk, splits, block, warps, _, stages, _ = config
        out[f"layer {config}"] = build(dl._layer_kernel, {
            "x_ptr": "*fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64", "bt_ptr": "*i32",
            "part_o_ptr": "*fp32", "part_ml_ptr": "*fp32", "count_ptr": "*i32", "sync_ptr": "*i32",
            "sinks_ptr": "*fp32", "eps": "fp32", "scale": "fp32", "softcap": "fp32"}, dict(
            D=2048, DP=2048, FF=5632, HD=64, HDP=64, OK=2048, BS=16, BN_QKV=bq, BN_O=bo, BN_GU=bg,
            BN_DOWN=bd, BK=bk, SPLITS=splits, BLOCK_S=block, QPP=1, GP=16, STAGES=0 if stages == 1 else stages,
            SOFTCAP=False, WINDOW=False, SINKS=False, F32=False, PRECISION="tf32", PHASE=-1, EVICT="evict_first",
            PDL=True), warps)
    out["embed"] = build(kd._embed_kernel, {"ids_ptr": "*i64", "out_ptr": "*fp32", "zero_ptr": "*i32"},
                         dict(BLOCK=2048, NZERO=32, PDL=True), 4)
    return out


def test_kernels_compile_for_hopper_without_spills():
    """The interpreter runs a kernel as Python and misses what only the compiler checks (a name given two
    types in different branches broke a GPU run once); compile every kernel for sm_90 in a subprocess
    without TRITON_INTERPRET, and check the default configurations fit in registers."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia.compiler")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    code = "import json; from tests.kernels.test_decode_kernels import compile_for_hopper as c; print(json.dumps(c()))"
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if run.returncode and "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("Triton's ptxas is not available")
    assert run.returncode == 0, run.stderr[-3000:]
    usage = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(usage) == 15 and all(spill == 0 for _, spill in usage.values()), usage
