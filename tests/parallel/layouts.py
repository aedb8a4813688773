"""Rank functions for the production layouts (FSDP2, DDP, TP, PP, their 2-D mixes) and distributed
checkpoints: each trains the same untied tiny model on the same global batches and reports the global
loss of every step, to compare with one process."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.optim import build_optimizer
from lmforge.parallel.cp import context_parallel_inputs
from lmforge.parallel.config import ParallelConfig, build_mesh, submesh
from lmforge.parallel.parallelize import dp_rank_and_size, parallelize
from lmforge.parallel.pp import build_schedule, split_stage
from lmforge.train.loss import lm_loss
from tests.parallel.workers import OPT, batches, local, loss_of

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
                  activation="swiglu", attn_impl="math")
STEPS = 3

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
}
LAYOUTS_4 = {
    "hsdp": dict(dp_replicate=2, dp_shard=2),
    "fsdp_tp": dict(dp_shard=2, tp=2),
    "pp_fsdp": dict(pp=2, dp_shard=2, microbatches=2),
    "pp_tp": dict(pp=2, tp=2, microbatches=2),
    "fsdp_cp": dict(dp_shard=2, cp=2),
    "tp_cp": dict(tp=2, cp=2),
    "hsdp_cp": dict(dp_replicate=2, cp=2),
}


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG)


def reference(steps: int = STEPS, resume: str | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, full batch: the loss of every step and the final parameters. With `resume`, load a
    distributed checkpoint written after step 2 and take step 3 only."""
    m = model()
    opt = build_optimizer(m, OPT)
    todo = batches(steps)
    if resume is not None:
        from lmforge.parallel.checkpoint import load_distributed

        load_distributed(resume, m, opt)
        todo = todo[2:]
    out = []
    for x, y in todo:
        loss = loss_of(m, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(float(loss.detach()))
    return out, full_params(m)


def full_params(m) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in m.named_parameters()}


class Run:
    """One rank's share of a layout: the (stage of the) parallelised model, its optimizer, a step()."""

    def __init__(self, layout: dict, world: int):
        self.cfg = ParallelConfig(**layout)
        self.cfg.validate(world, CFG, seq_len=8, batch_size=8)
        self.mesh = build_mesh(self.cfg)
        self.dp_rank, self.dp_size = dp_rank_and_size(self.mesh)
        full = model()
        self.pp_mesh, self.cp_mesh = submesh(self.mesh, "pp"), submesh(self.mesh, "cp")
        if self.pp_mesh is not None:
            self.stage = self.pp_mesh.get_local_rank()
            self.model = split_stage(full, self.stage, self.cfg.pp)
            rest = [n for n in self.mesh.mesh_dim_names if n != "pp"]
            if rest:
                parallelize(self.model, self.cfg, submesh(self.mesh, *rest))
            self.schedule = build_schedule(self.model, self.stage, self.cfg.pp, self.pp_mesh.get_group(),
                                           self.cfg.n_microbatches, self.cfg.pp_schedule,
                                           lambda out, y: lm_loss(out, y)[0], torch.device("cpu"))
        else:
            self.model = parallelize(full, self.cfg, self.mesh)
        self.opt = build_optimizer(self.model, OPT)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        x, y = local(x, self.dp_rank, self.dp_size), local(y, self.dp_rank, self.dp_size)
        if self.pp_mesh is not None:
            losses: list[torch.Tensor] = []
            first, last = self.stage == 0, self.stage == self.cfg.pp - 1
            self.schedule.step(*([x] if first else []), **({"target": y, "losses": losses} if last else {}))
            loss = torch.stack(losses).mean().detach() if last else torch.zeros(())
            loss = loss * self.cfg.pp  # only the last stage's world / pp ranks hold a loss
        else:
            ctx = contextlib.nullcontext()
            if self.cfg.loss_parallel:
                from torch.distributed.tensor.parallel import loss_parallel

                ctx = loss_parallel()
            kw = {}
            if self.cp_mesh is not None:  # this rank's tokens of every sequence, K/V gathered in attention
                x, y, kw["positions"], kw["cache"] = context_parallel_inputs(x, y, self.cp_mesh)
            with ctx:
                loss = lm_loss(self.model(x, **kw), y)[0]
                loss.backward()
            loss = loss.detach()
            loss = loss.full_tensor() if hasattr(loss, "full_tensor") else loss
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dist.all_reduce(loss)  # every rank holds its dp slice's mean loss: average over the world
        return float(loss) / dist.get_world_size()


def layout_suite(rank: int, world: int, layouts: dict, ckpt: str | None = None, resume: str | None = None) -> dict:
    out = {}
    for name, layout in layouts.items():
        run = Run(layout, world)
        out[name] = [run.step(x, y) for x, y in batches(STEPS)]
    if ckpt is not None:  # 2 steps with FSDP on this world, then save
        from lmforge.parallel.checkpoint import save_distributed

        run = Run(dict(dp_shard=world), world)
        for x, y in batches(2):
            run.step(x, y)
        save_distributed(ckpt, run.model, run.opt)
    if resume is not None:  # resume as FSDP x TP and take step 3
        from lmforge.parallel.checkpoint import load_distributed

        run = Run(dict(dp_shard=world // 2, tp=2), world)
        load_distributed(resume, run.model, run.opt)
        out["resumed"] = run.step(*batches(3)[2])
        out["resumed_params"] = full_params(run.model)
    dist.barrier()
    return out if rank == 0 else {}
