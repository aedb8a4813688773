"""Tiny deterministic corpora and configs for trainer tests."""

import random
from pathlib import Path

import numpy as np

from lmforge.data.shards import write_tokens
from lmforge.model.config import ModelConfig
from lmforge.optim.config import OptimConfig
from lmforge.train.config import DataConfig, TrainConfig
from lmforge.train.loss import LMObjective

WORDS = "the cat sat on a mat while dogs ran past small red houses and green trees by the river".split()


def synthetic_text(n_words: int = 6000, seed: int = 0) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(n_words):
        out.append(WORDS[(i * 7 + rng.randrange(3)) % len(WORDS)])
        if rng.random() < 0.1:
            out.append(".\n")
    return " ".join(out)


def make_shard(path: Path, text: str | None = None) -> Path:
    data = (text or synthetic_text()).encode()
    return write_tokens(path, np.frombuffer(data, dtype=np.uint8), vocab_size=257, tokenizer="byte", doc_sep=256)


def tiny_config(shard: Path, run_dir: Path, **overrides) -> TrainConfig:
    base = dict(
        model=ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, max_seq_len=32),
        data=DataConfig(train=(str(shard),), seq_len=32, batch_size=8),
        optim=OptimConfig(lr=3e-3, warmup_steps=5),
        run_dir=str(run_dir), max_steps=40, eval_every=20, eval_batches=4, log_every=1, ckpt_every=20,
        seed=0, device="cpu", progress=False, plot=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


def metric_rows(result) -> list[tuple]:
    """(step, loss, val_loss) of every metrics.jsonl row of a run (a resumed run's history holds the rows before
    its resume too): what an interrupted and resumed run must reproduce row for row."""
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in result.history]


def fit_interrupted_at(tr, step: int) -> None:
    """Run tr.fit() with a Ctrl-C (KeyboardInterrupt) arriving just before step `step + 1` begins."""
    import pytest

    real = tr.train_step

    def interrupt():
        if tr.step == step:
            raise KeyboardInterrupt
        return real()

    tr.train_step = interrupt
    with pytest.raises(KeyboardInterrupt):
        tr.fit()


class MaskedMean(LMObjective):
    """Next-token NLL as a masked mean, the way post-training objectives take it: (x * mask).sum() / n, whose
    backward over a batch (or rank's share) with nothing to train is NaN (0 * inf), not just its loss."""

    def loss(self, model, batch):
        keep = batch["targets"] != -100
        logps = model(batch["input_ids"]).float().log_softmax(-1)
        logps = logps.gather(-1, batch["targets"].clamp(min=0)[..., None])[..., 0]
        loss = -(logps * keep).sum() / keep.sum()
        return loss, {"loss": loss}
