"""DPO and its pairwise relatives as an Objective: sigmoid (DPO / conservative DPO), IPO, SimPO.

    obj = DPOObjective(DPOConfig(beta=0.1, loss_type="sigmoid"), reference=sft_model)
    loss, metrics = obj.loss(policy, batch)
    lora_obj = DPOObjective(DPOConfig(beta=0.1), reference=BaseReference(lora_policy))  # adapters off: no copy

Batch keys (lmforge.train.objective layout, prefixed per sequence):
  chosen_input_ids / chosen_targets / chosen_loss_mask      (B, T) the preferred completion
  rejected_input_ids / rejected_targets / rejected_loss_mask (B, T) the other one
  [chosen_positions, chosen_doc_ids, ... for packed rows]
  ref_chosen_logps / ref_rejected_logps (B,)  optional precomputed reference log-prob sums, used
                                               instead of running the reference
Sequence log-probs are sums over the completion tokens; IPO divides each log-ratio by its completion's
length and SimPO uses per-token means (both as TRL). The equations are in lmforge.align.losses; metrics
are named as TRL logs them (rewards = beta * summed log-ratio; SimPO: beta * mean log-prob). An MoE or MTP
policy's auxiliary losses of its own forward are added (lmforge.align.logprobs.ModelAux; TRL adds the router aux
loss of its concatenated forward): metrics loss (the preference loss alone), aux_loss, moe/*.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.align.config import DPOConfig
from lmforge.align.frozen import Frozen, held
from lmforge.align.logprobs import ModelAux, batch_logps
from lmforge.align.losses import dpo_loss, ipo_loss, preference_metrics, simpo_loss
from lmforge.errors import ConfigError
from lmforge.train.objective import Stateless  # noqa: F401 (its earlier home: imported from here elsewhere)

PAIR = ("chosen_", "rejected_")


def reference_logps(ref: Frozen | None, batch: dict, prefixes: tuple[str, ...], *, average: bool,
                    keys: tuple[str, ...]) -> list[torch.Tensor]:
    """Precomputed reference log-probs from the batch when present, else the reference model's."""
    if all(k in batch for k in keys):
        return [batch[k] for k in keys]
    if ref is None:
        raise ConfigError(f"this objective needs a reference model or the batch keys {keys}; pass reference=")
    return ref.sequence_logps(batch, prefixes, average=average)


class ReferenceHolder:
    """Objectives with a frozen reference: identity in state_dict; checked once, before its first forward
    freezes it, against the trained model (not it, no shared parameter) and its vocabulary."""

    ref: Frozen | None
    _checked: bool = False

    def _check(self, model: torch.nn.Module) -> None:
        if not self._checked and self.ref is not None:
            self.ref.check_not_trained(model)
            self.ref.check_vocab(model)
            self._checked = True

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.ref.identity() if self.ref is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ref is not None and state.get("reference"):
            self.ref.check_identity(state["reference"])


class DPOObjective(ReferenceHolder):
    Config = DPOConfig

    def __init__(self, cfg: DPOConfig | None = None, *, reference: torch.nn.Module | Frozen | None = None,
                 reference_path: str | None = None):
        self.cfg = cfg = cfg or DPOConfig()
        # SimPO has no reference: none is run, none is held. Without one the batches must carry
        # ref_chosen_logps / ref_rejected_logps
        self.ref = None if cfg.loss_type == "simpo" else held(
            reference, role="reference", device=cfg.reference_device, dtype=cfg.reference_dtype, path=reference_path,
            cache_size=cfg.reference_cache)

    def loss(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self._check(model)
        cfg = self.cfg
        aux = ModelAux(model)  # read at the policy's forward, before a BaseReference reruns its layers
        (pi_c, pi_r), _, (m_c, m_r) = batch_logps(model, batch, PAIR, average=cfg.loss_type == "simpo", aux=aux)
        if cfg.loss_type == "simpo":
            losses = simpo_loss(pi_c, pi_r, beta=cfg.beta, gamma=cfg.simpo_gamma,
                                label_smoothing=cfg.label_smoothing)
            rc, rr = cfg.beta * pi_c, cfg.beta * pi_r
        else:
            ref_c, ref_r = reference_logps(self.ref, batch, PAIR, average=False,
                                           keys=("ref_chosen_logps", "ref_rejected_logps"))
            if cfg.loss_type == "ipo":
                n_c, n_r = m_c.sum(-1).clamp(min=1), m_r.sum(-1).clamp(min=1)
                losses = ipo_loss(pi_c / n_c, pi_r / n_r, ref_c / n_c, ref_r / n_r, beta=cfg.beta)
            else:
                losses = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=cfg.beta, label_smoothing=cfg.label_smoothing)
            rc, rr = cfg.beta * (pi_c - ref_c), cfg.beta * (pi_r - ref_r)
        return aux.add(losses.mean(), preference_metrics(rc, rr, pi_c, pi_r))
