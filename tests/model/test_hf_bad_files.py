"""A HF directory whose files are not what they claim (a config.json or shard index holding no JSON object, a
truncated safetensors download, a string quantization_config) fails with a CheckpointError naming the file, not an
AttributeError or a bare JSON / safetensors traceback (found 2026-12-06)."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.model.config import ModelConfig
from lmforge.model.hf import save_pretrained
from lmforge.model.transformer import Transformer

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, d_ff=48)


def _saved(path, **kw):
    torch.manual_seed(0)
    save_pretrained(Transformer(CFG).eval(), path, **kw)
    return path


@pytest.mark.parametrize("text, match", [("[1, 2]", "config.json holds a JSON list, not an object"),
                                         ("{oops", "config.json is not valid JSON")])
def test_a_config_json_without_a_json_object_is_named(tmp_path, text, match):
    (_saved(tmp_path) / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        Transformer.from_pretrained(tmp_path)


def test_a_string_quantization_config_is_named(tmp_path):
    cfg = json.loads((_saved(tmp_path) / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": "bitsandbytes"}))
    with pytest.raises(CheckpointError, match="quant_method='bitsandbytes'.*not supported"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("text, match", [("{oops", "index.json is not valid JSON"),
                                         ('{"weight_map": [1]}', "index.json has no weight_map object"),
                                         ("{}", "index.json has no weight_map object")])
def test_a_broken_shard_index_is_named(tmp_path, text, match):
    (_saved(tmp_path, max_shard_bytes=20_000) / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_truncated_safetensors_file_is_named(tmp_path, sharded):
    _saved(tmp_path, max_shard_bytes=20_000 if sharded else 2**30)
    f = sorted(tmp_path.glob("model*.safetensors"))[-1]
    f.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # a Git LFS pointer where the weights belong
    with pytest.raises(CheckpointError, match=f"{f.name} is not a readable safetensors file"):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("config, match", [
    (None, r"has no config\.json.*HF-format model directory needs"),
    ({"vocab_size": 64}, r"config\.json that names no model_type or architectures.*HF-format model directory needs")])
def test_a_hf_directory_without_a_usable_config_json_is_named_as_one(tmp_path, config, match):
    """Weights without a config.json (or one naming no model) read as a HF directory missing its config, not as
    an lmforge checkpoint 'not fully written (no manifest.json)', which is what LLM.load / lmforge sample said."""
    from lmforge.checkpoint import load_model

    (_saved(tmp_path) / "config.json").unlink()
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        load_model(tmp_path)


def test_an_lmforge_checkpoint_without_its_manifest_is_still_called_unfinished(tmp_path):
    from lmforge.checkpoint import load_model, save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path, 1, Transformer(CFG))
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete \(no manifest\.json\); it was not fully written"):
        load_model(ckpt)


def test_a_hf_hub_cache_folder_names_its_snapshot(tmp_path):
    """The hub's cache keeps a model as models--org--name/snapshots/<revision>/; given the cache folder itself,
    the error names the snapshot to give instead of only 'no checkpoint found'."""
    from lmforge.checkpoint import load_model

    snapshot = _saved(tmp_path / "models--org--tiny" / "snapshots" / "0123abcd")
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    with pytest.raises(CheckpointError, match=f"HF hub cache folder: give its snapshot directory, {snapshot}"):
        load_model(tmp_path / "models--org--tiny")
    (tmp_path / "models--org--tiny" / "refs" / "main").write_bytes(b"\xff\xfe")  # a ref that does not read
    with pytest.raises(CheckpointError, match=f"HF hub cache folder: give its snapshot directory, {snapshot}"):
        load_model(tmp_path / "models--org--tiny")


def test_model_safetensors_beside_a_leftover_index_loads_as_transformers_loads_it(tmp_path):
    """transformers' save_pretrained leaves the other layout behind (an unsharded save over a sharded one keeps the
    index, its shards deleted), and its loader reads model.safetensors first; lmforge read the leftover index and
    failed ('model-00001-of-00002.safetensors is missing')."""
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    names = load_file(tmp_path / "model.safetensors")  # an earlier sharded save's index, its shards deleted
    index = {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="both model.safetensors and model.safetensors.index.json, one left over"):
        loaded = Transformer.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_a_dtype_given_by_name_loads_and_a_non_float_one_is_named(tmp_path):
    """LLM.load / load_model / from_pretrained take dtype='bfloat16' as transformers' from_pretrained does (the
    string reached nn.Module.to as a device: 'Invalid device string'); a non-float dtype is one ConfigError."""
    from lmforge.checkpoint import load_model
    from lmforge.errors import ConfigError

    _saved(tmp_path)
    assert Transformer.from_pretrained(tmp_path, dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    assert load_model(tmp_path, dtype="torch.float16")[0].lm_head.weight.dtype == torch.float16
    assert Transformer.from_pretrained(tmp_path, dtype="auto").lm_head.weight.dtype == torch.float32  # as saved
    for bad in ("int8", torch.int8, "half-ish", ["bfloat16"], 16):
        with pytest.raises(ConfigError, match=r"dtype=.* is not a floating-point dtype; use one of \['bfloat16'"):
            Transformer.from_pretrained(tmp_path, dtype=bad)


def test_a_file_or_a_missing_path_given_as_the_checkpoint_is_named(tmp_path):
    """A model's config.json or weights file given instead of its directory, or a path that does not exist, said
    only 'no checkpoint found in .../config.json (expected .../config.json/checkpoints/step_*/ ...)'."""
    from lmforge.checkpoint import load_model

    _saved(tmp_path)
    with pytest.raises(CheckpointError, match=f"is a file: give the directory holding it, {tmp_path}$"):
        load_model(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="nope does not exist"):
        load_model(tmp_path / "nope")


@pytest.mark.parametrize("kept", ["adapter_config.json", "adapter_model.safetensors"])
def test_half_a_peft_adapter_directory_names_the_file_it_lacks(tmp_path, kept):
    """A PEFT adapter directory with one of its two files (an unfinished copy) said only 'no checkpoint found ...
    or a HF model directory with config.json' (found 2026-12-07): the error names the missing file."""
    from lmforge.checkpoint import load_model

    (tmp_path / kept).write_text("{}")
    lacks = ({"adapter_config.json", "adapter_model.safetensors"} - {kept}).pop()
    with pytest.raises(CheckpointError, match=f"; {tmp_path} holds {kept} but not {lacks}: a PEFT adapter directory "
                                              f"needs both, fetch {lacks} too$"):
        load_model(tmp_path)


def test_from_pretrained_names_an_lmforge_checkpoint_run_or_peft_directory_and_its_loader(tmp_path):
    """Transformer.from_pretrained on an lmforge checkpoint or run directory said 'config.json model_type=None
    (architectures=[]) is not supported', on a PEFT adapter directory 'no config.json' (found 2026-12-07)."""
    from lmforge.checkpoint import save_checkpoint

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "run", 1, Transformer(CFG))
    (tmp_path / "peft").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "peft" / name).write_text("{}")
    for path, kind in ((ckpt, "an lmforge checkpoint"), (tmp_path / "run", "an lmforge run directory"),
                       (tmp_path / "peft", "a PEFT adapter directory")):
        with pytest.raises(CheckpointError, match=f"^{path} is {kind}, not a HF-format model directory: open it with "
                                                  r"lmforge\.checkpoint\.load_model\(path\) or LLM\.load\(path\)"):
            Transformer.from_pretrained(path)


def test_a_runs_checkpoints_folder_given_as_the_checkpoint_names_the_run(tmp_path):
    """A run's checkpoints/ folder said 'expected RUN/checkpoints/checkpoints/step_*/': the run directory (or one
    checkpoint) is named instead."""
    from lmforge.checkpoint import load_model, save_checkpoint

    model = Transformer(ModelConfig(vocab_size=16, d_model=8, n_layers=1, n_heads=2, max_seq_len=8))
    newest = save_checkpoint(tmp_path / "run", 2, model)
    with pytest.raises(CheckpointError, match=f"checkpoints folder: give the run directory, {tmp_path / 'run'} .*"
                                              f"or one checkpoint, {newest}$"):
        load_model(tmp_path / "run" / "checkpoints")


def test_shards_without_their_index_are_named(tmp_path):
    """Shards downloaded without model.safetensors.index.json said only 'no model.safetensors or
    model.safetensors.index.json ... no pickle', as if no weights were there."""
    _saved(tmp_path, max_shard_bytes=20_000)
    (tmp_path / "model.safetensors.index.json").unlink()
    first = sorted(tmp_path.glob("model-*.safetensors"))[0].name
    with pytest.raises(CheckpointError, match=f"holds shards \\({first}, ...\\) but not their index, "
                                              "model.safetensors.index.json: fetch it too"):
        Transformer.from_pretrained(tmp_path)


def test_a_loaders_dtype_takes_the_short_names_the_options_take():
    """LLM.load(dtype='bf16') was refused while ref_dtype='bf16' and --dtype bf16 were the names those options
    take: one table of short names (config.SHORT_DTYPES) for every dtype option."""
    from lmforge.align.config import FROZEN_DTYPE_NAMES
    from lmforge.cli.export import DTYPES
    from lmforge.config import SHORT_DTYPES
    from lmforge.model.hf import float_dtype

    assert [float_dtype(n) for n in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16, torch.float32]
    assert float_dtype("bfloat16") is torch.bfloat16 and FROZEN_DTYPE_NAMES is SHORT_DTYPES is DTYPES
