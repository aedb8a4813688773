"""ZeRO stages 1-3 from scratch (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models"), teaching implementations tested against torch's DDP and FSDP2.

Mixed-precision Adam holds, per parameter, 2 bytes of bf16 weights, 2 of bf16 gradients and K = 12 of
optimizer state (fp32 master weights, m, v): 16 bytes per parameter (sec. 3.1). ZeRO partitions the
model states over the N data-parallel ranks instead of replicating them (sec. 5, Figure 1):
    stage 0 (DDP)   (2 + 2 + K) Psi              everything replicated
    stage 1         (2 + 2) Psi + K Psi / N      optimizer state partitioned
    stage 2         2 Psi + (2 + K) Psi / N      + gradients reduced to their owner only
    stage 3         (2 + 2 + K) Psi / N          + parameters partitioned, gathered on demand and freed

Partitions here are whole parameters (each tensor has one owner rank, assigned largest-first to the
least-loaded rank, like torch's ZeroRedundancyOptimizer), not flat 1/N slices of every tensor as in the
paper. The cost is a little imbalance (at most one tensor's bytes); the gain is that any lmforge
optimizer runs unchanged on its owned tensors - including the matrix optimizers (Muon, Dion, Shampoo,
SOAP), which need each weight matrix whole and cannot step on a row slice of it.

Per step:
  stage 1  backward as usual; step(): all-reduce gradients, owners step, owners broadcast new weights
  stage 2  a post-accumulate-grad hook reduces each gradient to its owner during backward; other ranks
           drop theirs at once; step(): owners step and broadcast
  stage 3  non-owners keep no weight storage. A forward pre-hook broadcasts a module's weights from
           their owners, a forward hook frees them; a hook on the module's outputs gathers them again
           when backward reaches the module; after the gradient is reduced they are freed again.

Unused parameters are treated as lmforge.parallel.ddp's DDP treats them (and one process on the whole batch):
one used on some ranks only gets the mean with zeros from the others; one no rank used keeps grad None and
the optimizer leaves it alone. Stages 2-3 reduce in a fixed parameter order (ddp.InOrderLauncher), one round
per forward: a parameter a rank skipped holds back the ones after it until the next forward or step(), so
every rank issues the same reductions. Stage 3, like FSDP, also needs every rank to run the same modules'
forward (their weights are broadcast there): a module skipped on some ranks only is not supported.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError
from lmforge.parallel.ddp import InOrderLauncher, average_gradients, broadcast_module_, used_anywhere


def zero_memory(n_params: int, world: int, stage: int, *, param: float = 2, grad: float = 2, optim: float = 12,
                n_owned: int | None = None, n_frozen: int = 0) -> dict[str, float]:
    """Model-state bytes per rank under ZeRO `stage` (0 = plain DDP) of `n_params` trained parameters. Defaults
    are the paper's mixed-precision Adam (2 + 2 + 12 = 16 bytes/parameter); lmforge's AdamW on fp32 weights (bf16
    autocast) also holds 16: param=4, grad=4, optim=8. n_owned is this rank's partition (default Psi / N, the
    paper's); n_frozen parameters (requires_grad False) are in no partition: whole on every rank, at any stage."""
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"ZeRO stage={stage}; choose 0, 1, 2 or 3")
    owned = n_params / world if n_owned is None else n_owned
    out = {"param": param * ((owned if stage >= 3 else n_params) + n_frozen),
           "grad": grad * (owned if stage >= 2 else n_params),
           "optim": optim * (owned if stage >= 1 else n_params)}
    out["total"] = out["param"] + out["grad"] + out["optim"]
    return out


def partition(params: list[torch.Tensor], world: int) -> list[int]:
    """Owner rank of each tensor: largest first onto the least-loaded rank (deterministic on every rank)."""
    load = [0] * world
    owner = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += params[i].numel()
    return owner


class ZeroOptimizer:
    """Wrap `model` and an optimizer built over all of its parameters (e.g. lmforge.optim.build_optimizer);
    the optimizer's groups are pruned in place to this rank's partition, so build it just before."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, stage: int, group=None):
        if stage not in (1, 2, 3):
            raise ConfigError(f"ZeRO stage={stage}; choose 1, 2 or 3 (stage 0 is plain DDP: lmforge.parallel.ddp)")
        if optimizer.state:
            raise ConfigError("ZeroOptimizer needs a freshly built optimizer (its state is partitioned from step 0)")
        self.model, self.optimizer, self.stage, self.group = model, optimizer, stage, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        broadcast_module_(model, group=group)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.owner = {p: r for p, r in zip(self.params, partition(self.params, self.world))}
        self.names = {p: name for name, p in model.named_parameters()}
        # the unpartitioned groups, in the order torch's state_dict numbers parameters (full_state_dict)
        self._full_groups = [list(g["params"]) for g in optimizer.param_groups]
        for g in optimizer.param_groups:  # (a frozen parameter is in no partition: no rank steps it)
            g["params"] = [p for p in g["params"] if self.owner.get(p) == self.rank]
        self.shapes = {p: p.shape for p in self.params}
        self._live: set[torch.Tensor] = set(self.params)  # same on every rank: whether p is materialised
        if stage >= 2:  # one reduction per parameter per forward, in reverse registration order (backward's)
            self._reductions = InOrderLauncher([[p] for p in reversed(self.params)], self._reduce_to_owner)
            self._used: set[torch.Tensor] = set()  # parameters this rank produced a gradient for since step()
            self._round_open = False
            model.register_forward_pre_hook(lambda mod, args: self._new_round())
            for p in self.params:
                p.register_post_accumulate_grad_hook(self._on_grad)
        if stage == 3:
            self._free(self.params)
            for m in model.modules():
                own = [p for p in m.parameters(recurse=False) if p in self.owner]
                if own:
                    m.register_forward_pre_hook(lambda mod, args, own=own: self._gather(own))
                    m.register_forward_hook(lambda mod, args, out, own=own: self._after_forward(own, out))

    def _src(self, p: torch.Tensor) -> int:
        return dist.get_global_rank(self.group, self.owner[p]) if self.group is not None else self.owner[p]

    def owned(self, p: torch.Tensor) -> bool:
        return self.owner[p] == self.rank

    # stage 3: parameters on demand -----------------------------------------------------------------
    @torch.no_grad()
    def _gather(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if p in self._live:
                continue
            if not self.owned(p):
                p.data = torch.empty(self.shapes[p], dtype=p.dtype, device=p.device)
            dist.broadcast(p.data, src=self._src(p), group=self.group)
            self._live.add(p)

    def _free(self, params: list[torch.Tensor]) -> None:
        for p in params:
            if not self.owned(p):
                # autograd saved p itself, not a copy: gather() re-fills it before backward needs it
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            self._live.discard(p)

    def _after_forward(self, params: list[torch.Tensor], out) -> None:
        if torch.is_grad_enabled():
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for t in outs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(lambda grad, params=params: self._gather(params))
        self._free(params)

    # stages 2-3: gradients to their owner during backward --------------------------------------------
    def _new_round(self) -> None:
        """A forward that will be backpropagated: reductions still waiting from the previous one go first."""
        if torch.is_grad_enabled():
            self._end_round()
            self._round_open = True

    def _end_round(self) -> None:
        if self._round_open:
            self._reductions.launch_rest()
            self._reductions.reset()
            self._round_open = False

    def _on_grad(self, p: torch.Tensor) -> None:
        self._used.add(p)
        self._reductions.ready(p)

    @torch.no_grad()
    def _reduce_to_owner(self, i: int) -> None:
        # with gradient accumulation the owner's grad already holds the earlier micro-batches' sum and
        # the others hold only this micro-batch's: the reduced sum is still right
        (p,) = self._reductions.buckets[i]
        # not used on this rank (in this forward): it adds zeros (of the full shape: a stage-3 p may be freed)
        grad = p.grad if p.grad is not None else torch.zeros(self.shapes[p], dtype=p.dtype, device=p.device)
        dist.reduce(grad, dst=self._src(p), group=self.group)
        p.grad = grad if self.owned(p) else None
        if self.stage == 3:
            self._free([p])

    # the step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, max_norm: float = 0.0) -> torch.Tensor:
        """Average gradients, clip to the global norm `max_norm` (0 = off), step the owners, share the new
        weights (stages 1-2). Returns the global gradient norm before clipping."""
        if self.stage == 1:
            average_gradients(self.params, self.group)
        else:
            self._end_round()
            used = used_anywhere(self.params, [p in self._used for p in self.params], self.group)
            self._used.clear()
            for p, u in zip(self.params, used):  # an owner holds the ranks' summed gradient (zeros from some)
                if self.owned(p) and p.grad is not None:
                    if u:
                        p.grad.div_(self.world)
                    else:  # no rank used it: the zeros sent for it are no gradient
                        p.grad = None
        mine = [p for p in self.params if self.owned(p) and p.grad is not None]
        # on the parameters' device: NCCL reduces GPU tensors only (a CPU one failed there)
        sq = torch.zeros((), dtype=torch.float64, device=self.params[0].device if self.params else "cpu")
        for p in mine:
            sq += p.grad.double().square().sum()
        dist.all_reduce(sq, group=self.group)
        norm = sq.sqrt()
        if max_norm > 0 and float(norm) > max_norm:
            for p in mine:
                p.grad.mul_(max_norm / (float(norm) + 1e-6))
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        if self.stage < 3:
            for p in self.params:
                dist.broadcast(p.data, src=self._src(p), group=self.group)
        return norm.float()

    @torch.no_grad()
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """name -> the whole tensor, on every rank (stage 3 gathers a copy; the model stays partitioned)."""
        out = {}
        for name, p in self.model.named_parameters():
            if self.stage == 3 and p in self.owner and p not in self._live:  # (frozen ones are never partitioned)
                full = p.data.clone() if self.owned(p) else torch.empty(self.shapes[p], dtype=p.dtype, device=p.device)
                dist.broadcast(full, src=self._src(p), group=self.group)
                out[name] = full
            else:
                out[name] = p.detach().clone()
        return out

    # checkpoints -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's shard: the optimizer state of the parameters it owns. Save one per rank; resume at the
        same world size by loading the full parameters into the model, building the optimizer and the
        ZeroOptimizer as before, then load_state_dict(shard)."""
        return {"world": self.world, "rank": self.rank, "owned": [self.names[p] for p in self._owned_in_order()],
                "optimizer": self.optimizer.state_dict()}

    def full_state_dict(self) -> dict:
        """The unpartitioned optimizer's state_dict (torch's format; a copy, on CPU), gathered on every rank: it
        loads into the same optimizer built over the whole model in one process, and into a ZeroOptimizer
        of any world size (load_state_dict)."""
        index = {p: i for i, p in enumerate(p for g in self._full_groups for p in g)}
        mine = {index[p]: {k: v.to("cpu", copy=True) if isinstance(v, torch.Tensor) else v for k, v in st.items()}
                for p, st in self.optimizer.state.items()}
        parts: list[dict] = [{} for _ in range(self.world)]
        dist.all_gather_object(parts, mine, group=self.group)
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in full]}
                  for g, full in zip(self.optimizer.param_groups, self._full_groups)]
        return {"state": {i: st for part in parts for i, st in part.items()}, "param_groups": groups}

    def load_state_dict(self, state: dict) -> None:
        """Load this rank's shard (state_dict(), same world size and partition) or a full_state_dict()."""
        if "world" not in state:
            state = self._shard_of(state)
        elif state["world"] != self.world or state["owned"] != [self.names[p] for p in self._owned_in_order()]:
            raise ConfigError(f"this ZeRO shard was saved by rank {state['rank']} of {state['world']}, which owned "
                              f"other parameters than rank {self.rank} of {self.world}: load each rank's own shard at "
                              "the same world size, or a full_state_dict() at any")
        else:
            state = state["optimizer"]
        self.optimizer.load_state_dict(state)

    def _shard_of(self, full: dict) -> dict:
        """The owned parameters' part of a full_state_dict(), numbered as this rank's optimizer numbers them."""
        sizes = [len(g["params"]) for g in full["param_groups"]]
        if sizes != [len(g) for g in self._full_groups]:
            raise ConfigError(f"this optimizer state has groups of {sizes} parameters but the optimizer has "
                              f"{[len(g) for g in self._full_groups]}: build it as the saved one was built")
        state, groups, j = {}, [], 0
        for g, whole, saved in zip(self.optimizer.param_groups, self._full_groups, full["param_groups"]):
            position = {p: k for k, p in enumerate(whole)}
            ids = list(range(j, j + len(g["params"])))
            for p, local in zip(g["params"], ids):
                if saved["params"][position[p]] in full["state"]:
                    state[local] = full["state"][saved["params"][position[p]]]
            groups.append({**saved, "params": ids})
            j += len(ids)
        return {"state": state, "param_groups": groups}

    def _owned_in_order(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]


def state_bytes(zero: ZeroOptimizer) -> dict[str, int]:
    """Measured bytes this rank holds now: parameter storage (frozen parameters too), gradients, optimizer state."""
    from lmforge.optim import optimizer_state_bytes

    return {"param": sum(p.data.numel() * p.element_size() for p in zero.model.parameters()),
            "grad": sum(p.grad.numel() * p.grad.element_size() for p in zero.params if p.grad is not None),
            "optim": optimizer_state_bytes(zero.optimizer)}


def owned_numel(zero: ZeroOptimizer) -> int:
    """Parameters in this rank's partition (the n_owned of zero_memory)."""
    return sum(math.prod(zero.shapes[p]) for p in zero.params if zero.owned(p))
