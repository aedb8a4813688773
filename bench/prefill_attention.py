"""Batched prefill in the paged cache (lmforge/infer/kv/paged.py): all prefill chunks of an engine step in
one varlen FlashAttention-2 call (prefill="kernel") against the per-sequence loop (prefill="reference",
one SDPA call per chunk), for one attention layer and for a whole model forward, in one run on one GPU.

    python bench/prefill_attention.py            # H100/H200: bf16, 64-256 sequences per step
    python bench/prefill_attention.py --smoke    # CPU, Triton interpreter, toy sizes: checks the script

Scenarios, each one engine step built as the runner builds it (lmforge.model.meta.AttnMetadata):
  fresh    S whole prompts, log-normal lengths around L tokens, nothing cached (the engine's first
           prefill: the kernel reads the step's own keys)
  chunked  S chunks of about L tokens, each continuing a cached context of about C tokens in shuffled
           blocks of 16 (chunked prefill, prefix-cache hits: the kernel's keys come from one gather)
Shapes: Qwen3-0.6B's attention (16 query heads, 8 kv heads, head dim 128); the model level runs a
28-layer Transformer of that width with random weights, logits at each chunk's last token only. The
kernel's layer output is compared with the reference's (max |error| / max |reference|). Timing: the
median of triton.testing.do_bench (bench/attention.py's bench_ms). Prints a table and writes JSON
($OUT/prefill_attention.json, else bench/results/).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if "--smoke" in sys.argv:  # read when lmforge.kernels defines its kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

from attention import bench_ms, failure, show  # noqa: E402  (bench/attention.py)
from lmforge.infer.kv import PagedKVCache  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.layers.attention import AttnSpec  # noqa: E402
from lmforge.model.meta import AttnMetadata  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402

BS = 16


def step(S: int, L: int, C: int, dev) -> tuple[AttnMetadata, list[int], int]:
    """One prefill step: S chunks of ~L new tokens after ~C cached ones (C = 0: fresh prompts), blocks
    handed out in shuffled order. Returns its metadata, each chunk's cached length and the blocks used."""
    g = torch.Generator().manual_seed(S * 7 + L + C)
    draw = lambda m: [max(1, int(x * m)) for x in torch.empty(S).log_normal_(0.0, 0.5, generator=g)]  # noqa: E731
    qlens = draw(L)
    before = draw(C) if C else [0] * S
    num_blocks = sum(-(-(b + n) // BS) for b, n in zip(before, qlens))
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for b, n in zip(before, qlens):
        need = -(-(b + n) // BS)
        tables.append(free[:need])
        free = free[need:]
    width = max(map(len, tables))
    ctx = [b + n for b, n in zip(before, qlens)]
    slots = [t[p // BS] * BS + p % BS for t, b, n in zip(tables, before, qlens) for p in range(b, b + n)]
    meta = AttnMetadata(
        slot_mapping=torch.tensor(slots, device=dev), block_size=BS,
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
        context_lens=torch.tensor(ctx, dtype=torch.int32, device=dev), query_lens_host=tuple(qlens),
        context_lens_host=tuple(ctx), positions=torch.tensor([p for b, n in zip(before, qlens)
                                                              for p in range(b, b + n)], device=dev)[None],
        logits_indices=torch.tensor(qlens, device=dev).cumsum(0) - 1)
    return meta, before, num_blocks


def fresh_meta(meta: AttnMetadata) -> AttnMetadata:
    """A copy without the per-forward memo: each timed call builds its layout as a real step does."""
    return dataclasses.replace(meta, _derived={})  # (replace() would copy the memo dict itself)


def measure(rows, scenario: str, S: int, L: int, C: int, model, args, dev, dtype):
    spec = model.cache_spec()
    layer = spec.layers[0]
    H, KV, hd = layer.query_heads, layer.kv_heads, layer.head_dim
    meta, before, need = step(S, L, C, dev)
    N = sum(meta.query_lens_host)
    g = torch.Generator(device=dev).manual_seed(S)
    q = torch.randn(1, H, N, hd, device=dev, dtype=dtype, generator=g)
    k, v = (torch.randn(1, KV, N, hd, device=dev, dtype=dtype, generator=g) for _ in range(2))
    attn_spec = AttnSpec(scale=hd ** -0.5)
    ids = torch.randint(0, spec.vocab_size, (1, N), device=dev, generator=g)
    outs = {}
    for mode in ("reference", "kernel"):
        cache = PagedKVCache(spec, need, BS, dev, dtype, prefill=mode)
        fill = torch.Generator(device=dev).manual_seed(1)
        for pool in cache.pools():
            pool.normal_(generator=fill)  # the cached contexts, the same for both variants
        row = dict(scenario=scenario, seqs=S, new_tokens=N, cached_tokens=sum(before), variant=mode)
        try:
            with torch.inference_mode():
                outs[mode] = cache.attend(0, q, k, v, attn_spec, fresh_meta(meta))
                row["layer_ms"] = bench_ms(lambda: cache.attend(0, q, k, v, attn_spec, fresh_meta(meta)), dev)
                row["model_ms"] = bench_ms(lambda: model(ids, cache=cache, meta=fresh_meta(meta)), dev)
            row["tokens_per_s"] = N / row["model_ms"] * 1e3
            if mode == "kernel" and "reference" in outs:
                ref = outs["reference"].float()
                row["err"] = ((outs[mode].float() - ref).abs().max() / ref.abs().max()).item()
        except Exception as e:  # noqa: BLE001 - one variant failing must not end the run
            row["note"] = failure(e)
        rows.append(row)
        show(row)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def table(rows) -> str:
    base = {(r["scenario"], r["seqs"]): r for r in rows if r["variant"] == "reference" and "model_ms" in r}
    lines = ["| scenario | seqs | new tokens | cached tokens | variant | layer ms | ×ref | model ms | ×ref | "
             "tokens/s | err |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        head = f"| {r['scenario']} | {r['seqs']} | {r['new_tokens']} | {r['cached_tokens']} | {r['variant']} |"
        if "model_ms" not in r:
            lines.append(f"{head} - | - | - | - | - | {r.get('note', '')} |")
            continue
        b = base.get((r["scenario"], r["seqs"]))
        x1 = f"{b['layer_ms'] / r['layer_ms']:.2f}" if b else "-"
        x2 = f"{b['model_ms'] / r['model_ms']:.2f}" if b else "-"
        err = f"{r['err']:.1e}" if "err" in r else "-"
        lines.append(f"{head} {r['layer_ms']:.3g} | {x1} | {r['model_ms']:.4g} | {x2} | {r['tokens_per_s']:.4g} |"
                     f" {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, toy sizes")
    ap.add_argument("--seqs", default="64,256", help="sequences per step")
    ap.add_argument("--prompt-len", type=int, default=64, help="median new tokens per sequence")
    ap.add_argument("--context-len", type=int, default=512, help="chunked scenario: median cached tokens")
    args = ap.parse_args(argv)
    start = time.time()
    dev = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if args.smoke:
        seqs, L, C = [4], 12, 20
        cfg = ModelConfig.preset("llama-tiny", d_model=128, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=256)
    else:
        seqs, L, C = [int(s) for s in args.seqs.split(",")], args.prompt_len, args.context_len
        cfg = ModelConfig.preset("llama-small", d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                                 max_seq_len=8192)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev, dtype).eval()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "command": "python bench/prefill_attention.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(f"{meta['device']}, torch {meta['torch']}", flush=True)
    rows = []
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results") / \
        ("prefill_attention_smoke.json" if args.smoke else "prefill_attention.json")
    try:
        for S in seqs:
            for scenario, c in (("fresh", 0), ("chunked", C)):
                measure(rows, scenario, S, L, c, model, args, dev, dtype)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    finally:
        print(f"\n{time.time() - start:.0f} s; {out}\n")
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
