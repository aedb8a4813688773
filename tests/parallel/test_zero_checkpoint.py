"""ZeroOptimizer checkpoints on 2 gloo processes: each rank's shard (state_dict) resumes at the same world size
to exactly the parameters of the uninterrupted run; the gathered full_state_dict resumes a ZeroOptimizer too,
and the optimizer built over the whole model in one process, which then matches one process's uninterrupted
run. (ZeroOptimizer had no state_dict: a ZeRO run could not be checkpointed.)"""

from __future__ import annotations

import copy

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.optim import build_optimizer
from lmforge.parallel.launch import run_local
from tests.parallel import workers as w

RUNS = [(1, "adamw"), (2, "adamw"), (3, "adamw"), (2, "muon")]
CFGS = {"adamw": w.OPT, "muon": w.MUON}


@pytest.fixture(scope="module")
def results():
    return run_local(w.zero_resume_suite, 2, RUNS, timeout=120, start_method="fork")


@pytest.mark.parametrize("run", RUNS, ids=[f"zero{s}-{o}" for s, o in RUNS])
@pytest.mark.parametrize("kind", ("shard", "full"))
def test_resume_equals_uninterrupted_run(results, run, kind):
    got = results[0][run]
    want = got["uninterrupted"]
    assert got["resumed"][kind].keys() == want.keys()
    for k in want:
        assert torch.equal(got["resumed"][kind][k], want[k]), k


def test_each_rank_saves_only_its_shard(results):
    """The shards split the optimizer state: together they hold every trained parameter's state once."""
    for run in RUNS:
        owned = [results[r][run]["shard"]["owned"] for r in range(2)]
        assert owned[0] and owned[1] and not set(owned[0]) & set(owned[1])
        n_state = [len(results[r][run]["shard"]["optimizer"]["state"]) for r in range(2)]
        assert sum(n_state) == len(results[0][run]["full"]["state"]) == len(owned[0]) + len(owned[1])


@pytest.mark.parametrize("run", RUNS, ids=[f"zero{s}-{o}" for s, o in RUNS])
def test_full_state_resumes_one_process(results, run):
    """The full state loads into the optimizer one process builds over the whole model: its 3rd step on the
    whole batch lands where one process's 3 steps do (the tolerance of test_data_parallel)."""
    got = results[0][run]
    cfg = CFGS[run[1]]
    m = w._with_params(got["params"])
    opt = build_optimizer(m, cfg)
    opt.load_state_dict(copy.deepcopy(got["full"]))  # (optimizers keep the loaded tensors: steps would change them)
    x, y = w.batches()[2]
    w.loss_of(m, x, y).backward()
    opt.step()
    want = w.reference(cfg)
    for k, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), want[k], atol=5e-5, rtol=0, msg=k)


def test_shard_of_another_rank_is_refused():
    from lmforge.parallel.zero import ZeroOptimizer

    zero = ZeroOptimizer.__new__(ZeroOptimizer)  # only the fields load_state_dict reads
    m = w.model()
    zero.world, zero.rank, zero.optimizer = 2, 0, build_optimizer(m, w.OPT)
    zero.names = {p: n for n, p in m.named_parameters()}
    with pytest.raises(ConfigError, match="saved by rank 1 of 2"):
        zero.load_state_dict({"world": 2, "rank": 1, "owned": ["blocks.0.attn.wq.weight"], "optimizer": {}})


def test_full_state_resumes_another_world_size(results):
    """Saved on 2 ranks, resumed on 4 (other partitions): the 3rd step lands where one process's 3 steps do."""
    got = results[0][(3, "adamw")]
    resumed = run_local(w.zero_resume_full, 4, 3, got["params"], got["full"], timeout=60, start_method="fork")[0]
    want = w.reference(w.OPT)
    for k in want:
        torch.testing.assert_close(resumed[k], want[k], atol=5e-5, rtol=0)
