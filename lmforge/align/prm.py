"""Process reward models: a per-token head scoring every reasoning step where the step ends.

A PRM (Lightman et al. 2023, "Let's Verify Step by Step", §2.6; Wang et al. 2024, "Math-Shepherd")
reads a solution as steps and predicts, at the last token of each step, whether that step is correct: the
model is a ValueModel (lmforge.align.value; its scalar is the logit of "correct"), trained with binary
cross-entropy at the step ends only.

    prm = ValueModel(lm)
    ex = encode_steps(tok, "Q: What is 47 + 38?\n", ["7 + 8 + 0 = 15", "4 + 3 + 1 = 9"], [True, False])
    batch = step_batch([ex, ...])             # input_ids (B, T), step_labels (B, T): 0/1 at step ends, -100 else
    Trainer(prm, build_optimizer(prm, optim), ExampleSource(items, 8, step_batch), ProcessRewardObjective()).fit()
    prm_scores(prm, tok, "Q: What is 47 + 38?\n", ["7 + 8 + 0 = 15", "4 + 3 + 1 = 8"])  # [p(step 1 ok), p(step 2 ok)]

The format is TRL's PRMTrainer's (tokenize_row): the prompt's tokens, then each step's tokens followed by
the separator's (default "\\n"), each piece encoded on its own; a step's label sits on the last token of its
step + separator (the separator's last token: the model has read the whole step), every other position is
-100. The labels are on input positions (token classification, not next-token targets: no shift). TRL adds
the tokenizer's BOS first where it has one; lmforge's tokenizers have none. A solution's score is an
aggregate of its steps' probabilities: Lightman et al. take the product (§2.6), Math-Shepherd the minimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.align.data import encode_inside
from lmforge.align.logprobs import ModelAux
from lmforge.align.value import values_of
from lmforge.config import coerce_fields
from lmforge.errors import ConfigError
from lmforge.train.objective import Stateless
from lmforge.utils import eval_mode

IGNORE = -100
SEPARATOR = "\n"
"""TRL's PRMConfig.step_separator default"""

StepExample = tuple[list[int], list[int], list[int]]
"""(ids, step-end positions, labels 0/1 or IGNORE): one solution"""


def encode_steps(tokenizer, prompt: str, steps: list[str], labels: list[bool] | None = None, *,
                 separator: str = SEPARATOR) -> StepExample:
    """(ids, positions of each step's last token, labels) of a prompt and its steps; labels None (scoring):
    IGNORE for every step."""
    if not isinstance(steps, (list, tuple)) or not steps or not all(isinstance(s, str) and s for s in steps):
        raise ConfigError(f"steps must be a non-empty list of non-empty strings, got {steps!r:.80}")
    if labels is not None and len(labels) != len(steps):
        raise ConfigError(f"{len(labels)} labels for {len(steps)} steps: give one label (True = correct) per step")
    # steps and separators continue the prompt's text (a SentencePiece tokenizer puts no "▁" before them)
    sep = encode_inside(tokenizer, separator)
    if not sep:
        raise ConfigError(f"the step separator {separator!r} encodes to no token; use one that does (e.g. '\\n')")
    ids = list(tokenizer.encode(prompt))
    positions = []
    for step in steps:
        ids += list(encode_inside(tokenizer, step)) + sep
        positions.append(len(ids) - 1)
    return ids, positions, [IGNORE] * len(steps) if labels is None else [int(bool(x)) for x in labels]


def step_batch(examples: list[StepExample], length: int | None = None) -> dict[str, torch.Tensor]:
    """Rows right-padded to the longest (or `length`): input_ids (B, T) and step_labels (B, T) long, the label
    at each step's last token and IGNORE elsewhere (padding too)."""
    T = length or max(len(ids) for ids, _, _ in examples)
    ids = torch.zeros(len(examples), T, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for r, (x, pos, lab) in enumerate(examples):
        if len(x) > T:
            raise ConfigError(f"example {r} has {len(x)} tokens, more than length={T}")
        ids[r, :len(x)] = torch.tensor(x)
        labels[r, pos] = torch.tensor(lab)
    return {"input_ids": ids, "step_labels": labels}


@dataclass(frozen=True, kw_only=True)
class ProcessRewardConfig:
    last_step_only: bool = False
    """train on each row's last labelled step alone (TRL's train_on_last_step_only): outcome-style supervision
    with the same data, the baseline Lightman et al. compare against"""

    def __post_init__(self):
        coerce_fields(self, "prm")  # each field's type, named when wrong


def last_step_mask(labelled: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: each row's last labelled position only."""
    T = labelled.shape[1]
    last = T - 1 - labelled.flip(-1).int().argmax(-1)
    out = torch.zeros_like(labelled)
    out[torch.arange(labelled.shape[0], device=labelled.device), last] = labelled.any(-1)
    return out


class ProcessRewardObjective(Stateless):
    """Binary cross-entropy of each step's label against the head's logit at the step's last token, averaged
    over the batch's labelled steps (TRL's PRMTrainer averages its token-classification loss the same way).
    Metrics: accuracy (logit > 0 agrees with the label), mean_score (mean predicted p(correct))."""

    Config = ProcessRewardConfig

    def __init__(self, cfg: ProcessRewardConfig | None = None):
        self.cfg = cfg or ProcessRewardConfig()

    def steps(self, batch: dict) -> torch.Tensor:
        if "step_labels" not in batch:
            raise ConfigError(f"a process reward batch needs step_labels (B, T) (lmforge.align.prm.step_batch); "
                              f"got keys {sorted(batch)}")
        labelled = batch["step_labels"] >= 0
        return last_step_mask(labelled) if self.cfg.last_step_only else labelled

    def batch_weight(self, batch: dict) -> int:
        return int(self.steps(batch).sum())

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        at = self.steps(batch)
        if not bool(at.any()):
            raise ConfigError("this batch labels no step (step_labels is -100 everywhere); check the data")
        aux = ModelAux(model)  # a trained MoE trunk's balancing losses (ValueModel.aux_loss)
        logits = values_of(model, batch, aux=aux)[at]  # (S,) one per labelled step
        y = batch["step_labels"][at].float()
        loss = F.binary_cross_entropy_with_logits(logits, y)
        p = torch.sigmoid(logits.detach())
        return aux.add(loss, {"accuracy": ((logits.detach() > 0).float() == y).float().mean(), "mean_score": p.mean()})


@torch.no_grad()
def prm_scores(model: nn.Module, tokenizer, prompt: str, steps: list[str], *, separator: str = SEPARATOR
               ) -> list[float]:
    """p(step i is correct) for each step of one solution, encoded as the training data was (encode_steps)
    and read where training read (each step's last token)."""
    ids, positions, _ = encode_steps(tokenizer, prompt, steps, separator=separator)
    device = next(model.parameters()).device
    with eval_mode(model):
        logits = values_of(model, {"input_ids": torch.tensor([ids], device=device)})[0]
    return torch.sigmoid(logits[positions]).tolist()
