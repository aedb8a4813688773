"""Host overhead of the engine loop (issue 11): the Python work per step, with a model that costs nothing.

    python bench/engine_host.py                       # batches 1, 32, 256; V = 151,936 (Qwen3); ~1-2 min on CPU
    python bench/engine_host.py --vocab 1024          # the same loop with tiny logits: Python alone
    python bench/engine_host.py --profile             # + cProfile of the batch-256 decode steps (top functions)
    python bench/engine_host.py --sampling seeded     # rows sampling at temperature 0.8 with their own seeds
    python bench/engine_host.py --device cuda         # on a GPU: host work with real launches (CUDA graphs on)

A stub model stands in for the transformer: it honours the engine's model interface (`cache_spec()`,
`model(ids, cache=, meta=)` returning (1, M, V) logits at meta.logits_indices) and returns a fixed logits
table, so everything a step does besides the forward is what gets timed: schedule (the scheduler and
the block pool), prepare (the runner's flat inputs and metadata), forward (the stub: ~0), sample (the
batched sampler) and post (the rest of Engine.step: rows, appending tokens, detokenizing, stop checks,
prefix-block registration, outputs). On a CPU, `sample` includes the sampler's tensor work over M x V
logits, which a GPU does in well under a millisecond; `--vocab 1024` shows the part that is Python and
per-op dispatch (what a GPU step pays too, as kernel launches).

Steps: `decode` = every sequence decodes one token (the steady state of the offline workload), through
runner.prepare; `graphs` = the same through the CUDA-graph backend's static buffers (lmforge.infer.graphs,
run eagerly here: its input building is what a GPU's decode-only steps pay; prepare = graphs.run minus
the stub forward); `mixed` =
the same decodes plus a 512-token prompt prefilled whole in the step (a new request arriving; it is
aborted after the step so the batch stays put), eagerly through runner.prepare; `mixed-g` = that step through the
mixed-step graphs' static buffers (EngineConfig.graph_prefill_tokens=1024; prepare = graphs.run_mixed minus the
stub forward); `async` = the decode steps with async scheduling
(EngineConfig.async_scheduling; the other rows run without it): the same host work in another order
(each step launches the next before `post` reads the previous one), none of it on the device's critical
path on a GPU while it stays below the device's step time (~12 ms at batch 256 on an H200). Prompts of the decoding sequences are uniform in
[100, 1024] tokens, as in bench/engine.py's offline workload; greedy, EOS ignored, ids-only tokenizer.
Prints a table of median ms per step and per phase (the total is the median step, not the phases' sum); writes JSON to $OUT (or bench/results)/engine_host.json.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lmforge.infer.runner as runner_mod  # noqa: E402
from lmforge.infer.detok import IdTokenizer  # noqa: E402
from lmforge.infer.engine import Engine, EngineConfig  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model.cache import CacheSpec, LayerCacheSpec  # noqa: E402

PHASES = ("schedule", "prepare", "forward", "sample", "post")
KINDS = ("decode", "graphs", "mixed", "mixed-g", "async")


class StubModel(torch.nn.Module):
    """The engine's model interface at ~zero cost: a fixed (rows, V) logits table, row i for logits row i
    (a view, no copy), and a one-layer cache of 8 numbers per token that is never written."""

    def __init__(self, vocab_size: int, max_rows: int, max_seq_len: int = 4096):
        super().__init__()
        torch.manual_seed(0)
        self.logits = torch.nn.Parameter(torch.randn(max_rows, vocab_size), requires_grad=False)
        self.vocab_size, self.max_seq_len = vocab_size, max_seq_len

    def cache_spec(self) -> CacheSpec:
        layer = LayerCacheSpec(kind="full", kv_heads=1, query_heads=1, head_dim=4)
        return CacheSpec(layers=(layer,), dtype=torch.float32, max_seq_len=self.max_seq_len,
                         vocab_size=self.vocab_size)

    def forward(self, ids, positions=None, cache=None, meta=None):
        return self.logits[: meta.logits_indices.shape[0]][None]


def params_for(sampling: str, i: int) -> SamplingParams:
    if sampling == "greedy":
        return SamplingParams(temperature=0, max_tokens=2048, ignore_eos=True)
    return SamplingParams(temperature=0.8, top_p=0.95, seed=i, max_tokens=2048, ignore_eos=True)


def decoding_engine(batch: int, vocab: int, sampling: str, graphs: bool = False, device: str = "cpu",
                    async_scheduling: bool = False, mixed_tokens: int = 0) -> tuple[Engine, StubModel]:
    """An engine whose `batch` sequences have their prompts in the cache: the next step is decode-only."""
    model = StubModel(vocab, batch + 1).to(device)
    config = EngineConfig(max_num_seqs=batch + 1, num_kv_tokens=(batch + 1) * 4096, cuda_graphs=graphs,
                          kernel_step=False, async_scheduling=async_scheduling, graph_prefill_tokens=mixed_tokens)
    engine = Engine(model, IdTokenizer(vocab), config)
    rng = random.Random(0)
    for i in range(batch):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(100, 1024))]
        engine.add_request(prompt, params_for(sampling, i))
    while engine.scheduler.waiting or any(s.num_computed < len(s.tokens) - 1 for s in engine.scheduler.running):
        engine.step(finished_only=True)
    return engine, model


def timed_phases(engine: Engine, model: StubModel, spent: dict[str, float], mixed: bool = False):
    """Wrap the phases' entry points to add their seconds to `spent` (undo with the returned function)."""
    def wrap(obj, name, phase):
        fn = getattr(obj, name)

        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[phase] += time.perf_counter() - t0
        setattr(obj, name, run)
        return lambda: setattr(obj, name, fn) if obj is runner_mod else delattr(obj, name)

    graphs = engine.runner.graphs
    inputs = (engine.runner, "prepare") if graphs is None else (graphs, "run_mixed" if mixed else "run")
    undo = [wrap(engine.scheduler, "schedule", "schedule"), wrap(*inputs, "prepare"),
            wrap(model, "forward", "forward"), wrap(runner_mod, "sample_rows", "sample")]
    return lambda: [u() for u in undo]


def measure(batch: int, kind: str, steps: int, vocab: int, sampling: str, prof: cProfile.Profile | None,
            device: str = "cpu") -> dict:
    """Median ms per phase over `steps` timed steps (medians: the box is shared and single steps stall)."""
    engine, model = decoding_engine(batch, vocab, sampling, graphs=kind in ("graphs", "mixed-g"), device=device,
                                    async_scheduling=kind == "async", mixed_tokens=1024 if kind == "mixed-g" else 0)
    rng = random.Random(1)
    spent = dict.fromkeys(PHASES + ("step",), 0.0)
    undo = timed_phases(engine, model, spent, mixed=kind == "mixed-g")
    samples = []
    try:
        for i in range(steps + 1):  # the first step warms up (allocations, first-call caches)
            rid = None
            if kind.startswith("mixed"):
                rid = engine.add_request([rng.randrange(vocab) for _ in range(512)], params_for(sampling, 10**6 + i))
            spent.update(dict.fromkeys(spent, 0.0))
            if prof is not None and i > 0:
                prof.enable()
            t0 = time.perf_counter()
            engine.step(finished_only=True)
            spent["step"] = time.perf_counter() - t0
            if prof is not None:
                prof.disable()
            if kind in ("graphs", "mixed-g"):  # graphs.run / run_mixed call the forward
                spent["prepare"] -= spent["forward"]
            if i > 0:
                spent["post"] = spent["step"] - sum(spent[p] for p in PHASES if p != "post")
                samples.append(dict(spent))
            if rid is not None:
                engine.abort(rid)
    finally:
        undo()
    ms = {k: 1e3 * statistics.median(s[k] for s in samples) for k in spent}
    return {"batch": batch, "step": kind, "ms": {k: round(v, 3) for k, v in ms.items()},
            "us_per_seq": round(1e3 * ms["step"] / batch, 1)}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row (after one warm-up step)")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--sampling", choices=("greedy", "seeded"), default="greedy")
    ap.add_argument("--device", default="cpu", help="cuda: the same host work with the logits on a GPU "
                    "(launches instead of CPU tensor work; post includes the step's one sync)")
    ap.add_argument("--profile", action="store_true", help="cProfile the batch-256 decode row; print the top 25")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"host ms per step, V={args.vocab}, {args.sampling}, {args.steps} steps, {args.device}, "
          f"torch {torch.__version__}")
    print(f"{'batch':>5} {'step':>7} " + " ".join(f"{p:>9}" for p in PHASES + ("total",)) + f" {'us/seq':>8}")
    rows = []
    for batch in map(int, args.batches.split(",")):
        for kind in KINDS:
            prof = cProfile.Profile() if args.profile and batch == 256 and kind == "decode" else None
            row = measure(batch, kind, args.steps, args.vocab, args.sampling, prof, args.device)
            rows.append(row)
            ms = row["ms"]
            print(f"{batch:>5} {kind:>7} " + " ".join(f"{ms[p]:>9.3f}" for p in PHASES + ("step",))
                  + f" {row['us_per_seq']:>8.1f}", flush=True)
            if prof is not None:
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
                print(text.getvalue())
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_host.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
