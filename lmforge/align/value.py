"""Per-token value heads: a scalar read from a language model's final hidden state at every position.

    critic = ValueModel(lm)                        # a separate critic: backbone + Linear(d, 1) per position
    v = critic.values(ids)                         # (B, T) fp32
    ac = PolicyWithValue(policy)                   # a shared trunk: one backbone, the LM head and a value head
    logits = ac(ids)                               # the policy's own logits: engine, LLM, LoRA, FSDP as before
    logits, v = ac.policy_and_values(ids)          # both from ONE trunk forward (the PPO loss)
    pc = PolicyAndCritic(policy, critic)           # policy + a separate critic as the Trainer's one model

Where a value sits. In the Trainer's batch layout (lmforge.train.objective) position t of `input_ids` is the
state that chooses `targets[:, t]` (the next token), so values[:, t] = V(s_t) is aligned with the token
log-probs of lmforge.align.logprobs.token_logprobs and with response_mask(batch): GAE
(lmforge.align.advantages.gae) runs over that same (B, T) grid. (TRL's PPO slices `values[:, context - 1 :
-1]` for the same alignment.) A process reward model (lmforge.align.prm) is a ValueModel whose scalar is the
logit of "this step is correct", read at each step's last token.

The head reads the hidden state AFTER the final norm (the LM head's input: Transformer.forward's
return_hidden), in the head's own dtype outside autocast (values are regression targets of the scale of
the rewards; TRL's ValueHead casts to its head's dtype too) and returns fp32. It starts at zero weight and
bias, so every value starts at 0 (the value head of OpenAI's lm-human-preferences, the code of Ziegler et
al. 2019, per Huang et al. 2023, "The N Implementation Details of RLHF with PPO", detail "value head
initialisation"); a reward model's head (lmforge.align.reward.SequenceHead) starts at std 1/sqrt(d + 1)
instead, since its loss needs scores that differ from the start.

Both kinds are heads on a backbone (`.backbone`, `head_record()` kind "value"), like a reward model, so
lmforge.checkpoint writes and loads them (full, or adapter-only over a base: the head is trainable, so it is
saved with the adapters), FSDP shards the backbone's blocks, and the Trainer's optimizer holds the head as a
submodule parameter. With LoRA, apply_lora to the backbone before wrapping it or to the wrapped model: the
head trains either way (its `task_heads`, which apply_lora leaves trainable); the KL reference is then
BaseReference(ac.backbone).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from lmforge.align.logprobs import ModelAux, model_inputs
from lmforge.errors import ConfigError


def value_linear(backbone: nn.Module) -> nn.Linear:
    """Linear(d_model, 1) at zero weight and bias (every value starts at 0: see the module docstring), on the
    backbone's device and in its dtype, as if built with it."""
    p = next(backbone.parameters())
    head = nn.Linear(backbone.cfg.d_model, 1, device=p.device, dtype=p.dtype)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def read_values(head: nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """(..., d) final-norm hidden states -> (...) fp32 values, computed in the head's dtype outside autocast."""
    with torch.autocast(h.device.type, enabled=False):
        # h @ w + b as a new (..., ) tensor: not a view of head(h)'s (..., 1), which FSDP2 warns about
        return (torch.matmul(h.to(head.weight.dtype), head.weight[0]) + head.bias[0]).float()


def _check_backbone(backbone: nn.Module, who: str, *, shared: bool) -> None:
    if getattr(backbone, "head_record", None) is not None:
        raise ConfigError(f"{who} wraps a language model, got a {type(backbone).__name__} (a head already); "
                          f"pass its .backbone")
    if not hasattr(backbone, "hidden") or not hasattr(backbone, "cfg"):
        raise ConfigError(f"{who} needs a backbone with a .hidden(ids) trunk and a .cfg (an lmforge Transformer); "
                          f"got {type(backbone).__name__}")
    if shared and "return_hidden" not in inspect.signature(backbone.forward).parameters:
        raise ConfigError(f"{who} reads the hidden state of the policy's own forward, but "
                          f"{type(backbone).__name__}.forward has no return_hidden option; use an lmforge Transformer")


def trunk_aux_loss(backbone: nn.Module) -> torch.Tensor | None:
    """The MoE balancing / router z-losses of the trunk's last forward, for a head that reads .hidden() (its MTP
    heads never run there, so an MTP loss the backbone kept from another forward is not this one's); None
    without MoE layers."""
    from lmforge.model.layers.moe import MoE

    mtp = getattr(backbone, "mtp", None)
    skip = {id(m) for m in mtp.modules()} if mtp is not None else set()
    terms = [m.last_aux for m in backbone.modules() if isinstance(m, MoE) and id(m) not in skip
             and m.last_aux is not None]
    return torch.stack([t.float() for t in terms]).sum() if terms else None


def freeze_unread(backbone: nn.Module) -> None:
    """Freeze what a head on the backbone's trunk never reads: its LM head (unless tied to the embedding, which the
    trunk reads) and MTP heads. No gradient reaches them, and data-parallel replicas (DDP) would wait for one. For
    separate heads (SequenceHead, ValueModel); a shared trunk (PolicyWithValue) keeps its LM head trained."""
    for name in ("lm_head", "mtp"):
        part = getattr(backbone, name, None)
        if part is not None and not (name == "lm_head" and part.weight is backbone.tok_emb.weight):
            part.requires_grad_(False)


def _param_roles(model: nn.Module) -> dict[str, str]:
    """The backbone's optimizer roles under "backbone.", the value head's weight and bias in role "value": its
    own learning rate (OptimConfig.value_lr), no weight decay, AdamW under Muon/Dion (like lm_head)."""
    from lmforge.optim.groups import param_roles

    roles = {f"backbone.{n}": r for n, r in param_roles(model.backbone).items()}
    return {**roles, "value_head.weight": "value", "value_head.bias": "value"}


class ValueModel(nn.Module):
    """A separate critic (or a process reward model): backbone (an lmforge Transformer) + a scalar head at
    every position. forward(ids) = values(ids): (B, T) fp32. train_backbone=False freezes the backbone (the
    head alone trains; the trunk runs without autograd). Its LM head is carried along unused and frozen (the
    checkpoint stays a Transformer's: freeze_unread), as a reward model's is."""

    task_heads = ("value_head",)
    """new weights for its task, trained in full under apply_lora (as SequenceHead.task_heads)"""

    def __init__(self, backbone: nn.Module, *, train_backbone: bool = True):
        super().__init__()
        _check_backbone(backbone, "ValueModel", shared=False)
        self.backbone, self.train_backbone = backbone, train_backbone
        self.value_head = value_linear(backbone)
        if not train_backbone:
            backbone.requires_grad_(False)
        freeze_unread(backbone)

    @property
    def cfg(self):
        return self.backbone.cfg

    def head_record(self) -> dict:
        """What config.json records beside the backbone's config (lmforge.checkpoint.load_model rebuilds it)."""
        return {"kind": "value", "shared": False, "train_backbone": self.train_backbone}

    def param_roles(self) -> dict[str, str]:
        return _param_roles(self)

    def aux_loss(self) -> torch.Tensor | None:
        """The trunk's MoE losses of the last forward while it trains (objectives add them: ModelAux); None frozen."""
        return trunk_aux_loss(self.backbone) if self.train_backbone else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, meta=None) -> torch.Tensor:
        """(B, T) ids -> (B, T) fp32 values, one per position (packed rows: positions / meta as the model's)."""
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            h, _ = self.backbone.hidden(input_ids, positions, None, meta)
            norm = self.backbone.final_norm
            h = norm(h) if norm is not None else h
        return read_values(self.value_head, h)

    def values(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, meta=None) -> torch.Tensor:
        """The same as calling the model (through __call__: FSDP2's and DDP's forward hooks run)."""
        return self(input_ids, positions, meta)


class _PolicyFront(nn.Module):
    """The policy's interface, delegated to `.backbone` (the policy): what the engine and the Trainer read of
    PolicyWithValue and PolicyAndCritic, whose forward is the policy's own."""

    backbone: nn.Module

    @property
    def cfg(self):
        return self.backbone.cfg

    @property
    def generation_module(self) -> nn.Module:
        """The module whose forward this one's is when generating (the engine's batch-1 kernel step reads its
        weights: lmforge.infer.kernel_step.unsupported)."""
        return self.backbone

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(getattr(self.backbone, "eos_token_ids", None) or ())

    def cache_spec(self):
        return self.backbone.cache_spec()

    def aux_loss(self) -> torch.Tensor | None:
        return self.backbone.aux_loss()

    def forward_mtp(self, input_ids: torch.Tensor):
        return self.backbone.forward_mtp(input_ids)  # the engine's draft='mtp'

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        return self.backbone.flops_per_token(seq_len, training)  # the Trainer's MFU; a value head adds 2 d_model


def policy_of(model: nn.Module) -> nn.Module:
    """The policy inside an actor-critic module (PolicyWithValue, PolicyAndCritic: its `.backbone`), else the
    model itself: what an RL rollout engine runs (lmforge.train.distributed.rollout_model, sync_rollout)."""
    return model.backbone if isinstance(model, _PolicyFront) else model


class PolicyWithValue(_PolicyFront):
    """A policy and its critic on one trunk. forward is the policy's own (logits, the model interface of
    lmforge: the engine, LLM, LoRA, FSDP and the log-prob utilities take it as the bare policy); the value
    head reads the same final hidden state. policy_and_values(ids) gives (logits, values) from one trunk
    forward; values(ids) runs the trunk without the LM head."""

    task_heads = ("value_head",)
    """new weights for its task, trained in full under apply_lora (as SequenceHead.task_heads)"""

    def __init__(self, policy: nn.Module):
        super().__init__()
        _check_backbone(policy, "PolicyWithValue", shared=True)
        self.backbone = policy
        self.value_head = value_linear(policy)
        self._values_only = False  # the last forward ran the trunk alone (values(ids)): no LM head, no MTP heads

    def aux_loss(self) -> torch.Tensor | None:
        """The policy's aux losses of the last forward (MoE, MTP); after values alone, the trunk's MoE losses, not
        an MTP loss an earlier forward kept (its graph freed by that step's backward)."""
        return trunk_aux_loss(self.backbone) if self._values_only else self.backbone.aux_loss()

    def param_roles(self) -> dict[str, str]:
        return _param_roles(self)

    def head_record(self) -> dict:
        """config.json's record of the head (lmforge.checkpoint): shared = the value head sits on the policy."""
        return {"kind": "value", "shared": True}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None, meta=None, *,
                return_hidden: bool | tuple[int, ...] = False, values: bool = False, logits: bool = True):
        """Default: the policy's logits (B, T, V) (with return_hidden, (logits, features) for EAGLE/Medusa drafters,
        passed through to the policy).
        values=True: (logits, values (B, T) fp32) from one trunk forward; with logits=False the values alone
        (the trunk and final norm, no LM head). Every output goes through here, not through side methods, so
        FSDP2's and DDP's forward hooks (which gather and reduce the root's parameters) always run."""
        self._values_only = values and not logits
        if not values:
            if not logits:
                raise ConfigError("PolicyWithValue(..., logits=False) computes nothing: set values=True for the values")
            return self.backbone(input_ids, positions, cache, meta, return_hidden=return_hidden)
        if return_hidden:
            raise ConfigError("return_hidden is for the plain policy forward (drafters); leave it out with values=True")
        if not logits:
            h, _ = self.backbone.hidden(input_ids, positions, cache, meta)
            norm = self.backbone.final_norm
            return read_values(self.value_head, norm(h) if norm is not None else h)
        out, h = self.backbone(input_ids, positions, cache, meta, return_hidden=True)
        return out, read_values(self.value_head, h)

    def policy_and_values(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, meta=None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, T, V), values (B, T) fp32) from one forward of the trunk: the PPO loss's inputs."""
        return self(input_ids, positions, None, meta, values=True)

    def values(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, meta=None) -> torch.Tensor:
        """(B, T) fp32 values alone (no LM head)."""
        return self(input_ids, positions, None, meta, values=True, logits=False)


class PolicyAndCritic(_PolicyFront):
    """A policy and a separate critic (a ValueModel on its own trunk: InstructGPT's PPO, whose value model
    starts from the reward model) as ONE module, the one the Trainer trains and checkpoints (its optimizer
    must hold only the model's parameters) and the engine samples from. Its interface is PolicyWithValue's:
    forward is the policy's own (so LLM(model) samples the policy; the engine never runs the critic),
    policy_and_values(ids) gives (logits, values) from the two trunks, values(ids) the critic's alone; one
    PPO objective serves both kinds. `.backbone` is the policy; the critic's config travels in the head
    record, so lmforge.checkpoint.load_model rebuilds both. The KL reference is a copy of `.backbone`
    (or BaseReference(model.backbone) for a LoRA policy)."""

    task_heads = ("critic.value_head",)
    """the critic's head, trained in full under apply_lora (ValueModel.task_heads)"""

    def __init__(self, policy: nn.Module, critic: ValueModel):
        super().__init__()
        _check_backbone(policy, "PolicyAndCritic", shared=False)
        if not isinstance(critic, ValueModel):
            raise ConfigError(f"PolicyAndCritic's critic must be a ValueModel (e.g. ValueModel(copy.deepcopy("
                              f"reward_model.backbone))), got {type(critic).__name__}")
        self.backbone, self.critic = policy, critic
        self._ran = (True, False)  # (policy, critic): the trunks the last forward ran, whose aux losses count

    def aux_loss(self) -> torch.Tensor | None:
        """The MoE losses of the trunks the last forward ran: the policy's, and the critic's while it trains (a MoE
        critic's balancing keeps its router learning); never a trunk's from an earlier forward, whose graph a
        backward freed. None without any."""
        terms = list(self.aux_losses().values())
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """aux_loss by trunk ('policy', 'critic'), for ModelAux: a policy forward and a values forward read in turn
        (model_logits, then values_of) add the sum of the two, as one policy_and_values forward does."""
        policy, critic = self._ran
        terms = {"policy": self.backbone.aux_loss() if policy else None,
                 "critic": self.critic.aux_loss() if critic else None}
        return {trunk: t for trunk, t in terms.items() if t is not None}

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        return (self.backbone.flops_per_token(seq_len, training)  # the Trainer's MFU counts both trunks
                + self.critic.backbone.flops_per_token(seq_len, training))

    def param_roles(self) -> dict[str, str]:
        from lmforge.optim.groups import param_roles

        return {**{f"backbone.{n}": r for n, r in param_roles(self.backbone).items()},
                **{f"critic.{n}": r for n, r in _param_roles(self.critic).items()}}

    def head_record(self) -> dict:
        """config.json's record: the critic's own model config beside the policy's (lmforge.checkpoint), and its
        unmerged LoRA adapters (the policy's are the backbone's own record)."""
        from lmforge.adapt.lora import lora_record
        from lmforge.config import to_dict

        lora = lora_record(self.critic.backbone)
        return {"kind": "value", "shared": False, "critic": to_dict(self.critic.cfg),
                "train_backbone": self.critic.train_backbone, **({"critic_lora": lora} if lora else {})}

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache=None, meta=None, *,
                return_hidden: bool | tuple[int, ...] = False, values: bool = False, logits: bool = True):
        """As PolicyWithValue.forward: the policy's logits; values=True (logits, the critic's values (B, T)
        fp32); values=True, logits=False the values alone (the policy is not run)."""
        if not values:
            if not logits:
                raise ConfigError("PolicyAndCritic(..., logits=False) computes nothing: set values=True for the values")
            self._ran = (True, False)
            return self.backbone(input_ids, positions, cache, meta, return_hidden=return_hidden)
        if return_hidden or cache is not None:
            raise ConfigError("PolicyAndCritic: values=True is for training forwards (no cache, no return_hidden)")
        self._ran = (logits, True)
        v = self.critic(input_ids, positions, meta)
        return v if not logits else (self.backbone(input_ids, positions, None, meta), v)

    def policy_and_values(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, meta=None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(policy logits (B, T, V), critic values (B, T) fp32): the PPO loss's inputs."""
        return self(input_ids, positions, None, meta, values=True)

    def values(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, meta=None) -> torch.Tensor:
        """(B, T) fp32 values of the critic alone."""
        return self(input_ids, positions, None, meta, values=True, logits=False)


def value_from_record(backbone: nn.Module, record: dict) -> nn.Module:
    """The value model a checkpoint's head record describes, around its loaded backbone."""
    if record.get("shared"):
        return PolicyWithValue(backbone)
    train_backbone = bool(record.get("train_backbone", True))
    if "critic" in record:  # PolicyAndCritic: the critic's trunk built from its own config
        from lmforge.config import from_dict
        from lmforge.model.config import ModelConfig
        from lmforge.model.registry import build_model  # (the class its arch names)

        p = next(backbone.parameters())
        trunk = build_model(from_dict(ModelConfig, record["critic"], "head.critic")).to(p.device, p.dtype)
        if record.get("critic_lora"):  # the critic's adapters as trained (unmerged), before its weights load
            from lmforge.adapt.lora import restore_lora

            restore_lora(trunk, record["critic_lora"])
        return PolicyAndCritic(backbone, ValueModel(trunk, train_backbone=train_backbone))
    return ValueModel(backbone, train_backbone=train_backbone)


def values_of(model: nn.Module, batch: dict, prefix: str = "", *, aux: ModelAux | None = None) -> torch.Tensor:
    """(B, T) fp32 values of a batch's `prefix` rows from a model with a per-token value head; `aux`: the trained
    model's forward, whose aux losses it reads (lmforge.align.logprobs.ModelAux; after model_logits of a
    PolicyAndCritic, the critic's are added to the policy's, as policy_and_values adds them)."""
    if not callable(getattr(model, "values", None)):
        raise ConfigError(f"this objective needs a model with a per-token value head: wrap it, ValueModel(model) or "
                          f"PolicyWithValue(model), not a bare {type(model).__name__}")
    ids, kwargs = model_inputs(batch, prefix)
    out = model.values(ids, kwargs.get("positions"), kwargs.get("meta"))
    if aux is not None:
        aux.read()
    return out
