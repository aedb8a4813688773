"""Classification fine-tuning: head-only vs full vs LoRA, the same base model, steps, batch and data.

    1. pretrain a small byte-level lmforge model (next-token loss, lmforge's Trainer) on the reference
       solutions of a verifiable task (lmforge.tasks, default: sort): "<question>\\nAnswer: <sorted list>"
    2. turn the task into classification: each question with a candidate answer, half the time the
       correct one and half the time a near miss (two neighbouring numbers of the sorted list swapped);
       the task's verifier gives the label (1 = correct). Train and held-out sets come from the task's
       disjoint splits
    3. from the same base, a linear head on the last hidden state (lmforge.align.reward.SequenceHead,
       ClassificationObjective) is trained three ways for the same steps through the Trainer:
         head   the trunk frozen (a linear probe)
         full   every parameter
         lora   LoRA r=8, alpha=16 on every attention and MLP projection, plus the head (lmforge.adapt)
    4. print trainable parameters, held-out accuracy and training tokens/s as a table, and write JSON

Learning rates are the usual ones for each regime, not tuned here: head 1e-3, full 3e-4, LoRA 1e-3.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/classify.py            # CPU, ~100 s on 2 shared cores
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/classify.py --smoke    # toy sizes, a few seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmforge.adapt import LoRAConfig, apply_lora, trainable_parameters  # noqa: E402
from lmforge.align.reward import ClassificationObjective, SequenceHead  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.optim import build_optimizer  # noqa: E402
from lmforge.optim.config import OptimConfig  # noqa: E402
from lmforge.tasks import TASKS  # noqa: E402
from lmforge.tokenizer.load import load_tokenizer  # noqa: E402
from lmforge.train.config import LoopConfig  # noqa: E402
from lmforge.train.harness import FixedBatches, StepTimer, scratch_fit  # noqa: E402
from lmforge.train.loss import LMObjective  # noqa: E402

TOK = load_tokenizer("byte")
LR = {"head": 1e-3, "full": 3e-4, "lora": 1e-3}
PROJECTIONS = ("wq", "wk", "wv", "wo", "gate", "up", "down")


def text(e, answer: str) -> str:
    return f"{e.prompt}\nAnswer: {answer}"


def near_miss(answer: str, rng: random.Random) -> str | None:
    """The sorted list with one pair of unequal neighbours swapped (None if all items are equal)."""
    items = answer.split(", ")
    pairs = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
    if not pairs:
        return None
    i = rng.choice(pairs)
    items[i], items[i + 1] = items[i + 1], items[i]
    return ", ".join(items)


def labelled(task, examples, seed: int) -> list[tuple[str, int]]:
    """(text, label) rows: the correct answer or a near miss, by a fair coin; the verifier labels them."""
    rng, rows = random.Random(seed), []
    for e in examples:
        cand = e.answer if rng.random() < 0.5 else near_miss(e.answer, rng)
        if cand is not None:
            rows.append((text(e, cand), int(task.verify(e, f"Answer: {cand}"))))
    return rows


def pad(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) ids and the (B,) index of each row's last token."""
    T = max(map(len, ids))
    out = torch.zeros(len(ids), T, dtype=torch.long)
    for i, row in enumerate(ids):
        out[i, :len(row)] = torch.tensor(row)
    return out, torch.tensor([len(r) - 1 for r in ids])


def lm_batches(texts: list[str], batch: int) -> list[dict]:
    out = []
    for i in range(0, len(texts) - batch + 1, batch):
        ids, last = pad([TOK.encode(t + "\n") for t in texts[i:i + batch]])
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        for b, n in enumerate(last.tolist()):
            targets[b, n:] = -100
        out.append({"input_ids": ids, "targets": targets})
    return out


def clf_batches(rows: list[tuple[str, int]], batch: int) -> list[dict]:
    out = []
    for i in range(0, len(rows), batch):
        ids, last = pad([TOK.encode(t) for t, _ in rows[i:i + batch]])
        out.append({"input_ids": ids, "score_index": last, "label": torch.tensor([y for _, y in rows[i:i + batch]])})
    return out


def loop(steps: int, lr: float, device: str, seed: int) -> LoopConfig:
    optim = OptimConfig(lr=lr, weight_decay=0.0, grad_clip=1.0, schedule="constant", warmup_steps=max(1, steps // 20))
    return LoopConfig(optim=optim, max_steps=steps, log_every=steps, eval_every=steps, ckpt_every=steps,
                      keep_last=1, seed=seed, device=device, dtype="fp32")


def train(model, batches, objective, steps: int, lr: float, device: str, seed: int) -> float:
    """`steps` Trainer steps; returns training tokens/s (padded input tokens, the first step untimed)."""
    timer, cfg = StepTimer(), loop(steps, lr, device, seed)
    scratch_fit(model, build_optimizer(model, cfg.optim), FixedBatches(batches), objective, cfg, hooks=[timer])
    tokens = sum(b["input_ids"].numel() for b in (batches * (steps // len(batches) + 1))[1:steps])
    return tokens / timer.total if timer.total else float("nan")


@torch.no_grad()
def accuracy(model, batches, device: str) -> float:
    model.eval()
    right = sum(int((model(b["input_ids"].to(device), b["score_index"].to(device)).argmax(-1).cpu() == b["label"]).sum())
                for b in batches)
    model.train()
    return right / sum(len(b["label"]) for b in batches)


def classifier(base: Transformer, variant: str, r: int) -> SequenceHead:
    torch.manual_seed(1)  # the same head initialisation for every variant
    model = SequenceHead(copy.deepcopy(base), out_dim=2, train_backbone=variant != "head")
    if variant == "lora":
        apply_lora(model, LoRAConfig(r=r, alpha=2 * r, targets=PROJECTIONS, trainable=("head",)))
    return model


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="toy sizes: checks the script in seconds")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--task", default="sort")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--steps", type=int, default=600, help="classification steps, the same for every variant")
    ap.add_argument("--train", type=int, default=4000, help="train problems (pretraining and classification)")
    ap.add_argument("--eval", type=int, default=600, help="held-out problems")
    ap.add_argument("--r", type=int, default=8, help="LoRA rank (alpha = 2r)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.d, args.layers, args.pretrain_steps, args.steps, args.train, args.eval = 32, 1, 5, 5, 256, 64
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(args.seed)
    task = TASKS[args.task]()
    train_ex = task.examples("train", args.train, seed=args.seed)
    test_ex = task.examples("test", args.eval, seed=args.seed)
    t0 = time.perf_counter()
    cfg = ModelConfig(vocab_size=TOK.vocab_size, d_model=args.d, n_layers=args.layers, n_heads=args.heads,
                      max_seq_len=256)
    base = Transformer(cfg).to(args.device)
    lm = lm_batches([text(e, e.answer) for e in train_ex], args.batch)
    train(base, lm, LMObjective(), args.pretrain_steps, args.pretrain_lr, args.device, args.seed)
    print(f"pretrained {sum(p.numel() for p in base.parameters()):,} parameters, {args.pretrain_steps} steps "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    train_b = clf_batches(labelled(task, train_ex, args.seed + 1), args.batch)
    test_rows = labelled(task, test_ex, args.seed + 2)
    test_b = clf_batches(test_rows, 128)
    majority = max(sum(y for _, y in test_rows), sum(1 - y for _, y in test_rows)) / len(test_rows)
    rows = []
    for variant in ("head", "full", "lora"):
        model = classifier(base, variant, args.r).to(args.device)
        count = trainable_parameters(model)
        tps = train(model, train_b, ClassificationObjective(), args.steps, LR[variant], args.device, args.seed)
        rows.append({"variant": variant, "trainable": count.trainable, "fraction": count.fraction,
                     "lr": LR[variant], "accuracy": accuracy(model, test_b, args.device), "tokens_per_s": tps})
    print(f"\n{args.task} as classification: {len(test_rows)} held-out rows, majority class {majority:.1%}; "
          f"{args.steps} steps x {args.batch} rows each")
    print(f"{'variant':<8}{'trainable':>12}{'share':>9}{'lr':>9}{'accuracy':>10}{'tokens/s':>11}")
    for r in rows:
        print(f"{r['variant']:<8}{r['trainable']:>12,}{r['fraction']:>9.2%}{r['lr']:>9.0e}{r['accuracy']:>10.1%}"
              f"{r['tokens_per_s']:>11,.0f}")
    result = {"args": vars(args), "majority": majority, "rows": rows, "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"total {result['wall_s']} s")
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results") / "classify.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
