"""The frozen model's options of the objectives that hold one (lmforge.align.config.ReferenceOptions for DPO and
KTO, DistillConfig's teacher_*): one declaration and one check, reached by the same TOML keys and CLI flags."""

import pytest

from lmforge.align.config import DistillConfig, DPOConfig, KTOConfig, config_class
from lmforge.errors import ConfigError


@pytest.mark.parametrize("cls", [DPOConfig, KTOConfig])
def test_a_negative_reference_cache_is_refused_by_every_objective_with_a_reference(cls):
    with pytest.raises(ConfigError, match=r"^reference_cache=-1 must be >= 0 \(0 = no cache\)$"):
        cls(reference_cache=-1)


@pytest.mark.parametrize("cls,role", [(DPOConfig, "reference"), (KTOConfig, "reference"), (DistillConfig, "teacher")])
def test_a_frozen_dtype_is_checked_and_kept(cls, role):
    assert getattr(cls(**{f"{role}_dtype": "bf16"}), f"{role}_dtype") == "bf16"
    with pytest.raises(ConfigError, match=f"^{role}_dtype='int8' is not one of"):
        cls(**{f"{role}_dtype": "int8"})


@pytest.mark.parametrize("objective", ["dpo", "kto"])
def test_reference_options_come_from_toml_keys_and_cli_flags(tmp_path, objective):
    from lmforge.cli.common import parse_config

    toml = tmp_path / "run.toml"
    toml.write_text(f'[{objective}]\nreference_dtype = "bf16"\nreference_cache = 8\n')
    cfg = parse_config(config_class(objective), ["--config", str(toml), f"--{objective}.reference_device", "cpu"],
                       prog="t", description="")
    section = getattr(cfg, objective)
    assert (section.reference_device, section.reference_dtype, section.reference_cache) == ("cpu", "bf16", 8)


def test_kto_documents_its_reference_options_as_dpo_does(capsys):
    """`lmforge kto --help` gave no help for reference_device / reference_cache (DPO's were written twice)."""
    from lmforge.cli.common import parse_config

    for objective in ("dpo", "kto"):
        with pytest.raises(SystemExit):
            parse_config(config_class(objective), ["--help"], prog="t", description="")
        out = " ".join(capsys.readouterr().out.split())
        assert "run the reference on this device" in out
        assert "cache the reference log-probs of this many batches" in out

