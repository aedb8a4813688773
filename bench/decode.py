"""Decode speed (issue 5): lmforge's plain, CUDA-graph and compiled+graph decode paths, HF transformers
generate() on the same weights, and speculative decoding, in one run on one GPU.

    python bench/decode.py                # H100: Llama-shaped 1.1B, bf16, 128-token prompt, 256 new tokens
    python bench/decode.py --quick        # tiny fp32 model on CPU: checks the script and HF weight mapping
    python bench/decode.py --batches 1 --sections plain,kernels,compile --hf none     # batch-1 kernel step (H200)
    TRITON_INTERPRET=1 python bench/decode.py --smoke --batches 1 --sections plain,kernels --hf none --new-tokens 4

Prints a table and writes JSON (bench/results/decode.json, or $OUT/decode.json when OUT is set). Every
fast path's greedy tokens are compared with the plain path's ("agree" = length of the common prefix /
tokens generated, for paths that run free; fast decode paths are fed the plain path's tokens and "agree" is
the fraction of steps whose argmax equals it - random-init logits have near-ties that bf16 rounding in
different attention kernels can flip, after which free-running outputs diverge legitimately).
Roofline: batch-1 decode must read every weight once per token, so tokens/s <= copy bandwidth / weight
bytes, with the bandwidth measured here by a device-to-device copy (bytes read + written).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.infer.cuda_graph import GraphDecoder  # noqa: E402
from lmforge.infer.decoders import PlainDecoder, decode_attention  # noqa: E402
from lmforge.infer.llm import LLM  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.infer.speculative import ModelDrafter, NGramDrafter, speculative_generate  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.layers.fused import fused_copy  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402

LLAMA_1B = dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632,
                max_seq_len=512, pos_emb="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False)
TINY = dict(LLAMA_1B, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512, init_std=0.2)


class IdTokenizer:
    """Token ids in, nothing out: the benchmark never needs text."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eot_id = vocab_size, None

    def encode(self, text: str) -> list[int]:
        return [0]

    def decode(self, ids) -> str:
        return ""

    def token_bytes(self, i: int) -> bytes:
        return b""


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(dev: torch.device) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written (median of 10)."""
    n = 1 << 28 if dev.type == "cuda" else 1 << 22
    a, b = torch.empty(n, dtype=torch.float32, device=dev), torch.empty(n, dtype=torch.float32, device=dev)
    times = []
    for i in range(13):
        sync(dev)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(dev)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * 4 * n / sorted(times)[len(times) // 2]


@torch.no_grad()
def greedy_loop(decoder, prompt: torch.Tensor, new: int, force: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, float, float]:
    """Prefill + (new-1) decode steps with argmax, no host sync inside the loop. With `force` (B, new)
    the step after token i is fed force[:, i] (teacher forcing by the reference path's tokens), so each
    step's argmax can be compared with the reference's even after a bf16 near-tie flipped one.
    Returns argmax tokens (B, new), prefill seconds, decode seconds."""
    dev = prompt.device
    sync(dev)
    t0 = time.perf_counter()
    logits = decoder.prefill(prompt, torch.zeros(prompt.shape[0], dtype=torch.long, device=dev))
    out = [logits.argmax(-1)]
    sync(dev)
    t1 = time.perf_counter()
    for i in range(new - 1):
        out.append(decoder.step(out[-1] if force is None else force[:, i]).argmax(-1))
    sync(dev)
    return torch.stack(out, 1), t1 - t0, time.perf_counter() - t1


def agree(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the common-prefix length / row length (free-running comparison)."""
    eq = (a.cpu() == b.cpu()).long().cumprod(1)
    return float(eq.sum(1).float().mean() / a.shape[1])


def to_hf(model: Transformer):
    """The same weights in transformers' LlamaForCausalLM."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    hcfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ff,
                       num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads,
                       max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                       tie_word_embeddings=False, attn_implementation="sdpa")
    p = next(model.parameters())
    with torch.device(p.device):
        hf = LlamaForCausalLM(hcfg).to(p.dtype)
    names = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "final_norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(c.n_layers):
        for hf_name, ours in (("self_attn.q_proj", "attn.wq"), ("self_attn.k_proj", "attn.wk"),
                              ("self_attn.v_proj", "attn.wv"), ("self_attn.o_proj", "attn.wo"),
                              ("mlp.gate_proj", "mlp.gate"), ("mlp.up_proj", "mlp.up"), ("mlp.down_proj", "mlp.down"),
                              ("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2")):
            names[f"model.layers.{i}.{hf_name}.weight"] = f"blocks.{i}.{ours}.weight"
    ours = model.state_dict()
    hf.load_state_dict({k: ours[v] for k, v in names.items()}, strict=True)
    return hf.eval()


@torch.no_grad()
def hf_generate(hf, prompt: torch.Tensor, new: int) -> tuple[torch.Tensor, float]:
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new, do_sample=False,
              pad_token_id=0, eos_token_id=None)
    hf.generate(prompt, **dict(kw, max_new_tokens=2, min_new_tokens=2))  # warm-up
    sync(prompt.device)
    t0 = time.perf_counter()
    out = hf.generate(prompt, **kw)
    sync(prompt.device)
    return out[:, prompt.shape[1]:], time.perf_counter() - t0


def layer_skip_draft(model: Transformer, n_layers: int) -> Transformer:
    """Self-speculative draft (Zhang et al. 2024, Draft & Verify): the target's first n_layers blocks with
    its embedding, final norm and head - no extra weights to train or store."""
    import dataclasses

    cfg = dataclasses.replace(model.cfg, n_layers=n_layers)
    p = next(model.parameters())
    with torch.device(p.device):
        draft = Transformer(cfg).to(p.dtype)
    draft.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("blocks.") or int(k.split(".")[1]) < n_layers})
    return draft.eval()


class Report:
    """Rows of results, printed as a table and rewritten to JSON after each one (partial runs keep data)."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta, self.rows = path, meta, []

    def add(self, **row) -> None:
        self.rows.append(row)
        print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({**self.meta, "rows": self.rows}, indent=2))

    def table(self) -> str:
        head = f"| {'variant':<60} | batch | decode tok/s | % roofline | end-to-end tok/s | agree | note |"
        lines = [head, "|" + "---|" * 7]
        roof = self.meta["roofline_tok_s"]
        for r in self.rows:
            dec = r.get("decode_tok_s", float("nan"))
            pct = f"{dec / roof:>10.1%}" if r["batch"] == 1 and dec == dec else " " * 10
            lines.append(f"| {r['variant']:<60} | {r['batch']:>5} | {dec:>12.1f} | {pct} | "
                         f"{r.get('e2e_tok_s', float('nan')):>16.1f} | {r.get('agree', float('nan')):.3f} | "
                         f"{r.get('note', '')} |")
        return "\n".join(lines)


def run_loop(rep: Report, name: str, decoder, prompt, new: int, ref=None, note: str = ""):
    """Time one path; against a reference, teacher-forced: agree = fraction of steps whose argmax equals
    the reference path's token."""
    toks, pre, dec = greedy_loop(decoder, prompt, new, force=ref)
    B = prompt.shape[0]
    match = float((toks.cpu() == ref.cpu()).float().mean()) if ref is not None else 1.0
    rep.add(variant=name, batch=B, prefill_s=pre, decode_s=dec, decode_tok_s=B * (new - 1) / dec,
            e2e_tok_s=B * new / (pre + dec), agree=match, note=note)
    return toks


SECTIONS = ("plain", "graph", "kernels", "generate", "spec", "hf", "compile")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", "--smoke", action="store_true", help="tiny fp32 model on CPU (script check)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of: " + ", ".join(SECTIONS)
                    + ", gemv (matrix-vector bandwidth per weight shape), profile (the kernel step's kernel table), "
                      "profile-compile (the compiled step's)")
    ap.add_argument("--fuse", default="on", choices=["on", "off", "both"],
                    help="fused q/k/v and gate/up projections for the graph and compile paths ('both': off, then on)")
    ap.add_argument("--hf", default="both", choices=["default", "off", "both", "none"],
                    help="HF generate() runs: torch's default SDPA backends, cuDNN attention off, both, none")
    ap.add_argument("--kernel-configs", help="a KernelConfigs JSON file (lmforge.kernels.tuning) for the kernel step")
    ap.add_argument("--no-tune", action="store_true", help="kernel step: no tuning when the disk cache has no configs")
    ap.add_argument("--tune-candidates", type=int, help="kernel step: tune over the first N candidates of each shape")
    ap.add_argument("--kernel-variants", default="full", choices=["short", "full"],
                    help="short: tuned, reloaded from disk, previous variant; full: + no PDL, GraphDecoder's bucket")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-batches", default="1", help="batch sizes to run the torch.compile variant at")
    ap.add_argument("--compile-modes", default="default",
                    help="torch.compile modes for the compile section (comma list; 'default', 'max-autotune-no-cudagraphs', "
                         "'cdt' = default mode with inductor's coordinate-descent tuning)")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    dev = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    new, batches = args.new_tokens, [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(ModelConfig(**(TINY if args.quick else LLAMA_1B))).to(dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bw = copy_bandwidth(dev)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    rep = Report(out_dir / ("decode_quick.json" if args.quick else "decode.json"), {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "command": "python bench/decode.py " + " ".join(argv or sys.argv[1:]),
        "params": model.num_params(), "weight_bytes": weight_bytes, "copy_bandwidth_Bps": bw,
        "roofline_tok_s": bw / weight_bytes, "prompt_len": args.prompt_len, "new_tokens": new})
    print(f"{rep.meta['device']}: {model.num_params() / 1e9:.3f}B params, {weight_bytes / 1e9:.2f} GB, "
          f"copy {bw / 1e12:.2f} TB/s -> roofline {bw / weight_bytes:.0f} tok/s at batch 1", flush=True)
    gen = torch.Generator().manual_seed(1)
    prompts = {B: torch.randint(0, model.cfg.vocab_size, (B, args.prompt_len), generator=gen).to(dev)
               for B in batches}
    max_len = args.prompt_len + new + 8
    refs = {}
    for B in batches:  # the reference tokens every fast path is compared with
        refs[B] = run_loop(rep, "plain (eager, KVCache)", PlainDecoder(model, B, max_len), prompts[B], new)
    if "kernels" in sections and 1 in batches and (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        seed_kernel_cache(out_dir)
        try:  # a kernel failure must not cost the rest of the run
            bench_kernels(rep, model, prompts[1], new, refs[1], max_len, profile="profile" in sections,
                          configs=args.kernel_configs, tune=not args.no_tune, max_candidates=args.tune_candidates,
                          full=args.kernel_variants == "full")
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            rep.add(variant="Triton kernel step", batch=1, note=f"FAILED: {type(e).__name__}: {str(e)[:200]}")
        # inference never mutates the model it is given (the kernel step fuses its own copy)
        rep.meta["model_still_unfused"] = all(b.attn.wqkv is None and b.attn.wq is not None for b in model.blocks)
    for fused in {"on": [True], "off": [False], "both": [False, True]}[args.fuse]:
        m = fused_copy(model) if fused else model  # the model itself stays unfused
        tag = ", fused q/k/v + gate/up" if fused else ""
        if "gemv" in sections and dev.type == "cuda":
            print(gemv_table(m), flush=True)
        if "graph" in sections:
            graph = GraphDecoder(m, max(batches), max_len, kernels=False)
            for B in batches:
                run_loop(rep, "static cache, eager" + tag,
                         GraphDecoder(m, B, max_len, use_graphs=False, kernels=False), prompts[B], new, refs[B])
                if dev.type == "cuda":
                    graph.capture(graph.bucket(B))
                    run_loop(rep, "static cache + CUDA graph" + tag, graph.bind(B), prompts[B], new, refs[B])
            del graph
        if "compile" in sections and dev.type == "cuda" and not args.no_compile:
            for mode in args.compile_modes.split(","):
                for B in [int(b) for b in args.compile_batches.split(",")]:
                    bench_compiled(rep, m, prompts[B], new, refs[B], max_len, mode, tag,
                                   profile="profile-compile" in sections and B == 1)
        del m
    if "generate" in sections:
        bench_generate(rep, model, prompts[max(batches)], new, refs[max(batches)])
    if "spec" in sections:
        bench_speculative(rep, model, prompts[batches[0]][:1], new, refs[batches[0]][:1])
    if "hf" in sections:
        for cudnn in {"default": [True], "off": [False], "both": [True, False], "none": []}[args.hf]:
            bench_hf(rep, model, prompts, new, refs, cudnn)
    print("\n" + rep.table())
    print(f"\nroofline (batch 1): {rep.meta['roofline_tok_s']:.0f} tok/s; JSON: {rep.path}")


def bench_compiled(rep: Report, model, prompt, new: int, ref, max_len: int, mode: str, tag: str,
                   profile: bool = False) -> None:
    """torch.compile + CUDA graph at one batch size; mode 'cdt' turns on inductor's coordinate-descent
    tuning of kernel launch parameters (gpt-fast's setting)."""
    import torch._inductor.config as inductor

    B = prompt.shape[0]
    inductor.coordinate_descent_tuning = mode == "cdt"
    torch._dynamo.reset()
    comp = GraphDecoder(model, B, max_len, compile=True if mode in ("default", "cdt") else mode, kernels=False)
    t0 = time.perf_counter()
    comp.capture(B)
    name = "torch.compile" + ("" if mode == "default" else f" ({mode})") + " + CUDA graph" + tag
    run_loop(rep, name, comp, prompt, new, ref, note=f"compile+capture {time.perf_counter() - t0:.0f}s")
    if profile:
        from profiling import kernel_table

        tok = ref[:, 0]
        comp.cache.length = comp.cache.max_len // 2
        comp.cache.pos.fill_(comp.cache.length)
        eager = torch.no_grad()(comp.forward)  # the compiled step without the graph: one launch per kernel
        print(f"\n[{name}] compiled step, no graph:\n" + kernel_table(
            lambda: eager(comp.cache.view(B), tok[:, None]), calls=10), flush=True)
        graph = comp.graphs[B][0]
        print(f"\n[{name}] graph replay:\n" + kernel_table(graph.replay, calls=10), flush=True)
    del comp
    inductor.coordinate_descent_tuning = False


def bench_kernels(rep: Report, model, prompt, new: int, ref, max_len: int, profile: bool = False,
                  configs: str | None = None, tune: bool = True, max_candidates: int | None = None,
                  full: bool = True) -> None:
    """Batch 1 on lmforge.infer.kernel_step over a paged cache (shuffled blocks of 16), as a model runner
    drives it: step(token, position) captured once, replayed per token (the prompt is fed token by token).
    Block shapes come from the on-disk cache (LMFORGE_KERNEL_CACHE) or are tuned on first use and saved;
    a second step then loads them from disk. Ablations with the same shapes: the previous variant (no
    weight prefetch before the PDL wait), and no PDL at all. Last, GraphDecoder's batch-1 bucket (static
    cache), which builds its own KernelStep and so also reads the disk cache."""
    from lmforge.infer.kernel_step import KernelStep, PagedKV, unsupported
    from lmforge.kernels.tuning import KernelConfigs

    if unsupported(model):
        rep.add(variant="Triton kernel step", batch=1, note=f"skipped: {unsupported(model)}")
        return
    dev, c = prompt.device, model.cfg
    bs, T = 16, prompt.shape[1]
    n_blocks = -(-(T + new + 1) // bs)
    gen = torch.Generator().manual_seed(3)
    dtype = next(model.parameters()).dtype
    pool = lambda: torch.zeros(n_blocks + 4, bs, c.kv_heads, c.hd, dtype=dtype, device=dev)  # noqa: E731
    kv = PagedKV(k=[pool() for _ in range(c.n_layers)], v=[pool() for _ in range(c.n_layers)],
                 block_table=torch.randperm(n_blocks + 4, generator=gen)[:n_blocks].to(torch.int32)[None].to(dev))
    given = KernelConfigs.load(Path(configs)) if configs else None
    graphs = dev.type == "cuda"

    def run(name: str, ks: KernelStep, note: str) -> None:
        if graphs:
            ks.capture()
        call = ks.replay if graphs else ks.step
        positions = torch.arange(T + new, device=dev)
        sync(dev)
        t0 = time.perf_counter()
        for t in range(T):  # the prompt, one token per step (no prefill kernel at batch 1)
            logits = call(prompt[0, t:t + 1], positions[t:t + 1])
        out = [logits.argmax(-1)]
        sync(dev)
        t1 = time.perf_counter()
        for i in range(new - 1):
            out.append(call(ref[0, i:i + 1], positions[T + i:T + i + 1]).argmax(-1))
        sync(dev)
        dec = time.perf_counter() - t1
        toks = torch.stack(out, 1)
        rep.add(variant=name, batch=1, prefill_s=t1 - t0, decode_s=dec, decode_tok_s=(new - 1) / dec,
                e2e_tok_s=new / (time.perf_counter() - t0), agree=float((toks.cpu() == ref.cpu()).float().mean()),
                pct_roofline=(new - 1) / dec / rep.meta["roofline_tok_s"], note=note)

    t0 = time.perf_counter()
    ks = KernelStep(model, kv, configs=given, autotune=tune and graphs)
    source = "given file" if given else ("disk cache" if ks.configs.gpu else "defaults")
    if ks.autotune:
        ks.tune(context=T + new // 2, max_candidates=max_candidates)
        source = f"tuned on first use in {time.perf_counter() - t0:.0f}s, saved to disk"
    rep.meta["kernel_configs"] = ks.configs.to_json()
    print(f"kernel configs ({source}): {json.dumps(ks.configs.to_json()['configs'])}", flush=True)
    for i in range(2 if graphs else 1):  # two timings of one graph: the spread is the noise
        run("Triton kernel step (paged)" + (" + CUDA graph, PDL + weight prefetch" if graphs else ", eager"), ks,
            f"configs: {source}; timing {i + 1}")
    if not graphs:
        return
    variants = [("Triton kernel step (paged), configs reloaded from disk", lambda: KernelStep(model, kv), None),
                ("previous variant: PDL, no loads before the PDL wait",
                 lambda: KernelStep(model, kv, configs=ks.configs, prefetch=False), "same configs")]
    if full:
        variants += [("no evict-first L2 hint on weight loads",
                      lambda: KernelStep(model, kv, configs=ks.configs, evict=False), "same configs"),
                     ("no PDL, no prefetch", lambda: KernelStep(model, kv, configs=ks.configs, pdl=False,
                                                                prefetch=False), "same configs")]
    for name, make, note in variants:
        try:  # one variant failing must not cost the others
            step = make()
            if note is None:  # a fresh step: its configs come from the disk cache
                note = f"loaded set {'equal to' if step.configs == ks.configs else 'DIFFERENT from'} the tuned set"
            run(name, step, note)
            del step
        except Exception as e:  # noqa: BLE001
            rep.add(variant=name, batch=1, note=f"FAILED: {type(e).__name__}: {str(e)[:150]}")
    if full:
        dec = GraphDecoder(model, 1, max_len, kernels=True)
        dec.capture(1)
        run_loop(rep, "GraphDecoder batch-1 bucket (static cache, kernel step)", dec, prompt, new, ref,
                 note="configs from the disk cache" if dec.kernel_step.configs.gpu else "default configs")
    print("\n" + rep.table(), flush=True)  # now, in case a later section runs out of time
    if profile:
        from profiling import kernel_table

        print("\n[Triton kernel step] graph replay:\n" + kernel_table(ks.graph.replay, calls=10), flush=True)


def seed_kernel_cache(out_dir: Path) -> None:
    """Without LMFORGE_KERNEL_CACHE set, the kernel config cache is <out>/kernel_cache, seeded with the
    sets committed under bench/configs/kernels/ (an earlier run's, per GPU and model shape): a run on a
    fresh machine then loads instead of tuning, and a new set comes back with the results."""
    import shutil

    from lmforge.kernels.tuning import CACHE_ENV

    if os.environ.get(CACHE_ENV):
        return
    cache = out_dir / "kernel_cache"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(cache)
    for f in (Path(__file__).parent / "configs" / "kernels").glob("*.json"):
        if not (cache / f.name).exists():
            shutil.copy(f, cache / f.name)


@torch.no_grad()
def gemv_table(model) -> str:
    """Batch-1 matrix-vector products per distinct weight shape, cuBLAS (F.linear) and lmforge's Triton
    gemv: GB/s of weight reads. 100 products over distinct copies of the matrix (>= 256 MB in all, so the
    50 MB L2 cache cannot serve them) are captured in one CUDA graph: Python launch cost is excluded,
    each kernel's own fixed cost is not."""
    from lmforge.kernels.decode import available, gemv

    shapes = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and not name.startswith("tok_emb"):
            shapes.setdefault(tuple(p.shape), []).append(name)
    lines = ["weight (out x in)  count   cuBLAS us   GB/s   % copy BW   Triton us   GB/s   % copy BW"]
    dev = next(model.parameters()).device
    bw = copy_bandwidth(dev)
    for (n_out, n_in), names in sorted(shapes.items()):
        nbytes = n_out * n_in * 2
        ws = [torch.randn(n_out, n_in, device=dev, dtype=torch.bfloat16) for _ in range(max(1, -(-(256 << 20) // nbytes)))]
        x = torch.randn(n_in, device=dev, dtype=torch.bfloat16)
        row = f"{n_out:>6} x {n_in:<6}   {len(names):>5}"
        impls = {"cublas": lambda w: torch.nn.functional.linear(x[None], w)}
        if available(dev):
            impls["triton"] = lambda w: gemv(x, w)
        for fn in impls.values():
            fn(ws[0])  # tune (Triton) before capture
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn(ws[0])
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(100):
                    fn(ws[i % len(ws)])
            g.replay()
            times = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                g.replay()
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / 100)
            t = sorted(times)[2]
            row += f"   {t * 1e6:>9.1f}   {nbytes / t / 1e9:>5.0f}   {nbytes / t / bw:>8.0%}"
        lines.append(row)
        del ws
    return "\n".join(lines)


def bench_generate(rep: Report, model, prompt, new: int, ref) -> None:
    """The user-facing path: LLM.generate with per-row stopping, detokenization and bookkeeping."""
    llm = LLM(model, IdTokenizer(model.cfg.vocab_size), max_batch_size=prompt.shape[0])
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    ids = prompt.tolist()
    llm.generate(ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # capture graphs
    sync(prompt.device)
    t0 = time.perf_counter()
    outs = llm.generate(ids, sp)
    sync(prompt.device)
    dt = time.perf_counter() - t0
    toks = torch.tensor([o.token_ids for o in outs])
    rep.add(variant="LLM.generate" + (" (CUDA graphs)" if llm.cuda_graphs else ""), batch=len(ids),
            e2e_tok_s=len(ids) * new / dt, agree=agree(toks, ref), note="includes per-step host work")


def bench_speculative(rep: Report, model, prompt, new: int, ref) -> None:
    """Greedy speculative decoding (eager) against eager greedy decoding of the same prompt."""
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    L = model.cfg.max_seq_len
    ids = prompt[0].tolist()
    # baseline: the same eager loop with no drafts (one target forward per token)
    speculative_generate(model, NGramDrafter(vocab_size=model.cfg.vocab_size), ids, sp, 0, set(), L)
    toks, st = speculative_generate(model, NGramDrafter(vocab_size=model.cfg.vocab_size), ids, sp, 0, set(), L)
    base_s = st.seconds
    rep.add(variant="eager loop, no draft (spec. baseline)", batch=1, e2e_tok_s=new / base_s,
            agree=agree(torch.tensor([toks]), ref), note="target forward per token")
    n_draft = 2 if model.cfg.n_layers > 4 else 1
    draft = layer_skip_draft(model, n_draft)
    for name, drafter, k in ((f"speculative, {n_draft}-layer self-draft", None, 4),
                             ("speculative, prompt lookup (n-gram)", "ngram", 4)):
        ids = prompt[0].tolist()
        make = (lambda: NGramDrafter(vocab_size=model.cfg.vocab_size)) if drafter else \
            (lambda: ModelDrafter(draft, len(ids) + new + k + 1))
        speculative_generate(model, make(), ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                             k, set(), L)  # warm-up
        toks, st = speculative_generate(model, make(), ids, sp, k, set(), L)
        sync(prompt.device)
        m = st.as_dict(len(toks))
        rep.add(variant=name, batch=1, e2e_tok_s=new / st.seconds, agree=agree(torch.tensor([toks]), ref),
                acceptance=m["acceptance_rate"], speedup_vs_no_draft=base_s / st.seconds,
                note=f"k={k}, accept {m['acceptance_rate']:.2f}, {m['tokens_per_forward']:.2f} tok/forward, "
                     f"{base_s / st.seconds:.2f}x vs no draft")


def bench_hf(rep: Report, model, prompts: dict, new: int, refs: dict, cudnn: bool) -> None:
    """HF generate() on the same weights; cudnn=False runs it under the same SDPA backend choice as ours."""
    try:
        hf = to_hf(model)
    except Exception as e:  # transformers missing or changed: report, keep the other results
        rep.add(variant="HF transformers generate()", batch=0, note=f"skipped: {type(e).__name__}: {e}")
        return
    import transformers

    import contextlib

    for B, prompt in prompts.items():
        with contextlib.nullcontext() if cudnn else decode_attention():
            toks, dt = hf_generate(hf, prompt, new)
        rep.add(variant=f"HF transformers {transformers.__version__} generate()", batch=B, e2e_tok_s=B * new / dt,
                agree=agree(toks, refs[B]),
                note="same weights, sdpa, greedy" + ("" if cudnn else ", cuDNN attention off"))
    del hf


if __name__ == "__main__":
    main()
