"""Pipeline-parallel validation (ParallelRunner.eval_nats through LMEvaluator) against one process on batches of
several shapes: eval_windows ends on a short batch when its windows are not a multiple of batch_size, and a
batch may hold fewer rows than the schedule has micro-batches. The stages keep the buffers of their first
call, and torch cuts a batch into equal micro-batches only, so each shape must still give the one-process
token-weighted validation loss, and its bits per byte (whose nats leave out the ids that stand for no bytes)."""

from __future__ import annotations

import pytest
import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.parallel.launch import run_local

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, attn_impl="math")
LAYOUTS = {2: {"gpipe_m2": dict(pp=2, pp_schedule="gpipe", microbatches=2),
               "1f1b_m2": dict(pp=2, pp_schedule="1f1b", microbatches=2),
               "gpipe_m4": dict(pp=2, pp_schedule="gpipe", microbatches=4)},
           # two FSDP-sharded replicas: 3 rows split 2 + 1, and 1 row leaves one replica none (its stages must
           # still all-gather with the other's)
           4: {"fsdp_1f1b_m2": dict(pp=2, dp_shard=2, pp_schedule="1f1b", microbatches=2)}}
ROWS = [(4, 3), (1,), (4, 3, 1, 4)]
"""batch sets of batch_size 4: a short last batch (7 windows), one row (fewer than the micro-batches), and full
batches again after the short ones (the first shape's schedule is still right)"""


def batch_sets() -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, CFG.vocab_size, (sum(sum(r) for r in ROWS), 9), generator=g)
    sets, at = [], 0
    for rows in ROWS:
        batches = []
        for n in rows:
            batches.append((t[at:at + n, :-1], t[at:at + n, 1:]))  # views of longer rows, as eval_windows gives
            at += n
        sets.append(batches)
    return sets


def id_bytes() -> torch.Tensor:
    """bytes per id: ids 0-7 stand for none (special tokens), the others for 1-3"""
    out = (torch.arange(CFG.vocab_size, dtype=torch.float64) % 3) + 1
    out[:8] = 0
    return out


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def one_process() -> list[tuple[float, float]]:
    from lmforge.train.pretrain import LMEvaluator

    m = model()
    with torch.no_grad():
        return [_metrics(LMEvaluator(b, id_bytes())(m)) for b in batch_sets()]


def _metrics(out: dict) -> tuple[float, float]:
    return out["val_loss"], out["val_bpb"]


def pp_eval_suite(rank: int, world: int) -> dict[str, list[tuple[float, float]]]:
    from lmforge.parallel.config import ParallelConfig
    from lmforge.parallel.runner import ParallelRunner
    from lmforge.train.pretrain import LMEvaluator

    out = {}
    for name, layout in LAYOUTS[world].items():
        runner = ParallelRunner(model(), ParallelConfig(**layout), seq_len=8, batch_size=4)
        runner.model.eval()
        with torch.no_grad():
            out[name] = [_metrics(LMEvaluator(b, id_bytes(), runner=runner)(runner.model)) for b in batch_sets()]
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_val_loss_equals_one_process_on_every_batch_shape(world):
    want = one_process()
    results = run_local(pp_eval_suite, world, timeout=150, start_method="fork")
    for rank, got in enumerate(results):
        for name in LAYOUTS[world]:
            assert [x for pair in got[name] for x in pair] == pytest.approx([x for pair in want for x in pair],
                                                                            abs=1e-5), (rank, name)
