"""Functions the distributed tests run on every rank (module level, so spawned processes import them).
Each returns plain tensors/numbers; the tests compare them with one process on the full batch."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.distributed as dist

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.optim import build_optimizer
from lmforge.optim.config import OptimConfig
from lmforge.train.loss import lm_loss

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, tie_embeddings=True,
                  attn_impl="math")
OPT = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95))
MUON = OptimConfig(name="muon", lr=2e-2, adam_lr=1e-2, weight_decay=0.1)
B, T, STEPS = 8, 8, 3
TAU = 0.04  # below some heads' max logit in the tiny model: QK-clip acts on those heads


def model(cfg: ModelConfig = CFG) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg)


def batches(steps: int = STEPS, b: int = B, t: int = T, vocab: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        w = torch.randint(0, vocab, (b, t + 1), generator=g)
        out.append((w[:, :-1], w[:, 1:]))
    return out


def local(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous slice of the global batch (dim 0)."""
    n = x.shape[0] // world
    return x[rank * n:(rank + 1) * n]


def loss_of(m, x, y) -> torch.Tensor:
    return lm_loss(m(x), y)[0]


def reference(opt_cfg: OptimConfig = OPT, steps: int = STEPS, b: int = B, cfg: ModelConfig = CFG,
              frozen: bool = False) -> dict[str, torch.Tensor]:
    """One process, full batch: the parameters every layout must reach (frozen: with the tied embedding frozen)."""
    m = model(cfg)
    m.tok_emb.weight.requires_grad_(not frozen)
    opt = build_optimizer(m, opt_cfg)
    for x, y in batches(steps, b):
        loss_of(m, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def params_of(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


# -- from-scratch DDP and ZeRO vs torch DDP / FSDP2 ----------------------------------------------------
def _ddp(kind: str, rank: int, world: int) -> tuple[dict[str, torch.Tensor], list[int]]:
    """kind: naive | bucketed | bucketed_accum (two micro-batches, the first under no_sync). Also returns,
    per step, (buckets whose all-reduce had started before backward returned, buckets): the overlap."""
    from lmforge.parallel.ddp import BucketedDDP, NaiveDDP

    m = model()
    wrapped = NaiveDDP(m) if kind == "naive" else BucketedDDP(m, bucket_mb=0.01)
    opt = build_optimizer(m, OPT)
    launched = []
    for x, y in batches():
        xs, ys = local(x, rank, world), local(y, rank, world)
        if kind == "bucketed_accum":
            h = xs.shape[0] // 2
            with wrapped.no_sync():
                (loss_of(wrapped, xs[:h], ys[:h]) * 0.5).backward()
            (loss_of(wrapped, xs[h:], ys[h:]) * 0.5).backward()
        else:
            loss_of(wrapped, xs, ys).backward()
        if kind == "naive":
            wrapped.sync_gradients()
        else:
            launched.append((len(wrapped._inflight), len(wrapped.buckets)))
            wrapped.finish_gradient_sync()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return params_of(m), launched


def _zero(stage: int, rank: int, world: int, opt_cfg: OptimConfig = OPT, accum: int = 1, frozen: bool = False):
    from lmforge.parallel.zero import ZeroOptimizer, owned_numel, state_bytes

    m = model()
    opt = build_optimizer(m, opt_cfg)  # over every parameter, as a torch optimizer built before freezing one is
    m.tok_emb.weight.requires_grad_(not frozen)  # a frozen parameter stays whole on every rank, outside the partition
    zero = ZeroOptimizer(m, opt, stage)
    memory = None
    for i, (x, y) in enumerate(batches()):
        xs, ys = local(x, rank, world), local(y, rank, world)
        for xa, ya in zip(xs.chunk(accum), ys.chunk(accum)):
            (loss_of(m, xa, ya) / accum).backward()
        if i == 1:  # after one step the optimizer state exists; gradients are those of step 2
            memory = {**state_bytes(zero), "n_owned": owned_numel(zero)}
        zero.step()
    return zero.full_parameters(), memory


def _torch_ddp(rank: int, world: int) -> dict[str, torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel

    m = model()
    ddp = DistributedDataParallel(m)
    opt = build_optimizer(m, OPT)
    for x, y in batches():
        loss_of(ddp, local(x, rank, world), local(y, rank, world)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return params_of(m)


def _fsdp2(rank: int, world: int) -> dict[str, torch.Tensor]:
    from lmforge.parallel.fsdp import apply_fsdp
    from torch.distributed.device_mesh import init_device_mesh

    m = model()
    apply_fsdp(m, init_device_mesh("cpu", (world,)))
    opt = build_optimizer(m, OPT)
    for x, y in batches():
        loss_of(m, local(x, rank, world), local(y, rank, world)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.full_tensor().detach().clone() for k, v in m.named_parameters()}


def data_parallel_suite(rank: int, world: int) -> dict:
    """Every data-parallel implementation on the same steps; rank 0 reports parameters, every rank memory."""
    out: dict = {}
    for kind in ("naive", "bucketed", "bucketed_accum"):
        out[kind], out[f"{kind}_launched"] = _ddp(kind, rank, world)
    out["memory"] = {}
    for stage in (1, 2, 3):
        out[f"zero{stage}"], out["memory"][stage] = _zero(stage, rank, world)
    out["zero2_accum"], _ = _zero(2, rank, world, accum=2)
    out["zero3_accum"], _ = _zero(3, rank, world, accum=2)
    out["zero2_muon"], _ = _zero(2, rank, world, MUON)
    out["zero3_dion"], _ = _zero(3, rank, world, DION)
    out["zero3_frozen"], out["memory_frozen"] = _zero(3, rank, world, frozen=True)
    out["torch_ddp"] = _torch_ddp(rank, world)
    out["fsdp2"] = _fsdp2(rank, world)
    out["n_params"] = sum(p.numel() for p in model().parameters())
    if rank != 0:
        out = {"memory": out["memory"], "memory_frozen": out["memory_frozen"], "n_params": out["n_params"]}
    dist.barrier()
    return out


# -- matrix optimizers on FSDP2 shards, MuonClip's max logits ---------------------------------------------
DION = OptimConfig(name="dion", lr=2e-2, adam_lr=1e-2, weight_decay=0.1, rank=4)


def sharded_matrix_suite(rank: int, world: int) -> dict:
    """On 3 ranks the 32- and 128-row matrices split unevenly (11/11/10 rows): FSDP2's torch.chunk split; the
    MoE model's stacked (4, out, in) expert weights split by expert (2/1/1), each expert orthogonalised alone."""
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.parallel.fsdp import apply_fsdp
    from lmforge.parallel.matrix_optim import ShardedDion, ShardedMuon

    out = {}
    owner = lambda o: ShardedMuon.from_optimizer(o, owner_compute=True)  # noqa: E731
    builds = (("muon", MUON, ShardedMuon.from_optimizer, CFG), ("dion", DION, ShardedDion.from_optimizer, CFG),
              ("muon_owner", MUON, owner, CFG), ("muon_moe", MUON, ShardedMuon.from_optimizer, moe_cfg()),
              ("muon_owner_moe", MUON, owner, moe_cfg()), ("dion_moe", DION, ShardedDion.from_optimizer, moe_cfg()))
    for name, cfg, build, arch in builds:
        m = model(arch)
        apply_fsdp(m, init_device_mesh("cpu", (world,)))
        opt = build(build_optimizer(m, cfg))
        for x, y in batches(b=2 * world):
            loss_of(m, local(x, rank, world), local(y, rank, world)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        out[name] = {k: v.full_tensor().detach().clone() for k, v in m.named_parameters()}
    for name, arch in (("dion_rerank", CFG), ("dion_moe_rerank", moe_cfg())):
        m = model(arch)  # Dion resumed at rank 2 after a step at rank 4: Q's first 2 columns kept
        apply_fsdp(m, init_device_mesh("cpu", (world,)))
        opt = ShardedDion.from_optimizer(build_optimizer(m, DION))
        for x, y in batches(b=2 * world):
            loss_of(m, local(x, rank, world), local(y, rank, world)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            for g in opt.param_groups:
                if "rank" in g:
                    g["rank"] = 2
        out[name] = {k: v.full_tensor().detach().clone() for k, v in m.named_parameters()}
    dist.barrier()
    return out if rank == 0 else {}


def reference_reranked(cfg: OptimConfig, b: int, new_rank: int, arch: ModelConfig = CFG) -> dict[str, torch.Tensor]:
    """reference(), with the optimizer's rank set to new_rank after the first step."""
    m = model(arch)
    opt = build_optimizer(m, cfg)
    for x, y in batches(b=b):
        loss_of(m, x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for g in opt.param_groups:
            if "rank" in g:
                g["rank"] = new_rank
    return params_of(m)


# -- expert parallelism ----------------------------------------------------------------------------------
def moe_cfg(**moe) -> ModelConfig:
    from lmforge.model.config import MoEConfig

    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16, attn_impl="math",
                       activation="swiglu", mlp="moe",
                       moe=MoEConfig(**{"n_experts": 4, "top_k": 2, "d_expert": 16, **moe}))


def starved_moe(m: Transformer) -> Transformer:
    """An MoE model whose routers send every token to expert 0 (zero weights, a bias of +-10): under expert
    parallelism the other ranks' experts get no rows."""
    with torch.no_grad():
        for block in m.blocks:
            block.mlp.router.weight.zero_()
            block.mlp.router.bias.copy_(torch.tensor([10.0] + [-10.0] * (block.mlp.E - 1)))
    return m


BIASED = dict(score="sigmoid", bias_update_rate=0.05)  # aux-loss-free balancing: one bias over all ranks


def expert_parallel_suite(rank: int, world: int, starve: bool = False, biased: bool = False) -> dict:
    from lmforge.model.layers.moe import update_expert_biases
    from lmforge.parallel.ddp import broadcast_module_
    from lmforge.parallel.ep import apply_ep, sync_gradients

    m = (starved_moe(model(moe_cfg(router_bias=True, top_k=1))) if starve
         else model(moe_cfg(**BIASED)) if biased else model(moe_cfg()))
    broadcast_module_(m)
    apply_ep(m)
    opt = build_optimizer(m, OPT)
    losses = []
    for x, y in batches():
        loss = loss_of(m, local(x, rank, world), local(y, rank, world))
        loss.backward()
        sync_gradients(m)
        opt.step()
        update_expert_biases(m, world=True)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    out = {"params": params_of(m), "losses": torch.stack(losses),
           "biases": {k: v.clone() for k, v in m.named_buffers() if k.endswith("e_bias")}}
    return out


def stage_bias_suite(rank: int, world: int) -> dict:
    """Pipeline stages hold different MoE layers: rank r is stage r // 2 (blocks.{stage}) of a 2-stage, 2-replica
    layout, its layer's step load set to known values; update_expert_biases(world=True) sums each layer's load
    over the ranks that hold it."""
    from lmforge.model.layers.moe import MoE, update_expert_biases
    from lmforge.parallel.pp import split_stage

    cfg = moe_cfg(**BIASED)
    stage = split_stage(model(dataclasses.replace(cfg, tie_embeddings=False)), rank // 2, 2)
    for m in stage.modules():
        if isinstance(m, MoE):
            m.step_load.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]) * (rank + 1) if rank % 2 else
                              torch.tensor([9.0, 0.0, 0.0, 0.0] if rank == 0 else [0.0, 0.0, 0.0, 30.0]))
    updated = update_expert_biases(stage, world=True)
    return {"updated": updated, "biases": {k: v.clone() for k, v in stage.named_buffers() if k.endswith("e_bias")}}


def qk_clip_suite(rank: int, world: int) -> dict:
    """Max logits recorded on each rank's slice under FSDP2, all-reduced, then QK-clip on the shards."""
    from torch.distributed.device_mesh import init_device_mesh

    from lmforge.parallel.fsdp import apply_fsdp
    from lmforge.parallel.qk_logits import MaxLogitRecorder, clip_qk_

    m = model()
    rec = MaxLogitRecorder(m)
    apply_fsdp(m, init_device_mesh("cpu", (world,)))
    x, _ = batches()[0]
    with torch.no_grad():
        m(local(x, rank, world))
    m.reshard()  # the root unit keeps its gathered weights after forward until a backward that never comes
    rec.all_reduce_()
    maxes = [mx.clone() for _, _, mx, _ in rec.layers()]
    clip_qk_(rec.layers(), TAU)
    out = {"max": maxes, "params": {k: v.full_tensor().clone() for k, v in m.named_parameters()}}
    return out if rank == 0 else {}


# -- parameters some ranks (or none) use: DDP and ZeRO vs one process and torch's DDP ----------------------
class Branchy(torch.nn.Module):
    """`branch` runs only where asked (a rank's conditional path, an expert none of its tokens chose);
    `unused` never runs. Registered before `out`, so reverse-order reductions meet them mid-backward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(4, 8)
        self.branch = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, use_branch: bool = True) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        return self.out(h)


BRANCH_OPT = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1)


def branch_data(world: int, accum: int, steps: int = 3) -> torch.Tensor:
    """(steps, world, accum, 2 rows, 4) inputs; the target is 0."""
    return torch.randn(steps, world, accum, 2, 4, generator=torch.Generator().manual_seed(2))


def uses_branch(rank: int, micro: int, pattern: str) -> bool:
    """'skip0': rank 0 never takes the branch; 'alternate': ranks take it on alternate micro-batches; 'all'."""
    return {"skip0": rank != 0, "alternate": (rank + micro) % 2 == 0, "all": True}[pattern]


def branch_loss(m, x: torch.Tensor, use: bool) -> torch.Tensor:
    return m(x, use).square().mean()


def branch_reference(world: int, accum: int, pattern: str) -> dict[str, torch.Tensor]:
    """One process: the mean of every rank's and micro-batch's loss, one AdamW step per step."""
    m = Branchy()
    opt = build_optimizer(m, BRANCH_OPT)
    for xs in branch_data(world, accum):
        loss = sum(branch_loss(m, xs[r, k], uses_branch(r, k, pattern)) for r in range(world) for k in range(accum))
        (loss / (world * accum)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return params_of(m)


def build_data_parallel(kind: str, m: torch.nn.Module, opt_cfg: OptimConfig = OPT):
    """(the module to call, optimizer, ZeroOptimizer or None) for kind naive | bucketed (a bucket per parameter)
    | torch_ddp (find_unused_parameters) | zero1-3 | plain (m itself)."""
    from torch.nn.parallel import DistributedDataParallel

    from lmforge.parallel.ddp import BucketedDDP, NaiveDDP
    from lmforge.parallel.zero import ZeroOptimizer

    wrapped = {"naive": NaiveDDP, "bucketed": lambda m: BucketedDDP(m, bucket_mb=1e-4),
               "torch_ddp": lambda m: DistributedDataParallel(m, find_unused_parameters=True)}.get(kind, lambda m: m)(m)
    opt = build_optimizer(m, opt_cfg)
    return wrapped, opt, ZeroOptimizer(m, opt, int(kind[-1])) if kind.startswith("zero") else None


def finish_step(wrapped, opt, zero) -> None:
    """After backward: the teaching DDP's gradient sync and the optimizer step, or ZeroOptimizer.step()."""
    if zero is not None:
        zero.step()
        return
    if hasattr(wrapped, "sync_gradients"):
        wrapped.sync_gradients()
    elif hasattr(wrapped, "finish_gradient_sync"):
        wrapped.finish_gradient_sync()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _branch_run(kind: str, rank: int, world: int, accum: int, pattern: str) -> dict[str, torch.Tensor]:
    m = Branchy()
    wrapped, opt, zero = build_data_parallel(kind, m, BRANCH_OPT)
    for xs in branch_data(world, accum):
        for k in range(accum):
            (branch_loss(wrapped, xs[rank, k], uses_branch(rank, k, pattern)) / accum).backward()
        finish_step(wrapped, opt, zero)
    return zero.full_parameters() if zero is not None else params_of(m)


def branch_suite(rank: int, world: int, runs: list[tuple[str, int, str]]) -> dict:
    """Each (kind, accum, pattern) run's parameters, on rank 0."""
    out = {run: _branch_run(*run[:1], rank, world, *run[1:]) for run in runs}
    dist.barrier()
    return out if rank == 0 else {}


# -- ZeRO checkpoints ---------------------------------------------------------------------------------------
def _zero_steps(zero, m, steps, rank: int, world: int) -> None:
    for x, y in steps:
        loss_of(m, local(x, rank, world), local(y, rank, world)).backward()
        zero.step()


def _reloaded(obj):
    """obj after torch.save and a weights_only load, as a checkpoint file would give it back."""
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _with_params(params: dict[str, torch.Tensor], cfg: ModelConfig = CFG) -> Transformer:
    m = model(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(params[name])
    return m


def zero_resume_suite(rank: int, world: int, runs: list[tuple[int, str]]) -> dict:
    """Per (stage, optimizer): 2 steps, save the parameters, this rank's shard and the full optimizer state; a
    fresh model and ZeroOptimizer resume from the shard (and from the full state) for the 3rd step. Also the
    uninterrupted ZeRO run's parameters."""
    from lmforge.parallel.zero import ZeroOptimizer

    out = {}
    for stage, opt_name in runs:
        cfg = {"adamw": OPT, "muon": MUON}[opt_name]
        data = batches()
        m = model()
        zero = ZeroOptimizer(m, build_optimizer(m, cfg), stage)
        _zero_steps(zero, m, data[:2], rank, world)
        params, shard, full = _reloaded((zero.full_parameters(), zero.state_dict(), zero.full_state_dict()))
        resumed = {}
        for kind, saved in (("shard", shard), ("full", full)):
            m2 = _with_params(params)
            z2 = ZeroOptimizer(m2, build_optimizer(m2, cfg), stage)
            z2.load_state_dict(copy.deepcopy(saved))  # (optimizers keep the loaded tensors: steps would change them)
            _zero_steps(z2, m2, data[2:], rank, world)
            resumed[kind] = z2.full_parameters()
        out[(stage, opt_name)] = {"uninterrupted": _zero(stage, rank, world, cfg)[0], "resumed": resumed,
                                  "params": params, "full": full, "shard": shard}
    dist.barrier()
    return out


def zero_resume_full(rank: int, world: int, stage: int, params: dict, full: dict) -> dict[str, torch.Tensor]:
    """The 3rd step of a ZeroOptimizer at this world size, resumed from parameters and a full_state_dict."""
    from lmforge.parallel.zero import ZeroOptimizer

    m = _with_params(params)
    zero = ZeroOptimizer(m, build_optimizer(m, OPT), stage)
    zero.load_state_dict(full)
    _zero_steps(zero, m, batches()[2:], rank, world)
    return zero.full_parameters()
