"""The persistent one-launch decoder layer (lmforge.kernels.decode_layer) on its own: per-layer time and
weight bandwidth of every candidate configuration, and each phase's time when launched alone.

    python bench/decode_layer.py                 # 1.1B Llama layer shape, 22 distinct layers, bf16, 300 keys

22 layers with their own random weights (1.94 GB: none stays in the 50 MB L2), one CUDA graph per variant
replaying all of them (the barrier counters zeroed at its start, as the embedding kernel does in a step);
median of 20 replays. Phase rows: the same 22 layers, one phase per launch (no barriers).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from lmforge.utils import capture_cuda_graph


def build(L, H, KV, hd, D, FF, ctx, bs, dtype, dev):
    from lmforge.kernels import decode_layer as dl
    from lmforge.model.layers.rope import RotaryEmbedding

    w = lambda n, k: (torch.randn(n, k, device=dev) / k ** 0.5).to(dtype)  # noqa: E731
    blocks = -(-(ctx + 1) // bs)
    layers = [dict(g1=torch.ones(D, device=dev, dtype=dtype), wqkv=(w(H * hd, D), w(KV * hd, D), w(KV * hd, D)),
                   wo=w(D, H * hd), g2=torch.ones(D, device=dev, dtype=dtype), wgu=(w(FF, D), w(FF, D)), wd=w(D, FF),
                   k=torch.randn(blocks, bs, KV, hd, device=dev).to(dtype),
                   v=torch.randn(blocks, bs, KV, hd, device=dev).to(dtype)) for _ in range(L)]
    rope = RotaryEmbedding(hd, max_seq_len=ctx + 8)
    return dict(layers=layers, cos=rope.cos_table.to(dev), sin=rope.sin_table.to(dev),
                table=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
                pos=torch.tensor([ctx], device=dev), x=torch.randn(D, device=dev),
                work=dl.workspace(L, H, hd, FF, dtype, dev))


def timed(fn, reps=20) -> float:
    """Median seconds of one replay of a CUDA graph of fn."""
    fn()
    torch.cuda.synchronize()
    g, _ = capture_cuda_graph(fn)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def main():
    from lmforge.kernels import decode_layer as dl

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--configs", type=int, default=len(dl.LAYER_CONFIGS), help="the first N candidates")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/decode_layer.py times CUDA graphs and needs a CUDA GPU (the layer kernel's CPU checks, "
                         "in Triton's interpreter: tests/kernels/test_decode_layer.py)")
    dev = torch.device("cuda")
    L, H, KV, hd, D, FF = args.layers, 32, 4, 64, 2048, 5632
    t = build(L, H, KV, hd, D, FF, args.context, 16, torch.bfloat16, dev)
    weight_bytes = sum(p.numel() * p.element_size() for lay in t["layers"]
                       for p in (lay["wqkv"] + lay["wgu"] + (lay["wo"], lay["wd"])))
    copy = torch.empty(weight_bytes // 2, dtype=torch.bfloat16, device=dev)
    bw = 2 * copy.numel() * 2 / timed(lambda: copy.clone())
    print(f"{torch.cuda.get_device_name()}: {L} layers, {weight_bytes / 1e9:.2f} GB of weights; copy {bw / 1e12:.2f} TB/s "
          f"-> {weight_bytes / bw / L * 1e6:.1f} us per layer at copy bandwidth", flush=True)

    def run(config, split=False, phases=None):
        def fn():
            t["work"].sync.zero_()
            for i, lay in enumerate(t["layers"]):
                dl.decode_layer(t["x"], lay["g1"], lay["wqkv"], t["cos"], t["sin"], t["pos"], lay["k"], lay["v"],
                                t["table"], lay["wo"], lay["g2"], lay["wgu"], lay["wd"], t["work"], i, eps=1e-5,
                                scale=hd ** -0.5, config=config, split=split, phases=phases)
        return fn

    rows = []
    for config in dl.LAYER_CONFIGS[:args.configs]:
        try:
            s = timed(run(config))
        except Exception as e:  # noqa: BLE001
            print(f"{config}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        rows.append((s, config))
        print(f"one launch {config}: {s / L * 1e6:.1f} us/layer, {weight_bytes / s / 1e12:.2f} TB/s "
              f"({weight_bytes / s / bw:.1%} of copy)", flush=True)
    if not rows:
        raise SystemExit("every configuration failed: see the errors above")
    best = min(rows)[1]
    s = timed(run(best, split=True))
    print(f"five launches {best}: {s / L * 1e6:.1f} us/layer", flush=True)
    names = ("q/k/v + RoPE", "attention", "o-proj", "gate/up", "down")
    nbytes = (D * (H + 2 * KV) * hd * 2, 0, D * H * hd * 2, 2 * FF * D * 2, D * FF * 2)
    for p, (name, nb) in enumerate(zip(names, nbytes)):
        s = timed(run(best, split=True, phases=(p,)))
        print(f"  phase {p} {name:13s}: {s / L * 1e6:6.2f} us/layer" + (f", {nb / (s / L) / 1e12:.2f} TB/s" if nb else ""),
              flush=True)


if __name__ == "__main__":
    main()
