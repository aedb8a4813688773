"""Frozen extra models held by objectives: the DPO/KTO reference policy, the distillation teacher.

A `Frozen` model runs in eval mode without gradients, optionally on another device (its inputs are moved
there and its outputs moved back) and in another dtype (`FROZEN_DTYPES`: an fp32 checkpoint held in bf16
beside a bf16-trained model takes half the memory; the objectives upcast its logits to fp32 all the same).
It is left as it was given until its first forward: the objective first checks that it is not the trained
model and shares no parameter with it (`check_not_trained`), since freezing such a model would freeze the
trained one and an optimizer built afterwards would silently get none of its parameters. Its identity (a
path if known, and a checksum of its weights in the dtype it runs in, cast yet or not) goes into the
objective's state_dict, so a resumed run can check it got the same reference back without the checkpoint
holding its weights a second time.

`BaseReference(policy)` is the reference of a LoRA run without a second copy of the weights: the trained
policy itself with its adapters disabled (lmforge.adapt.lora.adapters_disabled), run in eval mode (the
policy's modes come back after) without gradients. Since only the adapters train, that is the starting
model at every step; its checksum covers the weights outside the adapters, so a resume checks the base.
The one base state a Trainer moves under frozen weights, the selection bias of MoE layers with aux-loss-free
balancing (bias_update_rate > 0), is kept as it was when the BaseReference was made and put in place while
the reference runs, so the reference stays the starting model.

Reference log-probs can be cached: DPO over several epochs sees each pair again, and the reference
never changes, so `cache_size > 0` keeps the sequence log-probs keyed by a hash of the token ids.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Collection, Iterator
from typing import Any

import torch

from lmforge.adapt.lora import adapter_names, adapters_disabled, lora_layers
from lmforge.align.config import FROZEN_DTYPE_NAMES, check_beta, check_frozen_dtype  # noqa: F401 (re-export)
from lmforge.align.logprobs import batch_logps, model_inputs
from lmforge.align.value import policy_of
from lmforge.errors import CheckpointError, ConfigError
from lmforge.utils import eval_mode, pick_device

FROZEN_DTYPES = {name: getattr(torch, dtype) for name, dtype in FROZEN_DTYPE_NAMES.items()}


def frozen_dtype(value: str | torch.dtype | None, name: str) -> torch.dtype | None:
    """The torch dtype a `{role}_dtype` option names (None: the model's own, as saved); a one-line ConfigError
    naming the choices otherwise."""
    if value is None or isinstance(value, torch.dtype):
        return value
    check_frozen_dtype(value, name)
    return FROZEN_DTYPES[value]


def frozen_device(value: str | torch.device | None, name: str) -> torch.device | None:
    """The device a `{role}_device` option names (None: the model's own), checked through pick_device ('auto',
    'cuda:N' beyond the GPUs there, 'gpu'): a one-line ConfigError naming the option, before any model is
    loaded onto it, instead of torch's RuntimeError or an assertion in load_model."""
    if value is None or isinstance(value, torch.device):
        return value
    try:
        return torch.device(pick_device(str(value), cpu=f"{name} = 'cpu'"))
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}; or leave {name} unset (the run's device)") from None


def vocab_size(model: torch.nn.Module) -> int | None:
    """The model's vocabulary size from its config, its own `vocab_size` (a HF model behind
    lmforge.infer.hf_wrapper.HFCausalLM), or its output head; None if none is known."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "vocab_size", None) is not None:
        return int(cfg.vocab_size)
    own = getattr(model, "vocab_size", None)
    if isinstance(own, int) and not isinstance(own, bool):
        return own
    head = getattr(model, "lm_head", None)
    return int(head.out_features) if isinstance(head, torch.nn.Linear) else None


def weights_checksum(model: torch.nn.Module, *, exclude: tuple[str, ...] = (), skip: Collection[str] = (),
                     dtype: torch.dtype | None = None) -> str:
    """sha256 (16 hex digits) over tensor names, shapes, dtypes and bytes, in state_dict order, leaving out
    the tensors whose names end with one of `exclude`, and those named in `skip`. With `dtype`, over the
    floating-point tensors cast to it (as Module.to(dtype) casts them), so a model hashes alike before and
    after that cast."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        if (exclude and name.endswith(exclude)) or name in skip:
            continue
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        # reshape(-1) first: a 0-d tensor (a scalar buffer) has no last dimension to view as bytes
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def shared_parameter(a: torch.nn.Module, b: torch.nn.Module) -> str | None:
    """The name of a parameter of `a` that `b` also has (the same Parameter, or a plain tensor over the
    same memory), or None. Sharded (DTensor) parameters compare by identity only."""
    def memory(p: torch.Tensor) -> tuple | None:
        plain = type(p) in (torch.Tensor, torch.nn.Parameter) and p.numel() and p.device.type != "meta"
        return (p.device, p.untyped_storage().data_ptr()) if plain else None

    ids = {id(p) for p in b.parameters()}
    mems = {memory(p) for p in b.parameters()} - {None}
    for name, p in a.named_parameters():
        if id(p) in ids or memory(p) in mems:
            return name
    return None


class Frozen:
    """A model that is never trained: run in eval mode without gradients, optionally on `device` and in
    `dtype` (a FROZEN_DTYPES name). Frozen (requires_grad False, moved to `device`, cast to `dtype`) at its
    first forward, so a check can refuse it first: cast earlier, a parameter it shares with the trained model
    would be cast under that model too."""

    def __init__(self, model: torch.nn.Module, *, role: str, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, path: str | None = None, cache_size: int = 0,
                 vocab: int | None = None):
        self.role, self.path, self.cache_size, self.vocab = role, path, cache_size, vocab
        self.model = model
        self._target = frozen_device(device, f"{role}_device")
        self._dtype = frozen_dtype(dtype, f"{role}_dtype")
        self._frozen = False
        self._checksum: str | None = None
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # identity ---------------------------------------------------------------------------------------
    @property
    def checksum(self) -> str:
        if self._checksum is None:
            self._checksum = weights_checksum(self.model, dtype=self._dtype)
        return self._checksum

    def identity(self) -> dict[str, Any]:
        return {"role": self.role, "path": self.path, "checksum": self.checksum}

    def check_identity(self, saved: dict[str, Any]) -> None:
        if saved and saved.get("checksum") not in (None, self.checksum):
            raise CheckpointError(
                f"the checkpoint was trained against {self.role} {saved.get('path') or '?'} "
                f"(checksum {saved['checksum']}), but this {self.role} has checksum {self.checksum}; "
                f"pass the same {self.role} model (at the same {self.role}_dtype) to resume")

    def check_not_trained(self, model: torch.nn.Module) -> None:
        """One-line ConfigError when this model is the trained `model` or shares a parameter with it."""
        shared = shared_parameter(self.model, model)
        if self.model is model or shared is not None:
            what = ("is the model being trained" if self.model is model
                    else f"shares {shared} with the model being trained")
            fix = "pass a separate copy, e.g. copy.deepcopy(model) before training"
            if self.role == "reference":
                fix += ", or for a LoRA policy BaseReference(model) (the policy with its adapters off, no copy)"
            raise ConfigError(f"the {self.role} {what}; {fix}")

    def check_vocab(self, model: torch.nn.Module) -> None:
        """One-line ConfigError when the trained model and this one disagree on the vocabulary: sizes must be
        equal, or with `vocab` (the tokenizer's size: the user compares over its ids) both at least that."""
        mine, theirs = vocab_size(self.model), vocab_size(model)
        if mine is None or theirs is None:
            return
        if self.vocab is not None and min(mine, theirs) < self.vocab:
            raise ConfigError(f"{self.role} vocab_size={mine} and the trained model's vocab_size={theirs} must both "
                              f"cover the tokenizer's {self.vocab} ids; use a {self.role} built with this tokenizer")
        if self.vocab is None and mine != theirs:
            raise ConfigError(f"{self.role} vocab_size={mine} differs from the trained model's vocab_size={theirs}; "
                              f"use a {self.role} built with the same tokenizer (if only the embedding padding "
                              "differs, give the tokenizer's vocabulary size: vocab_size=, as lmforge distill does)")

    # forward ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        if not self._frozen:  # the first forward: the objective has checked it is not the trained model
            if self._target is not None or self._dtype is not None:
                self.model.to(device=self._target, dtype=self._dtype)
            self.model.requires_grad_(False)
            self._frozen = True
        if self.model.training:
            self.model.eval()
        yield

    def _moved(self, batch: dict, prefixes: tuple[str, ...]) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                if any(k.startswith(p) for p in prefixes)}

    @torch.no_grad()
    def logits(self, batch: dict, prefix: str = "") -> torch.Tensor:
        """(B, T, V) logits of the batch's `prefix` rows, returned on the batch's device."""
        with self._running():
            ids, kwargs = model_inputs(self._moved(batch, (prefix,)), prefix)
            return self.model(ids, **kwargs).to(batch[f"{prefix}input_ids"].device)

    @torch.no_grad()
    def token_logps(self, batch: dict, prefix: str = "") -> torch.Tensor:
        """(B, T) fp32 log-probs of the batch's `prefix` targets, on the batch's device: per-token anchors
        (RL's KL to the reference, token-level objectives). Where a target is -100 the value is meaningless:
        mask with lmforge.align.logprobs.response_mask."""
        with self._running():
            tokens = batch_logps(self.model, self._moved(batch, (prefix,)), (prefix,))[1][0]
        return tokens.to(batch[f"{prefix}input_ids"].device)

    @torch.no_grad()
    def sequence_logps(self, batch: dict, prefixes: tuple[str, ...], *, average: bool = False
                       ) -> list[torch.Tensor]:
        """Sequence log-prob sums (or means) (B,) per prefix, through the cache when enabled."""
        key = self._key(batch, prefixes, average) if self.cache_size else None
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return list(self._cache[key].to(batch[f"{prefixes[0]}input_ids"].device).unbind(0))
        out_device = batch[f"{prefixes[0]}input_ids"].device
        with self._running():
            seqs = [s.to(out_device) for s in batch_logps(self.model, self._moved(batch, prefixes), prefixes,
                                                          average=average)[0]]
        if key is not None:
            self._cache[key] = torch.stack(seqs).cpu()
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return seqs

    @staticmethod
    def _key(batch: dict, prefixes: tuple[str, ...], average: bool) -> bytes:
        h = hashlib.sha256(str((prefixes, average)).encode())
        for p in prefixes:
            for name in ("input_ids", "targets", "loss_mask"):
                t = batch.get(f"{p}{name}")
                if t is not None:
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()


class BaseReference(Frozen):
    """The reference of a LoRA run from the policy's own weights: `policy` with its adapters disabled, in
    eval mode, without gradients. Pass it as an objective's `reference=`; the objective gives it its role,
    path and cache (it runs where the policy is: no device of its own)."""

    def __init__(self, policy: torch.nn.Module, *, path: str | None = None):
        super().__init__(policy, role="reference", path=path)
        self._check_base()
        from lmforge.model.layers.moe import MoE  # (it imports torch._dynamo: not at import, for --help)

        # the starting selection biases of the MoE layers the Trainer moves (aux-loss-free balancing,
        # update_expert_biases): put back while the reference runs, so it stays the starting model
        self._start_biases = {m: m.e_bias.detach().clone() for m in policy.modules()
                              if isinstance(m, MoE) and m.m.bias_update_rate > 0}
        # the base as given now (before a resume loads the checkpoint's): another base is refused on resume
        self._checksum = weights_checksum(policy, skip=adapter_names(policy))

    def _check_base(self) -> None:
        if not lora_layers(self.model):
            raise ConfigError(f"BaseReference needs a policy with LoRA adapters (apply_lora first); "
                              f"{type(self.model).__name__} has none, so it would be its own reference")
        policy = policy_of(self.model)  # an actor-critic's policy is its .backbone: the KL anchor
        in_policy, outside = _trained(policy), _trained(self.model)
        if in_policy:  # named as in the module given (an actor-critic's `backbone.` prefix)
            name = next(n for n in outside if n.endswith(in_policy[0]))
            raise ConfigError(f"BaseReference: {name} is trained (LoRAConfig.trainable or requires_grad), so "
                              "the policy with adapters off is not the starting model; freeze it, or give a "
                              "separate reference model (reference= in Python; reference = 'PATH' or --reference "
                              "PATH for lmforge dpo/kto)")
        if outside:  # only an actor-critic's value head trains besides the adapters: its policy is the anchor
            raise ConfigError(f"BaseReference: {outside[0]} is trained, so {type(self.model).__name__} with adapters "
                              "off is not the starting model; the KL anchor is the policy alone: "
                              "BaseReference(model.backbone)")

    def check_not_trained(self, model: torch.nn.Module) -> None:
        self._check_base()  # the policy is the trained model by design; only its adapters may train

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        with adapters_disabled(self.model), eval_mode(self.model), self._starting_biases():
            yield

    @contextlib.contextmanager
    def _starting_biases(self) -> Iterator[None]:
        """The MoE selection biases as they were at construction, the trained model's back on exit."""
        now = {m: m.e_bias.detach().clone() for m in self._start_biases}
        with torch.no_grad():
            for m, start in self._start_biases.items():
                m.e_bias.copy_(start)
        try:
            yield
        finally:
            with torch.no_grad():
                for m, bias in now.items():
                    m.e_bias.copy_(bias)


def _trained(model: torch.nn.Module) -> list[str]:
    """Names of the model's trained parameters besides its LoRA layers' own (LoRALinear.adapter_params)."""
    adapters = adapter_names(model)
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in adapters]


def held(model: torch.nn.Module | Frozen | None, *, role: str, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, path: str | None = None, cache_size: int = 0,
         vocab: int | None = None) -> Frozen | None:
    """What an objective holds for its `reference=` / `teacher=` argument: a module becomes a Frozen; a
    Frozen (a BaseReference) is adopted, taking the objective's role, path, cache and vocab; None stays None."""
    if not isinstance(model, Frozen):
        return None if model is None else Frozen(model, role=role, device=device, dtype=dtype, path=path,
                                                 cache_size=cache_size, vocab=vocab)
    if device is not None:
        raise ConfigError(f"{role}_device={str(device)!r} cannot move a {type(model).__name__}, which runs where "
                          f"its model is; unset {role}_device, or pass a separate {role} model")
    if dtype is not None:  # a BaseReference's weights are the trained policy's: casting them would cast the policy
        raise ConfigError(f"{role}_dtype={str(dtype)!r} cannot cast a {type(model).__name__}, which runs in its "
                          f"model's dtype; unset {role}_dtype, or pass a separate {role} model")
    model.role, model.path, model.cache_size, model.vocab = role, path or model.path, cache_size, vocab
    return model
