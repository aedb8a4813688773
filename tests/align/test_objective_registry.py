"""register_objective: a post-training objective plugs in from outside lmforge by name (PostTrainConfig.objective,
the [name] section of its options, lmforge.cli.sft.run_objective), as register_model adds a model class."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lmforge.align import config as C
from lmforge.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class ToyConfig:
    weight: float = 1.0


class ToyObjective:
    Config = ToyConfig

    def __init__(self, cfg: ToyConfig | None = None):
        self.cfg = cfg


def test_a_registered_objective_builds_its_run_config_and_is_found_by_name():
    spec = C.ObjectiveSpec(f"{__name__}:ToyObjective", "preference")
    try:
        assert C.register_objective("toy_registry", spec) is spec
        assert C.register_objective("toy_registry", spec) is spec  # the same spec again: a no-op
        assert C.objective_spec("toy_registry") is spec
        cfg = C.config_class("toy_registry")(toy_registry={"weight": 2.0})
        assert cfg.objective == "toy_registry" and cfg.toy_registry == ToyConfig(weight=2.0)
    finally:
        C.OBJECTIVES.pop("toy_registry", None)


@pytest.mark.parametrize("name,spec,message", [
    ("dpo", C.ObjectiveSpec(f"{__name__}:ToyObjective", "preference"), "'dpo' is already registered"),
    ("my-loss", C.ObjectiveSpec(f"{__name__}:ToyObjective", "sft"), "a Python identifier"),
    ("", C.ObjectiveSpec(f"{__name__}:ToyObjective", "sft"), "a Python identifier"),
    ("toy_bad", C.ObjectiveSpec(f"{__name__}:ToyObjective", "pairs"), "data kind 'pairs'"),
    ("toy_bad", C.ObjectiveSpec(f"{__name__}.ToyObjective", "sft"), "'module:Class'"),
    ("toy_bad", f"{__name__}:ToyObjective", "an ObjectiveSpec"),
    ("data", C.ObjectiveSpec(f"{__name__}:ToyObjective", "sft"), "the run's config has a field of that name"),
    ("lora", C.ObjectiveSpec(f"{__name__}:ToyObjective", "sft"), "cannot register as 'lora'"),
])
def test_bad_registrations_are_refused_in_one_line_naming_the_fix(name, spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        C.register_objective(name, spec)
    assert "\n" not in str(e.value) and "toy_bad" not in C.OBJECTIVES and not {"data", "lora"} & set(C.OBJECTIVES)
    assert C.OBJECTIVES["dpo"].path == "lmforge.align.dpo:DPOObjective"


def test_run_objective_is_the_command_of_a_registered_objective(capsys):
    from lmforge.cli.sft import run_objective

    C.register_objective("toy_cli", C.ObjectiveSpec(f"{__name__}:ToyObjective", "sft", config=ToyConfig))
    try:
        with pytest.raises(SystemExit) as e:
            run_objective("toy_cli", ["--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: lmforge toy_cli" in out and "registered objective 'toy_cli'" in out
        assert "--toy-cli.weight FLOAT" in out  # its options, as built-in objectives' (tyro writes - for _)
    finally:
        C.OBJECTIVES.pop("toy_cli", None)


def test_nproc_with_a_registered_objective_is_refused_before_any_process_starts():
    from lmforge.cli.sft import run_objective

    C.register_objective("toy_cli", C.ObjectiveSpec(f"{__name__}:ToyObjective", "sft", config=ToyConfig))
    try:  # torchrun would run `lmforge toy_cli`: a process that never registered it
        with pytest.raises(ConfigError, match="torchrun --nproc-per-node N YOUR_SCRIPT.py") as e:
            run_objective("toy_cli", ["--nproc", "2", "--init", "runs/none", "--device", "cpu"])
        assert "\n" not in str(e.value)
    finally:
        C.OBJECTIVES.pop("toy_cli", None)


def test_an_objective_with_nothing_to_save_takes_stateless_from_beside_the_protocol():
    from lmforge.align.orpo import ORPOObjective
    from lmforge.align.sft import SFTObjective
    from lmforge.train.loss import LMObjective
    from lmforge.train.objective import Objective, Stateless

    for objective in (LMObjective(), SFTObjective(), ORPOObjective()):
        assert isinstance(objective, Stateless) and isinstance(objective, Objective)
        assert objective.state_dict() == {} and objective.load_state_dict({}) is None
