"""What a post-training run takes from its objective and init when the config leaves it open: dropout (off for
DPO/KTO/ORPO/RM/distillation as TRL's trainers, kept for SFT; disable_dropout overrides), the chat template (the
init's recorded one, else chatml or plain as the tokenizer allows), and a warning for a data.seq_len past the
init's max_seq_len (as pretraining's)."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.model.dropout import set_dropout
from lmforge.model.layers.attention import AttnSpec
from lmforge.model.transformer import Transformer
from lmforge.tokenizer.bpe import Tokenizer
from lmforge.tokenizer.byte import ByteTokenizer
from lmforge.train import posttrain as PT
from lmforge.train.trainer import Trainer

from . import test_trainer_objectives as post
from .helpers import tiny_model

base = post.base  # the fixture: a tiny pretrained checkpoint and chat / preference JSONL files


def _resaved(base, where, dropout=0.0, extra=None):
    """base's pretrained model saved again under `where` with model.dropout and extra config.json facts."""
    model, tok = ckpt.load_model(base / "base")
    again = Transformer(dataclasses.replace(model.cfg, dropout=dropout))
    again.load_state_dict(model.state_dict())
    ckpt.save_checkpoint(where, 4, again, tokenizer=tok, extra=extra)
    return where


@pytest.fixture(scope="module")
def dropped(base):
    """base's model at model.dropout = 0.1 (an init pretrained with dropout)."""
    return _resaved(base, base / "dropped", dropout=0.1)


def _dropouts(model) -> set[float]:
    """Every dropout probability of the model: its nn.Dropout modules' and attention's on its weights."""
    return ({m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
            | {m.train_spec.dropout for m in model.modules() if isinstance(getattr(m, "train_spec", None), AttnSpec)})


def _started(monkeypatch, cfg):
    """The model a run hands the Trainer (fit not run)."""
    got = []
    with monkeypatch.context() as m:
        m.setattr(Trainer, "fit", lambda self: got.append(self.model))
        PT.posttrain(cfg)
    return got[0]


@pytest.mark.parametrize("attention, per_block", [("mha", 3), ("mla", 2)])  # (MLA has no dropout on its output)
def test_set_dropout_switches_off_every_dropout_attention_weights_included(attention, per_block):
    model = tiny_model(dropout=0.5, attention=attention, n_layers=2).train()
    ids = torch.randint(0, 41, (2, 12))
    with torch.no_grad():
        reference = model.eval()(ids)
        assert not torch.allclose(model.train()(ids), reference)
        assert set_dropout(model, 0.0) == 1 + per_block * 2  # embeddings; per block attention weights, output, MLP
        assert torch.allclose(model(ids), reference, atol=1e-6)  # in train mode: nothing dropped
    assert _dropouts(model) == {0.0} and model.cfg.dropout == 0.5  # the config (what checkpoints save) is kept


def test_dpo_switches_dropout_off_its_first_loss_is_log_2_and_checkpoints_keep_the_init_dropout(base, dropped,
                                                                                               tmp_path):
    run = PT.posttrain(post._cfg(base, tmp_path / "dpo", "dpo", init=str(dropped), max_steps=1, plot=False))
    # policy == reference at step 1: both rewards 0, loss -log sigmoid(0) (with dropout on: 0.69137)
    assert abs(post._losses(run)[0] - math.log(2)) < 1e-6
    assert ckpt.load_model(tmp_path / "dpo")[0].cfg.dropout == 0.1
    kept = PT.posttrain(post._cfg(base, tmp_path / "kept", "dpo", init=str(dropped), max_steps=1, plot=False,
                                  disable_dropout=False))
    assert abs(post._losses(kept)[0] - math.log(2)) > 1e-4


@pytest.mark.parametrize("objective, option, want", [
    ("sft", None, {0.1}),  # TRL's SFTTrainer keeps the model's dropout
    ("sft", True, {0.0}),
    ("orpo", None, {0.0}), ("rm", None, {0.0}), ("kto", None, {0.0}), ("distill", None, {0.0}),
    ("rm", False, {0.1}),
])
def test_each_objective_takes_trls_dropout_default_unless_told(base, dropped, tmp_path, monkeypatch, objective,
                                                               option, want):
    over = {"teacher": str(base / "base")} if objective == "distill" else {}
    if objective == "kto":
        over["data"] = {**post._cfg(base, tmp_path, "kto").data.__dict__, "train": [str(base / "unpaired.jsonl")]}
    if objective in ("sft", "distill"):
        over["data"] = {**post._cfg(base, tmp_path, "sft").data.__dict__, "train": [str(base / "chat.jsonl")]}
    cfg = post._cfg(base, tmp_path / "run", objective, init=str(dropped), disable_dropout=option, plot=False,
                   **over)
    assert _dropouts(_started(monkeypatch, cfg)) == want


def test_a_resumed_dpo_run_trains_without_dropout_as_it_started(base, dropped, tmp_path):
    def run(where, steps):
        return PT.posttrain(post._cfg(base, where, "dpo", init=str(dropped), max_steps=steps, ckpt_every=1,
                                      plot=False))

    whole = post._losses(run(tmp_path / "whole", 2))
    run(tmp_path / "split", 1)
    assert post._losses(run(tmp_path / "split", 2)) == whole  # (its history: step 1's row, then the resumed step 2)


def test_disable_dropout_is_an_option_of_each_command():
    out = subprocess.run([sys.executable, "-m", "lmforge", "dpo", "--help"], capture_output=True, text=True,
                         cwd=post.REPO, timeout=120)
    assert "--disable-dropout {None,True,False}" in out.stdout and "TRL" in out.stdout


def test_a_seq_len_past_the_init_models_max_seq_len_warns_as_pretraining_does(base, tmp_path, monkeypatch):
    data = {**post._cfg(base, tmp_path, "sft").data.__dict__, "seq_len": 128}
    with pytest.warns(UserWarning, match=r"^data.seq_len=128 exceeds the init model's max_seq_len=64: the model "
                                         r"trains on 128-token windows, but its checkpoints serve a 64-token context; "
                                         r"lower data.seq_len to 64"):
        _started(monkeypatch, post._cfg(base, tmp_path / "run", "sft", data=data, plot=False))


def _template_cfg(base, run, init, template=""):
    data = {**post._cfg(base, run, "sft").data.__dict__, "template": template}
    return post._cfg(base, run, "sft", init=str(init), data=data, max_steps=1, plot=False)


CHATML_TOK = Tokenizer({i: bytes([i]) for i in range(256)}, [],
                       special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
"""a tokenizer with chatml's markers as special tokens (the byte tokenizer has none)"""


def _template(cfg, tok=CHATML_TOK):
    return PT.run_template(cfg, tok, ckpt.recorded_chat_template(cfg.init))


def test_the_template_defaults_to_the_one_the_init_recorded_else_chatml(base, tmp_path):
    plain = _resaved(base, tmp_path / "plain", extra={"chat_template": "plain"})
    assert _template(_template_cfg(base, tmp_path / "a", base / "base")) == "chatml"  # none recorded
    assert _template(_template_cfg(base, tmp_path / "a", base / "base"), ByteTokenizer()) == "plain"  # no markers
    assert _template(_template_cfg(base, tmp_path / "b", plain)) == "plain"
    assert _template(_template_cfg(base, tmp_path / "c", plain, "chatml")) == "chatml"  # given: it wins
    # the byte tokenizer has no chatml markers: a run from `plain` trains on its template and records it
    PT.posttrain(_template_cfg(base, tmp_path / "run", plain))
    saved = json.loads((ckpt.checkpoint_dirs(tmp_path / "run")[-1] / "config.json").read_text())
    assert saved["chat_template"] == "plain" and ckpt.recorded_chat_template(tmp_path / "run") == "plain"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["data"]["template"] == ""


def test_sft_from_a_byte_tokenizer_pretrain_without_a_recorded_template_trains_plain(base, tmp_path, capsys):
    """No template given or recorded: chatml where the tokenizer has its markers as special tokens, else plain
    (lmforge.infer.chat_template.choose_template, as `lmforge chat`). It was chatml always, which the byte
    tokenizer refuses ("chat template 'chatml' uses <|im_start|> but the tokenizer encodes it as 12 tokens")."""
    assert ckpt.recorded_chat_template(base / "base") is None
    PT.posttrain(_template_cfg(base, tmp_path / "run", base / "base"))
    assert "this tokenizer has no chatml special tokens: using the plain template" in capsys.readouterr().out
    saved = json.loads((ckpt.checkpoint_dirs(tmp_path / "run")[-1] / "config.json").read_text())
    assert saved["chat_template"] == "plain" and ckpt.recorded_chat_template(tmp_path / "run") == "plain"


def test_a_resumed_run_keeps_the_template_its_checkpoints_recorded(base, tmp_path):
    plain = _resaved(base, tmp_path / "plain", extra={"chat_template": "plain"})
    _resaved(base, tmp_path / "run", extra={"chat_template": "chatml", "objective": "sft"})  # begun under chatml
    assert _template(_template_cfg(base, tmp_path / "run", plain)) == "chatml"
    fresh = dataclasses.replace(_template_cfg(base, tmp_path / "run", plain), resume=False)
    assert _template(fresh) == "plain"
