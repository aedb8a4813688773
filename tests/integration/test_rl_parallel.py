"""RL rollouts under data parallelism (lmforge.train.distributed: rollout_model, sync_rollout, full_weights):
the engine cannot run a sharded module, so each rank samples its share of a step's rollouts on an unsharded
copy of the policy, refreshed from the FSDP2-sharded (or DDP-replicated) policy at the top of every step.

On 2 gloo processes, for 3 optimizer steps (the sync after an update is exercised twice), each rank's
rollouts must be what a fresh single-process engine samples from the policy's full weights at the step's
start with the same seeds (same tokens, log-probs within 1e-5 in fp32), the sampled log-probs must be the
sharded training forward's (ratio = 1 within 1e-5 at the step's start), and the rollouts and loss curve
must be those of one process sampling the whole batch (and train its weights). Also a LoRA policy (its
rollout copy carries the adapters) and DDP, and full_weights of tensor-parallel and bf16-FSDP2 layouts. The
negative control: without the sync, the second step samples from stale weights and both checks see it.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.adapt.lora import LoRAConfig, apply_lora
from lmforge.errors import ConfigError
from lmforge.infer.engine import EngineConfig
from lmforge.infer.llm import LLM
from lmforge.optim import build_optimizer
from lmforge.optim.config import OptimConfig
from lmforge.parallel.config import ParallelConfig
from lmforge.parallel.launch import run_local
from lmforge.parallel.pp import split_stage
from lmforge.parallel.runner import ParallelRunner
from lmforge.tasks.listops import Counting
from lmforge.train import distributed
from lmforge.train.config import LoopConfig
from lmforge.train.trainer import Trainer

from .test_rl_seam import GRPO, TOL, Checks, CountTokenizer, Rollouts, collate, policy

PARTS = 2  # the global batch's prompts in 2 parts, each with its own seed: rank r of 2 samples part r
STEPS = 3
ATOL = 1e-4  # weights: the ranks' gradients are summed in another order than one process's (as in tests/train)
OPT_EPS = 1.0
"""AdamW's eps = 1 makes its step nearly linear in the gradients (as tests/parallel/layouts.OPT_LINEAR): with the
default 1e-8, a parameter with a near-zero gradient steps by ~lr times the sign of its last-bit noise, which the
ranks' summation order flips - on an AVX2 EPYC the weights then parted by 1.05e-3 and the rollouts' log-probs by
4.8e-4 (2026-12-05, at the code that passed on another machine), a comparison of Adam's sign of noise, not of
the gradients"""
TASK = Counting(alphabet="ab", length=(1, 3))
LORA = LoRAConfig(r=2, alpha=4.0, targets=("wq", "wv"))


def build(lora: bool = False) -> torch.nn.Module:
    model = policy(0)
    return apply_lora(model, LORA) if lora else model


class ShareRollouts(Rollouts):
    """GRPO rollouts of which each data-parallel rank samples its own share (per_rank): part p of a batch's
    prompts is drawn with seed (seed + batch) * PARTS + p, so one process sampling every part makes the same
    global batch as 2 ranks sampling one each. The engine is synced once per optimizer step, in begin_step
    on every rank (sync=False: the negative control). Records each part it sampled and the policy's full
    weights at each step's start, for the checks."""

    per_rank = True

    def __init__(self, *args, sync: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.sync, self.part, self.sampled, self.weights = sync, (0, 1), [], []

    def begin_step(self, trainer) -> None:
        if trainer.runner is not None:
            self.part = (trainer.runner.dp_rank, trainer.runner.dp_size)
        self.weights.append({k: v.clone() for k, v in distributed.full_weights(trainer.model).items()})
        if self.sync:
            distributed.sync_rollout(self.llm, trainer.model)

    def sample_part(self, part: int) -> list[tuple]:
        exs = self.batch_examples()
        return self.sample(exs[part * len(exs) // PARTS:(part + 1) * len(exs) // PARTS],
                           (self.seed + self.batches) * PARTS + part)

    def next_batch(self) -> dict[str, torch.Tensor]:
        rank, size = self.part
        rows = []
        for p in range(rank * PARTS // size, (rank + 1) * PARTS // size):
            part = self.sample_part(p)
            self.sampled.append({"step": self.batches, "part": p, "tokens": [r[1] for r in part],
                                 "logprobs": [r[2] for r in part]})
            rows += part
        self.batches += 1
        return collate(rows)


class LocalGRPO(GRPO):
    """GRPO keeping this rank's own ratio errors (the Trainer logs their mean over the ranks)."""

    def __init__(self):
        super().__init__()
        self.ratio_errors: list[float] = []

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        self.ratio_errors.append(float(metrics["ratio_error"]))
        return loss, metrics


def fit(run_dir: str, layout: dict | None = None, *, sync: bool = True, lora: bool = False, steps: int = STEPS
        ) -> dict:
    """The GRPO loop on this process's layout (None: one process, the whole batch)."""
    model = build(lora)
    par = ParallelConfig(**layout) if layout else None
    llm = LLM(distributed.rollout_model(model, par), CountTokenizer(),
              config=EngineConfig(block_size=4, max_num_seqs=16, num_kv_tokens=2048))
    src = ShareRollouts(llm, TASK, TASK.examples("train", 8, seed=0), sync=sync)
    model, src, runner = distributed.distribute(model, src, par, device=torch.device("cpu"), seq_len=32, batch_size=16)
    cfg = LoopConfig(run_dir=run_dir, max_steps=steps, log_every=1, eval_every=100, ckpt_every=100, device="cpu",
                     progress=False, plot=False, seed=0, optim=OptimConfig(lr=3e-2, weight_decay=0.0,
                     eps=OPT_EPS))
    objective, checks = LocalGRPO(), Checks(llm)
    Trainer(model, build_optimizer(model, cfg.optim), src, objective, config=cfg, runner=runner,
            hooks=[checks]).fit()
    return {"sampled": src.sampled, "weights": src.weights, "ratio_errors": objective.ratio_errors,
            "rewards": [row["reward"] for row in checks.rows]}


FSDP, DDP = {"dp_shard": 2}, {"dp_replicate": 2}
RUNS = {"fsdp": {"layout": FSDP}, "ddp": {"layout": DDP}, "fsdp_lora": {"layout": FSDP, "lora": True},
        "fsdp_no_sync": {"layout": FSDP, "sync": False, "steps": 2}}  # the negative control


def _worker(rank: int, world: int, tmp: str) -> dict:
    got = {name: fit(f"{tmp}/{name}", **kw) for name, kw in RUNS.items()}
    # full_weights beyond the runs: DDP's are the module's own tensors; tensor-parallel ones are gathered
    # whole, and FSDP2's in the model's dtype (fp32) when it computes in bf16
    for name, layout in {"ddp": DDP, "tp": {"tp": 2}, "fsdp_bf16": {**FSDP, "param_dtype": "bf16"}}.items():
        model = build()
        whole = {k: v.clone() for k, v in model.state_dict().items()}
        sharded = ParallelRunner(model, ParallelConfig(**layout), device="cpu", seq_len=32, batch_size=16).model
        full = distributed.full_weights(sharded)
        own = {k: v.data_ptr() for k, v in sharded.named_parameters()}
        got[f"{name}_full"] = {"gap": weight_gap(full, whole), "dtypes": {str(v.dtype) for v in full.values()},
                               "shared": {k: v.data_ptr() for k, v in full.items()} == own}
    # what sync_rollout sends of a LoRA policy: its adapters (and buffers), not the frozen base
    sharded = ParallelRunner(build(lora=True), ParallelConfig(**FSDP), device="cpu", seq_len=32, batch_size=16).model
    got["lora_sent"] = sorted(distributed.full_weights(sharded, frozen=False))
    return got


def replay(record: dict, weights: dict[str, torch.Tensor], lora: bool) -> list[tuple]:
    """The part a record holds, sampled again by a fresh single-process engine on the given weights."""
    model = build(lora)
    model.load_state_dict(weights)
    src = ShareRollouts(LLM(model, CountTokenizer()), TASK, TASK.examples("train", 8, seed=0))
    src.batches = record["step"]
    return src.sample_part(record["part"])


def logprob_gap(a: list[list[float]], b: list[list[float]]) -> float:
    """Largest difference between two parts' sampled-token log-probs (one list per sample)."""
    return max(abs(x - y) for p, q in zip(a, b, strict=True) for x, y in zip(p, q, strict=True))


def weight_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def same_rollouts(run: dict, rank: int, lora: bool = False, ref: dict | None = None) -> None:
    assert [(s["step"], s["part"]) for s in run["sampled"]] == [(i, rank) for i in range(STEPS)]
    for s in run["sampled"]:
        again = replay(s, run["weights"][s["step"]], lora)
        assert s["tokens"] == [r[1] for r in again] and logprob_gap(s["logprobs"], [r[2] for r in again]) < TOL
    if ref is not None:  # the single process's own rollouts of this part (its engine shares the module)
        mine = [s for s in ref["sampled"] if s["part"] == rank]
        assert [s["tokens"] for s in run["sampled"]] == [s["tokens"] for s in mine]
        assert max(logprob_gap(s["logprobs"], m["logprobs"]) for s, m in zip(run["sampled"], mine)) < TOL


def test_rollouts_under_fsdp_and_ddp_are_the_single_process_ones(tmp_path):
    ref = fit(str(tmp_path / "one"))
    assert len(ref["ratio_errors"]) == STEPS and max(ref["ratio_errors"]) < TOL and max(ref["rewards"]) > 0
    got = run_local(_worker, 2, str(tmp_path), timeout=120, start_method="fork")
    for rank, runs in enumerate(got):
        for name in ("fsdp", "ddp", "fsdp_lora"):
            run = runs[name]
            assert len(run["ratio_errors"]) == STEPS and max(run["ratio_errors"]) < TOL, name
            same_rollouts(run, rank, lora=name == "fsdp_lora", ref=None if name == "fsdp_lora" else ref)
            if name != "fsdp_lora":  # and the weights each step starts from are the one process's
                assert max(weight_gap(w, v) for w, v in zip(run["weights"], ref["weights"], strict=True)) < ATOL
        lora_b = [v for k, v in runs["fsdp_lora"]["weights"][-1].items() if k.endswith("lora_B")]
        assert lora_b and max(float(v.abs().max()) for v in lora_b) > 1e-3  # the adapters trained and synced
        assert weight_gap(runs["fsdp"]["weights"][0], runs["fsdp"]["weights"][-1]) > 1e-2  # the policy moved
        stale = runs["fsdp_no_sync"]
        assert stale["ratio_errors"][0] < TOL and stale["ratio_errors"][1] > 1e-3
        second = stale["sampled"][1]
        assert logprob_gap(second["logprobs"], [r[2] for r in replay(second, stale["weights"][1], False)]) > 1e-3
        full = {k[:-5]: v for k, v in runs.items() if k.endswith("_full")}
        assert all(f["gap"] == 0.0 and f["dtypes"] == {"torch.float32"} for f in full.values()), full
        assert [k for k, f in full.items() if f["shared"]] == ["ddp"]  # no copy under DDP; a gather otherwise
        lora = build(lora=True)
        assert runs["lora_sent"] == sorted([n for n, p in lora.named_parameters() if p.requires_grad]
                                           + [n for n, _ in lora.named_buffers() if n in lora.state_dict()])
        assert all(".lora_" in n for n in runs["lora_sent"] if n in dict(lora.named_parameters()))


def test_pipeline_layouts_are_refused():
    with pytest.raises(ConfigError, match="parallel.pp=2: each rank holds one pipeline stage"):
        distributed.rollout_model(policy(), ParallelConfig(pp=2))
    with pytest.raises(ConfigError, match="full_weights of a pipeline stage"):
        distributed.full_weights(split_stage(policy(), 0, 2))


def test_one_process_shares_the_module_and_full_weights_copy_nothing():
    model = policy()
    assert distributed.rollout_model(model, None) is model
    own = model.state_dict()
    assert all(v.data_ptr() == own[k].data_ptr() for k, v in distributed.full_weights(model).items())
    assert {v.device.type for v in distributed.full_weights(model, device="meta").values()} == {"meta"}
