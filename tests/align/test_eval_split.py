"""Post-training evaluation on 2 processes: each rank evaluates its share of every validation batch's rows
(as pretraining's LMEvaluator does) and the metrics equal the whole batches' on one process."""

import pytest
import torch

from lmforge.align.dpo import DPOConfig, DPOObjective
from lmforge.align.kto import KTOConfig, KTOObjective
from lmforge.align.sft import ObjectiveEvaluator, SFTObjective
from lmforge.parallel.config import ParallelConfig
from lmforge.parallel.launch import run_local

from .helpers import TINY, sequences, tiny_model

T = 10


def _cases() -> dict:
    """Objective and validation batches (5 and 3 rows: uneven shares, rows with different numbers of
    trained tokens) per case."""
    V = TINY.vocab_size
    sft = [sequences(5, T, V, [2, 3, 4, 5, 6], seed=0), sequences(3, T, V, [7, 2, 3], seed=1)]
    pairs = [{**sequences(B, T, V, lens, seed, "chosen_"), **sequences(B, T, V, lens, seed + 1, "rejected_")}
             for B, lens, seed in ((5, [2, 3, 4, 2, 3], 2), (3, [4, 2, 3], 4))]
    kto = [{**sequences(1, T, V, [3], seed=6), "label": torch.tensor([1])}]  # fewer rows than ranks
    return {"sft": (SFTObjective(), sft), "dpo": (DPOObjective(DPOConfig(beta=0.2), reference=tiny_model(1)), pairs),
            "kto_short": (KTOObjective(KTOConfig(beta=0.2), reference=tiny_model(1)), kto)}


def _evaluate(model, objective, batches, runner=None) -> tuple[dict, int]:
    """The evaluator's metrics as the Trainer calls it (no_grad, eval mode), and the rows the model saw."""
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    model.eval()
    with torch.no_grad():
        metrics = ObjectiveEvaluator(objective, batches, runner)(model)
    hook.remove()
    return metrics, sum(rows)


def _worker(rank: int, world: int) -> dict:
    from lmforge.parallel.runner import ParallelRunner

    runner = ParallelRunner(tiny_model(0), ParallelConfig(dp_shard=world), device="cpu")
    return {name: _evaluate(runner.model, obj, batches, runner) for name, (obj, batches) in _cases().items()}


@pytest.fixture(scope="module")
def two_ranks():
    return run_local(_worker, 2, timeout=60, start_method="fork")


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_two_processes_split_the_rows_and_match_one_process(two_ranks, name):
    objective, batches = _cases()[name]
    model = tiny_model(0).eval()
    with torch.no_grad():  # reference: each whole batch's metrics, averaged over the batches
        per_batch = [{"loss": loss, **m} for loss, m in (objective.loss(model, b) for b in batches)]
    ref = {f"val_{k}": sum(float(m[k]) for m in per_batch) / len(per_batch) for k in per_batch[0]}
    one, rows_one = _evaluate(model, objective, batches)
    assert one == pytest.approx(ref, rel=1e-6)
    (m0, rows0), (m1, rows1) = (r[name] for r in two_ranks)
    assert m0 == m1 and list(m0) == list(ref)
    assert m0 == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert rows0 + rows1 == rows_one and rows0 < rows_one and rows1 < rows_one  # each row evaluated once


def test_a_batch_with_fewer_rows_than_ranks_runs_whole_and_counts_once(two_ranks):
    """A short last validation batch (1 row, 2 ranks): each rank runs all of it (both join the forward) and
    one reports, so the metrics equal one process's (KTO's mismatched rows need at least one row)."""
    objective, batches = _cases()["kto_short"]
    model = tiny_model(0).eval()
    one, rows_one = _evaluate(model, objective, batches)
    (m0, rows0), (m1, rows1) = (r["kto_short"] for r in two_ranks)
    # (a row of one class: the other class's metrics are left out, on one process too)
    assert m0 == pytest.approx(m1, nan_ok=True) and m0 == pytest.approx(one, rel=1e-5, abs=1e-6, nan_ok=True)
    assert rows0 == rows1 == rows_one


def test_a_metric_a_batch_cannot_define_is_left_out_not_nan():
    """KTO's per-label means over a batch without that label are NaN; the evaluator averages each metric
    over the batches that define it (one process here), instead of returning NaN for the whole run."""
    objective, _ = _cases()["kto_short"]
    V = TINY.vocab_size
    both = {**sequences(4, T, V, [2, 3, 4, 2], seed=8), "label": torch.tensor([1, 0, 1, 0])}
    good = {**sequences(2, T, V, [3, 2], seed=9), "label": torch.tensor([1, 1])}
    model = tiny_model(0).eval()
    with torch.no_grad():
        per_batch = [objective.loss(model, b)[1] for b in (both, good)]
        metrics = ObjectiveEvaluator(objective, [both, good])(model)
    assert torch.isnan(per_batch[1]["rewards/rejected"])
    assert metrics["val_rewards/rejected"] == pytest.approx(float(per_batch[0]["rewards/rejected"]), rel=1e-6)
    assert metrics["val_rewards/chosen"] == pytest.approx(
        (float(per_batch[0]["rewards/chosen"]) + float(per_batch[1]["rewards/chosen"])) / 2, rel=1e-6)
    assert metrics["val_kl"] == pytest.approx((float(per_batch[0]["kl"]) + float(per_batch[1]["kl"])) / 2,
                                              rel=1e-6, abs=1e-9)


def test_the_evaluator_takes_metrics_given_as_plain_numbers():
    """The Objective protocol takes a metric as a 0-d tensor or a plain number (as the Trainer's step does); the
    evaluator's shared rule (train.objective.metric_terms) failed on a float with AttributeError."""
    import torch

    from lmforge.align.sft import ObjectiveEvaluator
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer

    class Plain:
        def loss(self, model, batch):
            logits = model(batch["input_ids"])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
            return loss, {"plain_metric": 0.5, "num_rows": 2}

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=41, d_model=16, n_layers=1, n_heads=2, max_seq_len=32))
    ids = torch.randint(0, 41, (2, 9))
    got = ObjectiveEvaluator(Plain(), [{"input_ids": ids[:, :-1], "targets": ids[:, 1:]}] * 2)(model)
    assert got["val_plain_metric"] == 0.5 and got["val_num_rows"] == 2.0 and got["val_loss"] > 0
