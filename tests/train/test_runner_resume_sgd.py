"""Resuming under the ParallelRunner with an optimizer whose state holds no tensors (plain SGD: empty state)."""

import pytest
import torch

from lmforge.parallel.launch import run_local


def _fit(run_dir: str, max_steps: int, momentum: float) -> list[torch.Tensor]:
    """A tiny LM trained with torch.optim.SGD through a one-process ParallelRunner, checkpointing every 2 steps
    (resuming run_dir's checkpoint if it has one); its parameters after the run."""
    from lmforge.model.config import ModelConfig
    from lmforge.model.transformer import Transformer
    from lmforge.optim.config import OptimConfig
    from lmforge.parallel.config import ParallelConfig
    from lmforge.parallel.runner import ParallelRunner
    from lmforge.train.config import LoopConfig
    from lmforge.train.distributed import RankRows
    from lmforge.train.harness import FixedBatches
    from lmforge.train.loss import LMObjective
    from lmforge.train.trainer import Trainer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=41, d_model=16, n_layers=1, n_heads=2, max_seq_len=32))
    ids = torch.randint(0, 41, (4, 4, 9), generator=torch.Generator().manual_seed(1))
    runner = ParallelRunner(model, ParallelConfig(), device="cpu")
    data = RankRows(FixedBatches([{"input_ids": i[:, :-1], "targets": i[:, 1:]} for i in ids]), runner.dp_rank,
                    runner.dp_size, 4)
    cfg = LoopConfig(optim=OptimConfig(lr=0.1, warmup_steps=0, schedule="constant"), run_dir=run_dir,
                     max_steps=max_steps, log_every=1, eval_every=100, ckpt_every=2, device="cpu", dtype="fp32",
                     progress=False, plot=False)
    optimizer = torch.optim.SGD(runner.model.parameters(), lr=0.1, momentum=momentum)
    Trainer(runner.model, optimizer, data, LMObjective(), config=cfg, runner=runner).fit()
    return [p.detach().clone() for p in runner.model.parameters()]


def _resume_worker(rank: int, world: int, root: str, momentum: float) -> bool:
    full = _fit(f"{root}/full", 4, momentum)
    _fit(f"{root}/part", 2, momentum)
    resumed = _fit(f"{root}/part", 4, momentum)  # from its step-2 checkpoint
    return all(a.equal(b) for a, b in zip(full, resumed))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_resumes_under_the_runner_bit_exactly(tmp_path, momentum):
    """SGD without momentum keeps no state, and torch's full-state optimizer loader (set_optimizer_state_dict)
    failed on it ("Expected device to be set": it takes the device from the state's tensors). Resumed at step 2,
    the run ends with the uninterrupted run's parameters, bit for bit (with momentum as well)."""
    assert run_local(_resume_worker, 1, str(tmp_path), momentum, timeout=120, start_method="fork") == [True]
