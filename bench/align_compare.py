"""DPO vs IPO vs KTO vs SimPO vs ORPO on the same verifier-made preference pairs and the same budget.

    1. SFT a small byte-level lmforge model on a verifiable task's reference solutions (lmforge.tasks)
    2. sample 4 completions per train prompt from it; the task's verifier splits them into correct and
       wrong; one (correct, wrong) pair per prompt that has both (lmforge.align.sampled.preference_pairs);
       held-out pairs are sampled the same way on test prompts
    3. from the SFT model (also the frozen reference), each objective trains for the same steps, batch
       and learning rate; KTO sees each pair as one desirable and one undesirable example
    4. report held-out greedy accuracy and the mean chosen-minus-rejected log-prob margin on held-out
       pairs, before (the SFT model) and after, as a table, JSON and a plot
    5. a reward model: the SFT model with a scalar head (SequenceHead), Bradley-Terry loss
       (RewardObjective) on the same train pairs; held-out pair accuracy (r(chosen) > r(rejected))
       before (random head) and after

Every stage trains through lmforge's Trainer with lmforge.align's objectives and ExampleSources
(bench/align_common.fit), as `lmforge sft|dpo|rm` do.

Hyper-parameters are each method's usual defaults (TRL / the papers), not tuned here: DPO beta 0.1,
IPO beta 0.1, KTO beta 0.1, SimPO beta 2.0 gamma 1.0 (the paper's gamma/beta = 0.5), ORPO lambda 0.1;
learning rate 1e-4 for all, 100 steps x 32 pairs (~1.3 epochs over the ~2400 pairs of the default sizes); the
reward model the same steps, batch and learning rate (--rm-steps / --rm-lr).

A CPU run split into two jobs (2 shared cores, 2026-12-02: SFT ~3 min, the rest ~5 min):
    python bench/align_compare.py --sft-cache /tmp/sft.pt --sft-only
    python bench/align_compare.py --sft-cache /tmp/sft.pt
(a rerun with the same --sft-cache skips SFT; --methods dpo,ipo,kto splits the second job further)

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python bench/align_compare.py --smoke   # toy sizes, ~5 s on CPU
    PYTHONPATH=$PWD python bench/align_compare.py --device cuda                # one H200, est. ~3 minutes

Sizes come from SIZES by --smoke / --device (explicit flags win). The CPU-sized SFT model stops near 30%
held-out accuracy on count, which is about what always answering the most common count (2) scores (28% of
the test prompts), so preference training had little to act on; the GPU size trains a 5M-parameter SFT model
(d 256, 6 layers) for 6,000 steps on 100,000 examples. The time estimate is launch-bound eager steps
(~7,000 optimizer steps at ~15 ms, ~2,000 engine steps of 256 rows).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.align_common import (SIZED, STOP, Clock, Engine, accuracy, fit, fixed_batches, model,  # noqa: E402
                                parser, sft_records, sized_args, source, write_json)
from lmforge.align.dpo import DPOConfig, DPOObjective  # noqa: E402
from lmforge.align.kto import KTOConfig, KTOObjective  # noqa: E402
from lmforge.align.logprobs import batch_logps  # noqa: E402
from lmforge.align.orpo import ORPOConfig, ORPOObjective  # noqa: E402
from lmforge.align.reward import RewardObjective, SequenceHead, scores  # noqa: E402
from lmforge.align.sampled import preference_pairs  # noqa: E402
from lmforge.align.sft import SFTObjective  # noqa: E402
from lmforge.infer.sampling import SamplingParams  # noqa: E402
from lmforge.tasks import TASKS  # noqa: E402

METHODS = {
    "dpo": lambda ref: DPOObjective(DPOConfig(beta=0.1), reference=ref),
    "ipo": lambda ref: DPOObjective(DPOConfig(beta=0.1, loss_type="ipo"), reference=ref),
    "kto": lambda ref: KTOObjective(KTOConfig(beta=0.1), reference=ref),
    "simpo": lambda ref: DPOObjective(DPOConfig(beta=2.0, loss_type="simpo", simpo_gamma=1.0)),
    "orpo": lambda ref: ORPOObjective(ORPOConfig(beta=0.1)),
}


def kto_records(pairs: list[dict]) -> list[dict]:
    """Each pair as two unpaired records (chosen desirable, rejected not; their sampled ids kept); KTOObjective
    builds its KL rows (every prompt with the next row's completion, TRL's mismatched pairs)."""
    def side(x: dict, name: str, label: bool) -> dict:
        ids = {"completion_ids": x[f"{name}_ids"]} if f"{name}_ids" in x else {}
        return {"prompt": x["prompt"], "prompt_ids": x["prompt_ids"], "completion": x[name], **ids, "label": label}
    return [side(x, "chosen", True) for x in pairs] + [side(x, "rejected", False) for x in pairs]


def pair_records(pairs: list[dict]) -> list[dict]:
    """Verifier-made pairs as preference records: conversational, with the sampled ids (each sampled side ends
    with the stop string's newline; a reference solution gets the plain template's, the same)."""
    return pairs


@torch.no_grad()
def margin(model, pairs: list[dict], T: int, device: str) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected) (sums over the completion tokens)."""
    model.eval()
    diffs = []
    for b in fixed_batches(pair_records(pairs), "preference", T):
        (c, r), _, _ = batch_logps(model, {k: v.to(device) for k, v in b.items()}, ("chosen_", "rejected_"))
        diffs.append(c - r)
    model.train()
    return float(torch.cat(diffs).mean())


@torch.no_grad()
def pair_accuracy(rm, pairs: list[dict], T: int, device: str) -> float:
    """Fraction of pairs the reward model scores r(chosen) > r(rejected)."""
    rm.eval()
    right = []
    for b in fixed_batches(pair_records(pairs), "preference", T):
        b = {k: v.to(device) for k, v in b.items()}
        right.append(scores(rm, b, "chosen_")[:, 0] > scores(rm, b, "rejected_")[:, 0])
    rm.train()
    return float(torch.cat(right).float().mean())


def sample_pairs(sft, task, examples, args, seed):
    params = SamplingParams(n=args.samples, temperature=1.0, max_tokens=args.max_tokens, stop=STOP, seed=seed)
    llm = Engine(sft)
    out = preference_pairs(llm, task, examples, params, seed=seed, reference_fallback=args.smoke)
    sft.train()
    return out


SIZES = {
    # the 2-core CPU recipe (2026-12-02, ~8 minutes in two jobs; see the module docstring)
    "cpu": dict(d=96, layers=3, sft_steps=1000, sft_lr=3e-3, sft_examples=4000, pair_prompts=4000, eval=1000,
                batch=32, pref_steps=100),
    # --smoke: toy sizes that check the script in seconds
    "smoke": dict(d=32, layers=1, sft_steps=60, sft_lr=3e-3, sft_examples=200, pair_prompts=64, eval=48, batch=8,
                  pref_steps=10),
    # --device cuda: a 5M-parameter SFT model trained on ~2 epochs of 100,000 examples at nanoGPT's rate for a
    # 6-layer model (1e-3); the pairs and the preference stage as on CPU; 2,000 held-out prompts
    "cuda": dict(d=256, layers=6, sft_steps=6000, sft_lr=1e-3, sft_examples=100_000, pair_prompts=4000, eval=2000,
                 batch=32, pref_steps=100),
}


def parse(argv=None) -> argparse.Namespace:
    ap, sized = parser(__doc__), SIZED
    ap.add_argument("--d", type=int, help=f"model width {sized}")
    ap.add_argument("--layers", type=int, help=sized)
    ap.add_argument("--sft-steps", type=int, help=sized)
    ap.add_argument("--sft-lr", type=float, help=sized)
    ap.add_argument("--sft-examples", type=int, help=f"SFT examples; the pair prompts are the first of them {sized}")
    ap.add_argument("--pref-steps", type=int, help=sized)
    ap.add_argument("--pref-lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, help=sized)
    ap.add_argument("--pair-prompts", type=int, help=sized)
    ap.add_argument("--eval", type=int, help=f"held-out prompts {sized}")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--rm-steps", type=int, default=0, help="reward-model steps (0 = --pref-steps)")
    ap.add_argument("--rm-lr", type=float, default=0.0, help="reward-model learning rate (0 = --pref-lr)")
    ap.add_argument("--sft-cache", default="", help="load the SFT model from this file if it exists, else save it")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--sft-only", action="store_true", help="stop after SFT (with --sft-cache: split a CPU run)")
    ap.add_argument("--no-rm", action="store_true", help="skip the reward-model stage")
    return sized_args(ap.parse_args(argv), SIZES)


def sft_model(args, train_ex):
    """The SFT model every method starts from (and its log); cached in --sft-cache when given."""
    sft = model(args.d, args.layers, 4, args.T, args.seed, args.device)
    if args.sft_cache and Path(args.sft_cache).exists():
        saved = torch.load(args.sft_cache, map_location=args.device)
        sft.load_state_dict(saved["model"])
        return sft, saved["log"]
    data = source(sft_records(train_ex), "sft", args.T, args.batch, args.seed)
    log = fit(sft, SFTObjective(), data, args.sft_steps, args.sft_lr, args.device)
    if args.sft_cache:
        torch.save({"model": sft.state_dict(), "log": log}, args.sft_cache)
    return sft, log


def run_methods(sft, task, pairs, held_pairs, test_ex, args, clock) -> dict:
    """Every method from a copy of the SFT model (its frozen reference another copy), same steps/batch."""
    dev = args.device
    results = {"before": {"accuracy": accuracy(sft, task, test_ex, args.max_tokens),
                          "margin": margin(sft, held_pairs, args.T, dev)}}
    for name in args.methods.split(","):
        try:
            results[name] = run_method(name, sft, task, pairs, held_pairs, test_ex, args)
        except Exception as e:  # one broken method must not lose the others' rows
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[{clock()}s] {name} FAILED: {results[name]['error']}", flush=True)
            continue
        print(f"[{clock()}s] {name}: acc {results[name]['accuracy']:.3f} margin {results[name]['margin']:.2f}",
              flush=True)
    return results


def run_method(name, sft, task, pairs, held_pairs, test_ex, args) -> dict:
    dev = args.device
    policy = copy.deepcopy(sft)
    obj = METHODS[name](copy.deepcopy(sft))
    if name == "kto":  # the same pairs as 2x batch unpaired rows
        data = source(kto_records(pair_records(pairs)), "kto", args.T, 2 * args.batch, args.seed)
    else:
        data = source(pair_records(pairs), "preference", args.T, args.batch, args.seed)
    log = fit(policy, obj, data, args.pref_steps, args.pref_lr, dev)
    return {"accuracy": accuracy(policy, task, test_ex, args.max_tokens),
            "margin": margin(policy, held_pairs, args.T, dev),
            "train_margin_after": margin(policy, pairs[:256], args.T, dev), "log": log}


def reward_model(sft, pairs, held_pairs, args) -> dict:
    """A scalar head on a copy of the SFT model, Bradley-Terry on the train pairs; held-out pair accuracy."""
    torch.manual_seed(args.seed)
    rm = SequenceHead(copy.deepcopy(sft)).to(args.device)
    before = pair_accuracy(rm, held_pairs, args.T, args.device)
    data = source(pair_records(pairs), "preference", args.T, args.batch, args.seed)
    log = fit(rm, RewardObjective(), data, args.rm_steps or args.pref_steps, args.rm_lr or args.pref_lr, args.device)
    return {"accuracy_before": before, "accuracy": pair_accuracy(rm, held_pairs, args.T, args.device),
            "train_accuracy": pair_accuracy(rm, pairs[:256], args.T, args.device), "log": log}


def main(argv=None):
    args = parse(argv)
    clock = Clock()
    task = TASKS[args.task]()
    train_ex = task.examples("train", max(args.pair_prompts, args.sft_examples), seed=args.seed)
    test_ex = task.examples("test", args.eval, seed=args.seed)

    sft, sft_log = sft_model(args, train_ex)
    print(f"[{clock()}s] SFT done: loss {sft_log[-1]['loss']:.3f}", flush=True)
    if args.sft_only:
        return

    # --smoke's toy model is rarely right: its pairs fall back to the reference solution as chosen
    pairs, pair_stats = sample_pairs(sft, task, train_ex[:args.pair_prompts], args, args.seed)
    held_pairs, held_stats = sample_pairs(sft, task, test_ex, args, args.seed + 1)
    print(f"[{clock()}s] pairs: train {pair_stats} held-out {held_stats}", flush=True)
    if len(pairs) < args.batch or not held_pairs:  # report what happened instead of failing the run
        print(f"too few verifier-made pairs ({len(pairs)} train, {len(held_pairs)} held-out) at this size")
        write_json(f"align_compare_{args.task}_s{args.seed}.json", {"args": vars(args), "sft_log": sft_log,
                   "pairs": pair_stats, "held_out_pairs": held_stats, "results": None})
        return

    rm = None if args.no_rm else reward_model(sft, pairs, held_pairs, args)
    if rm is not None:
        print(f"[{clock()}s] reward model: held-out pair accuracy {rm['accuracy_before']:.3f} -> {rm['accuracy']:.3f}",
              flush=True)
    results = run_methods(sft, task, pairs, held_pairs, test_ex, args, clock)

    payload = {"args": vars(args), "sft_log": sft_log, "pairs": pair_stats, "held_out_pairs": held_stats,
               "reward_model": rm, "results": results, "seconds": clock()}
    path = write_json(f"align_compare_{args.task}_s{args.seed}{'_smoke' if args.smoke else ''}.json", payload)
    plot(results, path.with_suffix(".png"))
    print(f"\ntask {args.task}: {len(pairs)} train pairs, {len(held_pairs)} held-out pairs, "
          f"{args.pref_steps} steps x batch {args.batch} pairs (KTO: the same pairs as 2x batch unpaired rows)")
    print("| method | held-out accuracy | held-out margin (nats) |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['accuracy']:.3f} | {r['margin']:+.2f} |" if "error" not in r else
              f"| {name} | failed: {r['error'][:80]} | |")
    if rm is not None:
        print(f"reward model (SFT + scalar head, {args.rm_steps or args.pref_steps} steps): held-out pair accuracy "
              f"{rm['accuracy_before']:.3f} (untrained head) -> {rm['accuracy']:.3f} (train pairs "
              f"{rm['train_accuracy']:.3f})")
    print(f"wrote {path}")


def plot(results: dict, path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib missing: no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results if n != "before" and "error" not in results[n]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, key, title in zip(axes, ("accuracy", "margin"), ("held-out accuracy", "held-out log-prob margin")):
        ax.bar(names, [results[n][key] for n in names], color="tab:blue")
        ax.axhline(results["before"][key], color="k", ls="--", label="SFT (before)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
