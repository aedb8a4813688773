"""Distillation evidence: does a small student learn more from a larger lmforge-trained teacher than from the
data alone, at equal steps?

    teacher  a larger byte-level model SFT-trained on a verifiable task (lmforge.tasks)
    students the same small model, initialisation, batches, steps and learning rate, trained on
      data          cross-entropy on the reference solutions
      token-KD      forward KL to the teacher's next-token distributions on the same rows
                    (DistillObjective, temperature 1, no data term)
      token-JSD     GKD's generalised JSD (beta 0.5) on the same rows
      seq-KD        cross-entropy on the teacher's greedy outputs for the train prompts (Kim & Rush 2016)
      seq-KD+verify cross-entropy on teacher samples the task's verifier accepts (West et al. 2022)
    reported: held-out loss of the reference completions (token mean) and held-out greedy accuracy

Teacher and students train through lmforge's Trainer (bench/align_common.fit) with SFTObjective /
DistillObjective over lmforge.align.data ExampleSources.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/align_distill.py --smoke   # toy sizes, ~6 s on CPU
    # CPU, two jobs (teacher 128,3 instead of the default 192,4):
    python bench/align_distill.py --teacher 128,3 --batch 32 --teacher-steps 1500 --teacher-cache /tmp/t.pt --teacher-only
    python bench/align_distill.py --teacher 128,3 --batch 32 --teacher-cache /tmp/t.pt
    PYTHONPATH=$PWD python bench/align_distill.py --device cuda               # one H200, est. ~4 minutes

Sizes come from SIZES by --smoke / --device (explicit flags win). The CPU-sized teachers, trained for 16-21
epochs over 3,000 examples, were no better than the student (docs/benchmarks.md), so no distillation effect
was possible; the GPU size trains a 10.8M-parameter teacher on 100,000 examples. The time estimate is launch-bound eager steps
(~7,000 optimizer steps at ~15 ms, ~5,000 engine steps of 256 rows for the teacher's records and accuracy).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.align_common import (SIZED, STOP, Clock, Engine, accuracy, completion_loss,  # noqa: E402
                                fit, model, parser, sft_records, sized_args, source, write_json)
from lmforge.align.distill import DistillConfig, DistillObjective  # noqa: E402
from lmforge.align.sampled import distillation_records  # noqa: E402
from lmforge.align.sft import SFTObjective  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.tasks import TASKS  # noqa: E402




def teacher_records(teacher, task, examples, args, verify: bool):
    params = (SamplingParams(n=4, temperature=1.0, max_tokens=args.max_tokens, stop=STOP, seed=args.seed)
              if verify else SamplingParams(temperature=0.0, max_tokens=args.max_tokens, stop=STOP))
    llm = Engine(teacher)
    recs, stats = distillation_records(llm, examples, params, task=task if verify else None)
    teacher.train()
    return recs, stats


def run_student(objective, records, task, test_ex, args) -> dict:
    """The small model, from the same initialisation every time, trained on `records` by `objective`."""
    sd, sl = map(int, args.student.split(","))
    student = model(sd, sl, 4, args.T, args.seed, args.device)
    log = fit(student, objective, source(records, "sft", args.T, args.batch, args.seed), args.steps, args.lr,
              args.device)
    return {"loss": completion_loss(student, test_ex, args.T, args.device),
            "accuracy": accuracy(student, task, test_ex, args.max_tokens), "params": student.num_params(),
            "log": log}


SIZES = {
    "cpu": dict(teacher="192,4", student="64,2", teacher_steps=2000, teacher_lr=0.0, steps=600, train=3000, eval=1000,
                batch=32, record_prompts=0),
    # --smoke: toy sizes that check the script in seconds
    "smoke": dict(teacher="48,2", student="32,1", teacher_steps=80, teacher_lr=0.0, steps=40, train=200, eval=48,
                  batch=8, record_prompts=0),
    # --device cuda: a 10.8M-parameter teacher (nanoGPT's 6 x 384 shape and its rate 1e-3) on ~1.3 epochs of
    # 100,000 examples, so that it does not overfit a small set; the students as on CPU; the teacher answers
    # 16,000 prompts for sequence-level KD
    "cuda": dict(teacher="384,6", student="64,2", teacher_steps=4000, teacher_lr=1e-3, steps=600, train=100_000,
                 eval=2000, batch=32, record_prompts=16_000),
}


def parse(argv=None) -> argparse.Namespace:
    ap, sized = parser(__doc__), SIZED
    ap.add_argument("--teacher", help=f"d_model,n_layers {sized}")
    ap.add_argument("--student", help=f"d_model,n_layers {sized}")
    ap.add_argument("--teacher-steps", type=int, help=sized)
    ap.add_argument("--teacher-lr", type=float, help=f"0 = --lr {sized}")
    ap.add_argument("--steps", type=int, help=f"steps of every student {sized}")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, help=sized)
    ap.add_argument("--train", type=int, help=f"training examples {sized}")
    ap.add_argument("--eval", type=int, help=f"held-out prompts {sized}")
    ap.add_argument("--record-prompts", type=int, help=f"prompts the teacher answers for seq-KD (0 = all) {sized}")
    ap.add_argument("--teacher-cache", default="", help="load the teacher from this file if it exists, else save it")
    ap.add_argument("--teacher-only", action="store_true",
                    help="stop after training the teacher (a cached one is trained --teacher-steps more)")
    ap.add_argument("--variants", default="data,token-KD,seq-KD+verify,seq-KD,token-JSD")
    return sized_args(ap.parse_args(argv), SIZES)


def main(argv=None):
    args = parse(argv)
    clock, dev = Clock(), args.device
    task = TASKS[args.task]()
    train_ex = task.examples("train", args.train, seed=args.seed)
    test_ex = task.examples("test", args.eval, seed=args.seed)
    td, tl = map(int, args.teacher.split(","))

    teacher = model(td, tl, 4, args.T, args.seed + 100, dev)
    cached = bool(args.teacher_cache) and Path(args.teacher_cache).exists()
    if cached:
        teacher.load_state_dict(torch.load(args.teacher_cache, map_location=dev))
    if not cached or args.teacher_only:  # --teacher-only on a cached teacher trains it further (chunks)
        fit(teacher, SFTObjective(), source(sft_records(train_ex), "sft", args.T, args.batch, args.seed + 100),
            args.teacher_steps, args.teacher_lr or args.lr, dev)
        if args.teacher_cache:
            torch.save(teacher.state_dict(), args.teacher_cache)
        if args.teacher_only:
            return
    results = {"teacher": {"loss": completion_loss(teacher, test_ex, args.T, dev),
                           "accuracy": accuracy(teacher, task, test_ex, args.max_tokens),
                           "params": teacher.num_params()}}
    print(f"[{clock()}s] teacher {results['teacher']}", flush=True)
    prompts = train_ex[:args.record_prompts or None]
    stats: dict = {}

    def seq_records(verify: bool):  # the teacher answers only when a sequence-level variant runs
        recs, stats["verified" if verify else "greedy"] = teacher_records(teacher, task, prompts, args, verify)
        print(f"[{clock()}s] seq-KD records ({'verified' if verify else 'greedy'}) {stats}", flush=True)
        return recs  # (their sampled ids end with the stop string's newline, as sft_records' text)

    data = sft_records(train_ex)
    variants = {
        "data": lambda: (SFTObjective(), data),
        "token-KD": lambda: (DistillObjective(DistillConfig(divergence="forward_kl"), teacher=teacher), data),
        "token-JSD": lambda: (DistillObjective(DistillConfig(divergence="jsd", beta=0.5), teacher=teacher), data),
        "seq-KD": lambda: (SFTObjective(), seq_records(False)),
        "seq-KD+verify": lambda: (SFTObjective(), seq_records(True)),
    }
    for name in args.variants.split(","):
        objective, records = variants[name]()
        if len(records) < args.batch:
            results[name] = {"skipped": f"{len(records)} records"}
            continue
        try:
            results[name] = run_student(objective, records, task, test_ex, args)
        except Exception as e:  # one broken variant must not lose the others' rows
            results[name] = {"skipped": f"failed: {type(e).__name__}: {e}"[:100]}
            print(f"[{clock()}s] {name} {results[name]['skipped']}", flush=True)
            continue
        print(f"[{clock()}s] {name}: held-out loss {results[name]['loss']:.4f} acc {results[name]['accuracy']:.3f}",
              flush=True)

    payload = {"args": vars(args), "records": stats,
               "results": results, "seconds": clock()}
    path = write_json(f"align_distill_{args.task}_s{args.seed}{'_smoke' if args.smoke else ''}.json", payload)
    print(f"\ntask {args.task}: teacher {args.teacher} ({results['teacher']['params']:,} params), student "
          f"{args.student}, {args.steps} steps x batch {args.batch} for every student")
    print("| model | held-out loss (nats/token) | held-out accuracy |\n|---|---|---|")
    for name, r in results.items():
        if "skipped" in r:
            print(f"| {name} | skipped: {r['skipped']} | |")
        else:
            print(f"| {name} | {r['loss']:.4f} | {r['accuracy']:.3f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
