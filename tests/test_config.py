"""Config loading: wrong types name the key and the expected type; plain dicts and path strings are
accepted where a user would pass them, with the same meaning as the typed values."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import lmforge as lf
from lmforge.config import from_dict, load_config, to_dict
from lmforge.errors import ConfigError
from lmforge.model.config import PRESETS, MoEConfig
from lmforge.train.config import DataConfig, TrainConfig


@pytest.mark.parametrize("toml, message", [
    ('[model]\nd_model = "big"\n', "model.d_model = 'big': expected an integer"),
    ("max_steps = 6.5\n", "max_steps = 6.5: expected an integer"),
    ("[data]\ntrain = [1]\n", "data.train[0] = 1: expected a string"),
    ('[optim]\nlr = "fast"\n', "optim.lr = 'fast': expected a number"),
    ('progress = "yes"\n', "progress = 'yes': expected true or false"),
    ("model = 3\n", "model = 3: expected a table of ModelConfig settings"),
    ("[optim]\nbetas = [0.9]\n", "optim.betas = [0.9]: expected 2 values"),
])
def test_toml_type_errors_name_the_key_and_type(tmp_path, toml, message):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, path)
    assert str(e.value) == message


def test_toml_path_string_is_one_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('max_steps = 6.0\n[data]\ntrain = "x.bin"\n')
    cfg = load_config(TrainConfig, path)
    assert cfg.data.train == ("x.bin",) and cfg.max_steps == 6 and type(cfg.max_steps) is int


def test_python_configs_accept_dicts_and_paths():
    a = TrainConfig(model=dict(vocab_size=257, d_model=32, n_layers=1, n_heads=2, max_seq_len=16),
                    data=dict(train="x.bin", seq_len=16), optim=dict(lr=1e-3, betas=[0.8, 0.9]))
    b = TrainConfig(model=lf.ModelConfig(vocab_size=257, d_model=32, n_layers=1, n_heads=2, max_seq_len=16),
                    data=DataConfig(train=("x.bin",), seq_len=16),
                    optim=from_dict(TrainConfig, {"optim": {"lr": 1e-3, "betas": [0.8, 0.9]}}).optim)
    assert a == b and a.optim.betas == (0.8, 0.9)
    with pytest.raises(ConfigError, match=r"data.seq_len = '16': expected an integer"):
        TrainConfig(data=dict(seq_len="16"))
    with pytest.raises(ConfigError, match=r"unknown config key 'data.trian'"):
        TrainConfig(data=dict(trian="x.bin"))
    # numpy numbers are numbers (a sweep's np.int64 depth, np.float32 lr), stored as plain Python ones
    c = TrainConfig(data=dict(seq_len=np.int64(16)), optim=dict(lr=np.float32(0.5)))
    assert (c.data.seq_len, type(c.data.seq_len), c.optim.lr, type(c.optim.lr)) == (16, int, 0.5, float)


@pytest.mark.parametrize("make, kw, message", [
    ("model", dict(d_model="512"), "model.d_model = '512': expected an integer"),  # was: '>' between str and int
    ("model", dict(tie_embeddings="no"), "model.tie_embeddings = 'no': expected true or false"),  # was: taken as True
    ("model", dict(norm_eps="1e-5"), "model.norm_eps = '1e-5': expected a number"),
    ("model", dict(vocab_size=None), "model.vocab_size = None: expected an integer"),
    ("model", dict(moe=dict(top_k="2")), "model.moe.top_k = '2': expected an integer"),  # the nested key, not the table
    ("optim", dict(lr="3e-4"), "optim.lr = '3e-4': expected a number"),
    ("optim", dict(nesterov="yes"), "optim.nesterov = 'yes': expected true or false"),
    ("parallel", dict(tp="2"), "parallel.tp = '2': expected an integer"),
    ("dpo", dict(beta="0.1"), "dpo.beta = '0.1': expected a number"),
    ("sft", dict(neftune_alpha="5"), "sft.neftune_alpha = '5': expected a number"),
])
def test_configs_built_in_python_name_wrong_types(make, kw, message):
    """Configs built in Python check their fields' types as TrainConfig's TOML loading does: a value of the
    wrong type is named at construction, not met later as a comparison error or silently taken as true."""
    from lmforge.align.dpo import DPOConfig
    from lmforge.align.sft import SFTConfig
    from lmforge.optim.config import OptimConfig
    from lmforge.parallel.config import ParallelConfig

    cls = dict(model=lf.ModelConfig, optim=OptimConfig, parallel=ParallelConfig, dpo=DPOConfig, sft=SFTConfig)[make]
    with pytest.raises(ConfigError) as e:
        cls(**kw)
    assert str(e.value) == message


def test_every_data_stage_config_names_wrong_types():
    """Each pipeline stage's config built in Python (not only from a pipeline TOML file) names a wrong-typed
    field with the stage's name."""
    import dataclasses
    import typing

    from lmforge.data.stages import STAGES

    for name, spec in STAGES.items():
        hints = typing.get_type_hints(spec.config)
        fields = [f for f in dataclasses.fields(spec.config) if f.init]
        scalar = next((f for f in fields if hints[f.name] in (int, float, bool)), None)
        if scalar is None:  # (pii: a tuple of kinds)
            continue
        required = {f.name: "x.bin" for f in fields if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        with pytest.raises(ConfigError, match=rf"^{name}\.{scalar.name} = 'many': expected "):
            spec.config(**{**required, scalar.name: "many"})


def test_python_configs_normalise_types_keeping_values():
    from lmforge.optim.config import OptimConfig

    c = lf.ModelConfig(n_layers=np.int64(2), rope_theta=10_000, moe=dict(n_experts=4))
    assert (c.n_layers, type(c.n_layers), c.rope_theta, type(c.rope_theta)) == (2, int, 10_000.0, float)
    assert c.moe == MoEConfig(n_experts=4)
    assert OptimConfig(betas=[0.8, 0.9]).betas == (0.8, 0.9)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_saved_configs_round_trip(name):
    cfg = TrainConfig(model=PRESETS[name], data=DataConfig(train=("a.bin", "b.bin")))
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_a_partial_toml_table_starts_from_the_field_default_like_cli_flags(tmp_path):
    """[model] d_model = 128 changes one field of TrainConfig's default model, as --model.d-model does."""
    import dataclasses

    from lmforge.cli.common import parse_config

    path = tmp_path / "run.toml"
    path.write_text("[model]\nd_model = 128\n")
    default = TrainConfig()
    want = dataclasses.replace(default, model=dataclasses.replace(default.model, d_model=128))
    assert load_config(TrainConfig, path) == want
    assert parse_config(TrainConfig, ["--model.d-model", "128"], prog="t", description="") == want


def test_flags_open_a_section_that_defaults_to_none_and_bools_take_any_case(tmp_path):
    """--model.moe.n-experts works without a [model.moe] table (ModelConfig.moe defaults to None, for which
    tyro has no flags); a table's values stay and flags override them; --progress false means False."""
    from lmforge.cli.common import parse_config
    from lmforge.model.config import MoEConfig, MTPConfig

    def parse(*argv):
        return parse_config(TrainConfig, list(argv), prog="t", description="")

    cfg = parse("--model.mlp", "moe", "--model.moe.n-experts", "4", "--model.moe.noisy", "--model.mtp.depth=2",
                "--progress", "false", "--model.fused-proj", "TRUE")
    assert cfg.model.moe == MoEConfig(n_experts=4, noisy=True) and cfg.model.mtp == MTPConfig(depth=2)
    assert cfg.progress is False and cfg.model.fused_proj is True
    assert parse("--progress=no").progress is False and parse().model.moe is None
    path = tmp_path / "moe.toml"
    path.write_text("[model]\nmlp = 'moe'\n[model.moe]\nn_experts = 6\ntop_k = 3\n")
    cfg = parse("--config", str(path), "--model.moe.top-k", "1")
    assert (cfg.model.moe.n_experts, cfg.model.moe.top_k) == (6, 1)


def test_a_pipeline_is_refused_for_losses_it_would_drop():
    """pp > 1 trains the plain LM loss stage by stage: an MoE model's balancing loss or an MTP loss would
    silently vanish, so the config says so before anything launches."""
    from lmforge.model.config import ModelConfig, MoEConfig, MTPConfig
    from lmforge.parallel.config import ParallelConfig

    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2)
    with pytest.raises(ConfigError, match="drop this model's MoE balancing loss; set parallel.pp=1"):
        TrainConfig(model=ModelConfig(**base, mlp="moe", moe=MoEConfig(n_experts=4, top_k=2)),
                    parallel=ParallelConfig(pp=2))
    with pytest.raises(ConfigError, match="drop this model's MTP loss"):
        TrainConfig(model=ModelConfig(**base, mtp=MTPConfig()), parallel=ParallelConfig(pp=2))
    TrainConfig(model=ModelConfig(**base), parallel=ParallelConfig(pp=2))  # a dense model is fine


def test_a_missing_required_key_is_named():
    from lmforge.data.pipeline import PipelineConfig

    with pytest.raises(ConfigError, match=r"missing config key 'input' \(a \[input\] table\)"):
        from_dict(PipelineConfig, {"output": {"dir": "x"}})

    @dataclasses.dataclass
    class Source:
        name: str

    # a scalar's form (it suggested a [data.sources[1].name] table too)
    with pytest.raises(ConfigError, match=r"missing config key 'data.sources\[1\].name' \(name = ...\)"):
        from_dict(Source, {}, "data.sources[1]")


def test_help_names_the_sections_that_are_off(capsys):
    """tyro lists no flags of a section that defaults to None: the help says how to turn it on."""
    from lmforge.cli.common import parse_config
    from lmforge.train import posttrain as PT

    with pytest.raises(SystemExit):
        parse_config(PT.config_class("dpo"), ["--help"], prog="lmforge dpo", description="DPO.")
    assert "--lora.FIELD flags (or a [lora] table) turn the lora section on: --lora.r, " in capsys.readouterr().out


@pytest.mark.parametrize("name, raw, where", [
    ("run.toml", b"max_steps = 2\n# caf\xe9 au lait\n", 19),  # Latin-1: \xe9 then a space, no continuation
    ("run.json", b'{"max_steps": 2, "note": "\xff\xfe"}', 26),
])
def test_a_config_file_that_is_not_utf8_is_a_one_line_error(tmp_path, name, raw, where, capsys):
    """Every command that reads a config file (train --config, data run) named the file's bytes in a
    UnicodeDecodeError traceback (found 2026-12-05): now one line with the file and the byte."""
    from lmforge.cli import main

    path = tmp_path / name
    path.write_bytes(raw)
    bad = raw[where:where + 1]
    commands = [["train", "--config", str(path)]] + ([["data", "run", str(path)]] if name.endswith(".toml") else [])
    for argv in commands:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[0] == (f"lmforge {argv[0]}: error: config file {path} is not UTF-8 text (byte "
                                       f"{where}: {bad!r}); save it as UTF-8")
        assert "Traceback" not in err


def test_one_utf8_reader_for_config_and_prompts_files(tmp_path):
    """Config files and generate's --prompts-file were read by two copies of one reader, which differed: a
    config directory was "config file not found", a missing JSON config an OSError repr, and a prompts file
    given as a pipe (<(cmd)) "not found". One reader now (lmforge.utils.read_utf8), each caller's error class."""
    import os
    import threading

    from lmforge.cli.generate import GenerateConfig, read_prompts
    from lmforge.config import read_config_file
    from lmforge.errors import DataError

    (tmp_path / "d.toml").mkdir()
    cases = [(tmp_path / "d.toml", f"config file {tmp_path / 'd.toml'} is a directory; give a TOML or JSON file"),
             (tmp_path / "nope.json", f"config file {tmp_path / 'nope.json'} not found"),
             (tmp_path / "nope.toml", f"config file {tmp_path / 'nope.toml'} not found")]
    for path, message in cases:
        with pytest.raises(ConfigError) as e:
            read_config_file(path)
        assert str(e.value) == message
    for path in (tmp_path / "nope.txt", tmp_path / "d.toml"):
        with pytest.raises(DataError) as e:  # generate's class, its own words for a directory
            read_prompts(GenerateConfig(checkpoint="x", prompts_file=str(path)))
        assert str(e.value) == (f"--prompts-file {path} not found" if path.suffix == ".txt" else
                                f"--prompts-file {path} is a directory; give a text or JSONL file of prompts")
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("caf\u00e9\nsecond\n"), daemon=True)
    writer.start()
    assert read_prompts(GenerateConfig(checkpoint="x", prompts_file=str(fifo))) == ["caf\u00e9", "second"]
    writer.join(timeout=60)


def _config_classes() -> list[type]:
    from lmforge.infer.engine import EngineConfig
    from lmforge.infer.sampling import SamplingParams
    from lmforge.model.config import ModelConfig

    return [SamplingParams, EngineConfig, ModelConfig, MoEConfig, TrainConfig, DataConfig]


VALUES = [0, 3, 2.5, 6.0, True, False, None, "x", "", (), ("a", "b"), (1, 2), [1], {1: 0.5}, {}, np.int64(3),
          np.float32(0.5), "raw", "cumulative"]


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_coerce_fast_path_passes_only_values_coerce_keeps(cls):
    """coerce_fields' per-class plan skips _coerce only for values it would return as they are (the reference):
    for every field of these configs and a spread of values, a value the fast test passes is one _coerce keeps."""
    from lmforge.config import _coerce, _field_plan

    for name, tp, unchanged in _field_plan(cls):
        for v in VALUES:
            if not unchanged(v):
                continue
            got = _coerce(tp, v, name)
            assert got == v and type(got) is type(v), (cls.__name__, name, tp, v, got)


def test_coerce_fields_plans_each_class_once_and_skips_typed_values(monkeypatch):
    """SamplingParams is built per request: its field types are looked up once per class and values already of
    their field's type skip _coerce (0.35 ms a SamplingParams before, 2026-12-06), with the same results."""
    import lmforge.config as config
    from lmforge.infer.sampling import SamplingParams

    SamplingParams()  # planned
    before = config._field_plan.cache_info()
    calls = []
    real = config._coerce
    monkeypatch.setattr(config, "_coerce", lambda tp, v, where: calls.append(where) or real(tp, v, where))
    sp = SamplingParams(temperature=0.7, max_tokens=8, stop=("x",), seed=3, logprobs=None)
    assert calls == [] and config._field_plan.cache_info().misses == before.misses
    sp = SamplingParams(temperature=1, max_tokens=np.int64(8), stop=["x"], top_k=4.0)  # these go through _coerce
    assert set(calls) == {"max_tokens", "stop", "stop[0]", "temperature", "top_k"}
    assert (type(sp.temperature), type(sp.max_tokens), sp.stop, type(sp.top_k)) == (float, int, ("x",), int)


def test_with_defaults_fills_missing_fields_even_where_a_saved_value_no_longer_reads():
    """A run's saved config read as the current lmforge reads it: fields added since take their defaults. Where one
    saved value no longer reads (a removed optimizer name) it returned the saved dict whole, so every new field was
    listed again as a change (None -> default) on resume."""
    from lmforge.config import to_dict, with_defaults
    from lmforge.train.config import TrainConfig

    full = to_dict(TrainConfig())
    saved = {k: dict(v) if isinstance(v, dict) else v for k, v in full.items()}
    saved["optim"]["name"] = "a_removed_optimizer"
    del saved["model"]["norm_offset"], saved["seed"]
    assert with_defaults(TrainConfig, saved) == dict(full, optim=saved["optim"])


def test_claim_is_the_one_taken_name_rule_of_every_registry():
    """register_model / _objective / _data_kind / _policy / _base_layer each wrote the rule again (and drifted:
    'is' for classes, '!=' for specs, two message forms); claim is it: the same or an equal value again does
    nothing, another is refused in one line naming what holds the name."""
    import dataclasses

    from lmforge.config import claim

    @dataclasses.dataclass(frozen=True)
    class Spec:
        path: str

    table: dict = {}
    assert claim(table, "a", Spec("m:A"), "toy") == Spec("m:A") and claim(table, "a", Spec("m:A"), "toy")
    assert claim(table, "k", int, "toy") is int and claim(table, "k", int, "toy") is int
    with pytest.raises(ConfigError, match=r"^toy 'a' is already registered \(m:A\); choose another name$"):
        claim(table, "a", Spec("m:B"), "toy")
    with pytest.raises(ConfigError, match=r"toy 'k' is already registered \(int\)"):
        claim(table, "k", float, "toy")
    assert table == {"a": Spec("m:A"), "k": int}


def test_a_section_s_key_written_at_the_top_names_its_section(tmp_path, capsys):
    """`temperature = 0` at the top of a `lmforge sample --config` file (the flags are flat: --temperature) was
    'unknown config key' with the valid keys listed; the line now says which [section] takes it."""
    from lmforge.align.config import config_class
    from lmforge.cli import main

    with pytest.raises(ConfigError, match=r"unknown config key 'lr'; .*'lr' is a key of \[optim\]"):
        from_dict(TrainConfig, {"lr": 1e-3})
    with pytest.raises(ConfigError, match=r"unknown config key 'data.lr'; valid keys here: [^;]*$"):
        from_dict(TrainConfig, {"data": {"lr": 1e-3}})  # (sections are named below where the key was written)
    with pytest.raises(ConfigError, match=r"'r' is a key of \[lora\]"):  # an optional section (None by default)
        from_dict(config_class("sft"), {"r": 8})
    with pytest.raises(ConfigError, match=r"valid keys here: [^;]*$"):  # no section has it: the list alone
        from_dict(TrainConfig, {"no_such_key": 1})
    (tmp_path / "s.toml").write_text('checkpoint = "x"\ntemperature = 0.0\n')
    assert main(["sample", "--config", str(tmp_path / "s.toml")]) == 2
    assert "'temperature' is a key of [sampling]" in capsys.readouterr().err


def test_check_finite_names_the_field_of_a_non_finite_float_or_tuple_of_floats():
    """The one check of OptimConfig and the post-training configs (lmforge.config.check_finite)."""
    from lmforge.config import check_finite

    @dataclasses.dataclass(frozen=True)
    class Cfg:
        rate: float = 1.0
        pair: tuple[float, float] = (0.5, 0.5)
        name: str = "x"

    check_finite(Cfg(), "s")
    with pytest.raises(ConfigError, match=r"^s.rate must be a finite number, got inf$"):
        check_finite(Cfg(rate=float("inf")), "s")
    with pytest.raises(ConfigError, match=r"^s.pair must be a finite number, got \(0.5, nan\)$"):
        check_finite(Cfg(pair=(0.5, float("nan"))), "s")


def test_a_config_file_with_a_byte_order_mark_reads(tmp_path):
    """A Windows editor's byte-order mark made a TOML config "not valid TOML (line 1, column 1)" and a JSON one
    "Unexpected UTF-8 BOM": read_utf8, the one reader of config and prompts files, drops it."""
    from lmforge.config import read_config_file

    (tmp_path / "run.toml").write_bytes("\ufeffmax_steps = 2\n".encode())
    (tmp_path / "run.json").write_bytes("\ufeff{\"max_steps\": 2}".encode())
    for name in ("run.toml", "run.json"):
        assert read_config_file(tmp_path / name) == {"max_steps": 2}
    (tmp_path / "bad.toml").write_bytes(b"\xef\xbb\xbfab\xff")  # the bad byte's offset counts the mark
    with pytest.raises(ConfigError, match=r"is not UTF-8 text \(byte 5: b'\\xff'\)"):
        read_config_file(tmp_path / "bad.toml")
