"""ParallelConfig validation (bad meshes give one-line errors naming the value), the pipeline bubble
formula, and rank-aware batches (every window once per epoch across ranks; resumable on any world size)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.errors import ConfigError, DataError
from lmforge.model.config import ModelConfig
from lmforge.parallel.config import ParallelConfig
from lmforge.parallel.data import RankBatches
from lmforge.parallel.pp import bubble_fraction

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=16)


@pytest.mark.parametrize("layout, world, match", [
    (dict(dp_shard=2, tp=2), 2, "needs world_size=4 but the launch has 2"),
    (dict(tp=4), 4, "tp=4 must divide n_heads=4 and n_kv_heads=2"),
    (dict(pp=3), 3, "pp=3 must divide n_layers=4"),
    (dict(dp_shard=3), 3, "batch_size=8 must be divisible by the data-parallel size 3"),
    (dict(pp=2, microbatches=3), 2, r"batch_size=8 must be divisible .* microbatches=3"),
    (dict(cp=3), 3, r"seq_len=8 must be divisible by 6 \(2 x parallel.cp=3\)"),
])
def test_bad_layouts_name_the_value(layout, world, match):
    with pytest.raises(ConfigError, match=match) as e:
        ParallelConfig(**layout).validate(world, CFG, seq_len=8, batch_size=8)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value", [("tp", 0), ("pp_schedule", "zb"), ("ac_every", 0), ("dp_shard", -1)])
def test_bad_fields_are_refused(field, value):
    with pytest.raises(ConfigError, match=f"parallel.{field}"):
        ParallelConfig(**{field: value})


def test_model_features_tp_cannot_split_are_refused():
    import dataclasses

    ParallelConfig(tp=2).validate(2, dataclasses.replace(CFG, tie_embeddings=True))  # TP keeps them tied
    with pytest.raises(ConfigError, match="tie_embeddings"):
        ParallelConfig(pp=2).validate(2, dataclasses.replace(CFG, tie_embeddings=True, n_layers=2))
    # the MLP width: column shards of up/gate must match down's row shards (d_ff=69 failed in the first forward, deep
    # in DTensor: "a and b must have same reduction dim, but got [64, 70] X [69, 32]"); 70 splits and trains
    ParallelConfig(tp=2).validate(2, dataclasses.replace(CFG, d_ff=70))
    with pytest.raises(ConfigError, match="tp=2 must divide the MLP width d_ff=69"):
        ParallelConfig(tp=2).validate(2, dataclasses.replace(CFG, d_ff=69))
    with pytest.raises(ConfigError, match="loss_parallel needs tp > 1"):
        ParallelConfig(loss_parallel=True)
    with pytest.raises(ConfigError, match="sliding_window=4"):
        ParallelConfig(cp=2).validate(2, dataclasses.replace(CFG, sliding_window=4))
    with pytest.raises(ConfigError, match="parallel.cp=2 with pp=2"):
        ParallelConfig(cp=2, pp=2)


def test_mtp_heads_on_a_split_sequence_are_refused():
    """MTP heads shift the sequence by k tokens: under sequence parallelism (tp) each rank holds a slice of it and
    the first step failed deep in a forward ("Sizes of tensors must match ... Expected size 15 but got size 16"); under
    context parallelism the shifted tokens crossed the ranks' chunks and the loss came out silently off one process's
    (2e-2 in 4 steps). tp without sequence parallelism, dp_shard and dp_replicate train them as one process does."""
    import dataclasses

    from lmforge.model.config import MTPConfig

    mtp = dataclasses.replace(CFG, mtp=MTPConfig())
    with pytest.raises(ConfigError, match=r"^parallel.cp=2 with \[model.mtp\]: .*use dp_shard, dp_replicate or tp"):
        ParallelConfig(cp=2).validate(2, mtp)
    with pytest.raises(ConfigError, match=r"^parallel.sequence_parallel with \[model.mtp\]: .*sequence_parallel = fal"):
        ParallelConfig(tp=2).validate(2, mtp)
    ParallelConfig(tp=2, sequence_parallel=False).validate(2, mtp)
    ParallelConfig(dp_shard=2).validate(2, mtp)


def test_world_size_mismatch_with_launch():
    from lmforge.parallel.launch import init_distributed

    with pytest.raises(ConfigError, match="torchrun"):  # no RANK in the environment of the test process
        init_distributed(expected_world=2)


def test_backend_follows_the_run_device_and_gpus_are_counted(monkeypatch):
    """A CPU run joins gloo also on a GPU machine (NCCL would put every rank on the one GPU there: the CPU
    tests under torchrun failed so on the H200); NCCL needs a GPU per local process."""
    import torch

    from lmforge.parallel.launch import backend_for, check_local_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert (backend_for("cpu"), backend_for("auto"), backend_for("cuda")) == ("gloo", "nccl", "nccl")
    check_local_gpus(1)
    with pytest.raises(ConfigError, match="2 processes on the GPU need 2 GPUs but this machine has 1: launch at "
                                          "most 1 per node \\(--nproc 1\\), or set device = 'cpu'"):
        check_local_gpus(2)


def test_torchrun_command_for_nproc():
    import sys

    from lmforge.parallel.launch import torchrun_argv

    assert torchrun_argv(4, ["train", "--config", "x.toml"]) == [
        sys.executable, "-m", "lmforge.parallel.launch", "--standalone", "--nproc-per-node=4", "-m", "lmforge",
        "train", "--config", "x.toml"]
    with pytest.raises(ConfigError, match="--nproc must be >= 1, got 0"):
        torchrun_argv(0, [])


def test_bubble_fraction_formula():
    assert bubble_fraction(1, 8) == 0
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 28) == pytest.approx(0.0967741935)


def _epoch_windows(world: int, steps: int) -> list[int]:
    tokens = np.arange(4 * 12 + 1)  # 12 windows of seq_len 4
    ranks = [RankBatches(tokens, 4, 6, r, world, seed=3) for r in range(world)]
    seen = []
    for _ in range(steps):
        for rb in ranks:
            x, y = rb.next()
            assert torch.equal(y[:, :-1], x[:, 1:])
            seen += [int(row[0]) // 4 for row in x]
    return seen


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_window_once_per_epoch_across_ranks(world):
    seen = _epoch_windows(world, steps=4)  # 4 steps x 6 windows = 2 epochs of 12
    assert sorted(seen[:12]) == list(range(12)) and sorted(seen[12:]) == list(range(12))


def test_global_order_does_not_depend_on_world_size():
    one = _epoch_windows(1, 4)
    for world in (2, 3):
        assert _epoch_windows(world, 4) == one


def test_windows_never_cross_shards():
    shards = [np.arange(0, 10), np.arange(100, 113)]  # 2 and 3 windows of seq_len 4 (plus boundary token)
    rb = RankBatches(shards, 4, 5, 0, 1, seed=0)
    x, y = rb.next()
    rows = sorted(torch.cat([x, y[:, -1:]], 1).tolist())
    assert rows == [[0, 1, 2, 3, 4], [4, 5, 6, 7, 8], [100, 101, 102, 103, 104], [104, 105, 106, 107, 108],
                    [108, 109, 110, 111, 112]]


def test_resume_on_a_different_world_size():
    tokens = np.arange(4 * 12 + 1)
    a = RankBatches(tokens, 4, 6, 0, 1, seed=3)
    a.next()
    state = a.state_dict()
    expect = a.next()[0]
    parts = []
    for r in range(2):
        b = RankBatches(tokens, 4, 6, r, 2, seed=3)
        b.load_state_dict(state)
        parts.append(b.next()[0])
    assert torch.equal(torch.cat(parts), expect)
    with pytest.raises(DataError, match="saved for 12 windows"):
        RankBatches(np.arange(100), 4, 6, 0, 1, seed=3).load_state_dict(state)


def test_context_and_sequence_parallel_split_the_sequence_together():
    with pytest.raises(ConfigError, match=r"seq_len=12 must be divisible by 8 .* tp=2 for sequence"):
        ParallelConfig(cp=2, tp=2).validate(4, CFG, seq_len=12)


def test_load_balanced_positions_pair_early_and_late_chunks():
    from lmforge.parallel.cp import load_balanced_positions

    got = [load_balanced_positions(8, r, 2).tolist() for r in range(2)]
    assert got == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert sorted(sum(got, [])) == list(range(8))
    with pytest.raises(ConfigError, match="seq_len=6 must be divisible by 2·cp=4"):
        load_balanced_positions(6, 0, 2)


def test_parallel_section_of_a_toml_config_loads():
    """`[parallel]` in a run's TOML file becomes a ParallelConfig (lmforge.config), unknown keys refused."""
    from lmforge.config import from_dict, to_dict

    cfg = from_dict(ParallelConfig, {"dp_shard": 2, "tp": 2, "pp_schedule": "gpipe",
                                     "activation_checkpoint": "selective"})
    assert cfg == ParallelConfig(dp_shard=2, tp=2, pp_schedule="gpipe", activation_checkpoint="selective")
    assert from_dict(ParallelConfig, to_dict(cfg)) == cfg and cfg.world_size == 4
    with pytest.raises(ConfigError, match="tp_size"):
        from_dict(ParallelConfig, {"tp_size": 2})


@pytest.fixture
def launched(monkeypatch) -> list[list[str]]:
    """The torchrun commands `lmforge COMMAND --nproc N` runs from here on (recorded, none started)."""
    from lmforge.parallel import launch

    calls: list[list[str]] = []
    monkeypatch.setattr(launch, "run_passing_signals", lambda argv: calls.append(argv) or 0)
    monkeypatch.delenv("RANK", raising=False)
    return calls


@pytest.mark.parametrize("command", ["train", "sft"])
def test_nproc_parses_the_config_once_before_launching(command, tmp_path, launched, capsys):
    """A bad config under --nproc N answers once, in the launching process, instead of once per rank after
    torchrun started N of them; a good one is what the relaunch carries."""
    from lmforge.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nno_such_key = 1\n")
    assert main([command, "--config", str(bad), "--nproc", "2"]) == 2
    assert "unknown config key 'optim.no_such_key'" in capsys.readouterr().err and launched == []
    if command == "sft":
        wrong = tmp_path / "wrong.toml"
        wrong.write_text('objective = "dpo"\n')
        assert main([command, "--config", str(wrong), "--nproc", "2"]) == 2
        assert "this is `lmforge sft`" in capsys.readouterr().err and launched == []


@pytest.mark.parametrize("command", ["train", "sft"])
def test_nproc_checks_the_batch_against_the_default_layout_before_launching(command, tmp_path, launched, capsys):
    """--nproc 2 without a [parallel] layout runs FSDP2 over both processes: a batch they cannot split is refused
    once, before torchrun starts (it failed in every rank, under torchrun's report of failed children)."""
    from lmforge.cli import main

    good = _runnable(tmp_path, command)
    assert main([command, "--config", good, "--data.batch-size", "3", "--nproc", "2"]) == 2
    assert ("batch_size=3 must be divisible by the data-parallel size 2; set data.batch_size (the global batch, split "
            "over the ranks) to a multiple of 2, e.g. 4") in capsys.readouterr().err
    assert launched == []
    assert main([command, "--config", good, "--data.batch-size", "4", "--nproc", "2"]) == 0 and len(launched) == 1


def _runnable(tmp_path, command: str) -> str:
    """A config file `lmforge COMMAND` checks as runnable: its data there, the model's vocabulary holding its ids
    (train), an init directory holding a checkpoint (sft: the file resolve_checkpoint looks for, never loaded)."""
    from tests.train.helpers import make_shard

    path = tmp_path / f"{command}.toml"
    head = f'run_dir = "{tmp_path / "run"}"\ndevice = "cpu"\n'
    if command == "train":
        shard = make_shard(tmp_path / "train.bin")  # byte ids: vocab 257
        path.write_text(f'{head}[model]\nvocab_size = 257\nd_model = 32\nn_layers = 1\nn_heads = 2\n'
                        f'max_seq_len = 32\n[data]\ntrain = ["{shard}"]\nseq_len = 32\nbatch_size = 4\n')
    else:
        (tmp_path / "init").mkdir()
        (tmp_path / "init" / "model.safetensors").write_bytes(b"")
        (tmp_path / "chat.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
        path.write_text(f'{head}init = "{tmp_path / "init"}"\n[data]\ntrain = ["{tmp_path / "chat.jsonl"}"]\n'
                        'batch_size = 4\n')
    return str(path)


@pytest.mark.parametrize("bad", ["missing", "vocab", "section", "good"])
def test_nproc_checks_the_run_once_before_launching(bad, tmp_path, launched, capsys):
    """`lmforge train --nproc 2` with a data error (a missing shard, ids beyond the model's vocabulary) or a model
    section the model ignores: every rank printed the error, then torchrun its traceback. The launcher runs the
    checks the run makes before training (pretraining_data, check_sections) itself first: one line, exit 2, nothing
    launched; a good run launches."""
    from lmforge.cli import main

    argv = ["train", "--config", _runnable(tmp_path, "train"), "--nproc", "2"]
    want = {"missing": f"token file not found: {tmp_path / 'nope.bin'}",
            "vocab": "model.vocab_size=200 is smaller than the tokenizer's 257 tokens (byte)",
            "section": "model.moe is set but model.mlp='dense' ignores it"}.get(bad)
    argv += {"missing": ["--data.train", str(tmp_path / "nope.bin")], "vocab": ["--model.vocab-size", "200"],
             "section": ["--model.moe.n-experts", "4"], "good": []}[bad]
    assert main(argv) == (0 if want is None else 2)
    err = capsys.readouterr().err
    if want is None:
        assert len(launched) == 1 and err == ""
    else:
        assert launched == [] and err.splitlines()[0].startswith(f"lmforge train: error: {want}")
        assert err.splitlines()[1:] == ["(run with --debug for a traceback)"]


@pytest.mark.parametrize("bad", ["init", "data"])
def test_nproc_posttraining_checks_its_inputs_once_before_launching(bad, tmp_path, launched, capsys):
    """`lmforge sft --nproc 2` with an init that holds no checkpoint or a missing data file: one line from the
    launcher (check_posttrain), exit 2, no process launched."""
    from lmforge.cli import main

    argv = ["sft", "--config", _runnable(tmp_path, "sft"), "--nproc", "2"]
    argv += {"init": ["--init", str(tmp_path)], "data": ["--data.train", str(tmp_path / "nope.jsonl")]}[bad]
    assert main(argv) == 2
    want = {"init": f"no checkpoint found in {tmp_path}", "data": f"data file not found: {tmp_path / 'nope.jsonl'}"}
    assert launched == [] and capsys.readouterr().err.startswith(f"lmforge sft: error: {want[bad]}")


def test_nproc_debug_reaches_the_processes_it_starts(tmp_path, monkeypatch, capsys):
    """`lmforge train --nproc 2 --debug`: the one-line error says "run with --debug for a traceback", but --debug was
    read by the launcher alone (the torchrun command lacks it), so the processes' errors stayed one line. The
    launcher's environment carries it (LMFORGE_DEBUG=1, also a way to set it), and only while the command runs."""
    import os

    from lmforge.cli import main
    from lmforge.parallel import launch

    seen = []
    monkeypatch.setattr(launch, "run_passing_signals", lambda argv: seen.append(os.environ.get("LMFORGE_DEBUG")) or 0)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LMFORGE_DEBUG", raising=False)
    good = _runnable(tmp_path, "train")
    assert main(["train", "--config", good, "--nproc", "2", "--debug"]) == 0
    assert main(["train", "--config", good, "--nproc", "2"]) == 0
    assert seen == ["1", None] and "LMFORGE_DEBUG" not in os.environ
    monkeypatch.setenv("LMFORGE_DEBUG", "1")  # a process torchrun started: errors raise, with their traceback
    with pytest.raises(ConfigError, match="--nproc must be"):
        main(["train", "--nproc", "0"])


def test_nproc_a_warning_of_the_config_is_said_once(tmp_path, monkeypatch, capsys):
    """A config warning (warmup longer than the run) was printed by the launcher, which parses the config first, and
    again by the processes: the launcher's own is noted for the launch, so theirs is left out."""
    from lmforge.cli import main
    from lmforge.parallel import launch
    from lmforge.parallel.reports import report_once

    said = "lmforge train: warning: optim.warmup_steps=5 > max_steps=2: the learning rate never reaches optim.lr"
    in_a_process = []
    monkeypatch.setattr(launch, "run_passing_signals", lambda argv: in_a_process.append(report_once(said)) or 0)
    monkeypatch.delenv("RANK", raising=False)
    argv = ["train", "--config", _runnable(tmp_path, "train"), "--max-steps", "2", "--optim.warmup-steps", "5"]
    assert main([*argv, "--nproc", "2"]) == 0
    assert in_a_process == [False] and capsys.readouterr().err.splitlines() == [said]


def test_sequence_parallel_alone_names_tp_not_a_context_parallel_of_one():
    with pytest.raises(ConfigError, match=r"^seq_len=7 must be divisible by 2 \(tp=2 for sequence parallelism\)$"):
        ParallelConfig(tp=2).validate(2, CFG, seq_len=7)


def _odd_rows_step(rank: int, world: int) -> dict[str, torch.Tensor]:
    """ParallelRunner(tp=2) given rows of 7 tokens: the ConfigError's message, as bytes."""
    from lmforge.model.transformer import Transformer
    from lmforge.parallel.runner import ParallelRunner

    torch.manual_seed(0)
    runner = ParallelRunner(Transformer(CFG), ParallelConfig(tp=2), seq_len=8, batch_size=2)
    x = torch.randint(0, 64, (2, 8))
    try:
        runner.forward_backward(x[:, :-1], x[:, 1:])
    except ConfigError as e:
        return {"error": torch.tensor(list(str(e).encode()))}
    return {"error": torch.tensor([], dtype=torch.long)}


def test_runner_names_a_sequence_its_tensor_parallel_ranks_cannot_split():
    """Rows whose length the sequence-parallel shards cannot split failed inside a layer ('The size of tensor a (8)
    must match the size of tensor b (7)'); the runner names the length at each step, as validate does up front."""
    from lmforge.parallel.launch import run_local

    got = [bytes(r["error"].tolist()).decode() for r in run_local(_odd_rows_step, 2)]
    assert got == ["seq_len=7 must be divisible by 2 (tp=2 for sequence parallelism)"] * 2
