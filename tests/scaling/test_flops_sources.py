"""`lmforge scaling flops --model` on what a run leaves behind: a checkpoint (its directory or its config.json,
told from a run config by the manifest.json its writer seals it with) counts at the model's max_seq_len; the run
directory's config.json (the Trainer's resolved config) at the rows the run trained on."""

import json
import shutil

import pytest

from lmforge.model.config import ModelConfig
from lmforge.scaling.flops import flops_per_token

CFG = ModelConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)


def _count(capsys, model: str) -> str:
    from lmforge.cli import main

    assert main(["scaling", "flops", "--model", model, "--tokens", "1e6"]) == 0
    out = capsys.readouterr().out
    assert "N = 32,864 " in out  # the checkpoint's model, not the --depth default
    return out


def _at(seq_len: int) -> str:
    return f"exact count = {flops_per_token(CFG, seq_len) * 1e6:.4g} FLOPs (seq_len {seq_len})"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from lmforge.checkpoint import save_checkpoint
    from lmforge.model.transformer import Transformer

    return save_checkpoint(tmp_path_factory.mktemp("flops") / "run", 5, Transformer(CFG))


def test_a_checkpoint_directory_and_its_config_json_count_at_the_models_context(capsys, ckpt, tmp_path):
    assert _at(64) in _count(capsys, str(ckpt))  # was refused: "neither a preset nor a .toml / .json file"
    assert _at(64) in _count(capsys, str(ckpt / "config.json"))
    shutil.copy(ckpt / "config.json", tmp_path / "config.json")  # copied out of its sealed folder: still known
    assert _at(64) in _count(capsys, str(tmp_path / "config.json"))


def test_a_run_directorys_config_json_counts_at_the_rows_the_run_trained_on(capsys, tmp_path):
    """The Trainer keeps {"config": run config, "seed", lmforge_version, ...} in the run directory; it was refused
    with "unknown config key 'model.config'"."""
    from lmforge.config import to_dict
    from lmforge.train.config import DataConfig, TrainConfig
    from lmforge.utils import run_metadata

    cfg = TrainConfig(model=CFG, data=DataConfig(train=("t.bin",), seq_len=32))
    (tmp_path / "config.json").write_text(json.dumps({"config": to_dict(cfg), "seed": cfg.seed, **run_metadata()}))
    assert _at(32) in _count(capsys, str(tmp_path / "config.json"))
    assert _at(32) in _count(capsys, str(tmp_path))  # the run directory itself


def test_a_checkpoint_of_a_model_without_a_model_config_is_named(capsys, tmp_path):
    from lmforge.cli import main

    (tmp_path / "config.json").write_text(json.dumps({"step": 3, "model_class": "my.Net", "lmforge_version": "0"}))
    (tmp_path / "manifest.json").write_text(json.dumps({"files": {"config.json": 1}, "sha256": {}}))
    assert main(["scaling", "flops", "--model", str(tmp_path / "config.json")]) == 2
    assert "holds a my.Net and records no ModelConfig to count" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [("--seq-len", "-3", "--seq-len must be >= 0"),
                                                ("--tokens", "nan", "--tokens must be a positive number, got nan"),
                                                ("--tokens", "inf", "--tokens must be a positive number, got inf")])
def test_a_bad_context_or_token_count_is_refused_not_counted(capsys, flag, value, message):
    """--seq-len -3 was counted as it stood ("exact count = 6.001e+17 FLOPs (seq_len -3)"), --tokens nan printed
    "nan FLOPs"; both exited 0."""
    from lmforge.cli import main

    assert main(["scaling", "flops", "--model", "llama-small", flag, value]) == 2
    captured = capsys.readouterr()
    assert message in captured.err.splitlines()[0] and "FLOPs" not in captured.out  # (one line; it was tyro's box)


def test_6nd_refuses_a_count_that_is_not_a_positive_number():
    from lmforge.errors import ConfigError
    from lmforge.scaling.flops import flops_6nd

    for n, d in ((1e6, float("nan")), (float("inf"), 1e9), (1e6, -1.0)):
        with pytest.raises(ConfigError, match="6ND needs positive N and D"):
            flops_6nd(n, d)


def test_a_hf_model_directory_counts_the_model_the_hf_loader_reads(capsys, tmp_path):
    """A HF model directory was refused as an lmforge config ("unknown config key 'model.architectures'")."""
    from lmforge.cli import main
    from lmforge.model.hf import config_from_hf, config_to_hf
    from lmforge.scaling.flops import num_params

    hf = config_to_hf(ModelConfig.preset("llama-tiny"), "llama")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = config_from_hf(hf)
    assert main(["scaling", "flops", "--model", str(tmp_path), "--tokens", "1e6"]) == 0
    out = capsys.readouterr().out
    assert f"N = {num_params(cfg):,} " in out
    assert f"exact count = {flops_per_token(cfg, cfg.max_seq_len) * 1e6:.4g} FLOPs (seq_len {cfg.max_seq_len})" in out
