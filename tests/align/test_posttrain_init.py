"""Post-training from a model that scores text (a reward model, a critic): refused as the init, teacher or
reference of a language-model objective in one line; `lmforge rm` from a reward model goes on training it."""

import re

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.errors import ConfigError
from lmforge.train import posttrain as PT
from lmforge.train.trainer import Trainer

from . import test_trainer_objectives as post

base = post.base  # the fixture: a tiny pretrained checkpoint and chat / preference JSONL files


@pytest.fixture(scope="module")
def reward_model(base):
    PT.posttrain(post._cfg(base, base / "rm", "rm", max_steps=2, plot=False))
    return base / "rm"


def _chat(base):
    return {"train": [str(base / "chat.jsonl")], "template": "plain", "seq_len": 64, "batch_size": 4}


def test_a_model_that_scores_text_is_refused_as_init_teacher_or_reference(base, reward_model, tmp_path):
    from lmforge.align.value import ValueModel

    with pytest.raises(ConfigError, match="^" + re.escape(
            f"init {reward_model} is a reward model, classifier or critic (SequenceHead: a head on a language "
            "model), which has no next-token logits; give init a language model checkpoint")):
        PT.posttrain(post._cfg(base, tmp_path / "sft", init=str(reward_model)))
    with pytest.raises(ConfigError, match=rf"^the teacher {reward_model} is a reward model, .*; give the teacher a "):
        PT.posttrain(post._cfg(base, tmp_path / "distill", "distill", teacher=str(reward_model), data=_chat(base)))
    with pytest.raises(ConfigError, match=rf"^the reference {reward_model} is a reward model"):
        PT.posttrain(post._cfg(base, tmp_path / "dpo", "dpo", reference=str(reward_model)))
    lm, tok = ckpt.load_model(base / "base")
    critic = ckpt.save_checkpoint(tmp_path / "critic", 1, ValueModel(lm), tokenizer=tok)
    with pytest.raises(ConfigError, match=rf"^init {critic} is a reward model, classifier or critic \(ValueModel"):
        PT.posttrain(post._cfg(base, tmp_path / "rm", "rm", init=str(critic)))
    assert not any((tmp_path / run).exists() for run in ("sft", "distill", "dpo", "rm"))


def test_a_reward_model_goes_on_training_from_a_reward_model_with_its_trained_head(base, reward_model, tmp_path,
                                                                                   monkeypatch):
    from lmforge.align.reward import SequenceHead
    from lmforge.model.transformer import Transformer

    started = []
    with monkeypatch.context() as m:  # the model the run starts from, as the Trainer gets it
        m.setattr(Trainer, "fit", lambda self: started.append(self.model))
        PT.posttrain(post._cfg(base, tmp_path / "a", "rm", init=str(reward_model), plot=False))
    model, saved = started[0], ckpt.load_model(reward_model)[0].state_dict()
    assert type(model) is SequenceHead and type(model.backbone) is Transformer  # not a head on a head
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(t, saved[n]) for n, t in model.state_dict().items())  # the trained head and trunk
    res = PT.posttrain(post._cfg(base, tmp_path / "b", "rm", init=str(reward_model), max_steps=2, plot=False))
    assert res.steps == 2 and type(ckpt.load_model(tmp_path / "b")[0]) is SequenceHead
    lora = {"r": 2, "targets": ["wq"]}
    with pytest.raises(ConfigError, match=rf"^\[lora\] adapters alone cannot be saved over the reward model "
                                          rf"{reward_model} .*; set lora.save = 'full'$"):
        PT.posttrain(post._cfg(base, tmp_path / "c", "rm", init=str(reward_model), lora=lora))
    PT.posttrain(post._cfg(base, tmp_path / "d", "rm", init=str(reward_model), lora={**lora, "save": "full"},
                           max_steps=2, plot=False))
    adapted = ckpt.load_model(tmp_path / "d")[0]
    assert type(adapted) is SequenceHead and type(adapted.backbone) is Transformer
    # [lora] goes on training the reward head (apply_lora keeps a task head trainable; it stayed frozen unless
    # trainable = ["head"] was given), beside the adapters
    assert not torch.equal(adapted.head.weight, saved["head.weight"])


def test_a_run_dir_of_another_objective_is_refused(base, reward_model, tmp_path):
    """A post-training command pointed at a run_dir another objective's checkpoints are in (config.json's
    "objective") is refused in one line before anything is written: it resumed that run with its own loss,
    metrics.jsonl and the final checkpoint a mix of both. The same objective resumes as before."""
    before = sorted(p.name for p in (reward_model / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="^" + re.escape(
            f"run_dir '{reward_model}' holds a rm run (its checkpoints' objective), which `lmforge dpo` would resume "
            f"with another loss; set run_dir to a new directory, or start from that run with init = '{reward_model}'")):
        PT.posttrain(post._cfg(base, reward_model, "dpo", max_steps=3, plot=False))
    assert sorted(p.name for p in (reward_model / "checkpoints").iterdir()) == before


def test_a_pretraining_run_dir_is_refused(base, tmp_path):
    """A pretraining run's checkpoints record no objective: `run_dir` = the init run (a copy here) was taken as
    this run's to resume, past max_steps, and its config.json was overwritten with the SFT run's (found
    2026-12-07). Refused in one line before anything is written."""
    import shutil

    pretrain = tmp_path / "pretrain"
    shutil.copytree(base / "base", pretrain)
    before = {p.name: p.read_bytes() for p in pretrain.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="^" + re.escape(
            f"run_dir '{pretrain}' holds a pretraining run (its checkpoints record no objective), which `lmforge sft` "
            f"would resume with another loss; set run_dir to a new directory, or start from that run with "
            f"init = '{pretrain}'")):
        PT.posttrain(post._cfg(base, pretrain, init=str(pretrain), max_steps=3, plot=False))
    assert {p.name: p.read_bytes() for p in pretrain.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("objective,over,message", [
    ("sft", {"teacher": "T"}, "sft uses no teacher model, so teacher = 'T' would be ignored; remove it"),
    ("orpo", {"reference": "R"}, "orpo uses no reference model, so reference = 'R' would be ignored; remove it"),
    ("dpo", {"teacher": "T"}, "dpo uses no teacher model, so teacher = 'T' would be ignored; remove it"),
    ("dpo", {"reference": "R", "dpo": {"loss_type": "simpo"}},
     "dpo with loss_type='simpo' uses no reference model, so reference = 'R' would be ignored; remove it")])
def test_a_reference_or_teacher_the_objective_never_loads_is_refused(base, tmp_path, objective, over, message):
    """`lmforge sft --teacher X`, `lmforge orpo --reference X` and SimPO's reference trained as if unset, a path
    that does not exist included (found 2026-12-07): refused in one line before the run starts."""
    with pytest.raises(ConfigError, match="^" + re.escape(message) + "$"):
        PT.posttrain(post._cfg(base, tmp_path / "run", objective, **over))
    assert not (tmp_path / "run").exists()


def test_lmforge_rm_with_lora_takes_the_head_as_trainable(base, tmp_path):
    """`lmforge rm --lora.trainable head` (as apply_lora on a SequenceHead takes it) was refused: the head is put on
    after the adapters, so 'head' matched no module of the language model (found 2026-12-07). The fresh head trains
    in full either way: the run equals one without the pattern; a pattern naming nothing is still refused."""
    runs = {}
    for name, trainable in (("named", ["head"]), ("unnamed", [])):
        lora = {"r": 2, "targets": ["wq"], "trainable": trainable}
        PT.posttrain(post._cfg(base, tmp_path / name, "rm", lora=lora, max_steps=2, plot=False))
        runs[name] = ckpt.load_model(tmp_path / name, tokenizer=False)[0].state_dict()
    assert runs["named"].keys() == runs["unnamed"].keys()
    assert all(torch.equal(t, runs["unnamed"][n]) for n, t in runs["named"].items())
    with pytest.raises(ConfigError, match="^trainable pattern 'heads' matches no module of Transformer"):
        PT.posttrain(post._cfg(base, tmp_path / "bad", "rm", lora={"r": 2, "trainable": ["heads"]}))


def test_an_init_with_adapters_over_a_quantized_base_is_refused_naming_resume():
    """A run started from a QLoRA checkpoint merges the init's adapters first, which a quantized base cannot take:
    the error advised 'serve it unmerged, save the adapters alone' (found 2026-12-07); it now says how to train
    those adapters on. A plain LoRA init is still merged."""
    from lmforge.adapt.lora import LoRAConfig, apply_lora, lora_layers

    from ..adapt.test_lora import quantized
    from .helpers import tiny_model

    qlora = apply_lora(quantized(tiny_model(0)), LoRAConfig(r=2, targets=("wq", "up")))
    before = sorted(lora_layers(qlora))
    with pytest.raises(ConfigError, match=r"^the init model's LoRA layer blocks.0.attn.wq is over a quantized base "
                                          r"\(QLoRA\), .*; to train them on, resume the run that wrote them"):
        PT.start_model(qlora, LoRAConfig(r=2, targets=("wv",)), own_reference=False)
    assert sorted(lora_layers(qlora)) == before  # left as it was
    lora = PT.start_model(apply_lora(tiny_model(0), LoRAConfig(r=2, targets=("wq",))), LoRAConfig(r=2, targets=("wv",)),
                          own_reference=False)
    assert [n.rsplit(".", 1)[-1] for n in lora_layers(lora)] == ["wv"] * (len(before) // 2)  # wq merged, wv new
