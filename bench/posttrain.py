"""SFT packing: trained tokens/s with and without packing on chat data, and the padding each wastes.

Chat examples with a long-tailed length distribution (log-normal answer lengths, as real SFT sets have)
go through the real data path (lmforge.align.data: chat template, assistant-only loss mask) and the
Trainer's step (lmforge.train.trainer: SFT objective, forward + backward + AdamW), in three layouts:
  padded         one example per row, padded to the batch's longest (random order)
  length-grouped one example per row, batches of similar lengths (TRL's group_by_length)
  packed         several examples per row (best-fit decreasing), per-document attention and positions
Reported: rows, the fraction of row positions that are real tokens, and real (non-padding) tokens
trained per second. Before timing, the packed and padded layouts of the same examples are checked to
give the same loss (the test asserts gradients too).

    python bench/posttrain.py --smoke                 # CPU, seconds
    python bench/posttrain.py --device cuda           # H200: a ~100M-parameter model, seq 2048
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from lmforge.align import data as D
from lmforge.align.sft import SFTObjective
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.optim.config import OptimConfig
from lmforge.tokenizer.byte import ByteTokenizer
from lmforge.train.config import LoopConfig
from lmforge.train.harness import FixedBatches, StepTimer, scratch_trainer


def chat_examples(n: int, seq_len: int, seed: int = 0) -> list[D.Example]:
    """Byte-level chats: prompt 20-200 bytes, answer log-normal (median seq_len/8), truncated to fit."""
    g = torch.Generator().manual_seed(seed)
    enc = D.Encoder(ByteTokenizer(), "plain")
    out = []
    for i in range(n):
        p = int(torch.randint(20, 200, (1,), generator=g))
        a = int(math.exp(math.log(seq_len / 8) + 0.9 * float(torch.randn(1, generator=g))))
        letters = torch.randint(97, 123, (p + a,), generator=g).tolist()
        msgs = [{"role": "user", "content": bytes(letters[:p]).decode()},
                {"role": "assistant", "content": bytes(letters[p:]).decode()}]
        ids, mask = enc.chat(msgs, f"synthetic:{i}")
        out.append((ids[:seq_len + 1], mask[:seq_len + 1]))
    return [e for e in out if any(e[1][1:])]


def layouts(examples, seq_len: int, batch: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    order = [examples[i] for i in torch.randperm(len(examples), generator=g).tolist()]
    padded = [D.pad_batch(order[i:i + batch]) for i in range(0, len(order), batch)]
    by_len = sorted(order, key=lambda e: len(e[0]))
    grouped = [D.pad_batch(by_len[i:i + batch]) for i in range(0, len(by_len), batch)]
    rows = [[order[i] for i in r] for r in D.pack_rows(order, seq_len)]
    # as many row positions per batch as the padded layout's average batch holds
    avg_slots = sum(b["input_ids"].numel() for b in padded) / len(padded)
    rows_per_batch = max(1, round(avg_slots / seq_len))
    packed = [D.packed_batch(rows[i:i + rows_per_batch], seq_len) for i in range(0, len(rows), rows_per_batch)]
    return {"padded": padded, "length-grouped": grouped, "packed": packed}


def check_equal(model, examples, seq_len: int) -> float:
    """|loss(packed) - loss(padded)| on the same 8 examples, fp32."""
    obj = SFTObjective()
    few = examples[:8]
    dev = next(model.parameters()).device
    packed = D.packed_batch([[few[i] for i in r] for r in D.pack_rows(few, seq_len)], seq_len)
    with torch.no_grad():
        a, _ = obj.loss(model, {k: v.to(dev) for k, v in packed.items()})
        b, _ = obj.loss(model, {k: v.to(dev) for k, v in D.pad_batch(few).items()})
    return abs(float(a) - float(b))


def time_layout(model, batches, device, dtype, real_tokens: int) -> dict:
    """One pass over `batches` with the Trainer's step (SFT objective, torch AdamW at lr 1e-4, no
    clipping), after one untimed warm-up step on the first batch; steps timed by a StepTimer hook."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = LoopConfig(optim=OptimConfig(lr=1e-4, schedule="constant", grad_clip=0.0), max_steps=len(batches) + 1,
                     device=str(device), dtype=dtype)
    timer = StepTimer()
    with scratch_trainer(model, opt, FixedBatches([batches[0], *batches]), SFTObjective(), cfg,
                         hooks=[timer]) as trainer:
        for _ in range(cfg.max_steps):
            trainer.train_step()
    secs = timer.total
    slots = sum(b["input_ids"].numel() for b in batches)
    return {"batches": len(batches), "rows": sum(b["input_ids"].shape[0] for b in batches),
            "real_frac": real_tokens / slots, "seconds": secs, "real_tok_per_s": real_tokens / secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="toy size on CPU")
    ap.add_argument("--examples", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--out", default="bench/results/posttrain.json")
    args = ap.parse_args()
    if args.smoke:
        args.device, args.examples, args.seq, args.batch, args.depth = "cpu", 96, 256, 8, 2
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = "bf16" if device.type == "cuda" else "fp32"
    cfg = ModelConfig.from_depth(args.depth, vocab_size=257, max_seq_len=args.seq)
    model = Transformer(cfg).to(device)
    examples = chat_examples(args.examples, args.seq)
    diff = check_equal(model, examples, args.seq)
    real_tokens = sum(len(ids) - 1 for ids, _ in examples)  # every layout trains every example once
    check = "ok" if diff < 1e-4 else "MISMATCH: packed and padded layouts disagree"
    print(f"model {model.num_params() / 1e6:.1f}M params, {len(examples)} chats, seq {args.seq}; "
          f"|packed - padded| loss = {diff:.2e} ({check})")
    results = {}
    for name, batches in layouts(examples, args.seq, args.batch).items():
        try:
            results[name] = time_layout(model, batches, device, dtype, real_tokens)
        except Exception as e:  # one failing layout must not hide the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"{name}: {results[name]['error']}")
    base = results.get("padded", {}).get("real_tok_per_s")
    print(f"\n{'layout':<16}{'rows':>7}{'real tokens':>13}{'tok/s (real)':>15}{'speed-up':>10}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<16}  failed")
            continue
        up = f"{r['real_tok_per_s'] / base:>9.2f}x" if base else "        -"
        print(f"{name:<16}{r['rows']:>7}{r['real_frac']:>12.1%}{r['real_tok_per_s']:>15,.0f}{up}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "device": str(device), "loss_diff": diff, "check": check,
                               "results": results},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
