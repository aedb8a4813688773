"""MLA's attention over the paged latent cache: the Triton kernel (lmforge/kernels/paged_latent.py) against the
engine's eager path before it (every decode row gathers its whole block table, then the model's absorbed math:
two batched products over the gathered latents), in one run on one GPU.

    python bench/paged_latent.py                   # H200: DeepSeek-V2-Lite's attention, batch 1-128, context 512-8192
    python bench/paged_latent.py --sweep           # and every configuration of SWEEP at each shape
    python bench/paged_latent.py --batches 0       # only the engine's fp32 kernel-vs-reference check (~1 min)
    TRITON_INTERPRET=1 python bench/paged_latent.py --smoke   # toy sizes on CPU: checks the script

Decode rows all at the full context, blocks of 16 handed out in shuffled order; 16 query heads, latent rank 512,
rope keys of 64, bf16. Reports microseconds per call (one layer), GB/s of latents read (B · context · (r + d_r) ·
2 bytes, what any exact kernel must read; the copy bandwidth for scale), and the largest difference from the
fp32 reference. A varlen section times a step holding one 512-token prompt chunk after 1,536 cached tokens beside
the decode rows (the mixed CUDA graphs' path). Last, the engine end to end (a 4-layer random model with that
attention, 32 x (512 + 128) tokens): first in fp32 (8 shorter prompts; greedy tokens and their log-probs, kernel
vs reference: the correctness check for LATENT_KERNEL_AUTO), then timed in bf16, the kernel vs the reference, CUDA
graphs on and off, tok/s and agreement of the first 4 greedy tokens. A variant is timed only if its output agrees
with the reference (max |x - ref| / max |ref| <= 1e-4 fp32, 3e-2 bf16: bench.common). --smoke on a CPU runs the
kernels in Triton's interpreter. Prints a table and writes JSON ($OUT/paged_latent.json, else bench/results/) after
every shape; exits non-zero if the kernel ran at no shape.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

if "--smoke" in sys.argv and not torch.cuda.is_available():  # read when lmforge.kernels defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from paged_attention import copy_bandwidth, shape_args, timed  # noqa: E402  (bench/paged_attention.py)

from bench.common import TOLERANCE, rel_err  # noqa: E402

from lmforge.kernels.paged_latent import (  # noqa: E402
    default_latent_config, paged_latent_attention, paged_latent_reference)

SWEEP = [(s, b, w, 16) for s in (1, 2, 4, 8, 16) for b in (16, 32, 64) for w in (4, 8)]
"""(slices, keys per tile, warps, heads per program) tried by --sweep"""


def gathered(q_lat, q_rope, c_cache, kr_cache, tables, ctx, scale):
    """The engine's eager decode path before the kernel (PagedLatentCache's reference, as the model's absorbed
    math): gather every row's whole table, one batched product for the scores and one for the output."""
    t = tables.long()
    c = c_cache[t].flatten(1, 2)  # (B, S, r)
    k = torch.cat((c, kr_cache[t].flatten(1, 2)), -1)  # (B, S, r + d_r)
    q = torch.cat((q_lat, q_rope), -1)  # (B, H, r + d_r)
    s = torch.bmm(q, k.transpose(1, 2)).float() * scale
    seen = torch.arange(k.shape[1], device=q.device)[None, None] < ctx.long()[:, None, None]
    p = s.masked_fill(~seen, float("-inf")).softmax(-1)
    return torch.bmm(p.to(c.dtype), c)


def pool(B: int, ctx: int, R: int, DR: int, bs: int, dev, dtype, g):
    blocks = -(-ctx // bs)
    perm = torch.randperm(B * blocks + 3, generator=g)
    tables = perm[:B * blocks].view(B, blocks).to(torch.int32)
    c = torch.randn(B * blocks + 3, bs, R, generator=g).to(dtype)
    kr = torch.randn(B * blocks + 3, bs, DR, generator=g).to(dtype)
    return c.to(dev), kr.to(dev), tables.to(dev)


def one_shape(B, ctx, H, R, DR, bs, dev, dtype, reps, sweep) -> list[dict]:
    g = torch.Generator().manual_seed(B * 7 + ctx)
    c, kr, tables = pool(B, ctx, R, DR, bs, dev, dtype, g)
    q_lat = torch.randn(B, H, R, generator=g).to(dtype).to(dev)
    q_rope = torch.randn(B, H, DR, generator=g).to(dtype).to(dev)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    scale = (128 + DR) ** -0.5
    want = paged_latent_reference(q_lat, q_rope, c, kr, tables, lens, scale=scale).float()
    read = B * ctx * (R + DR) * q_lat.element_size()
    rows = []
    default = default_latent_config(B, H, tables.shape[1] * bs, q_lat.device, R)
    variants = [("gathered (eager before)", lambda: gathered(q_lat, q_rope, c, kr, tables, lens, scale))]
    variants.append((f"kernel {default}", lambda: paged_latent_attention(q_lat, q_rope, c, kr, tables, lens,
                                                                        scale=scale)))
    for cfg in (SWEEP if sweep else []):
        if cfg != default:
            variants.append((f"kernel {cfg}", lambda cfg=cfg: paged_latent_attention(
                q_lat, q_rope, c, kr, tables, lens, scale=scale, config=cfg)))
    for name, fn in variants:
        row = dict(batch=B, context=ctx, variant=name)
        try:
            got = fn().float()
            row["err"] = (got - want).abs().max().item()
            if not rel_err(got, want) <= TOLERANCE[dtype]:  # a wrong answer's speed means nothing: not timed
                row["note"] = f"FAIL: max error {rel_err(got, want):.2g} of the largest value > {TOLERANCE[dtype]:g}"
                rows.append(row)
                continue
            sec = timed(fn, dev, reps)
            row.update(us=sec * 1e6, gbs=read / sec / 1e9)
        except Exception as e:  # noqa: BLE001 - a config that does not compile must not end the run
            row["note"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
        rows.append(row)
    return rows


def varlen_shape(B, H, R, DR, bs, dev, dtype, reps, prompt=512, cached=1536) -> list[dict]:
    """B decode rows at `cached` + 1 keys and one chunk of `prompt` tokens after `cached` keys, as one step."""
    g = torch.Generator().manual_seed(11)
    ctx = cached + prompt
    c, kr, tables = pool(B + 1, ctx, R, DR, bs, dev, dtype, g)
    N = B + prompt
    q_lat = torch.randn(N, H, R, generator=g).to(dtype).to(dev)
    q_rope = torch.randn(N, H, DR, generator=g).to(dtype).to(dev)
    cu = torch.tensor([*range(B + 1), N], dtype=torch.int32, device=dev)
    lens = torch.tensor([cached + 1] * B + [ctx], dtype=torch.int32, device=dev)
    scale = (128 + DR) ** -0.5
    kw = dict(scale=scale, cu_q=cu)
    want = paged_latent_reference(q_lat, q_rope, c, kr, tables, lens, **kw).float()
    rows = []
    for name, fn in (("varlen reference", lambda: paged_latent_reference(q_lat, q_rope, c, kr, tables, lens, **kw)),
                     ("varlen kernel", lambda: paged_latent_attention(q_lat, q_rope, c, kr, tables, lens, **kw))):
        row = dict(batch=B, context=ctx, variant=f"{name} ({B} decodes + {prompt}-token chunk)")
        try:
            got = fn().float()
            row["err"] = (got - want).abs().max().item()
            if not rel_err(got, want) <= TOLERANCE[dtype]:
                row["note"] = f"FAIL: max error {rel_err(got, want):.2g} of the largest value > {TOLERANCE[dtype]:g}"
                rows.append(row)
                continue
            row["us"] = timed(fn, dev, reps) * 1e6
        except Exception as e:  # noqa: BLE001
            row["note"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
        rows.append(row)
    return rows


def fp32_check(prompts: list[list[int]], new: int, model) -> dict:
    """The engine's correctness at these shapes in fp32, where kernel and reference agree to rounding: greedy
    tokens and their log-probs, latent kernel vs gathered reference, both on CUDA graphs (a random bf16 model's
    greedy paths part at its many near-ties, so the timed bf16 rows below compare only their first tokens)."""
    from lmforge.infer.engine import EngineConfig
    from lmforge.infer.llm import LLM
    from lmforge.infer.sampling import SamplingParams
    from lmforge.tokenizer.byte import ByteTokenizer

    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True, logprobs=0)
    outs = {}
    for attn in ("reference", "kernel"):
        llm = LLM(model, ByteTokenizer(), config=EngineConfig(decode_attention=attn, num_kv_tokens=4 * 4096))
        outs[attn] = llm.generate(prompts, sp)
        llm = None
    same = sum(a.token_ids == b.token_ids for a, b in zip(outs["reference"], outs["kernel"]))
    diff = max((abs(x - y) for a, b in zip(outs["reference"], outs["kernel"]) for x, y in zip(a.logprobs, b.logprobs)
                if a.token_ids == b.token_ids), default=float("nan"))  # nan: no output equal, nothing to compare
    return dict(batch=len(prompts), context=len(prompts[0]) + new, variant="engine fp32, kernel vs reference",
                note=f"{same}/{len(prompts)} greedy outputs equal; max |log-prob diff| {diff:.1e}")


def engine_rows(dev, smoke: bool, check_only: bool = False) -> list[dict]:
    """End to end: a random-init model with DeepSeek-V2-Lite's attention (d 2048, 16 heads, r 512, rope 64, nope
    128, v 128; 4 dense layers, bf16) decoding 32 prompts of 512 tokens x 128 new tokens through the engine, the
    latent kernel vs the gathered reference, with and without CUDA graphs (greedy tokens compared)."""
    import time

    from lmforge.infer.engine import EngineConfig
    from lmforge.infer.llm import LLM
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model.config import MLAConfig, ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.tokenizer.byte import ByteTokenizer

    if smoke:
        cfg = ModelConfig(vocab_size=257, d_model=64, n_layers=2, n_heads=4, attention="mla", max_seq_len=128,
                          mla=MLAConfig(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16))
        batch, prompt, new, dtype = 2, 20, 6, torch.float32
    else:
        cfg = ModelConfig(vocab_size=32000, d_model=2048, n_layers=4, n_heads=16, attention="mla", max_seq_len=4096,
                          mla=MLAConfig(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128))
        batch, prompt, new, dtype = 32, 512, 128, torch.bfloat16
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev, torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 257, (prompt,), generator=g).tolist() for _ in range(batch)]
    rows = [fp32_check([p[:prompt // 4] for p in prompts[:8]], new // 4, model)]
    print(rows[-1], flush=True)
    if check_only:
        return rows
    model = model.to(dtype)
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    want = None
    for attn in ("reference", "kernel"):
        for graphs in (False, True):
            row = dict(batch=batch, context=prompt + new, variant=f"engine, {attn}, graphs {'on' if graphs else 'off'}")
            try:
                # a pool for this workload only (an engine's default takes most of the free GPU memory, which the
                # next variant's engine would then lack)
                llm = LLM(model, ByteTokenizer(), config=EngineConfig(decode_attention=attn, cuda_graphs=graphs,
                                                                      num_kv_tokens=2 * batch * (prompt + new)))
                llm.generate(prompts[:2], sp)  # warm-up: compiles, captures
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                outs = llm.generate(prompts, sp)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                sec = time.perf_counter() - t0
                tokens = [o.token_ids for o in outs]
                want = want or tokens
                same = sum(a[:4] == b[:4] for a, b in zip(tokens, want))
                row.update(us=sec * 1e6, note=f"{batch * new / sec:,.0f} tok/s; {same}/{batch} outputs' first 4 "
                                              "greedy tokens equal the first row's")
            except Exception as e:  # noqa: BLE001
                row["note"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:100]}"
            llm = None  # its pool and graphs go before the next variant's
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            print(row, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = shape_args(__doc__, "1,8,32,128", "512,2048,8192", argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.batches == "0":  # `--batches 0`: the engine's fp32 check alone (a short device call)
        engine_rows(dev, args.smoke, check_only=True)
        return
    if args.smoke:
        H, R, DR, bs, dtype, reps = 4, 32, 16, 4, torch.float32, 2
        batches, contexts = [1, 3], [9, 40]
    else:
        H, R, DR, bs, dtype, reps = 16, 512, 64, 16, torch.bfloat16, args.reps
        batches, contexts = [int(x) for x in args.batches.split(",")], [int(x) for x in args.contexts.split(",")]
    bw = copy_bandwidth(dev)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    def save() -> None:  # after every shape: a failure later keeps what was measured
        (out / "paged_latent.json").write_text(json.dumps(dict(device=name, copy_gbs=bw / 1e9, rows=rows), indent=1))

    def guarded(what: str, fn) -> list[dict]:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - one section failing must not lose the others' rows
            row = dict(batch=0, context=0, variant=what, note=f"FAILED {type(e).__name__}: "
                                                                f"{(str(e).splitlines() or [''])[0][:160]}")
            print(row, flush=True)
            return [row]

    for B in batches:
        for ctx in contexts:
            rows += guarded(f"shape {B} x {ctx}", lambda: one_shape(B, ctx, H, R, DR, bs, dev, dtype, reps,
                                                                  args.sweep and not args.smoke))
            save()
    rows += guarded("varlen", lambda: varlen_shape(2 if args.smoke else 32, H, R, DR, bs, dev, dtype, reps,
                                                   *((20, 12) if args.smoke else (512, 1536))))
    save()
    rows += guarded("engine", lambda: engine_rows(dev, args.smoke))
    save()
    print(f"\n{name}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, copy {bw / 1e9:.0f} GB/s; "
          f"H={H}, r={R}, d_r={DR}, block {bs}, {dtype}")
    print("| batch | context | variant | us | GB/s of latents | max err |")
    print("|---:|---:|---|---:|---:|---:|")
    for r in rows:
        us, gbs, err = r.get("us"), r.get("gbs"), r.get("err")
        print(f"| {r['batch']} | {r['context']} | {r['variant']} | {'-' if us is None else f'{us:.1f}'} | "
              f"{'-' if gbs is None else f'{gbs:.0f}'} | {'-' if err is None else f'{err:.1e}'} |"
              + (f" {r['note']}" if "note" in r else ""))
    print(f"JSON: {out / 'paged_latent.json'}")
    # the shapes' kernel rows (the engine's "kernel" rows fall back to the reference where the kernel fails)
    kernel = [r for r in rows if r["variant"].startswith(("kernel", "varlen kernel"))]
    if not any("us" in r for r in kernel):
        raise SystemExit("no kernel row ran at any shape: see the notes above"
                         + ("; on a CPU the kernels need TRITON_INTERPRET=1" if dev.type == "cpu" else ""))


if __name__ == "__main__":
    main()
