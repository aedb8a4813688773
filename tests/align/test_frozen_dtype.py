"""teacher_dtype / reference_dtype: a frozen model held in another dtype than it was saved in (an fp32 teacher in
bf16 beside a bf16 student): cast when loaded and when a module is held (at its first forward), the loss as with
a teacher cast by hand, half the parameter bytes, the identity alike before and after the cast."""

import copy

import pytest
import torch

from lmforge.align.distill import DistillConfig, DistillObjective
from lmforge.align.dpo import DPOConfig, DPOObjective
from lmforge.align.frozen import BaseReference
from lmforge.align.kto import KTOConfig, KTOObjective
from lmforge.errors import CheckpointError, ConfigError

from .helpers import pair_batch, sequences, tiny_model


def _bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


def _bf16(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(torch.bfloat16)


def _unpaired(seed: int = 0) -> dict:
    return {**sequences(4, 10, 41, [2, 3, 4, 2], seed), "label": torch.tensor([True, False, True, False])}


# objective name -> (build(frozen model, dtype), a batch)
OBJECTIVES = {
    "forward_kl": (lambda m, d: DistillObjective(DistillConfig(teacher_dtype=d), teacher=m),
                   lambda: sequences(2, 10, 41, [2, 3], 0)),
    "sampled_reverse_kl": (lambda m, d: DistillObjective(DistillConfig(divergence="sampled_reverse_kl",
                                                                       teacher_dtype=d), teacher=m),
                           lambda: sequences(2, 10, 41, [2, 3], 0)),
    "dpo": (lambda m, d: DPOObjective(DPOConfig(reference_dtype=d), reference=m), pair_batch),
    "kto": (lambda m, d: KTOObjective(KTOConfig(reference_dtype=d), reference=m), _unpaired),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_a_held_module_runs_in_bf16_as_one_cast_by_hand_at_half_the_bytes(name):
    build, batch_of = OBJECTIVES[name]
    student, frozen, batch = tiny_model(0), tiny_model(3), batch_of()
    fp32_bytes = _bytes(frozen)
    obj = build(frozen, "bf16")
    assert _dtypes(frozen) == {torch.float32}  # left as given until the objective has checked it
    loss, _ = obj.loss(student, batch)
    assert _dtypes(frozen) == {torch.bfloat16} and _bytes(frozen) * 2 == fp32_bytes
    by_hand, _ = build(_bf16(tiny_model(3)), None).loss(student, batch)
    assert loss.dtype == torch.float32 and torch.equal(loss, by_hand)
    as_saved, _ = build(tiny_model(3), None).loss(student, batch)
    assert not torch.equal(loss, as_saved)  # the cast is real: fp32 weights give another loss


def test_the_identity_is_the_cast_weights_before_and_after_the_cast_and_a_resume_checks_the_dtype():
    obj = DistillObjective(DistillConfig(teacher_dtype="bf16"), teacher=tiny_model(3))
    before = obj.state_dict()["reference"]["checksum"]
    obj.loss(tiny_model(0), sequences(2, 10, 41, [2, 3], 0))
    saved = obj.state_dict()
    assert saved["reference"]["checksum"] == before
    assert before == DistillObjective(teacher=_bf16(tiny_model(3))).state_dict()["reference"]["checksum"]
    DistillObjective(DistillConfig(teacher_dtype="bf16"), teacher=tiny_model(3)).load_state_dict(saved)  # resumes
    with pytest.raises(CheckpointError, match="at the same teacher_dtype"):
        DistillObjective(teacher=tiny_model(3)).load_state_dict(saved)


def test_the_trained_model_given_as_teacher_is_refused_before_it_is_cast():
    student = tiny_model(0)
    with pytest.raises(ConfigError, match="the teacher is the model being trained"):
        DistillObjective(DistillConfig(teacher_dtype="bf16"), teacher=student).loss(
            student, sequences(2, 10, 41, [2, 3], 0))
    assert _dtypes(student) == {torch.float32}


@pytest.mark.parametrize("make,option", [(DistillConfig, "teacher_dtype"), (DPOConfig, "reference_dtype"),
                                         (KTOConfig, "reference_dtype")])
def test_an_unknown_dtype_is_refused_naming_the_choices(make, option):
    with pytest.raises(ConfigError, match=rf"^{option}='int8' is not one of \['bf16', 'fp16', 'fp32'\] \(or None"):
        make(**{option: "int8"})


def test_a_base_reference_cannot_be_cast():
    from lmforge.adapt.lora import LoRAConfig, apply_lora

    policy = apply_lora(tiny_model(0), LoRAConfig(r=2, targets=("wq",)))
    with pytest.raises(ConfigError, match="reference_dtype='bf16' cannot cast a BaseReference"):
        DPOObjective(DPOConfig(reference_dtype="bf16"), reference=BaseReference(policy))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An fp32 checkpoint of the tiny model that the DPO reference and the distillation teacher are loaded from."""
    from lmforge.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("frozen_dtype")
    return str(save_checkpoint(tmp / "fp32", 1, tiny_model(3)))


def _parsed(tmp_path, objective: str, section: str, saved: str):
    from lmforge.cli.common import parse_config
    from lmforge.train import posttrain as PT

    toml = tmp_path / f"{objective}.toml"
    toml.write_text(f'init = "{saved}"\nteacher = "{saved}"\nrun_dir = "{tmp_path / "run"}"\ndevice = "cpu"\n'
                    f"[{objective}]\n{section}\n")
    return parse_config(PT.config_class(objective), ["--config", str(toml)], prog="t", description="")


@pytest.mark.parametrize("objective,option", [("distill", "teacher_dtype"), ("dpo", "reference_dtype"),
                                              ("kto", "reference_dtype")])
def test_a_toml_dtype_loads_the_frozen_model_cast(tmp_path, saved, objective, option):
    """lmforge distill --config with [distill] teacher_dtype = "bf16" (dpo, kto: reference_dtype): the frozen
    model is bf16 once loaded, and its loss equals the one with the checkpoint's model cast by hand."""
    from lmforge.checkpoint import load_model
    from lmforge.train import posttrain as PT

    cfg = _parsed(tmp_path, objective, f'{option} = "bf16"', saved)
    assert getattr(getattr(cfg, objective), option) == "bf16"
    obj = PT.build_objective(cfg, cfg.init, "cpu")
    assert _dtypes(obj.ref.model) == {torch.bfloat16}
    fp32 = load_model(saved)[0]
    assert _bytes(obj.ref.model) * 2 == _bytes(fp32)
    build, batch_of = OBJECTIVES["forward_kl" if objective == "distill" else objective]
    batch = batch_of()
    assert torch.equal(obj.loss(tiny_model(0), batch)[0], build(_bf16(fp32), None).loss(tiny_model(0), batch)[0])
    with pytest.raises(ConfigError, match=f"{option}='int8' is not one of"):
        _parsed(tmp_path, objective, f'{option} = "int8"', saved)


def test_a_cast_model_is_loaded_on_the_cpu_and_moved_to_its_device_in_its_dtype(monkeypatch, tmp_path):
    """With a dtype, the device (here meta, standing for a GPU) never holds the model in its saved dtype."""
    import dataclasses

    from lmforge import checkpoint
    from lmforge.align import frozen
    from lmforge.train import posttrain as PT

    calls = []

    def load_model(path, device="cpu", **kw):
        calls.append(str(device))
        return tiny_model(3).to(device), None
    monkeypatch.setattr(checkpoint, "load_model", load_model)
    monkeypatch.setattr(frozen, "pick_device", lambda name, **kw: name)  # (meta stands for a GPU: the check passes it)
    cls = PT.config_class("distill")
    options = dataclasses.replace(DistillConfig(), teacher_device="meta", teacher_dtype="bf16")
    obj = PT.build_objective(cls(init="init", teacher="teacher", run_dir=str(tmp_path), device="cpu",
                                 distill=options), "init", "cpu")
    assert calls == ["cpu"]
    assert {(p.device.type, p.dtype) for p in obj.ref.model.parameters()} == {("meta", torch.bfloat16)}


def test_lmforge_distill_trains_against_a_bf16_teacher_and_resumes(tmp_path, capsys):
    """End to end: `lmforge distill --config` with [distill] teacher_dtype = "bf16" trains, records the bf16
    teacher's identity, and resumes against it; resumed with the teacher as saved, it is refused."""
    import json
    import math

    from lmforge import checkpoint as ckpt
    from lmforge.align.frozen import weights_checksum
    from lmforge.cli import main

    from . import test_trainer_objectives as post
    from .helpers import post_base

    base = post_base(tmp_path)
    toml = post._toml(base, tmp_path / "run", "distill", max_steps=2, extra=f'teacher = "{base / "base"}"\n')
    toml = toml.replace(str(base / "pairs.jsonl"), str(base / "chat.jsonl")) + '[distill]\nteacher_dtype = "bf16"\n'
    (tmp_path / "distill.toml").write_text(toml)
    assert main(["distill", "--config", str(tmp_path / "distill.toml"), "--plot", "False"]) == 0
    state = ckpt.load_train_state(ckpt.checkpoint_dirs(tmp_path / "run")[-1])
    teacher = ckpt.load_model(base / "base")[0]
    assert state["objective"]["reference"]["checksum"] == weights_checksum(teacher, dtype=torch.bfloat16)
    (tmp_path / "more.toml").write_text(toml.replace("max_steps = 2", "max_steps = 3"))
    assert main(["distill", "--config", str(tmp_path / "more.toml"), "--plot", "False"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(map(math.isfinite, losses))
    (tmp_path / "fp32.toml").write_text(toml.replace("max_steps = 2", "max_steps = 4").replace(
        'teacher_dtype = "bf16"', "teacher_dtype = 'fp32'"))
    assert main(["distill", "--config", str(tmp_path / "fp32.toml"), "--plot", "False"]) != 0
    assert "pass the same teacher model (at the same teacher_dtype) to resume" in capsys.readouterr().err
