"""Multi-process training: the pieces the one Trainer needs when `lmforge train` runs on N processes
(`lmforge train --nproc N`, or torchrun directly), in any [parallel] layout: data parallel (dp_shard =
FSDP2, dp_replicate = DDP), tensor (tp), pipeline (pp), context (cp) parallel and their 2-D/3-D meshes.
Post-training (`lmforge sft|dpo|... --nproc N`, lmforge.train.posttrain) uses the same pieces, data
parallel only: join() the group, distribute() the model and data source, pass the runner to the Trainer.

Every rank builds the same model from the same seed; a lmforge.parallel.runner.ParallelRunner applies the
layout and is the Trainer's step strategy (forward/backward per micro-batch, global-norm clipping over
DTensor shards and stages, the global loss, validation over this rank's rows). Every rank walks the same
global batch stream and keeps its data-parallel rank's contiguous rows of it (RankRows; tensor-parallel
and pipeline ranks of one replica read the same rows, context-parallel ranks cut them along the
sequence): the data state is the single-process state, so a run resumes on any layout and the loss curve
equals one process on the same global batch.

Checkpoints are ordinary lmforge checkpoints: the full weights and optimizer state are gathered to rank 0
(DTensor shards all-gathered; a pipeline's stages each gathered on their first rank, then merged on rank
0), which writes them (LLM.load opens them; a 1-process run resumes from them), and every rank reads them
back into its own shards. The optimizer state is stored as a single-process optimizer.state_dict() with
the parameter names in its id order beside it ("optimizer_params"), so any layout maps it back by name.

Interrupts: a SIGINT/SIGTERM reaching any one rank sets that rank's stop flag; the ranks all-reduce their
flags at every step boundary (one tiny CPU all-reduce, no device sync), so all stop at the same step and
write one checkpoint together. Under torchrun a Ctrl-C reaches torchrun only (its workers run in their
own sessions); it forwards the signal once to every worker and kills those still running 30 s later
(torchrun --shutdown-timeout), so a step plus a checkpoint must fit in that time.

Validation: every evaluator given the runner splits each validation batch's rows over the ranks and adds
up the ranks' sums in one host-side all-reduce (sum_over_ranks): pretraining's LMEvaluator through
runner.eval_nats, the post-training objectives' ObjectiveEvaluator (lmforge.align.sft) through eval_rows.
The metrics are the single process's, computed once rather than once per rank.

RL rollouts (docs/rl.md, "Under data parallelism"): the inference engine cannot run a sharded module, so
each rank's engine runs an unsharded copy of the policy (rollout_model, made before distribute()) that
sync_rollout refreshes from the sharded policy before each step's rollouts (full_weights: every rank
all-gathers the whole model), as verl and OpenRLHF refresh their vLLM copies.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from lmforge.errors import ConfigError
from lmforge.parallel.config import ParallelConfig
from lmforge.utils import pick_device


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def join(par: ParallelConfig, device: str = "auto") -> ParallelConfig | None:
    """Join the process group when launched by torchrun or asked for > 1 process; None = single process.
    Launched on N ranks with no [parallel] layout, FSDP2 over all of them (dp_shard = N). The backend
    follows the run's `device`: NCCL on GPUs, gloo for a CPU run (also on a machine with GPUs)."""
    if par.world_size == 1 and "RANK" not in os.environ:
        return None
    from lmforge.parallel.launch import backend_for, init_distributed

    _, world = init_distributed(backend_for(device), expected_world=None if par.world_size == 1 else par.world_size)
    return par.for_world(world) if world > 1 else None


def check_runner(runner, world: int, objective) -> None:
    """One-line errors for a process group without a layout, and a pipeline asked for another loss."""
    if runner is None:
        if world > 1:
            raise ConfigError(f"the Trainer runs on {world} processes but was given no runner: pass runner="
                              "ParallelRunner(model, ParallelConfig(...)) (lmforge.parallel.runner), as "
                              "pretraining does from [parallel]")
        return
    from lmforge.kernels.fused_ce import FusedLMObjective
    from lmforge.train.config import check_fused_loss
    from lmforge.train.loss import LMObjective

    if isinstance(objective, FusedLMObjective):  # (the launcher's check_launch said so before any process started)
        check_fused_loss(runner.cfg)
    if runner.pp_mesh is not None and not (type(objective) is LMObjective and objective.z_loss == 0):
        raise ConfigError(f"parallel.pp={runner.cfg.pp} trains the plain LM loss through the pipeline schedule; "
                          f"{type(objective).__name__} (or model.z_loss > 0) needs parallel.pp=1")


def train_device(device: str) -> torch.device:
    """cuda:LOCAL_RANK for each rank of a multi-GPU launch, else what pick_device chooses."""
    d = torch.device(pick_device(device))
    if d.type == "cuda" and d.index is None and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return d


def distribute(model: torch.nn.Module, source, par: ParallelConfig | None, *, device: torch.device, seq_len: int,
               batch_size: int):
    """(model, data source, runner) of this process: as given with runner None on one process (par from
    join() is None), else the model laid out by a ParallelRunner (call before building the optimizer: FSDP2
    and TP replace the parameters by their shards) and the source cut to this rank's rows (RankRows). A
    source with `per_rank = True` yields only its rank's rows itself (batch_size / dp_size of them: an RL
    source sampling its share of the rollouts on each rank's engine, which learns its rank from
    `trainer.runner.dp_rank` in begin_step) and is left as it is. Its state_dict is rank 0's in checkpoints
    (every rank resumes from it) unless the source also sets `per_rank_state = True` (each rank's own rollout
    between PPO epochs: every rank's state is kept and each resumes its own, on the same number of ranks)."""
    if par is None:
        return model, source, None
    from lmforge.parallel.runner import ParallelRunner

    runner = ParallelRunner(model, par, device=device, seq_len=seq_len, batch_size=batch_size)
    if getattr(source, "per_rank", False):
        return runner.model, source, runner
    return runner.model, RankRows(source, runner.dp_rank, runner.dp_size, batch_size), runner


PIPELINE_ROLLOUTS = ("each rank holds one pipeline stage, but rollouts need the whole model on every rank; train "
                     "the RL policy with data parallelism (dp_shard / dp_replicate) and pp=1")


def rollout_model(policy: torch.nn.Module, par: ParallelConfig | None) -> torch.nn.Module:
    """The module this rank's RL rollout engine runs; call before distribute(policy, ...). One process (par
    None): the policy itself, shared with the Trainer (nothing copied). Under a parallel layout: an unsharded
    copy on every rank (copy.deepcopy: LoRA adapters and any other wrapping come along; the policy must
    already be on its device), refreshed by sync_rollout. A copy also under DDP, whose module holds the full
    weights: the engine then never runs a training wrapper's forward hooks (DDP's lazy broadcast, FSDP's
    all-gathers) while the ranks sample out of lockstep. Costs one full copy of the weights per rank. An
    actor-critic (lmforge.align.value.PolicyWithValue, PolicyAndCritic) is copied without its critic: the
    engine runs the policy alone (its `.backbone`)."""
    from lmforge.align.value import policy_of

    if par is None:
        return policy
    if par.pp > 1:
        raise ConfigError(f"parallel.pp={par.pp}: {PIPELINE_ROLLOUTS}")
    return copy.deepcopy(policy_of(policy))


def full_weights(model: torch.nn.Module, device: torch.device | str | None = None, *, frozen: bool = True
                 ) -> dict[str, torch.Tensor]:
    """The model's whole state_dict (weights and buffers, no optimizer state) on every rank; call on all
    ranks. Keyed by the plain names (activation checkpointing's wrapper names removed), in the model's own
    dtype (FSDP2's param_dtype is only what it computes in), on `device` (None: where they are).
      FSDP2 / HSDP / TP: every DTensor all-gathered onto every rank (one transient full copy per rank,
                         where gather_states gathers a checkpoint onto rank 0 only).
      DDP, one process:  the module's own tensors: no copy, no communication.
    frozen=False leaves out the parameters that do not train (requires_grad False: a LoRA policy's base),
    which only trainable parameters and buffers need gathering: megabytes of adapters, not the model.
    A pipeline stage is refused: the other stages' weights are on other ranks."""
    import torch.distributed.checkpoint.state_dict as state_dicts

    from lmforge.parallel.pp import StageModule

    if isinstance(model, StageModule):
        raise ConfigError(f"full_weights of a pipeline stage (parallel.pp > 1): {PIPELINE_ROLLOUTS}")
    everywhere = state_dicts.StateDictOptions(full_state_dict=True, cpu_offload=False,  # offload: rank 0 only
                                              ignore_frozen_params=not frozen)
    weights = state_dicts.get_model_state_dict(model, options=everywhere)
    return weights if device is None else {k: v.to(device) for k, v in weights.items()}


def sync_rollout(llm, policy: torch.nn.Module) -> None:
    """Before sampling a step's rollouts (e.g. in a DataSource's begin_step(trainer), policy=trainer.model;
    on every rank at once): the engine (an LLM or Engine) drops what the old weights computed and, when it
    runs a rollout_model copy, first takes what can have changed in place: the policy's trainable
    parameters and buffers (full_weights(frozen=False)); a frozen parameter is the copy's own since
    rollout_model made it (a LoRA policy sends its adapters, not its base). Of an actor-critic only the policy
    (its `.backbone`) is gathered and sent, not the critic's trunk or value head."""
    from lmforge.align.value import policy_of

    if llm.model is policy or llm.model is policy_of(policy):  # one process: the very module
        llm.update_weights()
    else:
        llm.update_weights(full_weights(policy_of(policy), frozen=False), partial=True)


class Repeated(dict):
    """A batch a rank runs only to join the step's collectives: rows another rank trains on, which the
    Trainer gives no weight and leaves out of the MoE expert load (RankRows, when a batch has fewer rows than
    ranks)."""


class RankRows:
    """A DataSource wrapper: the wrapped source yields the global batch (identically on every rank, same
    seed); rank r of N keeps rows [r·B/N, (r+1)·B/N). State is the wrapped source's (global) state.
    A shorter batch (a post-training epoch's last) is split as evenly as its rows allow (tensor_split);
    the Trainer then weighs each rank's loss by its share of the rows or items (Trainer._micro_batches).
    With fewer rows than ranks, ranks past the rows repeat the first row as a `Repeated` batch: every
    rank must still run the forward and backward (FSDP and DDP communicate inside them), at weight 0."""

    def __init__(self, source, rank: int, world: int, batch_size: int):
        if batch_size % world:
            raise ConfigError(f"data.batch_size={batch_size} must be divisible by the data-parallel size {world}")
        self.source, self.rank, self.world = source, rank, world

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = rows_only(self.source.next_batch(), "RankRows")
        rows = len(next(iter(batch.values())))
        if rows <= self.rank:
            return Repeated({k: v[:1] for k, v in batch.items()})
        return {k: v.tensor_split(min(rows, self.world))[self.rank] for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return self.source.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source.load_state_dict(state)

    def __getattr__(self, name: str):  # log_stats and the like of the wrapped source
        return getattr(self.source, name)


def param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's order: index i of a plain optimizer.state_dict() is names[i]."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _to_cpu(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to_cpu(v) for v in tree]
    return tree


def _merge_stages(parts: list[tuple[dict, dict]]) -> tuple[dict, dict]:
    """One model's (weights, name-keyed optimizer state) from its pipeline stages' (in stage order).
    Stages hold disjoint parameters; their optimizer groups are merged by role in lmforge.optim's ROLES
    order, each the stages' parameters in stage order: the groups a single-process build_optimizer makes."""
    from lmforge.optim.groups import ROLES

    weights, state, groups = {}, {}, {}
    for w, osd in parts:
        weights.update(w)
        state.update(osd["state"])
        for g in osd["param_groups"]:
            if g.get("role") not in ROLES:
                raise ConfigError("checkpointing a pipeline merges optimizer groups by role: build the optimizer "
                                  "with lmforge.optim.build_optimizer (groups with a 'role' key)")
            if g["role"] in groups:
                groups[g["role"]]["params"] += g["params"]
            else:
                groups[g["role"]] = {**g, "params": list(g["params"])}
    ordered = [groups[r] for r in ROLES if r in groups]
    return weights, {"state": state, "param_groups": ordered}


def gather_states(runner, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, list[str]]:
    """(weights, optimizer state, parameter names) as full CPU tensors on rank 0 (empty elsewhere; call on
    all ranks). The optimizer state is keyed like a single-process optimizer.state_dict() (integer ids);
    names[i] is the parameter of id i."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    model, pp = runner.model, runner.pp_mesh is not None
    # cpu_offload gathers onto global rank 0 only; a pipeline needs every stage's first rank to hold its stage,
    # so there each rank of a stage briefly holds the stage's full state on its device
    opts = StateDictOptions(full_state_dict=True, cpu_offload=not pp)
    weights = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts)
    if pp:
        stage = (_to_cpu(weights), _to_cpu(osd)) if runner.stage_leader else None
        weights, osd = {}, {"state": {}, "param_groups": []}
        if runner.stage_leader:  # the leaders form rank 0's pipeline group
            parts = [None] * runner.cfg.pp if dist.get_rank() == 0 else None
            dist.gather_object(stage, parts, dst=0, group=runner.pp_mesh.get_group())
            if parts is not None:
                weights, osd = _merge_stages(parts)
    groups = osd.get("param_groups", [])  # empty but on rank 0
    names = [n for g in groups for n in g["params"]]
    ids = {n: i for i, n in enumerate(names)}
    plain = {"state": {ids[n]: s for n, s in osd.get("state", {}).items()},
             "param_groups": [{**g, "params": [ids[n] for n in g["params"]]} for g in groups]}
    return weights, plain, names


def load_states(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, weights: dict,
                opt_state: dict | None, names: list[str] | None, *, partial: bool = False) -> None:
    """Load full weights and a single-process-format optimizer state (its parameter names in id order:
    `names`) into this rank's shards; a pipeline stage takes its own parameters of both. partial=True: the
    weights of an adapter-only checkpoint, the frozen parameters left as they are."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.utils._pytree import tree_leaves

    opts = StateDictOptions(full_state_dict=True)
    mine = get_model_state_dict(model).keys()  # this rank's parameter names (no communication)
    set_model_state_dict(model, {k: v for k, v in weights.items() if k in mine},
                         options=dataclasses.replace(opts, strict=not partial))
    if optimizer is None or opt_state is None:
        return
    named = {"state": {names[i]: s for i, s in opt_state["state"].items()},
             "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in opt_state["param_groups"]]}
    if not any(isinstance(t, torch.Tensor) and t.dim() > 0 for t in tree_leaves(named["state"])):
        # a state with nothing to shard or place (plain SGD's is empty; or step counters only): torch's full-state
        # loader takes the device from the optimizer's own tensors and asserts when there are none. Loaded as a
        # local state instead, with an entry for every parameter, so torch matches them by name (an empty state
        # would be taken for an id-keyed one as it stands) and a pipeline stage takes only its own
        everyone = {n: {} for g in named["param_groups"] for n in g["params"]}
        named["state"] = {**everyone, **named["state"]}
        opts = dataclasses.replace(opts, full_state_dict=False)
    set_optimizer_state_dict(model, optimizer, named, options=opts)


def eval_rows(runner, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This rank's share of a validation batch's rows (all of them (B, ...)), split as runner.eval_nats
    splits them: over the data-parallel and context-parallel ranks (runner.eval_rank of eval_size); the
    ranks of one tensor-parallel group get the same rows, and only one of them reports (runner.reports)."""
    return {k: v.tensor_split(runner.eval_size)[runner.eval_rank] for k, v in rows_only(batch, "eval_rows").items()}


def rows_only(batch: dict, where: str) -> dict[str, torch.Tensor]:
    """`batch`, refused in one line when a value is not a tensor: cutting a batch into ranks' rows needs every
    value's rows (one process passes other values to the objective as they are: Trainer._to_device)."""
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor):
            raise ConfigError(f"{where} splits a batch's rows over the data-parallel ranks, but batch[{k!r}] is a "
                              f"{type(v).__name__}, not a tensor of rows; make it a tensor (B, ...), or train on one "
                              "process")
    return batch


def sum_over_ranks(sums: torch.Tensor, runner) -> torch.Tensor:
    """The ranks' sums (a float64 host tensor: validation sums, a step's loss weights) added up in place in
    one all-reduce on the runner's CPU group (call on all ranks); returned as given without a runner."""
    if runner is not None:
        dist.all_reduce(sums, group=runner.cpu_group)
    return sums


def max_over_ranks(value: int, group) -> int:
    """The largest of the ranks' `value`s, on every rank (call on all ranks; e.g. OR-ed stop flags)."""
    t = torch.tensor([int(value)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


class Gathered:
    """What lmforge.checkpoint.save_checkpoint reads of a model (cfg, state_dict), over gathered weights."""

    def __init__(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]):
        self.cfg, self._weights = getattr(model, "cfg", None), weights
        # the class a single process would record: FSDP2 swaps in a subclass FSDP<Name>(FSDPModule, Name)
        from torch.distributed.fsdp import FSDPModule

        self.model_class = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
        from lmforge.adapt.lora import lora_record

        self.lora = lora_record(model)  # its LoRA layers, which the checkpoint records
        from lmforge.adapt.qlora import base_layer_record

        self.base_layers = base_layer_record(model)  # its quantized Linears (QLoRA), which load_model rebuilds
        from lmforge.checkpoint import frozen_names

        self.frozen = frozen_names(model)  # what an adapter-only checkpoint leaves to its base
        # a HF model's end-of-sequence ids and BOS, which the checkpoint records (checkpoint.model_meta, bos_record)
        self.eos_token_ids = tuple(getattr(model, "eos_token_ids", None) or ())
        self.bos_token_id = getattr(model, "bos_token_id", None)
        record = getattr(model, "head_record", None)
        if record is not None:  # a head on a backbone (a reward model): checkpoint.model_meta records both
            self.head_record, self.backbone = record, Gathered(model.backbone, {})

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._weights


class NullLog:
    """MetricsLog of the ranks other than 0 (only rank 0 writes metrics)."""

    path = None

    def log(self, row: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"
