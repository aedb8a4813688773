"""Parameter roles and the parameter groups built from them.

Every trainable parameter gets one role:
    "embedding"  token/position embedding tables (nn.Embedding weights)
    "head"       the output projection (lm_head)
    "matrix"     every other tensor of dim >= 2 (attention and MLP weights): what Muon, Dion, Shampoo
                 and SOAP precondition as a matrix
    "vector"     norm gains, biases, scalars
    "value"      a critic's value head, weight and bias (lmforge.align.value): RL's critic often learns at
                 a rate of its own; never decayed (decay pulls every value toward 0, a baseline it must learn),
                 and like "head" not a matrix to precondition (Muon/Dion update it with AdamW)
A model that knows better exposes `param_roles() -> {name: role}` (lmforge's Transformer does); other
modules get the rule above. Weight decay applies to every role but "vector" and "value"; per-role learning
rates come from `OptimConfig.embed_lr / head_lr / vector_lr / value_lr`.
"""

from __future__ import annotations

import torch

from lmforge.errors import ConfigError

ROLES = ("matrix", "embedding", "head", "vector", "value")
NO_DECAY = ("vector", "value")


def infer_roles(model: torch.nn.Module) -> dict[str, str]:
    """The fallback rule: nn.Embedding weights, `lm_head` names, dim >= 2, the rest."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    roles = {}
    for name, p in model.named_parameters():
        if id(p) in embedding_ids:
            roles[name] = "embedding"
        elif "lm_head" in name:
            roles[name] = "head"
        elif p.dim() >= 2:
            roles[name] = "matrix"
        else:
            roles[name] = "vector"
    return roles


def param_roles(model: torch.nn.Module) -> dict[str, str]:
    """name -> role, named as `model.named_parameters()` names them."""
    if not hasattr(model, "param_roles"):
        roles = infer_roles(model)
    else:
        roles = model.param_roles()
        owner = getattr(model.param_roles, "__self__", model)
        if owner is not model:  # a wrapper that forwards attributes (torch.compile's) names the same parameters
            # with a prefix ("_orig_mod."): matched by name, every role fell back to the rule below
            by_id = {id(p): roles[n] for n, p in owner.named_parameters() if n in roles}
            roles = {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}
    bad = {n: r for n, r in roles.items() if r not in ROLES}
    if bad:
        name, role = next(iter(bad.items()))
        raise ConfigError(f"parameter {name!r} has unknown role {role!r}; roles are {ROLES}")
    return roles


def role_groups(model: torch.nn.Module, weight_decay: float,
                lrs: dict[str, float] | None = None) -> list[dict]:
    """One group per role present, in ROLES order: {"params", "role", "name", "weight_decay"[, "lr"]}.

    `lrs` maps a role to its learning rate; roles missing from it take the optimizer's default lr.
    Tied parameters appear once (named_parameters deduplicates them)."""
    roles = param_roles(model)
    by_role: dict[str, list[torch.nn.Parameter]] = {r: [] for r in ROLES}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_role[roles.get(name) or ("matrix" if p.dim() >= 2 else "vector")].append(p)
    groups = []
    for role in ROLES:
        if not by_role[role]:
            continue
        g = {"params": by_role[role], "role": role, "name": role,
             "weight_decay": 0.0 if role in NO_DECAY else weight_decay}
        if lrs and lrs.get(role):
            g["lr"] = lrs[role]
        groups.append(g)
    return groups
