"""StreamingLLM's effect (Xiao et al. 2023, §3-4, Fig. 3 and Table 1) on a model lmforge trains here: per-character
loss over a text stream many times longer than the model's window.

    python bench/streaming.py [--steps 1500] [--stream 4096]      # ~6 min on 2 CPU cores

The model: Llama-style, 4 layers, d 128, 4 heads, RoPE, max_seq_len 128, trained on byte-level tinyshakespeare
(../shared/data; batch 12 x 128, AdamW 1e-3). The stream: the first `--stream` bytes of the validation split.
Rows, each scoring every byte of the stream after the first (cache of C = 100 keys where a cache is kept):
  dense                         one causal forward over the whole stream: RoPE positions past the 128 trained
                                (the paper's dense-attention row; the engine refuses prompts past max_seq_len)
  sliding window, recomputed    each byte scored by a fresh forward over its previous C - 1 bytes (the paper's
                                strong baseline, O(T C^2))
  StreamingLLM, cache positions the engine with StreamingLLM(sink_tokens=4, window=96, positions="cache"): the
                                4 first keys and the last 96, positions within the cache (the paper's setting)
  window attention              the same cache without sinks (sink_tokens=0, window=100): the paper's failing
                                baseline once the first tokens leave the cache
  StreamingLLM, text positions  StreamingLLM(..., positions="original"): stops at max_seq_len
Then equal cache budgets inside the window (positions the text's): 64 validation windows of 128 bytes, a 16-byte
prompt and the rest forced as the output (a logits processor; the model's own log-probs reported), under no policy,
StreamingLLM, a window without sinks and H2O at 24 keys each.
Prints mean loss (nats per byte), writes JSON ($OUT or bench/results/streaming.json) and a plot of the loss along
the stream (--out-png, default docs/img/streaming_cpu.png, the docs' figure; --out-png '' writes none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.data.shards import write_tokens  # noqa: E402
from lmforge.infer.engine import EngineConfig  # noqa: E402
from lmforge.infer.kv.policy import H2O, StreamingLLM  # noqa: E402
from lmforge.infer.llm import LLM  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.optim.config import OptimConfig  # noqa: E402
from lmforge.tokenizer.byte import ByteTokenizer  # noqa: E402
from lmforge.train.config import DataConfig, TrainConfig  # noqa: E402
from lmforge.train.trainer import Trainer  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
WINDOW, CACHE, CHUNK = 128, 100, 16


def trained(steps: int, tmp: Path) -> tuple[torch.nn.Module, np.ndarray]:
    """The byte-level model and the validation bytes."""
    ids = np.frombuffer(DATA.read_bytes(), dtype=np.uint8).astype(np.int64)
    n = int(0.9 * len(ids))
    tr = write_tokens(tmp / "train.bin", ids[:n], vocab_size=257, tokenizer="")
    va = write_tokens(tmp / "val.bin", ids[n:], vocab_size=257, tokenizer="")
    model = ModelConfig(vocab_size=257, d_model=128, n_layers=4, n_heads=4, max_seq_len=WINDOW, pos_emb="rope",
                        norm="rmsnorm", activation="swiglu")
    cfg = TrainConfig(model=model, data=DataConfig(train=(str(tr),), val=(str(va),), seq_len=WINDOW, batch_size=12,
                                                    bytes_per_token=1.0),
                      optim=OptimConfig(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, warmup_steps=100,
                                        min_lr_ratio=0.1),
                      run_dir=str(tmp / "run"), max_steps=steps, eval_every=steps, eval_batches=20, log_every=100,
                      ckpt_every=steps, device="cpu", progress=False, plot=False, seed=1337, dtype="fp32")
    trainer = Trainer(cfg)
    res = trainer.fit()
    print(f"trained {res.steps} steps in {res.wall_time:.0f} s, validation loss {res.final_val_loss:.3f}", flush=True)
    return trainer.model.eval(), ids[n:]


def recomputed(model, ids: list[int], context: int) -> np.ndarray:
    """Loss of byte t (t >= 1) from a fresh forward over bytes max(0, t - context + 1) .. t - 1."""
    out = np.zeros(len(ids) - 1)
    with torch.no_grad():
        for t in range(1, min(context, len(ids))):  # the first bytes: their whole prefix
            lp = model(torch.tensor([ids[:t]]))[0, -1].log_softmax(-1)
            out[t - 1] = -float(lp[ids[t]])
        ends = list(range(context, len(ids)))
        for i in range(0, len(ends), 64):  # windows of `context` bytes ending at the scored one, 64 at a time
            batch = torch.tensor([ids[e - context + 1:e + 1] for e in ends[i:i + 64]])
            lp = model(batch[:, :-1])[:, -1].log_softmax(-1)
            out[np.array(ends[i:i + 64]) - 1] = -lp.gather(1, batch[:, -1:]).squeeze(1).numpy()
    return out


def engine_loss(model, ids: list[int], policy, chunk: int = CHUNK, **config) -> np.ndarray:
    """Loss of every byte after the first, scored by the engine as one prompt (prompt log-probs, no generation),
    prefilled in chunks of `chunk` bytes with the policy's evictions between them."""
    llm = LLM(model, ByteTokenizer(), config=EngineConfig(block_size=4, kv_policy=policy, max_num_batched_tokens=chunk,
                                                          **config))
    out = llm.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=0))[0]
    return np.array([-d[t] for d, t in zip(out.prompt_logprobs[1:], ids[1:])])


def forced(target: list[int]):
    """A logits processor forcing the next output token to target[len(output)] (teacher forcing through the
    engine: greedy picks it, and the 'raw' log-prob reported is the model's own for it)."""
    def force(out_ids, logits):
        keep = torch.full_like(logits, float("-inf"))
        keep[target[len(out_ids)]] = 0.0
        return logits + keep
    return force


def budget_rows(model, val: np.ndarray, windows: int, budget: int, prompt: int = 16) -> list[dict]:
    """Equal cache budgets inside the model's window (positions the text's): `windows` validation windows of
    WINDOW bytes, each a `prompt`-byte prompt then its remaining bytes forced as the output, decoded through
    the engine under each policy; the loss of the bytes past position budget + prompt (where the policies
    differ) and the time, all windows in one batch."""
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(val) - WINDOW, windows)
    texts = [val[s:s + WINDOW].tolist() for s in starts]
    policies = {"full cache (no policy)": None,
                f"StreamingLLM, 4 sinks + {budget - 4}": StreamingLLM(sink_tokens=4, window=budget - 4),
                f"window of {budget} (no sinks)": StreamingLLM(sink_tokens=0, window=budget),
                f"H2O, {budget // 2} heavy + {budget // 2} recent (per kv head)": H2O(heavy=budget // 2,
                                                                                    recent=budget // 2)}
    rows = []
    for name, policy in policies.items():
        llm = LLM(model, ByteTokenizer(), config=EngineConfig(block_size=4, kv_policy=policy, max_num_seqs=windows))
        params = [SamplingParams(temperature=0, max_tokens=WINDOW - prompt, ignore_eos=True, logprobs=0,
                                 logits_processors=(forced(t[prompt:]),)) for t in texts]
        t0 = time.perf_counter()
        outs = llm.generate([t[:prompt] for t in texts], params)
        assert all(o.token_ids == t[prompt:] for o, t in zip(outs, texts))
        loss = -np.array([o.logprobs for o in outs])  # (windows, WINDOW - prompt)
        rows.append(dict(method=name, budget=budget if policy is not None else None, loss_evicting=float(loss[:, budget:].mean()),
                         loss_all=float(loss.mean()), evicted=llm.engine.stats()["evicted_tokens"],
                         seconds=time.perf_counter() - t0))
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--stream", type=int, default=4096, help="bytes of validation text scored")
    ap.add_argument("--windows", type=int, default=64, help="validation windows of the equal-budget section")
    ap.add_argument("--budget", type=int, default=24, help="keys each policy keeps in the equal-budget section")
    figure = Path(__file__).resolve().parents[1] / "docs" / "img" / "streaming_cpu.png"
    ap.add_argument("--out-png", default=str(figure),
                    help="the plot of the loss along the stream ('' for none; default: the docs' figure)")
    args = ap.parse_args(argv)
    if not DATA.exists():
        raise SystemExit(f"needs {DATA} (../shared/data, see its README)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, val = trained(args.steps, Path(tempfile.mkdtemp()))
    ids = val[:args.stream].tolist()
    rows, curves = [], {}

    def row(name: str, loss: np.ndarray | None, t0: float, note: str = "") -> None:
        past = loss[WINDOW:] if loss is not None and len(loss) > WINDOW else None
        rows.append(dict(method=name, loss_past_window=None if past is None else float(past.mean()),
                         loss_first_window=None if loss is None else float(loss[:WINDOW - 1].mean()),
                         scored=0 if loss is None else len(loss), seconds=time.perf_counter() - t0, note=note))
        if loss is not None:
            curves[name] = loss
        print(rows[-1], flush=True)

    t0 = time.perf_counter()
    with torch.no_grad():  # one causal forward over the whole stream: RoPE positions past the trained window
        lp = model(torch.tensor([ids]))[0, :-1].log_softmax(-1)
    row("dense, whole stream (positions past the window)", -lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy(),
        t0, f"O(T^2); positions > {WINDOW} never trained")
    t0 = time.perf_counter()
    row(f"sliding window, recomputed ({CACHE} bytes)", recomputed(model, ids, CACHE), t0)
    for name, policy in (("StreamingLLM, cache positions (4 sinks + 96)",
                          StreamingLLM(sink_tokens=4, window=CACHE - 4, slack=8, positions="cache")),
                         ("window attention, cache positions (no sinks, 100)",
                          StreamingLLM(sink_tokens=0, window=CACHE, slack=8, positions="cache"))):
        t0 = time.perf_counter()
        row(name, engine_loss(model, ids, policy), t0)
    # each shift re-rounds the moved keys to the cache's dtype: a bf16 cache, shifted every byte (slack 1, the
    # paper's rolling cache: each key turned ~96 times) or every 8 bytes (~12 times), against the fp32 cache
    for slack, dtype in ((1, None), (1, "bf16"), (8, "bf16")):
        t0 = time.perf_counter()
        policy = StreamingLLM(sink_tokens=4, window=CACHE - 4, slack=slack, positions="cache")
        row(f"StreamingLLM, cache positions, {dtype or 'fp32'} cache, slack {slack}",
            engine_loss(model, ids, policy, chunk=1 if slack == 1 else CHUNK, kv_cache_dtype=dtype), t0,
            "byte by byte" if slack == 1 else "")
    t0 = time.perf_counter()
    try:
        engine_loss(model, ids, StreamingLLM(sink_tokens=4, window=CACHE - 4, slack=8))
        row("StreamingLLM, text positions", None, t0, "ran (unexpected)")
    except Exception as e:  # noqa: BLE001 - the point of the row: it cannot go past the window
        row("StreamingLLM, text positions", None, t0, f"refused: {str(e).splitlines()[0][:110]}")
    print(f"\nbyte-level tinyshakespeare, {len(ids)}-byte stream, model window {WINDOW}, cache {CACHE}; CPU "
          f"({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC")
    print("| method | loss past the window (nats/byte) | loss in the first window | bytes scored | seconds | note |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"| {r['method']} | {f(r['loss_past_window'])} | {f(r['loss_first_window'])} | {r['scored']} | "
              f"{r['seconds']:.1f} | {r['note']} |")
    budget = budget_rows(model, val, args.windows, args.budget)
    print(f"\nequal budgets inside the window: {args.windows} windows of {WINDOW} bytes, 16-byte prompts, the rest "
          f"forced; loss of the bytes past {args.budget + 16} (where the policies differ)")
    print("| policy | cache budget | loss past the budget (nats/byte) | loss, all output bytes | keys evicted | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in budget:
        print(f"| {r['method']} | {r['budget'] or 'all'} | {r['loss_evicting']:.3f} | {r['loss_all']:.3f} | {r['evicted']} | "
              f"{r['seconds']:.1f} |")
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "streaming.json").write_text(json.dumps(dict(rows=rows, stream=len(ids), window=WINDOW, cache=CACHE,
                                                        budget_rows=budget), indent=1))
    if not args.out_png:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    k = 64
    for name, loss in curves.items():
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + k, smooth, label=name)
    ax.axvline(WINDOW, color="grey", ls=":", lw=1)
    ax.set(xlabel="byte position in the stream", ylabel=f"loss, nats/byte ({k}-byte mean)",
           title=f"Streaming past a {WINDOW}-position window (byte-level tinyshakespeare)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.tight_layout()
    img = Path(args.out_png)
    img.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(img, dpi=110)
    print(f"plot: {img}")


if __name__ == "__main__":
    main()
