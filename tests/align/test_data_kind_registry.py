"""register_data_kind: a post-training record kind plugs in from outside lmforge by name (DATA_KINDS,
ObjectiveSpec.data) and lmforge.align.data reads it through the one path the built-in sft / preference / kto take:
their encoders and collates are registered the same way."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from lmforge.align import config as C
from lmforge.align import data as D
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.tokenizer.byte import ByteTokenizer

TOK = ByteTokenizer()


def encode_weighted(enc, rec: dict, where: str, fit):
    """A toy kind: a prompt/completion record with a positive 'weight' -> (example, weight)."""
    weight = rec.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
        raise D.RecordError("bad_weight", f"{where}: field 'weight' must be a number > 0, got {weight!r}")
    return fit(enc.prompt_completion(rec.get("prompt"), rec.get("completion"), where)), float(weight)


def collate_weighted(items, data, options) -> dict[str, torch.Tensor]:
    scale = getattr(options, "scale", 1.0)  # the objective's options reach the batches
    return {**D.pad_batch([ex for ex, _ in items]), "weight": torch.tensor([w * scale for _, w in items])}


def collate_without_weight(items, data, options) -> dict[str, torch.Tensor]:
    return D.pad_batch([ex for ex, _ in items])


WEIGHTED = C.DataKindSpec(f"{__name__}:encode_weighted", f"{__name__}:collate_weighted", keys=(*C.LM_KEYS, "weight"))


@pytest.fixture
def weighted():
    C.register_data_kind("toy_weighted", WEIGHTED)
    yield "toy_weighted"
    C.DATA_KINDS.pop("toy_weighted", None)


def write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_the_built_in_kinds_are_entries_of_the_registry():
    assert list(C.DATA_KINDS)[:3] == ["sft", "preference", "kto"]
    for name in ("sft", "preference", "kto"):
        spec = C.DATA_KINDS[name]
        assert C.resolve(spec.encode) is getattr(D, f"encode_{name}")
        assert C.resolve(spec.collate) is getattr(D, f"collate_{name}")
        assert C.register_data_kind(name, spec) is spec  # the same spec again: a no-op
    assert C.DATA_KINDS["sft"].packs and not C.DATA_KINDS["preference"].packs
    assert C.DATA_KINDS["preference"].keys == ("chosen_input_ids", "chosen_targets", "chosen_loss_mask",
                                               "rejected_input_ids", "rejected_targets", "rejected_loss_mask")


def test_a_registered_kind_is_read_checked_and_batched_by_build_sources(tmp_path, weighted):
    path = write(tmp_path / "w.jsonl", [{"prompt": "ab", "completion": "cd", "weight": 2},
                                        {"prompt": "ef", "completion": "gh", "weight": 0.5},
                                        {"prompt": "ij", "completion": "kl", "weight": -1},
                                        {"prompt": "mn" * 10, "completion": "op", "weight": 1}])
    cfg = C.PostDataConfig(train=(path,), template="plain", seq_len=8, batch_size=8, val_fraction=0, on_error="skip",
                           truncation="keep_end")
    src, val, report = D.build_sources(cfg, TOK, weighted, seed=0, options=type("Opts", (), {"scale": 10.0})())
    assert val is None and (report.used, report.truncated, report.rejected) == (3, 1, {"bad_weight": 1})
    assert report.first == {"bad_weight": "w.jsonl:3"}
    batch = src.next_batch()
    assert set(batch) == {"input_ids", "targets", "loss_mask", "weight"}  # not packed: sft's packing only
    # each row trains on its completion and the end-of-text token; the weights scaled by the options' 10
    trained = [t[m].tolist() for t, m in zip(batch["targets"], batch["loss_mask"])]
    assert all(ids[-1] == TOK.eot_id for ids in trained)
    assert dict(zip((TOK.decode(ids[:-1]) for ids in trained), batch["weight"].tolist())) == {
        "cd": 20.0, "gh": 5.0, "op": 10.0}
    assert batch["input_ids"].shape == (3, 8)  # the long record: its last seq_len + 1 tokens (keep_end)
    with pytest.raises(D.RecordError, match="w.jsonl:3: field 'weight' must be a number > 0, got -1; fix the record"):
        D.load_records((path,), D.Encoder(TOK, "plain"), weighted, 8, "raise")


def test_a_batch_missing_a_key_its_kind_promises_is_refused(tmp_path):
    spec = C.DataKindSpec(f"{__name__}:encode_weighted", f"{__name__}:collate_without_weight",
                          keys=(*C.LM_KEYS, "weight"))
    C.register_data_kind("toy_keyless", spec)
    try:
        cfg = C.PostDataConfig(train=(write(tmp_path / "w.jsonl", [{"prompt": "a", "completion": "b", "weight": 1}]),),
                               template="plain", seq_len=8, val_fraction=0)
        src, _, _ = D.build_sources(cfg, TOK, "toy_keyless", seed=0)
        with pytest.raises(DataError, match=r"data kind 'toy_keyless': .*collate_without_weight gave a batch without "
                                            r"\['weight'\]") as e:
            src.next_batch()
        assert "\n" not in str(e.value)
    finally:
        C.DATA_KINDS.pop("toy_keyless", None)


def test_an_unknown_kind_is_refused_before_any_file_is_read():
    """An unknown name is a config mistake, as objective_spec's (it was a DataError, a corrupt file's class)."""
    cfg = C.PostDataConfig(train=("missing.jsonl",), template="plain")
    with pytest.raises(ConfigError, match="unknown data kind 'ranked'; choose one of sft, preference, kto.*"
                                        "register_data_kind") as e:
        D.build_sources(cfg, TOK, "ranked", seed=0)
    assert "\n" not in str(e.value)


def encode_scored(enc, rec: dict, where: str, fit):
    """A toy kind whose encode trusts its record: a record without 'score' raises KeyError."""
    return fit(enc.prompt_completion(rec["prompt"], rec["completion"], where)), float(rec["score"])


def test_a_registered_encoders_own_exception_names_the_record_and_the_kind(tmp_path):
    """A KeyError in a registered kind's encode was a traceback naming neither the file's line nor the kind; it now
    takes the built-in kinds' path: one line naming file:line and the kind, or counted under on_error='skip'."""
    C.register_data_kind("toy_scored", C.DataKindSpec(f"{__name__}:encode_scored", f"{__name__}:collate_weighted",
                                                      keys=(*C.LM_KEYS, "weight")))
    try:
        path = write(tmp_path / "s.jsonl", [{"prompt": "ab", "completion": "cd", "score": 1},
                                            {"prompt": "ef", "completion": "gh"}])
        with pytest.raises(D.RecordError, match=r"^s.jsonl:2: data kind 'toy_scored' \(tests.align.test_data_kind_"
                                                r"registry:encode_scored\) raised KeyError: 'score'; fix the record or "
                                                r"set data.on_error='skip'") as e:
            D.load_records((path,), D.Encoder(TOK, "plain"), "toy_scored", 8, "raise")
        assert "\n" not in str(e.value) and isinstance(e.value.__cause__, KeyError)  # (--debug shows where)
        items, report = D.load_records((path,), D.Encoder(TOK, "plain"), "toy_scored", 8, "skip")
        assert len(items) == 1 and report.rejected == {"encode_error": 1} and report.first == {"encode_error":
                                                                                               "s.jsonl:2"}
    finally:
        C.DATA_KINDS.pop("toy_scored", None)


def test_a_kind_whose_function_cannot_be_imported_is_refused_naming_it(tmp_path):
    C.register_data_kind("toy_missing", C.DataKindSpec("no_such_module_here:encode", "m:collate", keys=C.LM_KEYS))
    try:
        cfg = C.PostDataConfig(train=(write(tmp_path / "w.jsonl", [{"prompt": "a", "completion": "b"}]),),
                               template="plain")
        with pytest.raises(ConfigError, match="cannot import no_such_module_here:encode .*importable") as e:
            D.build_sources(cfg, TOK, "toy_missing", seed=0)
        assert "\n" not in str(e.value)
    finally:
        C.DATA_KINDS.pop("toy_missing", None)


def test_the_objectives_options_reach_the_kinds_batches(tmp_path):
    from lmforge.align.config import KTOConfig

    path = write(tmp_path / "k.jsonl", [{"prompt": "ab", "completion": "cd", "label": True},
                                        {"prompt": "ef", "completion": "gh", "label": False}])
    cfg = C.PostDataConfig(train=(path,), template="plain", seq_len=16, val_fraction=0)
    with_kl = D.build_sources(cfg, TOK, "kto", seed=0)[0].next_batch()
    without = D.build_sources(cfg, TOK, "kto", seed=0, options=KTOConfig(kl=False))[0].next_batch()
    assert "kl_input_ids" in with_kl and not any(k.startswith("kl_") for k in without)
    assert torch.equal(with_kl["input_ids"], without["input_ids"])

    @dataclasses.dataclass(frozen=True)
    class Other:  # another objective's options on the kto kind: its `kl` a coefficient, not KTO's switch
        kl: float = 0.0

    assert "kl_input_ids" in D.build_sources(cfg, TOK, "kto", seed=0, options=Other())[0].next_batch()


def test_an_objective_registers_on_a_registered_kind_only(weighted):
    spec = C.ObjectiveSpec("my_module:Weighted", "toy_weighted_too")
    with pytest.raises(ConfigError, match="data kind 'toy_weighted_too'.*register it first with register_data_kind"):
        C.register_objective("toy_weighted_obj", spec)
    try:
        assert C.register_objective("toy_weighted_obj", C.ObjectiveSpec("my_module:Weighted", weighted))
    finally:
        C.OBJECTIVES.pop("toy_weighted_obj", None)


@pytest.mark.parametrize("name,spec,message", [
    ("sft", WEIGHTED, "data kind 'sft' is already registered"),
    ("my-kind", WEIGHTED, "a Python identifier"),
    ("", WEIGHTED, "a Python identifier"),
    (3, WEIGHTED, "a Python identifier"),
    ("toy_bad", C.ObjectiveSpec("m:C", "sft"), "takes a DataKindSpec, got ObjectiveSpec"),
    ("toy_bad", C.DataKindSpec("my_module.encode", "m:collate", keys=("input_ids",)),
     r"DataKindSpec.encode='my_module.encode' is not 'module:Function'"),
    ("toy_bad", C.DataKindSpec("m:encode", "m:", keys=("input_ids",)), "DataKindSpec.collate='m:' is not"),
    ("toy_bad", C.DataKindSpec("m:encode", "m:collate", keys=("input_ids",), check="check"),
     "DataKindSpec.check='check' is not"),
    ("toy_bad", C.DataKindSpec("m:encode", "m:collate", keys=()), "keys=\\(\\) must be a non-empty tuple"),
    ("toy_bad", C.DataKindSpec("m:encode", "m:collate", keys=["input_ids"]), "must be a non-empty tuple"),
])
def test_bad_registrations_are_refused_in_one_line_naming_the_fix(name, spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        C.register_data_kind(name, spec)
    assert "\n" not in str(e.value) and "toy_bad" not in C.DATA_KINDS
    assert C.DATA_KINDS["sft"].encode == "lmforge.align.data:encode_sft"


def test_a_kind_check_runs_over_each_file_set(tmp_path):
    """preference's check (pair_margins), through the registry: train and val files are checked apart."""
    pair = {"prompt": "a", "chosen": "b", "rejected": "c"}
    train = write(tmp_path / "t.jsonl", [pair, {**pair, "margin": 1.0}])
    with pytest.raises(DataError, match="1 of 2 preference pairs have a 'margin'"):
        D.build_sources(C.PostDataConfig(train=(train,), template="plain"), TOK, "preference", seed=0)
    val = write(tmp_path / "v.jsonl", [{**pair, "margin": math.pi}])
    ok = write(tmp_path / "ok.jsonl", [{**pair, "margin": 0.5}] * 2)
    src, vsrc, _ = D.build_sources(C.PostDataConfig(train=(ok,), val=(val,), template="plain"), TOK, "preference", 0)
    assert vsrc.next_batch()["margin"].tolist() == pytest.approx([math.pi])


def test_a_registered_kinds_functions_are_imported_before_the_model_loads(tmp_path):
    """A typo in a registered kind's path was found only when the run first read data, after loading the model (on
    every rank under --nproc): check_posttrain imports the functions first."""
    from lmforge.train.posttrain import check_posttrain

    for name, spec, message in (
            ("toy_typo", C.DataKindSpec("nomodule_xyz_:encode", f"{__name__}:collate_weighted", keys=C.LM_KEYS),
             "nomodule_xyz_"),
            ("toy_tuple", C.DataKindSpec(f"{__name__}:encode_weighted", "lmforge.align.config:LM_KEYS",
                                         keys=C.LM_KEYS), "DataKindSpec.collate='lmforge.align.config:LM_KEYS' is no "
                                                          "function")):
        C.register_data_kind(name, spec)
        C.register_objective("toy_obj", C.ObjectiveSpec("lmforge.align.sft:SFTObjective", name))
        try:
            cfg = C.PostTrainConfig(objective="toy_obj", init=str(tmp_path / "no_checkpoint_here"))
            with pytest.raises(LmforgeError, match=message) as e:
                check_posttrain(cfg)
            assert "\n" not in str(e.value)
        finally:
            C.OBJECTIVES.pop("toy_obj", None)
            C.DATA_KINDS.pop(name, None)
