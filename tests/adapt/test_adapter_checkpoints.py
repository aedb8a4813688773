"""Adapter-only checkpoints of LoRA post-training runs ([lora] save = "adapters", the default): they hold
only what trains and record their base (path + checksum); load_model rebuilds the trained model from them
exactly (also over a base that was itself a LoRA checkpoint, merged), a resume is bit-exact, a moved or
changed base is refused in one line and found again with base= / --base, and a reference, an init and a
2-process (FSDP2) run work from them."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge import checkpoint as ckpt
from lmforge.adapt.lora import LoRALinear
from lmforge.cli import main
from lmforge.errors import CheckpointError, ConfigError
from lmforge.parallel.launch import run_local
from lmforge.train import posttrain as PT
from lmforge.train.trainer import Trainer

from ..align import test_trainer_objectives as post
from ..align.test_trainer_objectives import _cfg, _interrupted_at, _losses

base = post.base  # the fixture: a tiny pretrained checkpoint and chat / preference JSONL files

LORA = {"r": 4, "alpha": 8.0, "targets": ["wq", "wv", "up"], "trainable": ["final_norm"]}
OPTIM = {"lr": 3e-2, "warmup_steps": 1}
IDS = torch.tensor([[104, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])


def _trained(cfg, monkeypatch):
    """posttrain(cfg)'s result and the model its Trainer trained (in memory, as the run ended)."""
    built, init = [], Trainer.__init__

    def keep(self, *a, **k):
        init(self, *a, **k)
        built.append(self)

    monkeypatch.setattr(Trainer, "__init__", keep)
    result = PT.posttrain(cfg)
    monkeypatch.setattr(Trainer, "__init__", init)
    return result, built[0].model.eval()


def _last(run):
    return ckpt.checkpoint_dirs(run)[-1]


def test_an_adapter_checkpoint_holds_what_trains_and_loads_as_the_trained_model(base, tmp_path, monkeypatch):
    """The same SFT run saved both ways: the adapter checkpoint's weights are the trainable tensors (A, B of
    every adapted layer and final_norm), 1/20 of the full file here (megabytes of gigabytes for a 7B
    model); its config.json records the init as base; both load to the in-memory trained model's logits."""
    adapters, policy = _trained(_cfg(base, tmp_path / "a", lora=LORA, optim=OPTIM, max_steps=4, plot=False),
                                monkeypatch)
    full = PT.posttrain(_cfg(base, tmp_path / "f", lora={**LORA, "save": "full"}, optim=OPTIM, max_steps=4,
                             plot=False))
    assert _losses(adapters) == _losses(full)
    # the held-out loss falls (step 0's evaluation is the init's): in 200 runs (100 run seeds; 10 bases x 10 seeds)
    # by 0.027 to 0.13; the last step's training loss against the first's (other rows) rose in 9 of them
    val = [r["val_loss"] for r in adapters.history if "val_loss" in r]
    assert len(val) == 2 and val[1] < val[0]
    small, whole = (_last(tmp_path / r) / "model.safetensors" for r in ("a", "f"))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert set(load_file(small)) == trainable and len(trainable) == 2 * 3 * 2 + 1
    assert set(load_file(whole)) == set(policy.state_dict())
    assert small.stat().st_size * 15 < whole.stat().st_size  # 10 kB of 210 kB
    meta = json.loads((_last(tmp_path / "a") / "config.json").read_text())
    init = ckpt.checkpoint_dirs(base / "base")[-1].resolve()
    assert meta["base"] == {"path": str(init), "sha256": ckpt.checkpoint_identity(init)["sha256"],
                            "merge_lora": False}
    assert "base" not in json.loads((_last(tmp_path / "f") / "config.json").read_text())
    with torch.no_grad():
        expected = policy(IDS)
        for run in ("a", "f"):
            model, tok = ckpt.load_model(tmp_path / run)
            assert torch.equal(model(IDS), expected) and tok.encode("a") == [97]
            assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6
    with pytest.raises(CheckpointError, match="holds only what trained over the base .*: load_model"):
        ckpt.load_weights(ckpt.load_model(base / "base")[0], _last(tmp_path / "a"))
    # the identity of an adapter checkpoint covers its base: another base, another identity
    assert ckpt.checkpoint_identity(tmp_path / "a")["sha256"] != ckpt.checkpoint_identity(tmp_path / "f")["sha256"]


def test_an_adapter_checkpoint_resumes_bit_exactly_and_only_onto_its_base(base, tmp_path, monkeypatch):
    """Interrupted after step 3 (an adapter-only checkpoint), the resumed run gives the uninterrupted losses
    and weights; resuming onto another init, or as a full-checkpoint run, is refused."""
    whole = PT.posttrain(_cfg(base, tmp_path / "a", lora=LORA, optim=OPTIM, max_steps=6, plot=False))
    cfg = _cfg(base, tmp_path / "b", lora=LORA, optim=OPTIM, max_steps=6, plot=False, ckpt_every=100)
    _interrupted_at(3, cfg, monkeypatch)
    assert "base" in json.loads((_last(tmp_path / "b") / "config.json").read_text())
    other = ckpt.save_checkpoint(tmp_path / "other", 1, _shifted(base), tokenizer=ckpt.load_model(base / "base")[1])
    with pytest.raises(ConfigError, match=r"trained adapters over the base .*step_000004 \(sha256 [0-9a-f]{64}, "
                                          r"merge_lora False\), but this run starts from .*other.*; resume from"):
        PT.posttrain(_cfg(base, tmp_path / "b", lora=LORA, optim=OPTIM, max_steps=6, plot=False, init=str(other)))
    with pytest.raises(ConfigError, match="is adapter-only .* but this run saves full checkpoints"):
        PT.posttrain(_cfg(base, tmp_path / "b", lora={**LORA, "save": "full"}, optim=OPTIM, max_steps=6, plot=False))
    assert _losses(PT.posttrain(cfg)) == _losses(whole)
    a, b = (ckpt.load_model(tmp_path / r)[0].state_dict() for r in ("a", "b"))
    assert all(torch.equal(a[n], b[n]) for n in a)


def _shifted(base):
    """The base model with one weight changed."""
    model, _ = ckpt.load_model(base / "base")
    with torch.no_grad():
        model.blocks[0].attn.wk.weight.add_(0.01)
    return model


def test_a_moved_or_changed_base_is_refused_in_one_line_and_found_with_base(base, tmp_path, monkeypatch, capsys):
    """The base is a copy that then moves: load_model names the recorded path and checksum and how to point to
    the base; base= (LLM.load, --base) with the moved copy loads the same model; other weights are refused,
    given as base= or put in the recorded place."""
    from lmforge.infer.llm import LLM

    shutil.copytree(base / "base", tmp_path / "init")
    _, policy = _trained(_cfg(base, tmp_path / "a", lora=LORA, optim=OPTIM, max_steps=2, plot=False,
                              init=str(tmp_path / "init")), monkeypatch)
    record = json.loads((_last(tmp_path / "a") / "config.json").read_text())["base"]
    (tmp_path / "init").rename(tmp_path / "moved")
    with pytest.raises(CheckpointError) as err:
        ckpt.load_model(tmp_path / "a")
    msg = str(err.value)
    assert "\n" not in msg and msg == (f"{_last(tmp_path / 'a')} holds adapters over the base {record['path']} "
                                       f"(sha256 {record['sha256']}), which is missing; pass its "
                                       "current location: load_model(path, base=DIR), LLM.load(path, base=DIR) or "
                                       "--base DIR (lmforge sample | generate | chat | export), or record it once: "
                                       "lmforge.checkpoint.rebase(path, DIR)")
    with torch.no_grad():
        assert torch.equal(ckpt.load_model(tmp_path / "a", base=tmp_path / "moved")[0](IDS), policy(IDS))
        assert torch.equal(LLM.load(tmp_path / "a", base=str(tmp_path / "moved")).model(IDS), policy(IDS))
    argv = ["sample", "--checkpoint", str(tmp_path / "a"), "--prompt", "he", "--max-tokens", "3", "--temperature", "0"]
    capsys.readouterr()
    assert main(argv) == 2 and "which is missing; pass its current location" in capsys.readouterr().err
    assert main([*argv, "--base", str(tmp_path / "moved")]) == 0
    assert capsys.readouterr().out.startswith("--- sample 1/1")

    changed = ckpt.save_checkpoint(tmp_path / "changed", 4, _shifted(base))
    sha = ckpt.checkpoint_identity(changed)["sha256"]
    with pytest.raises(CheckpointError, match=rf"^\S+ holds adapters over the base \S+ \(sha256 {record['sha256']}\), "
                                              rf"but \S+changed\S* has other weights \(sha256 {sha}\); restore that "
                                              r"base or pass its current location"):
        ckpt.load_model(tmp_path / "a", base=changed)
    shutil.copytree(changed.parent.parent, tmp_path / "init")  # other weights where the base was
    with pytest.raises(CheckpointError, match=rf"but {record['path']} has other weights"):
        ckpt.load_model(tmp_path / "a")
    with pytest.raises(CheckpointError, match=r"which is not at \S+nowhere; pass"):
        ckpt.load_model(tmp_path / "a", base=tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="holds all its weights .*leave base out"):
        ckpt.load_model(tmp_path / "moved", base=tmp_path / "moved")
    # rebase records the new place once: every reader then finds it (the identity, made of checksums, stays)
    identity = ckpt.checkpoint_identity(tmp_path / "a")["sha256"]
    with pytest.raises(CheckpointError, match="other weights .* than the base"):
        ckpt.rebase(tmp_path / "a", changed)
    with pytest.raises(ConfigError, match="nothing to rebase"):
        ckpt.rebase(tmp_path / "moved", tmp_path / "moved")
    assert ckpt.rebase(tmp_path / "a", tmp_path / "moved") == _last(tmp_path / "a")
    moved = json.loads((_last(tmp_path / "a") / "config.json").read_text())["base"]
    assert moved == {**record, "path": str(ckpt.resolve_checkpoint(tmp_path / "moved").resolve())}
    assert ckpt.checkpoint_identity(tmp_path / "a")["sha256"] == identity
    assert sorted(p.name for p in _last(tmp_path / "a").parent.iterdir()) == [_last(tmp_path / "a").name]
    with torch.no_grad():  # (the manifest was rewritten: load_model verifies every checksum)
        assert torch.equal(ckpt.load_model(tmp_path / "a")[0](IDS), policy(IDS))


def test_adapter_checkpoints_serve_as_init_and_reference_and_chain(base, tmp_path, monkeypatch):
    """A LoRA SFT run's adapter checkpoint is the init and the reference of a DPO run (the same model: the
    first loss is log 2), and the init of a LoRA DPO run, whose adapter checkpoint records that init as a
    base to merge and loads back to its trained model."""
    from lmforge.align.frozen import weights_checksum

    PT.posttrain(_cfg(base, tmp_path / "sft", lora=LORA, optim=OPTIM, max_steps=3, plot=False))
    sft = str(tmp_path / "sft")
    dpo = PT.posttrain(_cfg(base, tmp_path / "dpo", "dpo", init=sft, reference=sft, max_steps=2, plot=False))
    assert _losses(dpo)[0] == pytest.approx(math.log(2), abs=1e-6)
    state = ckpt.load_train_state(_last(tmp_path / "dpo"))
    assert state["objective"]["reference"]["checksum"] == weights_checksum(ckpt.load_model(sft)[0])

    lora = {"r": 2, "alpha": 4.0, "targets": ["wq", "wv"]}
    _, policy = _trained(_cfg(base, tmp_path / "chain", "dpo", init=sft, lora=lora, optim=OPTIM, max_steps=2,
                              plot=False), monkeypatch)
    record = json.loads((_last(tmp_path / "chain") / "config.json").read_text())["base"]
    assert record == {"path": str(_last(tmp_path / "sft").resolve()),
                      "sha256": ckpt.checkpoint_identity(sft)["sha256"], "merge_lora": True}
    model, _ = ckpt.load_model(tmp_path / "chain")
    with torch.no_grad():
        assert torch.equal(model(IDS), policy(IDS))
    # the SFT adapters as a PEFT directory (lmforge export --adapter) are an init too, recorded as the base
    assert main(["export", sft, str(tmp_path / "peft"), "--adapter"]) == 0
    _, policy = _trained(_cfg(base, tmp_path / "from_peft", "dpo", init=str(tmp_path / "peft"), lora=lora,
                              optim=OPTIM, max_steps=2, plot=False), monkeypatch)
    record = json.loads((_last(tmp_path / "from_peft") / "config.json").read_text())["base"]
    assert record == {"path": str((tmp_path / "peft").resolve()), "merge_lora": True,
                      "sha256": ckpt.checkpoint_identity(tmp_path / "peft")["sha256"]}
    peft_sum, base_sum = (ckpt.checkpoint_identity(tmp_path / p)["sha256"] for p in ("peft", "peft/base"))
    assert peft_sum != base_sum  # a PEFT directory's identity covers its adapters and its base
    with torch.no_grad():
        assert torch.allclose(ckpt.load_model(tmp_path / "from_peft")[0](IDS), policy(IDS), atol=1e-6)


def test_a_reward_model_with_lora_saves_its_head_with_the_adapters(base, tmp_path, monkeypatch):
    """`lmforge rm` with [lora]: the new scalar head trains and is saved with the adapters; load_model
    rebuilds the SequenceHead over the base with the same scores."""
    _, rm = _trained(_cfg(base, tmp_path / "rm", "rm", lora={"r": 2, "targets": ["wq"]}, max_steps=2, plot=False),
                     monkeypatch)
    saved = load_file(_last(tmp_path / "rm") / "model.safetensors")
    assert {n for n in saved if not n.endswith((".lora_A", ".lora_B"))} == {n for n, _ in rm.head.named_parameters(
        prefix="head")}
    model, _ = ckpt.load_model(tmp_path / "rm")
    with torch.no_grad():
        assert torch.equal(model(IDS), rm(IDS))


def _fsdp_worker(rank: int, world: int, base: str, run: str) -> list[float]:
    cfg = _cfg(Path(base), run, lora=LORA, optim=OPTIM, max_steps=4, plot=False, ckpt_every=2,
               parallel={"dp_shard": 2})
    return _losses(PT.posttrain(cfg))


def test_two_fsdp_processes_write_adapter_checkpoints_that_resume_in_two_and_in_one(base, tmp_path, capfd):
    """Under FSDP2 on 2 gloo processes rank 0 writes the gathered adapter tensors alone; the step-2 checkpoint
    resumes on 2 processes (each rank loads the adapters into its shards, keeping its frozen base) and in one,
    both to the one-process curve (1e-4: see tests/align/test_posttrain_parallel.py)."""
    one = _losses(PT.posttrain(_cfg(base, tmp_path / "one", lora=LORA, optim=OPTIM, max_steps=4, plot=False)))
    run = tmp_path / "two"
    assert run_local(_fsdp_worker, 2, str(base), str(run), timeout=120, start_method="fork")[0] == pytest.approx(
        one, abs=1e-4)
    saved = load_file(_last(run) / "model.safetensors")
    assert set(saved) == set(load_file(_last(tmp_path / "one") / "model.safetensors")) and len(saved) == 13
    for resume in ("two", "one"):
        shutil.rmtree(_last(run))  # back to step 2
        if resume == "two":
            resumed = run_local(_fsdp_worker, 2, str(base), str(run), timeout=120, start_method="fork")[0]
        else:
            resumed = _losses(PT.posttrain(_cfg(base, run, lora=LORA, optim=OPTIM, max_steps=4, plot=False)))
        assert resumed == pytest.approx(one, abs=1e-4), resume  # steps 1-2 as run, 3-4 resumed
        assert "step_000002 at step 2" in capfd.readouterr().out


def _fsdp_ac_worker(rank: int, world: int, base: str, run: str) -> list[float]:
    cfg = _cfg(Path(base), run, lora=LORA, optim=OPTIM, max_steps=2, plot=False, ckpt_every=2,
               parallel={"dp_shard": 2, "activation_checkpoint": "full"})
    return _losses(PT.posttrain(cfg))


def test_two_fsdp_processes_with_activation_checkpointing_write_an_adapter_checkpoint_that_opens(base, tmp_path):
    """A LoRA run on 2 processes with parallel.activation_checkpoint recorded its adapters under the wrapper's names
    ('blocks.0._checkpoint_wrapped_module.attn.wq') and saved the whole model as 'adapter-only' (31 tensors): its
    checkpoint did not open (AttributeError: Block has no attribute `_checkpoint_wrapped_module`). It records the
    state_dict's names and holds the 13 tensors a run without the wrapper holds."""
    run = tmp_path / "ac"
    run_local(_fsdp_ac_worker, 2, str(base), str(run), timeout=120, start_method="fork")
    path = _last(run)
    assert sorted(json.loads((path / "config.json").read_text())["lora"]) == [
        f"blocks.{i}.{n}" for i in (0, 1) for n in ("attn.wq", "attn.wv", "mlp.up")]
    assert len(load_file(path / "model.safetensors")) == 13
    model, _ = ckpt.load_model(path, tokenizer=False)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 6


def test_an_adapter_checkpoint_leaves_out_exactly_what_its_base_gives(tmp_path):
    """What an adapter-only checkpoint leaves out is what its base checkpoint gives back, nothing else: a
    PolicyAndCritic over a LoRA policy saves its critic whole, frozen or not (its unread lm_head, the trunk with
    train_backbone=False: in no other file), and load_model rebuilds both trunks exactly."""
    from lmforge.adapt.lora import LoRAConfig, adapter_names, apply_lora
    from lmforge.align.value import PolicyAndCritic, ValueModel

    from ..adapt.test_lora import randomise_b
    from ..align.helpers import tiny_model

    ids = torch.randint(0, 41, (2, 7), generator=torch.Generator().manual_seed(0))
    base = ckpt.save_checkpoint(tmp_path / "base", 0, tiny_model(0))
    for train_backbone in (True, False):
        ac = PolicyAndCritic(apply_lora(tiny_model(0), LoRAConfig(r=2, alpha=4, targets=("wq", "wv"))),
                             ValueModel(tiny_model(1), train_backbone=train_backbone))
        randomise_b(ac)
        path = ckpt.save_checkpoint(tmp_path / f"ac_{train_backbone}", 1, ac, base=ckpt.base_record(base))
        saved = set(load_file(path / "model.safetensors"))
        assert {n for n in saved if n.startswith("backbone.")} == {f"backbone.{n}" for n in adapter_names(ac.backbone)}
        assert {n for n in ac.state_dict() if n.startswith("critic.")} - saved <= {"critic.backbone.lm_head.weight"}
        model, _ = ckpt.load_model(path)
        with torch.no_grad():
            got, want = model.policy_and_values(ids), ac.eval().policy_and_values(ids)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    # one written before (every frozen parameter left out, "leaves_out" not recorded) still resumes, onto the
    # model the run builds; load_model, which has no critic of its own, still refuses it
    from safetensors.torch import save_file

    frozen = {n for n, p in ac.named_parameters(remove_duplicate=False) if not p.requires_grad}
    save_file({n: t for n, t in load_file(path / "model.safetensors").items() if n not in frozen},
              str(path / "model.safetensors"))
    meta = json.loads((path / "config.json").read_text())
    del meta["leaves_out"]
    (path / "config.json").write_text(json.dumps(meta))
    ckpt._seal(path)
    ckpt.load_weights(ac, path, set(ac.state_dict()) - ckpt.frozen_names(ac))
    with pytest.raises(CheckpointError, match=r"missing \['critic.backbone"):
        ckpt.load_model(path)


def test_an_adapter_checkpoint_of_a_quantized_base_holds_the_adapters_alone(tmp_path):
    """QLoRA: the quantized base's codes and scales are buffers, which the base checkpoint holds; an
    adapter-only checkpoint leaves them out (it holds A and B alone), and a resume finds every tensor it needs."""
    from lmforge.adapt.lora import LoRAConfig, adapter_names, apply_lora

    from ..adapt.test_lora import quantized, randomise_b
    from ..align.helpers import tiny_model

    qbase = ckpt.save_checkpoint(tmp_path / "qbase", 0, quantized(tiny_model(0), ("wq", "wk", "wv")))
    cfg = LoRAConfig(r=2, alpha=4, targets=("wq", "wv"))
    model = apply_lora(quantized(tiny_model(0), ("wq", "wk", "wv")), cfg)
    randomise_b(model)
    path = ckpt.save_checkpoint(tmp_path / "q", 1, model, base=ckpt.base_record(qbase))
    assert set(load_file(path / "model.safetensors")) == adapter_names(model)
    resumed = apply_lora(quantized(tiny_model(0), ("wq", "wk", "wv")), cfg)  # as a Trainer's resume loads it
    ckpt.load_weights(resumed, path, set(resumed.state_dict()) - ckpt.frozen_names(resumed))
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), model.state_dict().values()))


def test_an_activation_checkpointed_lora_models_checkpoints_name_its_layers_as_its_state_dict(tmp_path):
    """Under activation checkpointing (lmforge.parallel.ac: a `--nproc` run's parallel.activation_checkpoint) the
    module names hold the wrapper's `_checkpoint_wrapped_module` part and the state_dict's do not. The LoRA record
    named the layers with it, so load_model could not find them (AttributeError, then 'not a Linear layer'), and
    an adapter-only checkpoint found none of the base's tensors frozen and held the whole model. Both use the
    state_dict's names now (lmforge.model.surgery.state_dict_name): the checkpoints are the unwrapped model's."""
    import copy

    from lmforge.adapt.lora import LoRAConfig, adapter_names, apply_lora, lora_record
    from lmforge.parallel.ac import apply_ac

    from ..adapt.test_lora import randomise_b
    from ..align.helpers import tiny_model

    ids = torch.randint(0, 41, (2, 7), generator=torch.Generator().manual_seed(0))
    base = ckpt.save_checkpoint(tmp_path / "base", 0, tiny_model(0))
    plain = apply_lora(tiny_model(0), LoRAConfig(r=2, alpha=4, targets=("wq", "wv")))
    randomise_b(plain)
    model = apply_ac(copy.deepcopy(plain), "full")
    assert "blocks.0._checkpoint_wrapped_module.attn.wq" in dict(model.named_modules())
    assert lora_record(model) == lora_record(plain) == {"blocks.0.attn.wq": [2, 2.0], "blocks.0.attn.wv": [2, 2.0]}
    assert ckpt.frozen_names(model) == ckpt.frozen_names(plain) != set()
    whole = ckpt.save_checkpoint(tmp_path / "whole", 1, model)
    adapters = ckpt.save_checkpoint(tmp_path / "adapters", 1, model, base=ckpt.base_record(base))
    assert set(load_file(adapters / "model.safetensors")) == adapter_names(plain)
    for path in (whole, adapters):
        loaded, _ = ckpt.load_model(path, tokenizer=False)
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids), plain.eval()(ids), rtol=0, atol=0)
