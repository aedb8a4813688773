"""Frozen extra models held by objectives: the DPO/KTO reference policy, the distillation teacher.

A `Frozen` model is in eval mode with requires_grad False, optionally on another device (its inputs are
moved there and its outputs moved back). Its identity (a path if known, and a checksum of its weights)
goes into the objective's state_dict, so a resumed run can check it got the same reference back without
the checkpoint holding its weights a second time.

Reference log-probs can be cached: DPO over several epochs sees each pair again, and the reference
never changes, so `cache_size > 0` keeps the sequence log-probs keyed by a hash of the token ids.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch

from lmforge.align.logprobs import batch_logps, model_inputs
from lmforge.errors import CheckpointError, ConfigError


def vocab_size(model: torch.nn.Module) -> int | None:
    """The model's vocabulary size from its config, or its output head; None if neither is known."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "vocab_size", None) is not None:
        return int(cfg.vocab_size)
    head = getattr(model, "lm_head", None)
    return int(head.out_features) if isinstance(head, torch.nn.Linear) else None


def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 (16 hex digits) over parameter names, shapes, dtypes and bytes, in state_dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


class Frozen:
    """A model that is never trained: eval mode, no gradients, optionally on `device`."""

    def __init__(self, model: torch.nn.Module, *, role: str, device: str | torch.device | None = None,
                 path: str | None = None, cache_size: int = 0):
        self.role, self.path, self.cache_size = role, path, cache_size
        self.model = model.to(device) if device is not None else model
        self.model.eval().requires_grad_(False)
        self.device = next(self.model.parameters()).device
        self._checksum: str | None = None
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    # identity ---------------------------------------------------------------------------------------
    @property
    def checksum(self) -> str:
        if self._checksum is None:
            self._checksum = weights_checksum(self.model)
        return self._checksum

    def identity(self) -> dict[str, Any]:
        return {"role": self.role, "path": self.path, "checksum": self.checksum}

    def check_identity(self, saved: dict[str, Any]) -> None:
        if saved and saved.get("checksum") not in (None, self.checksum):
            raise CheckpointError(
                f"the checkpoint was trained against {self.role} {saved.get('path') or '?'} "
                f"(checksum {saved['checksum']}), but this {self.role} has checksum {self.checksum}; "
                f"pass the same {self.role} model to resume")

    def check_vocab(self, model: torch.nn.Module) -> None:
        """One-line ConfigError when the trained model and this one disagree on the vocabulary."""
        mine, theirs = vocab_size(self.model), vocab_size(model)
        if mine is not None and theirs is not None and mine != theirs:
            raise ConfigError(f"{self.role} vocab_size={mine} differs from the trained model's vocab_size={theirs}; "
                              f"use a {self.role} built with the same tokenizer")

    # forward ----------------------------------------------------------------------------------------
    def _moved(self, batch: dict, prefixes: tuple[str, ...]) -> dict:
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                if any(k.startswith(p) for p in prefixes)}

    @torch.no_grad()
    def logits(self, batch: dict, prefix: str = "") -> torch.Tensor:
        """(B, T, V) logits of the batch's `prefix` rows, returned on the batch's device."""
        ids, kwargs = model_inputs(self._moved(batch, (prefix,)), prefix)
        return self.model(ids, **kwargs).to(batch[f"{prefix}input_ids"].device)

    @torch.no_grad()
    def sequence_logps(self, batch: dict, prefixes: tuple[str, ...], *, average: bool = False
                       ) -> list[torch.Tensor]:
        """Sequence log-prob sums (or means) (B,) per prefix, through the cache when enabled."""
        key = self._key(batch, prefixes, average) if self.cache_size else None
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return list(self._cache[key].to(batch[f"{prefixes[0]}input_ids"].device).unbind(0))
        out_device = batch[f"{prefixes[0]}input_ids"].device
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


def check_beta(beta: float, name: str = "beta") -> None:
    if not beta > 0:
        raise ConfigError(f"{name} must be > 0, got {beta}; e.g. 0.1 (the strength of the KL anchor)")
