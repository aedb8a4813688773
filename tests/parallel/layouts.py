"""Rank functions for the production layouts (FSDP2, DDP, TP, PP, their 2-D mixes) and distributed
checkpoints: each trains the same untied tiny model on the same global batches and reports the global
loss of every step, to compare with one process."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.optim import build_optimizer
from lmforge.optim.config import OptimConfig
from lmforge.parallel.config import ParallelConfig
from lmforge.parallel.runner import ParallelRunner
from lmforge.train.loss import lm_loss
from tests.parallel.workers import OPT, batches, local, loss_of

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                  activation="swiglu", attn_impl="math")
STEPS = 3
CLIP = 0.5  # below the gradient norms of these steps (about 1-2): clipping is exercised

LAYOUTS_2 = {
    "fsdp": dict(dp_shard=2),
    "fsdp_keep_gathered": dict(dp_shard=2, reshard_after_forward=False),
    "ddp": dict(dp_replicate=2),
    "tp_sp": dict(tp=2),
    "tp_no_sp": dict(tp=2, sequence_parallel=False),
    "tp_loss_parallel": dict(tp=2, loss_parallel=True),
    "pp_gpipe": dict(pp=2, pp_schedule="gpipe", microbatches=4),
    "pp_1f1b": dict(pp=2, pp_schedule="1f1b", microbatches=4),
    "fsdp_ac_full": dict(dp_shard=2, activation_checkpoint="full"),
    "fsdp_ac_selective": dict(dp_shard=2, activation_checkpoint="selective"),
    "cp": dict(cp=2),
    "cp_objective": dict(cp=2, objective=True),
    "fsdp_accum_no_sync": dict(dp_shard=2, accum=2),
}
LAYOUTS_4 = {
    "hsdp": dict(dp_replicate=2, dp_shard=2),
    "fsdp_tp": dict(dp_shard=2, tp=2),
    "pp_fsdp": dict(pp=2, dp_shard=2, microbatches=2),
    "pp_tp": dict(pp=2, tp=2, microbatches=2),
    "fsdp_cp": dict(dp_shard=2, cp=2),
    "tp_cp": dict(tp=2, cp=2),
    "hsdp_cp": dict(dp_replicate=2, cp=2),
    "ddp_tp": dict(dp_replicate=2, tp=2),  # FSDP2's replicate: the composable DDP failed on TP's DTensors
    # replicas of a pipeline stage, averaged on the last micro-step: under the composable DDP they never were
    "pp_ddp_accum": dict(pp=2, dp_replicate=2, microbatches=2, accum=2),
    "fsdp_tp_objective": dict(dp_shard=2, tp=2, loss_parallel=True, objective=True),
}
LAYOUTS_8 = {"pp_fsdp_tp": dict(pp=2, dp_shard=2, tp=2, microbatches=2)}  # 3-D

VARIANT = dict(tie_embeddings=True, qk_norm=True, norm_position="sandwich", bias=True)
"""a second model for tensor parallelism: tied embeddings (one parameter sharded for both uses), QK-norm (weights
shared by the heads that ranks split), sandwich norms (outputs added to plain tensors), biases (DTensors beside the
plain norms of a layout without sequence parallelism)"""
OPT_LINEAR = OptimConfig(name="adamw", lr=0.3, eps=1.0, weight_decay=0.1)
"""eps = 1 makes AdamW's step nearly linear in the gradients: the comparison checks the gradients, not Adam's
sign-like step on near-zero gradients, which turns their last-bit differences into differences of lr"""
LAYOUTS_VARIANT_2 = {f"variant_{name}": dict(LAYOUTS_2[name], model=VARIANT, opt=OPT_LINEAR)
                     for name in ("tp_sp", "tp_no_sp", "tp_loss_parallel")}
LAYOUTS_VARIANT_4 = {"variant_fsdp_tp": dict(LAYOUTS_4["fsdp_tp"], model=VARIANT, opt=OPT_LINEAR)}


def model(overrides: dict | None = None) -> Transformer:
    torch.manual_seed(0)
    return Transformer(dataclasses.replace(CFG, **overrides) if overrides else CFG)


def reference(steps: int = STEPS, resume: str | None = None, variant: dict | None = None,
              opt_cfg: OptimConfig = OPT) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, full batch: (loss, gradient norm) of every step and the final parameters. With `resume`, load a
    distributed checkpoint written after step 2 and take step 3 only. variant: ModelConfig overrides."""
    m = model(variant)
    opt = build_optimizer(m, opt_cfg)
    todo = batches(steps)
    if resume is not None:
        from lmforge.parallel.checkpoint import load_distributed

        load_distributed(resume, m, opt)
        todo = todo[2:]
    out = []
    for x, y in todo:
        loss = loss_of(m, x, y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append((float(loss.detach()), float(norm)))
    return out, full_params(m)


def full_params(m) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in m.named_parameters()}


class LMObjective:
    """The shape of lmforge.train's objectives: loss(model, batch) calls model(batch["input_ids"])."""

    def loss(self, m, batch):
        loss = lm_loss(m(batch["input_ids"]), batch["targets"])[0]
        return loss, {"loss": loss.detach()}


class Run:
    """One rank's share of a layout: a ParallelRunner and its optimizer, one clipped step per call.
    objective=True steps through runner.objective_step (an Objective on a batch dict) instead; accum=n
    splits each step into n micro-batches."""

    def __init__(self, layout: dict, world: int):
        layout = dict(layout)
        self.objective = LMObjective() if layout.pop("objective", False) else None
        self.accum = layout.pop("accum", 1)  # micro-batches per step, reduce-scatter on the last only
        variant, opt_cfg = layout.pop("model", None), layout.pop("opt", OPT)
        self.runner = ParallelRunner(model(variant), ParallelConfig(**layout), seq_len=8, batch_size=8)
        self.model = self.runner.model
        self.opt = build_optimizer(self.model, opt_cfg)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        r = self.runner
        x, y = local(x, r.dp_rank, r.dp_size), local(y, r.dp_rank, r.dp_size)
        if self.objective is not None:
            loss = r.objective_step({"input_ids": x, "targets": y}, self.objective.loss)[0]
        else:
            parts = list(zip(x.chunk(self.accum), y.chunk(self.accum)))
            loss = sum(r.forward_backward(xa, ya, 1 / self.accum, sync=i == len(parts) - 1)
                       for i, (xa, ya) in enumerate(parts)) / self.accum
        norm = r.clip_grad_norm_(CLIP)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(r.global_loss(loss)), float(norm)


def layout_suite(rank: int, world: int, layouts: dict, ckpt: str | None = None, resume: str | None = None) -> dict:
    out = {}
    for name, layout in layouts.items():
        run = Run(layout, world)
        out[name] = [run.step(x, y) for x, y in batches(STEPS)]  # [(loss, grad norm)] per step
    if ckpt is not None:  # 2 steps with FSDP on this world, then save; the same as a pipeline into ckpt + "_pp"
        from lmforge.parallel.checkpoint import gather_full_state_dict, save_distributed

        for layout, path in ((dict(pp=world, microbatches=4), ckpt + "_pp"), (dict(dp_shard=world), ckpt)):
            run = Run(layout, world)
            for x, y in batches(2):
                run.step(x, y)
            save_distributed(path, run.model, run.opt)
        out["full_state_after_2"] = gather_full_state_dict(run.model)  # the FSDP run's
    if resume is not None:  # resume as FSDP x TP and take step 3; the pipeline's as FSDP x TP, FSDP's as PP x FSDP
        from lmforge.parallel.checkpoint import load_distributed

        for key, layout, path in (("resumed", dict(dp_shard=world // 2, tp=2), resume),
                                  ("resumed_from_pp", dict(dp_shard=world // 2, tp=2), resume + "_pp"),
                                  ("resumed_into_pp", dict(pp=2, dp_shard=world // 2, microbatches=2), resume)):
            run = Run(layout, world)
            load_distributed(path, run.model, run.opt)
            out[key] = run.step(*batches(3)[2])[0]
            if key == "resumed":
                out["resumed_params"] = full_params(run.model)
    dist.barrier()
    return out if rank == 0 else {}
