"""Decode speed (issue 5) through the engine: the model runner's decode backends side by side in one run on
one GPU - plain eager paged steps, CUDA-graph decode (lmforge.infer.graphs.DecodeGraphs) and, at batch 1,
the Triton kernel step (lmforge.infer.kernel_step through graphs.BatchOneKernel) - with HF transformers
generate() on the same weights and speculative decoding.

    python bench/decode.py                # H200: Llama-shaped 1.1B, bf16, 128-token prompt, 256 new tokens
    python bench/decode.py --quick        # tiny fp32 model on CPU: checks the script and HF weight mapping
    python bench/decode.py --batches 1 --sections plain,graph,kernels --hf none --tune-step   # batch 1 (H200)
    TRITON_INTERPRET=1 python bench/decode.py --quick --batches 1 --sections plain,kernels --hf none --new-tokens 4

Each variant is an `LLM` whose EngineConfig picks the backend (cuda_graphs, kernel_step); B random prompts
run to `new` greedy tokens each. A full warm-up run comes first (graph captures, kernel compilation), then
a timed run: prefill up to every request's first token, decode from there to the last token
(decode tok/s = B x (new - 1) / decode seconds). Prefix caching is off, so the timed run's prefill is real.
The KV pool is sized to the batch, the same for every variant. The kernel step's block shapes come from the
disk cache (seeded from lmforge/kernels/configs/), a --kernel-configs file, or --tune-step (tuned now, on the
whole captured step, and saved). "agree" = common prefix with the plain eager engine's tokens / tokens
generated: random-init logits have near-ties that bf16 rounding in different kernels can flip, after which
free-running outputs diverge legitimately.
Roofline: batch-1 decode must read every weight once per token, so tokens/s <= copy bandwidth / weight
bytes, with the bandwidth measured here by a device-to-device copy (bytes read + written). Of the untied token
embedding a step reads one row (bench.common.decode_weight_bytes: 2.069 GB for the 1.1B shape; runs before
2026-12-05 counted the whole 131 MB table, 2.200 GB).

Prints a table and writes JSON (bench/results/decode.json, or $OUT/decode.json when OUT is set).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import decode_weight_bytes, parse_sections  # noqa: E402
from lmforge.infer.detok import IdTokenizer  # noqa: E402
from lmforge.infer.engine import EngineConfig  # noqa: E402
from lmforge.infer.llm import LLM  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.infer.speculative import ModelDrafter, NGramDrafter, speculative_generate  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.layers.fused import fused_copy  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.utils import capture_cuda_graph  # noqa: E402

LLAMA_1B = dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632,
                max_seq_len=512, pos_emb="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=False)
TINY = dict(LLAMA_1B, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512, init_std=0.2)
SECTIONS = ("plain", "graph", "kernels", "spec", "hf")
EXTRA_SECTIONS = ("gemv", "profile")


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
    return 2 * 4 * n / statistics.median(times)


def decode_attention():
    """Context for HF's eager decoding, whose key length grows every step: SDPA may use flash,
    memory-efficient or math kernels, not cuDNN's, which builds an execution plan for each new key length
    (H100, 1.1B, batch 1: 10.8 -> 74 tok/s with this; 2026-11-23)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


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


def engine_run(llm: LLM, prompts: list[list[int]], new: int) -> tuple[torch.Tensor, float, float]:
    """Greedy generation of every prompt on the engine: tokens (B, new), prefill seconds (until every
    request has its first token), decode seconds (from there to the last token)."""
    engine, dev = llm.engine, llm.device
    sp = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    sync(dev)
    t0 = time.perf_counter()
    rids = [engine.add_request(p, sp) for p in prompts]
    reqs, done = [engine.requests[r] for r in rids], {}
    while any(r.first_token_time is None for r in reqs):
        done.update((o.request_id, o.token_ids) for o in engine.step(finished_only=True))
    t1 = time.perf_counter()  # a step ends by reading its sampled tokens: the device is idle here
    while engine.has_unfinished():
        done.update((o.request_id, o.token_ids) for o in engine.step(finished_only=True))
    sync(dev)
    return torch.tensor([done[r] for r in rids]), t1 - t0, time.perf_counter() - t1


def kv_tokens(batch: int, prompt_len: int, new: int, block_size: int = 16) -> int:
    """The pool every variant gets: room for the batch's sequences, one block of slack each."""
    return batch * (-(-(prompt_len + new) // block_size) + 1) * block_size


def bench_engine(rep: Report, model, prompts: list[list[int]], new: int, ref: torch.Tensor | None, name: str,
                 config: EngineConfig, setup=None, note: str = "") -> tuple[torch.Tensor, LLM]:
    """Warm-up run, then the timed run of one variant. setup(llm) -> note: backend options before the
    warm-up (kernel configs, tuning). Returns the tokens (ref None: this variant is the reference) and
    the LLM."""
    llm = LLM(model, IdTokenizer(model.cfg.vocab_size), config=config)
    if setup is not None:
        note = "; ".join(filter(None, [note, setup(llm)]))
    engine_run(llm, prompts, new)
    toks, pre, dec = engine_run(llm, prompts, new)
    B = len(prompts)
    runner = llm.engine.runner
    if runner.graphs is not None and runner.graphs.failed:
        note += f"; graph capture FAILED ({runner.graphs.failed}), ran eagerly"
    if runner.kernel_step is not None and runner.kernel_step.failed:
        note += f"; kernel step FAILED ({runner.kernel_step.failed}), ran on the general path"
    row = dict(variant=name, batch=B, prefill_s=pre, decode_s=dec, decode_tok_s=B * (new - 1) / max(dec, 1e-9),
               e2e_tok_s=B * new / (pre + dec), agree=1.0 if ref is None else agree(toks, ref), note=note)
    if B == 1:
        row["pct_roofline"] = row["decode_tok_s"] / rep.meta["roofline_tok_s"]
    rep.add(**row)
    return toks, llm


def kernel_variants(args, dev: torch.device, context: int) -> list[tuple[str, object]]:
    """(name, setup(llm) -> note) of the kernel-step rows. The first row's configs come from
    --kernel-configs, --tune-step (tuned now, saved to the disk cache) or the disk cache; later rows
    reload them from disk or switch one launch option off (the ablations)."""
    from lmforge.infer.kernel_step import TUNE_CONTEXTS
    from lmforge.kernels.tuning import KernelConfigs

    given = KernelConfigs.load(Path(args.kernel_configs)) if args.kernel_configs else None
    tuned = {}

    def tune_now(step) -> str | None:
        """With --tune-step on a GPU: tune the step's current mode now (saved to disk); how long it took."""
        if not (args.tune_step and dev.type == "cuda"):
            return None
        t0 = time.perf_counter()
        step.tune(contexts=(context, TUNE_CONTEXTS[-1]), max_candidates=args.tune_candidates)
        return f"tuned now in {time.perf_counter() - t0:.0f}s"

    def first(llm: LLM) -> str:
        step = llm.engine.runner.kernel_step.step
        if given is not None:
            step.configs = given
            source = "given file"
        elif (took := tune_now(step)) is not None:
            source = f"{took}, saved to disk"
        else:
            source = "disk cache" if step.configs.gpu else "defaults" + (" (tuning needs CUDA)" if args.tune_step else "")
        tuned["configs"] = step.configs
        print(f"kernel configs ({source}): {json.dumps(step.configs.to_json()['configs'])}", flush=True)
        return f"configs: {source}"

    def reloaded(llm: LLM) -> str:
        # (a later row - the persistent layer's - may have tuned and saved shapes of its own since: compared are
        # the first row's shapes)
        first_set = tuned.get("configs")
        table = llm.engine.runner.kernel_step.step.configs.table
        same = first_set is not None and all(table.get(k) == v for k, v in first_set.table.items())
        more = len(set(table) - set(first_set.table)) if first_set is not None else 0
        return (f"loaded set {'equal to' if same else 'DIFFERENT from'} the first row's on its shapes"
                + (f" (+{more} tuned since)" if more else ""))

    def option(**off):
        def setup(llm: LLM) -> str:
            step = llm.engine.runner.kernel_step.step
            step.configs = tuned.get("configs", step.configs)
            for k, v in off.items():
                setattr(step, k, v)
            return "same configs"
        return setup

    def persistent(llm: LLM) -> str:
        """The one-launch layer (lmforge.kernels.decode_layer): its layer shape tuned now with --tune-step,
        from the first row's set (the head's config) otherwise."""
        step = llm.engine.runner.kernel_step.step
        step.configs = tuned.get("configs", step.configs)
        step.persistent = True
        took = tune_now(step)
        source = f"layer config {took}" if took else "first row's set + disk/default layer config"
        print(f"persistent kernel configs ({source}): {json.dumps(step.configs.to_json()['configs'])}", flush=True)
        return source

    rows = [("Triton kernel step", first)]
    if dev.type != "cuda":
        return rows
    rows += [("kernel step, persistent layer kernel (1 launch per layer)", persistent)]
    rows += [("kernel step, configs reloaded from disk", reloaded),
             ("kernel step, no loads before the PDL wait", option(prefetch=False))]
    if args.kernel_variants == "full":
        rows += [("kernel step, no evict-first L2 hint", option(evict=False)),
                 ("kernel step, no PDL, no prefetch", option(pdl=False, prefetch=False))]
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", "--smoke", action="store_true", help="tiny fp32 model on CPU (script check)")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of: " + ", ".join(SECTIONS)
                    + " (plain always runs: it is the reference), gemv (matrix-vector bandwidth per weight "
                      "shape), profile (the kernel step's kernel table)")
    ap.add_argument("--fuse", action="store_true",
                    help="graph section: also a CUDA-graph row on a copy with fused q/k/v and gate/up projections")
    ap.add_argument("--hf", default="both", choices=["default", "off", "both", "none"],
                    help="HF generate() runs: torch's default SDPA backends, cuDNN attention off, both, none")
    ap.add_argument("--kernel-configs", help="a KernelConfigs JSON file (lmforge.kernels.tuning) for the kernel step")
    ap.add_argument("--tune-step", action="store_true",
                    help="kernel step: tune its block shapes now on the whole captured step (saved to the disk cache)")
    ap.add_argument("--tune-candidates", type=int, help="--tune-step over the first N candidates of each shape")
    ap.add_argument("--kernel-variants", default="full", choices=["short", "full"],
                    help="short: configs as chosen, reloaded from disk, no prefetch; full: + no evict hint, no PDL")
    args = ap.parse_args(argv)
    sections = set(parse_sections(ap, args.sections, SECTIONS + EXTRA_SECTIONS))
    if args.kernel_configs:  # refused now, not after the plain rows have run (the kernel rows load it again)
        from lmforge.errors import ConfigError
        from lmforge.kernels.tuning import KernelConfigs

        try:
            KernelConfigs.load(Path(args.kernel_configs))
        except ConfigError as e:
            ap.error(str(e))
    dev = torch.device("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    new, batches = args.new_tokens, [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    with torch.device(dev):
        model = Transformer(ModelConfig(**(TINY if args.quick else LLAMA_1B))).to(dtype).eval()
    weight_bytes = decode_weight_bytes(model)  # one row of the token embedding, not the table
    bw = copy_bandwidth(dev)
    out_dir = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    rep = Report(out_dir / ("decode_quick.json" if args.quick else "decode.json"), {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "command": "python bench/decode.py " + " ".join(argv or sys.argv[1:]),
        "params": model.num_params(), "weight_bytes": weight_bytes, "copy_bandwidth_Bps": bw,
        "roofline_tok_s": bw / weight_bytes, "prompt_len": args.prompt_len, "new_tokens": new})
    print(f"{rep.meta['device']}: {model.num_params() / 1e9:.3f}B params, {weight_bytes / 1e9:.3f} GB read per token, "
          f"copy {bw / 1e12:.2f} TB/s -> roofline {bw / weight_bytes:.0f} tok/s at batch 1", flush=True)
    if "gemv" in sections and dev.type == "cuda":
        print(gemv_table(model), flush=True)
    gen = torch.Generator().manual_seed(1)
    prompts = {B: torch.randint(0, model.cfg.vocab_size, (B, args.prompt_len), generator=gen).tolist()
               for B in batches}
    refs = {}
    for B in batches:
        base = dict(max_num_seqs=B, num_kv_tokens=kv_tokens(B, args.prompt_len, new), prefix_caching=False,
                    kernel_step=False)
        cfg = lambda **kw: EngineConfig(**{**base, **kw})  # noqa: E731
        refs[B], _ = bench_engine(rep, model, prompts[B], new, None, "engine, plain eager paged steps",
                                  cfg(cuda_graphs=False))
        if "graph" in sections:
            graphs = "CUDA-graph decode" if dev.type == "cuda" else "graph-bucket decode (eager static buffers, CPU)"
            bench_engine(rep, model, prompts[B], new, refs[B], "engine, " + graphs, cfg(cuda_graphs=True))
            if args.fuse:
                bench_engine(rep, fused_copy(model), prompts[B], new, refs[B],
                             "engine, " + graphs + ", fused q/k/v + gate/up", cfg(cuda_graphs=True))
        if "kernels" in sections and B == 1:
            bench_kernel_step(rep, model, prompts[B], new, refs[B], args, dev, cfg(kernel_step=True, cuda_graphs=None),
                              profile="profile" in sections)
    if "spec" in sections:
        bench_speculative(rep, model, torch.tensor(prompts[batches[0]][:1], device=dev), new, refs[batches[0]][:1])
    if "hf" in sections:
        for cudnn in {"default": [True], "off": [False], "both": [True, False], "none": []}[args.hf]:
            bench_hf(rep, model, {B: torch.tensor(p, device=dev) for B, p in prompts.items()}, new, refs, cudnn)
    print("\n" + rep.table())
    print(f"\nroofline (batch 1): {rep.meta['roofline_tok_s']:.0f} tok/s; JSON: {rep.path}")


def bench_kernel_step(rep: Report, model, prompts: list[list[int]], new: int, ref, args, dev: torch.device,
                      config: EngineConfig, profile: bool) -> None:
    """The kernel-step rows (batch 1), or one row saying why they cannot run here."""
    from lmforge.infer.graphs import kernel_step_available
    from lmforge.infer.kernel_step import unsupported

    why = kernel_step_available(dev) or unsupported(model)
    if why is None and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        why = "no GPU (TRITON_INTERPRET=1 runs it in Triton's interpreter)"
    if why is not None:
        rep.add(variant="Triton kernel step", batch=1, note=f"skipped: {why}")
        return
    seed_kernel_cache(Path(rep.path).parent)
    for name, setup in kernel_variants(args, dev, context=len(prompts[0]) + new // 2):
        try:  # a kernel failure must not cost the rest of the run
            _, llm = bench_engine(rep, model, prompts, new, ref, "engine, " + name, config, setup)
        except Exception as e:  # noqa: BLE001
            rep.add(variant="engine, " + name, batch=1, note=f"FAILED: {type(e).__name__}: {str(e)[:200]}")
            continue
        graph = llm.engine.runner.kernel_step.step.graph
        if profile and (name == "Triton kernel step" or "persistent" in name) and graph is not None:
            from profiling import kernel_table

            print(f"\n[{name}] graph replay:\n" + kernel_table(graph.replay, calls=10), flush=True)
        del llm
    # inference never mutates the model it is given (the kernel step reads its weights as they are)
    rep.meta["model_still_unfused"] = all(b.attn.wqkv is None and b.attn.wq is not None for b in model.blocks)
    print("\n" + rep.table(), flush=True)  # now, in case a later section runs out of time


def seed_kernel_cache(out_dir: Path) -> None:
    """Without LMFORGE_KERNEL_CACHE set, the kernel config cache is <out>/kernel_cache, seeded with the
    sets shipped in lmforge/kernels/configs/ (an earlier run's, per GPU and model shape): a run on a fresh
    machine then loads instead of tuning, and a new set comes back with the results."""
    import shutil

    from lmforge.kernels.tuning import CACHE_ENV, SHIPPED_DIR

    if os.environ.get(CACHE_ENV):
        return
    cache = out_dir / "kernel_cache"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ[CACHE_ENV] = str(cache)
    for f in SHIPPED_DIR.glob("*.json"):
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
            g, _ = capture_cuda_graph(lambda fn=fn, ws=ws: [fn(ws[i % len(ws)]) for i in range(100)])
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

    for B, prompt in prompts.items():
        with contextlib.nullcontext() if cudnn else decode_attention():
            toks, dt = hf_generate(hf, prompt, new)
        rep.add(variant=f"HF transformers {transformers.__version__} generate()", batch=B, e2e_tok_s=B * new / dt,
                agree=agree(toks, refs[B]),
                note="same weights, sdpa, greedy" + ("" if cudnn else ", cuDNN attention off"))
    del hf


if __name__ == "__main__":
    main()
