"""Reward models and sequence classifiers: a linear head on the last hidden state of a language model.

    rm = SequenceHead(lm, out_dim=1)                 # reward model: one scalar per sequence
    obj = RewardObjective(RewardConfig(center_rewards_coefficient=0.01))   # a batch's `margin` is read if given
    clf = SequenceHead(lm, out_dim=4, train_backbone=False)   # head-only fine-tuning (a linear probe)
    obj = ClassificationObjective()

The head reads the final-norm hidden state at one position per row: `{prefix}score_index` (B,) when the
batch gives it, else the last position whose target counts (`loss_mask`), i.e. the state that has read the
whole prompt and response but the final token (an end-of-turn marker in chat data), else the last position.

RewardObjective: Bradley-Terry pairwise loss on chosen_* / rejected_* rows (optional per-pair `margin`
(B,) key, Llama 2: the preference records' "margin" field, lmforge.align.data; optional reward centring,
Eisenstein et al. 2023, as TRL's center_rewards_coefficient); metrics as TRL's RewardTrainer: accuracy,
margin, mean/min/max_reward.
ClassificationObjective: cross-entropy of `label` (B,) long; metric accuracy.
Both add the trained trunk's MoE balancing losses (SequenceHead.aux_loss, lmforge.align.logprobs.ModelAux):
metrics loss (the objective's own), aux_loss.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn

from lmforge.align.config import RewardConfig
from lmforge.align.dpo import PAIR
from lmforge.align.logprobs import ModelAux, model_inputs
from lmforge.align.losses import bradley_terry_loss
from lmforge.align.value import freeze_unread, trunk_aux_loss
from lmforge.config import coerce_fields
from lmforge.errors import ConfigError
from lmforge.train.objective import Stateless
from lmforge.utils import eval_mode


class SequenceHead(nn.Module):
    """backbone (a Transformer: .hidden(), .final_norm, .cfg.d_model) + Linear(d_model, out_dim).
    train_backbone=False freezes the backbone (head-only fine-tuning; it runs without autograd)."""

    task_heads = ("head",)
    """the module this model adds for its task: new weights that apply_lora leaves trainable in full (a run
    continuing a reward model with [lora] goes on training its head, as PEFT trains a classifier's score head)"""

    def __init__(self, backbone: nn.Module, out_dim: int = 1, *, train_backbone: bool = True):
        super().__init__()
        if not hasattr(backbone, "hidden"):
            raise ConfigError(f"{type(backbone).__name__} has no .hidden(ids) trunk; use an lmforge Transformer")
        self.backbone, self.train_backbone = backbone, train_backbone
        d = backbone.cfg.d_model
        self.head = nn.Linear(d, out_dim)
        nn.init.normal_(self.head.weight, std=1 / (d + 1) ** 0.5)  # as InstructGPT's / TRL's value heads
        nn.init.zeros_(self.head.bias)
        if not train_backbone:
            backbone.requires_grad_(False)
        freeze_unread(backbone)

    def head_record(self) -> dict:
        """What a checkpoint's config.json records beside the backbone's config, so that
        lmforge.checkpoint.load_model rebuilds this model (a trained reward model scores RL rollouts)."""
        return {"kind": "sequence", "out_dim": self.head.out_features, "train_backbone": self.train_backbone}

    def aux_loss(self) -> torch.Tensor | None:
        """The trunk's MoE losses of the last forward while it trains (objectives add them: ModelAux); None frozen."""
        return trunk_aux_loss(self.backbone) if self.train_backbone else None

    @classmethod
    def from_record(cls, backbone: nn.Module, record: dict) -> "SequenceHead":
        return cls(backbone, int(record["out_dim"]), train_backbone=bool(record.get("train_backbone", True)))

    def forward(self, input_ids: torch.Tensor, index: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """(B, T) ids -> (B, out_dim) scores read at `index` (B,) (default: the last position)."""
        with torch.set_grad_enabled(self.train_backbone and torch.is_grad_enabled()):
            h, _ = self.backbone.hidden(input_ids, kwargs.get("positions"), None, kwargs.get("meta"))
            norm = self.backbone.final_norm
            h = norm(h) if norm is not None else h
        if index is None:
            index = torch.full((h.shape[0],), h.shape[1] - 1, device=h.device)
        last = h[torch.arange(h.shape[0], device=h.device), index]  # (B, d)
        with torch.autocast(last.device.type, enabled=False):  # scores in the head's dtype, as read_values'
            return self.head(last.to(self.head.weight.dtype)).float()


@torch.no_grad()
def reward_scores(model: nn.Module, tokenizer, items: list, template: str = "plain") -> list[float]:
    """Scores of a reward model (a SequenceHead with out_dim 1) as it was trained to give them: each item a
    (prompt, completion) pair of strings or a list of messages, encoded as its training data was
    (lmforge.align.data.Encoder with the run's chat template, checkpoint.recorded_chat_template) and read at
    the same position, the last trained token's (not the last token: a chat's text ends after its end
    marker, where the head never learned to read).

        rm, tok = load_model("runs/rm")
        reward_scores(rm, tok, [("2+2=", " 4"), ("2+2=", " 5")], recorded_chat_template("runs/rm") or "plain")"""
    from lmforge.align.data import Encoder, pad_batch

    enc = Encoder(tokenizer, template)
    for i, x in enumerate(items):
        if not isinstance(x, list) and not (isinstance(x, tuple) and len(x) == 2):
            raise ConfigError(f"item {i} must be a (prompt, completion) tuple or a list of messages, got {x!r:.80}")
    examples = [enc.chat(x, f"item {i}") if isinstance(x, list) else enc.prompt_completion(*x, f"item {i}")
                for i, x in enumerate(items)]
    batch = pad_batch(examples)
    device = next(model.parameters()).device
    with eval_mode(model):
        out = model(batch["input_ids"].to(device), score_index(batch).to(device))
    if out.shape[-1] != 1:
        raise ConfigError(f"reward_scores reads one score per item; this head has out_dim={out.shape[-1]} "
                          "(a classifier: call the model and read its logits)")
    return out[:, 0].float().tolist()


def score_index(batch: dict, prefix: str = "") -> torch.Tensor | None:
    """(B,) position read by the head: explicit, else the last loss_mask position, else None (the last)."""
    if f"{prefix}score_index" in batch:
        return batch[f"{prefix}score_index"]
    mask = batch.get(f"{prefix}loss_mask")
    if mask is None:
        return None
    mask = mask.bool()
    if not mask.any(-1).all():
        row = int((~mask.any(-1)).nonzero()[0])
        raise ConfigError(f"row {row} of {prefix}loss_mask selects no token, so it has no position to score; "
                          f"drop the example or give {prefix}score_index")
    T = mask.shape[1]
    return T - 1 - mask.flip(-1).int().argmax(-1)


def scores(model: nn.Module, batch: dict, prefix: str = "", *, aux: ModelAux | None = None) -> torch.Tensor:
    """(B, out_dim) scores of a batch's `prefix` rows; `aux`: the trained model's forward (ModelAux.read)."""
    if not isinstance(model, SequenceHead):
        raise ConfigError(f"this objective needs a model with a head: wrap it, SequenceHead(model, out_dim), "
                          f"not a bare {type(model).__name__}")
    ids, kwargs = model_inputs(batch, prefix)
    out = model(ids, score_index(batch, prefix), **kwargs)
    if aux is not None:
        aux.read()
    return out


class RewardObjective(Stateless):
    Config = RewardConfig

    def __init__(self, cfg: RewardConfig | None = None):
        self.cfg = cfg or RewardConfig()

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        aux = ModelAux(model)
        r = scores(model, batch, PAIR[0], aux=aux).squeeze(-1)
        r_r = scores(model, batch, PAIR[1], aux=aux).squeeze(-1)
        loss = bradley_terry_loss(r, r_r, batch.get("margin")).mean()
        if self.cfg.center_rewards_coefficient:
            loss = loss + self.cfg.center_rewards_coefficient * ((r + r_r) ** 2).mean()
        both = torch.cat([r, r_r]).detach()
        return aux.add(loss, {"accuracy": (r > r_r).float().mean(), "margin": (r - r_r).detach().mean(),
                              "mean_reward": both.mean(), "min_reward": both.min(), "max_reward": both.max()})


@dataclass(frozen=True, kw_only=True)
class ClassificationConfig:
    label_smoothing: float = 0.0

    def __post_init__(self):
        coerce_fields(self, "classification")  # each field's type, named when wrong
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")


class ClassificationObjective(Stateless):
    Config = ClassificationConfig

    def __init__(self, cfg: ClassificationConfig | None = None):
        self.cfg = cfg or ClassificationConfig()

    def loss(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        aux = ModelAux(model)
        logits = scores(model, batch, aux=aux).float()
        label = batch["label"].long()
        loss = nn.functional.cross_entropy(logits, label, label_smoothing=self.cfg.label_smoothing)
        return aux.add(loss, {"accuracy": (logits.argmax(-1) == label).float().mean()})
