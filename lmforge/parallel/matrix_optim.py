"""Muon and Dion on FSDP2-sharded parameters (DTensors split by rows, Shard(0), over a 1-D mesh).

Element-wise optimizers (AdamW, Lion) step on each rank's shard unchanged. Matrix optimizers cannot: the
orthogonalised update of a matrix is not the concatenation of its row blocks' updates.

  ShardedMuon  gathers the whole momentum matrix (one all-gather of m·n values per matrix, the same
               volume FSDP spends gathering the weight), runs Newton-Schulz on it, keeps its own rows.
               Every rank repeats the NS work; with owner_compute=True each matrix is gathered to one
               rank (round robin), orthogonalised there and its rows scattered back (as Moonlight, Liu
               et al. 2025 sec. 2.3, distributes the work): NS compute divided by N.
  ShardedDion  Dion's distributed form (Ahn et al. 2025, Algorithm 3): the momentum stays sharded by
               rows and only rank-r factors travel. With B = [B_1; ...; B_N] (rows per rank) and Q (n x r)
               replicated:  B Q = [B_1 Q; ...] (all-gather m x r) -> P = QR(B Q), each rank keeps its rows
               P_i;  R = sum_i B_i^T P_i  (all-reduce n x r). Communication O((m + n) r) per matrix
               instead of O(m n), and the result equals Dion on the whole matrix.
Other roles (embeddings, head, vectors) take the AdamW path of the parent optimizer on their shards.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from lmforge.errors import ConfigError
from lmforge.optim.base import apply_step_
from lmforge.optim.dion import Dion, check_q, dion_update, initial_q, next_q, orthonormal_columns, q_at_rank
from lmforge.optim.muon import Muon, newton_schulz, shape_scale


def _is_row_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return False
    if p.device_mesh.ndim != 1 or p.placements[0] != Shard(0):
        raise ConfigError(f"sharded Muon/Dion need FSDP's Shard(0) on a 1-D mesh, got {p.placements} on "
                          f"{p.device_mesh.ndim} dims; use FSDP without tensor parallelism")
    return True


def _own_rows(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's rows of a tensor every rank computed whole, as a DTensor placed like `like`."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


class ShardedMuon(Muon):
    """owner_compute=False (the reference): every rank all-gathers each momentum matrix and runs NS on it.
    owner_compute=True: matrix j is gathered to rank j mod N only, orthogonalised there, and its rows
    scattered back - the same result with 1/N of the Newton-Schulz work per rank and no all-gather."""

    def __init__(self, *args, owner_compute: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.owner_compute = owner_compute
        self._matrix_index = 0

    @classmethod
    def from_optimizer(cls, opt: Muon, owner_compute: bool = False) -> "ShardedMuon":
        d = opt.defaults
        return cls(opt.param_groups, lr=d["lr"], momentum=d["momentum"], nesterov=d["nesterov"],
                   ns_steps=d["ns_steps"], scale=d["scale"], weight_decay=d["weight_decay"], betas=d["betas"],
                   eps=d["eps"], qk_clip_tau=opt.qk_clip_tau, owner_compute=owner_compute)

    @torch.no_grad()
    def step(self, closure=None):
        self._matrix_index = 0  # owners rotate over the matrices in the same order on every rank
        return super().step(closure)

    def _orthogonalise(self, m: torch.Tensor, group: dict) -> torch.Tensor:
        """(rows, cols) whole momentum, or stacked experts (E, rows, cols) -> the scaled NS5 update (Muon's)."""
        o = newton_schulz(m, group["ns_steps"], dtype=torch.bfloat16 if m.is_cuda else None)
        return o * shape_scale(m.shape[-2], m.shape[-1], group["scale"])

    def _owner_update(self, m, group: dict) -> torch.Tensor:
        """This rank's rows of the update, computed on the matrix's owner: gather rows, NS, scatter rows."""
        pg = m.device_mesh.get_group()
        world, rank = dist.get_world_size(pg), dist.get_rank(pg)
        owner = self._matrix_index % world
        self._matrix_index += 1
        rows = [len(c) for c in torch.arange(m.shape[0]).chunk(world)]  # FSDP2's torch.chunk row split
        rows += [0] * (world - len(rows))
        local = m.to_local().reshape(rows[rank], math.prod(m.shape[1:]))  # a rank may hold no rows (4 on 3)
        padded = local.new_zeros(max(rows), local.shape[1])  # gloo/NCCL gather and scatter want equal sizes
        padded[:rows[rank]] = local
        parts = [torch.empty_like(padded) for _ in range(world)] if rank == owner else None
        src = dist.get_global_rank(pg, owner)
        dist.gather(padded, parts, dst=src, group=pg)
        out = None
        if rank == owner:
            whole = torch.cat([t[:r] for t, r in zip(parts, rows)])
            o = self._orthogonalise(whole.view(m.shape), group).view(whole.shape)
            out = [padded.new_zeros(padded.shape) for _ in range(world)]
            for t, chunk in zip(out, o.split(rows)):
                t[:chunk.shape[0]] = chunk
        dist.scatter(padded, out, src=src, group=pg)
        return padded[:rows[rank]].reshape(m.to_local().shape)

    def update(self, p: torch.Tensor, group: dict) -> None:
        if not (group["use_muon"] and p.dim() >= 2 and _is_row_sharded(p)):
            return super().update(p, group)
        from torch.distributed.tensor import DTensor

        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)  # a DTensor: sharded like the weight
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(p.grad)
        m = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        if self.owner_compute:
            local = self._owner_update(m, group)
            o = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        else:
            full = m.full_tensor()  # (m, n...) the whole matrix on every rank
            o = _own_rows(self._orthogonalise(full, group), p)
        apply_step_(p, o, group["lr"], group["weight_decay"])


class ShardedDion(Dion):
    @classmethod
    def from_optimizer(cls, opt: Dion) -> "ShardedDion":
        d = opt.defaults
        return cls(opt.param_groups, lr=d["lr"], momentum=d["momentum"], rank=d["rank"],
                   weight_decay=d["weight_decay"], betas=d["betas"], eps=d["eps"], seed=opt._seed)

    def update(self, p: torch.Tensor, group: dict) -> None:
        if not (group["use_dion"] and p.dim() >= 2 and _is_row_sharded(p)):
            return super().update(p, group)
        from torch.distributed.tensor import DTensor

        if p.dim() > 2:
            return self._local_experts_step(p, group)
        m, n = p.shape[0], math.prod(p.shape[1:])
        g = p.grad.to_local().reshape(-1, n)  # (m_i, n): this rank's rows
        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
            state["q"] = initial_q((m, n), group["rank"], self._seed).to(device=g.device, dtype=g.dtype)  # Dion's
        state["q"] = q_at_rank(state["q"], (m, n), group["rank"], self._seed)  # a resume may change optim.rank
        b = state["momentum_buffer"].to_local().reshape(-1, n) + g
        group_ = p.device_mesh.get_group()
        r = state["q"].shape[1]
        bq = DTensor.from_local(b @ state["q"], p.device_mesh, p.placements, shape=(m, r),
                                stride=(r, 1)).full_tensor()  # (m, r) gathered; shards may be uneven
        p_full = orthonormal_columns(bq)  # (QR in fp32 for bf16 shards)
        p_i = _own_rows(p_full, p).to_local()  # (m_i, r)
        r_mat = b.T @ p_i  # (n, r): this rank's share of B^T P
        dist.all_reduce(r_mat, group=group_)
        new_m = b - (1 - group["momentum"]) * (p_i @ r_mat.T)
        state["momentum_buffer"].to_local().copy_(new_m.reshape(state["momentum_buffer"].to_local().shape))
        r_normed, state["q"] = next_q(r_mat, state["q"])
        update = (p_i @ r_normed.T).reshape(p.to_local().shape) * (m / n) ** 0.5
        apply_step_(p, DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()),
                    group["lr"], group["weight_decay"])

    def _local_experts_step(self, p, group: dict) -> None:
        """A stacked (E, m, n) expert weight sharded by expert: each rank holds its experts whole, so it runs their
        per-expert Dion alone, with the Q each expert has in unsharded Dion; nothing is communicated."""
        from torch.distributed.tensor import DTensor

        state = self.state[p]
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
            state["q"] = _own_rows(initial_q(p.shape, group["rank"], self._seed).to(p.device, p.dtype), p).to_local()
        buf = state["momentum_buffer"].to_local()
        check_q(state["q"], buf.shape)
        state["q"] = q_at_rank(state["q"], p.shape, group["rank"], self._seed,  # a resume may change optim.rank
                               rows=lambda q: _own_rows(q, p).to_local())
        update, new_m, state["q"] = dion_update(buf + p.grad.to_local(), state["q"], group["momentum"])
        buf.copy_(new_m)
        update = update * (p.shape[-2] / p.shape[-1]) ** 0.5
        apply_step_(p, DTensor.from_local(update, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()),
                    group["lr"], group["weight_decay"])
