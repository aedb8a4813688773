"""lmforge.train.harness: the fixed-batch DataSource, the step timer and the scratch run that benchmarks
train through."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.optim import build_optimizer
from lmforge.optim.config import OptimConfig
from lmforge.train.config import LoopConfig
from lmforge.train.harness import FixedBatches, StepTimer, scratch_fit
from lmforge.train.loss import LMObjective
from tests.align.helpers import tiny_model


def _batches(n: int, V: int = 41) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (2, 9), generator=g)
        out.append({"input_ids": ids[:, :-1], "targets": ids[:, 1:]})
    return out


def test_fixed_batches_cycle_in_order_and_resume():
    bs = _batches(3)
    src = FixedBatches(bs)
    assert [src.next_batch() is b for b in bs + bs[:1]] == [True] * 4
    state = src.state_dict()
    nxt = src.next_batch()
    src.load_state_dict(state)
    assert src.next_batch() is nxt is bs[1]


def test_scratch_fit_trains_like_a_plain_loop_and_times_every_step():
    """5 steps of scratch_fit = a plain AdamW loop (warm-up 2, cosine to 10%, clipping at 1.0) on the
    same batches; the timer times the steps after the first (no evaluator), or all after an evaluation."""
    from lmforge.optim import lr_multiplier

    bs, steps = _batches(5), 5
    ocfg = OptimConfig(lr=1e-2, warmup_steps=2, weight_decay=0.0)
    model = tiny_model()
    ref = copy.deepcopy(model)
    timer = StepTimer()
    cfg = LoopConfig(optim=ocfg, max_steps=steps, log_every=1, device="cpu", dtype="fp32")
    result = scratch_fit(model, build_optimizer(model, ocfg), FixedBatches(bs), LMObjective(), cfg, hooks=[timer])
    assert len(timer.times) == steps - 1 and all(t > 0 for t in timer.times)
    assert not result.run_dir.exists()  # the scratch directory is gone

    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step, b in enumerate(bs):
        for g in opt.param_groups:
            g["lr"] = 1e-2 * lr_multiplier(ocfg, step, steps)
        loss = F.cross_entropy(ref(b["input_ids"]).flatten(0, 1), b["targets"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert [r["loss"] for r in result.history] == pytest.approx(losses, rel=1e-5)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    timer, fresh = StepTimer(), tiny_model()
    scratch_fit(fresh, build_optimizer(fresh, ocfg), FixedBatches(bs), LMObjective(), cfg, hooks=[timer],
                evaluator=lambda m: {"val_loss": 0.0})
    assert len(timer.times) == steps  # the step-0 evaluation started the clock


def test_a_hook_stops_fit_at_a_step_boundary_with_eval_and_checkpoint(tmp_path):
    """Trainer.request_stop from a hook ends fit after that step as a last step would (evaluated,
    checkpointed, stop_reason given); a later fit of the same run resumes there and runs to max_steps."""
    from lmforge.train.trainer import Trainer

    class StopAt:
        def on_step_end(self, trainer, stats):
            if trainer.step == 3:
                trainer.request_stop("target reached")

    def make(hooks):
        model = tiny_model()
        ocfg = OptimConfig(lr=1e-2, warmup_steps=0)
        cfg = LoopConfig(optim=ocfg, run_dir=str(tmp_path / "run"), max_steps=8, eval_every=100, ckpt_every=100,
                         device="cpu", dtype="fp32", progress=False, plot=False)
        return Trainer(model, build_optimizer(model, ocfg), FixedBatches(_batches(4)), LMObjective(), config=cfg,
                       hooks=hooks, evaluator=lambda m: {"val_loss": 1.0})

    res = make([StopAt()]).fit()
    assert res.steps == 3 and res.stop_reason == "target reached"
    assert res.checkpoint.name == "step_000003" and res.final_eval == {"val_loss": 1.0}
    assert [r["step"] for r in res.history if "val_loss" in r] == [0, 3]
    again = make([]).fit()
    assert again.steps == 8 and again.stop_reason is None and again.checkpoint.name == "step_000008"
