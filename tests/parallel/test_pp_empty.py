"""Pipeline-parallel training steps whose rows have nothing to train in places (targets all -100), against one
process: the pipeline runs the LM loss through its schedule, which cuts this rank's rows into n_microbatches
pieces, so a piece without a trained token must add nothing rather than its mean over nothing (NaN)."""

from __future__ import annotations

import numpy as np
import torch

from lmforge.parallel.launch import run_local

LAYOUT = dict(pp=2, pp_schedule="gpipe", microbatches=2)


def _batches() -> dict[str, list[dict[str, torch.Tensor]]]:
    ids = torch.randint(0, 41, (3, 4, 9), generator=torch.Generator().manual_seed(3))
    b = [{"input_ids": i[:, :-1], "targets": i[:, 1:].clone()} for i in ids]
    b[1]["targets"][:] = -100  # a Trainer micro-batch with nothing to train (batch_weight 0)
    b[2]["targets"][2:] = -100  # rows 2-3: the schedule's second piece has nothing to train
    return {"empty_micro_batch": [b[0], b[1]], "empty_piece": [b[2]]}


def _fit(run_dir: str, batches: list[dict], layout: dict | None) -> tuple[list, list[torch.Tensor]]:
    """One step (grad_accum = len(batches)) of the Trainer's LM objective: (loss, grad_norm) and the parameters."""
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.optim import build_optimizer
    from lmforge.optim.config import OptimConfig
    from lmforge.parallel.config import ParallelConfig
    from lmforge.train.config import LoopConfig
    from lmforge.train.distributed import RankRows
    from lmforge.train.harness import FixedBatches
    from lmforge.train.loss import LMObjective
    from lmforge.train.trainer import Trainer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=41, d_model=16, n_layers=2, n_heads=2, max_seq_len=32,
                                    tie_embeddings=False))
    data, runner = FixedBatches(batches), None
    if layout is not None:
        from lmforge.parallel.runner import ParallelRunner

        runner = ParallelRunner(model, ParallelConfig(**layout), device="cpu")
        model, data = runner.model, RankRows(data, runner.dp_rank, runner.dp_size, 4)
    cfg = LoopConfig(optim=OptimConfig(lr=1e-2, warmup_steps=0), run_dir=run_dir, max_steps=1,
                     grad_accum=len(batches), log_every=1, eval_every=100, ckpt_every=100, device="cpu", dtype="fp32",
                     progress=False, plot=False)
    history = Trainer(model, build_optimizer(model, cfg.optim), data, LMObjective(), config=cfg, runner=runner
                      ).fit().history
    named = dict(model.named_parameters())
    return [(r["loss"], r["grad_norm"]) for r in history if "grad_norm" in r], named


def _pp_worker(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, batches in _batches().items():
        logged, named = _fit(f"{root}/{name}", batches, LAYOUT)
        out[name] = logged, {n: p.detach() for n, p in named.items()}  # this stage's parameters
    return out


def test_pipeline_pieces_with_nothing_to_train_add_nothing(tmp_path):
    """A pipeline's loss was the mean of its pieces' token means: a piece of ignored rows gave NaN, which the
    step's gradient and loss lost (loss logged 0.0, half the gradient), and pieces of unequal token counts were
    weighted equally. Each piece now adds its loss sum over the rows' trained tokens: the step equals one
    process's (loss, gradient norm and parameters), and a whole micro-batch of ignored rows adds nothing."""
    got = run_local(_pp_worker, 2, str(tmp_path / "pp"), timeout=120, start_method="fork")
    for name, batches in _batches().items():
        ref, ref_params = _fit(str(tmp_path / name), batches, None)
        assert got[0][name][0] and got[1][name][0] == []  # only rank 0 logs
        np.testing.assert_allclose(got[0][name][0], ref, atol=1e-5, rtol=0)
        for stage in got:
            for n, p in stage[name][1].items():
                torch.testing.assert_close(p, ref_params[n].detach(), atol=1e-6, rtol=0)
