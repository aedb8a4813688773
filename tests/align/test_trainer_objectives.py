"""Post-training on the one Trainer: `lmforge sft` end to end (run dir, LLM.load), exact resume, and an
objective with a reference model resolved through the registry (preference batches, identity saved)."""

import dataclasses
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.align.sft import model_logits
from lmforge.align.logprobs import sequence_logprobs
from lmforge.train import posttrain as PT
from lmforge.train.data import PROBE

from .helpers import post_base

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny byte-level model pretrained for a few steps, and chat / preference JSONL files."""
    return post_base(tmp_path_factory.mktemp("post"))


def _toml(base, run, objective="sft", max_steps=12, extra=""):
    return f"""
init = "{base / 'base'}"
run_dir = "{run}"
max_steps = {max_steps}
eval_every = 6
eval_batches = 2
log_every = 1
ckpt_every = 6
device = "cpu"
progress = false
seed = 0
{extra}
[optim]
lr = 3e-3
warmup_steps = 2
[data]
train = ["{base / ('chat.jsonl' if objective == 'sft' else 'pairs.jsonl')}"]
template = "plain"
seq_len = 64
batch_size = 4
val_fraction = 0.25
"""


def _cfg(base, run, objective="sft", **over):
    from lmforge.config import from_dict
    import tomllib

    data = tomllib.loads(_toml(base, run, objective))
    data.update(over)
    return from_dict(PT.config_class(objective), data)


def _losses(result):
    return [r["loss"] for r in result.history if "loss" in r]


def test_lmforge_sft_command_end_to_end(base, tmp_path):
    (tmp_path / "sft.toml").write_text(_toml(base, tmp_path / "run") + "[sft]\nneftune_alpha = 5.0\n")
    out = subprocess.run([sys.executable, "-m", "lmforge", "sft", "--config", str(tmp_path / "sft.toml"),
                          "--max_steps", "8"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "data: 48 records: 48 used (12 held out for validation), 0 truncated" in out.stdout
    assert "done: 8 steps" in out.stdout
    run = tmp_path / "run"
    assert [p.name for p in ckpt.checkpoint_dirs(run)] == ["step_000006", "step_000008"]
    meta = json.loads((ckpt.checkpoint_dirs(run)[-1] / "config.json").read_text())
    assert meta["objective"] == "sft" and meta["chat_template"] == "plain"
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["sft"]["neftune_alpha"] == 5.0 and saved["max_steps"] == 8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in rows) and any("mean_token_accuracy" in r for r in rows)
    from lmforge.infer.llm import LLM

    llm = LLM.load(run)
    assert llm.model.cfg.d_model == 32 and llm.tokenizer.encode("a") == [97]


def _interrupted_at(step: int, cfg, monkeypatch) -> None:
    """posttrain(cfg) stopped by a Ctrl-C right after `step` (a hook on the Trainer it builds)."""
    from lmforge.train.trainer import Trainer

    class Stop:
        def on_step_end(self, trainer, stats):
            if trainer.step == step:
                raise KeyboardInterrupt

    init = Trainer.__init__

    def with_hook(self, *a, **k):
        init(self, *a, **k)
        self.hooks.append(Stop())

    monkeypatch.setattr(Trainer, "__init__", with_hook)
    with pytest.raises(KeyboardInterrupt):
        PT.posttrain(cfg)
    monkeypatch.setattr(Trainer, "__init__", init)


def test_sft_learns_and_resumes_bit_exactly(base, tmp_path, monkeypatch):

    full = PT.posttrain(_cfg(base, tmp_path / "a", plot=False))
    evals = [r["val_loss"] for r in full.history if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.5  # the assistant answers are being learned
    cfg = _cfg(base, tmp_path / "b", plot=False, ckpt_every=100)
    _interrupted_at(5, cfg, monkeypatch)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "b")] == ["step_000005"]
    assert _losses(PT.posttrain(cfg)) == _losses(full)


@dataclass(frozen=True, kw_only=True)
class MarginConfig:
    beta: float = 0.5


class MarginObjective:
    """A DPO-shaped test objective: -logsigmoid(beta * (policy - reference) margin)."""

    Config = MarginConfig
    built: list = []

    def __init__(self, cfg=None, *, reference=None, reference_path=None):
        self.cfg, self.ref, self.path = cfg, reference.eval().requires_grad_(False), reference_path
        MarginObjective.built.append(self)

    def _logps(self, model, batch):
        return [sequence_logprobs(model_logits(model, batch, p), batch[p + "targets"], batch[p + "loss_mask"])
                for p in ("chosen_", "rejected_")]

    def loss(self, model, batch):
        pc, pr = self._logps(model, batch)
        with torch.no_grad():
            rc, rr = self._logps(self.ref, batch)
        margin = self.cfg.beta * ((pc - rc) - (pr - rr))
        return -torch.nn.functional.logsigmoid(margin).mean(), {"rewards/margins": margin.detach().mean()}

    def state_dict(self):
        return {"reference": ckpt.checkpoint_identity(self.path)}

    def load_state_dict(self, state):
        assert state["reference"] == ckpt.checkpoint_identity(self.path)


def test_a_registered_objective_gets_its_reference_and_preference_batches(base, tmp_path, monkeypatch):
    monkeypatch.setitem(PT.OBJECTIVES, "dpo", PT.ObjectiveSpec(f"{__name__}:MarginObjective", "preference"))
    MarginObjective.built.clear()
    cfg = _cfg(base, tmp_path / "run", "dpo", dpo={"beta": 0.25}, max_steps=6, plot=True)
    res = PT.posttrain(cfg)
    obj = MarginObjective.built[-1]
    assert obj.cfg.beta == 0.25 and obj.path == str(base / "base")
    policy, _ = ckpt.load_model(tmp_path / "run")
    ref, _ = ckpt.load_model(base / "base")
    assert all(torch.equal(a, b) for a, b in zip(obj.ref.parameters(), ref.parameters()))  # untouched
    assert not all(torch.equal(a, b) for a, b in zip(policy.parameters(), ref.parameters()))
    margins = [r["rewards/margins"] for r in res.history if "rewards/margins" in r]
    assert margins[-1] > margins[0] and (tmp_path / "run" / "metrics.png").is_file()
    state = ckpt.load_train_state(ckpt.checkpoint_dirs(tmp_path / "run")[-1])
    assert state["objective"]["reference"]["path"].endswith("step_000004")  # identity, not weights
    assert not any(k.startswith("ref") for k in state) and "optimizer_name" in state


@pytest.mark.parametrize("name", ["kto", "orpo"])
def test_lmforge_kto_and_orpo_commands_train_and_chat_reads_the_template(name, base, tmp_path):
    """`lmforge kto` (unpaired labelled completions) and `lmforge orpo` (pairs, no reference) run end to end
    like the other objectives; `lmforge chat` then defaults to the template the run recorded."""
    from lmforge.cli import main
    from lmforge.checkpoint import recorded_chat_template as saved_template

    data = base / "pairs.jsonl"
    if name == "kto":
        data = tmp_path / "unpaired.jsonl"
        rows = [json.loads(line) for line in (base / "pairs.jsonl").read_text().splitlines()]
        data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[side], "label": side == "chosen"})
                                + "\n" for r in rows for side in ("chosen", "rejected")))
    toml = _toml(base, tmp_path / "run", "dpo", max_steps=6).replace(str(base / "pairs.jsonl"), str(data))
    (tmp_path / f"{name}.toml").write_text(toml)
    assert main([name, "--config", str(tmp_path / f"{name}.toml"), "--plot", "False"]) == 0
    meta = json.loads((ckpt.checkpoint_dirs(tmp_path / "run")[-1] / "config.json").read_text())
    assert meta["objective"] == name
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 6 and all(map(math.isfinite, losses))
    assert saved_template(str(tmp_path / "run")) == "plain" and saved_template(str(base / "base")) is None


def test_every_objective_reports_its_validation_loss_and_bad_setups_stop_before_the_data(base, tmp_path, capsys):
    """ObjectiveEvaluator reports the objective's own loss as val_loss (DPO has no 'loss' metric of its own);
    a tokenizer larger than the model and a distillation without a teacher are refused before any file is
    written; validation records dropped with on_error='skip' are counted in the report."""
    from lmforge.errors import ConfigError

    res = PT.posttrain(_cfg(base, tmp_path / "dpo", "dpo", max_steps=2, eval_every=2, plot=False))
    assert res.final_val_loss is not None and math.isfinite(res.final_val_loss)
    big = tmp_path / "big_tok.json"
    from lmforge.tokenizer.byte import ByteTokenizer
    ByteTokenizer([f"<x{i}>" for i in range(300)]).save(big)
    with pytest.raises(ConfigError, match="tokenizer has 556 tokens but the init model's vocab_size is 257"):
        PT.posttrain(_cfg(base, tmp_path / "v", tokenizer=str(big)))
    with pytest.raises(ConfigError, match="distill needs a teacher model"):
        PT.posttrain(_cfg(base, tmp_path / "d", "distill"))
    assert not (tmp_path / "v").exists() and not (tmp_path / "d").exists()
    val = tmp_path / "val.jsonl"
    good = (base / "chat.jsonl").read_text().splitlines()[:3]
    val.write_text("\n".join(good + ["not json", '{"text": "no messages"}']) + "\n")
    cfg = _cfg(base, tmp_path / "s", max_steps=1, plot=False)
    PT.posttrain(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val=(str(val),), on_error="skip")))
    report = json.loads((tmp_path / "s" / "data_report.json").read_text())
    assert report["val"]["records"] == 5 and report["val"]["used"] == 3
    assert report["val"]["rejected"] == {"bad_json": 1, "unknown_format": 1}
    assert "validation files: 5 records: 3 used" in capsys.readouterr().out


def test_lmforge_dpo_with_lora_trains_adapters_against_the_base_and_resumes(base, tmp_path, monkeypatch):
    """[lora] on a DPO run: only the adapters train; the reference is the init model as the policy with its
    adapters off (no second model loaded), so the first loss is log 2 (B = 0: policy = base); the
    checkpoints record the adapters (load_model opens them) and an interrupted run resumes bit-exactly."""
    from lmforge.adapt.lora import LoRAConfig, LoRALinear
    from lmforge.align.frozen import weights_checksum
    from lmforge.cli.common import parse_config
    from lmforge.errors import ConfigError

    toml = tmp_path / "dpo.toml"
    toml.write_text(_toml(base, tmp_path / "cli", "dpo") + "[lora]\nr = 4\ntargets = ['wq', 'wv']\n")
    parsed = parse_config(PT.config_class("dpo"), ["--config", str(toml), "--lora.alpha", "4"], prog="t",
                          description="")
    assert parsed.lora == LoRAConfig(r=4, alpha=4.0, targets=("wq", "wv"))
    load, loaded = ckpt.load_model, []
    monkeypatch.setattr(ckpt, "load_model", lambda path, **k: loaded.append(str(path)) or load(path, **k))
    lora, optim = {"r": 4, "alpha": 8.0, "targets": ["wq", "wv", "up", "down"]}, {"lr": 3e-2, "warmup_steps": 1}
    full = PT.posttrain(_cfg(base, tmp_path / "a", "dpo", lora=lora, optim=optim, max_steps=6, plot=False))
    assert loaded == [str(base / "base")]  # the policy alone: no reference model was loaded
    monkeypatch.setattr(ckpt, "load_model", load)
    losses = _losses(full)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0] - 0.02
    init, _ = ckpt.load_model(base / "base")
    policy, _ = ckpt.load_model(tmp_path / "a")  # the adapters come back, unmerged
    layers = [n for n, m in policy.named_modules() if isinstance(m, LoRALinear)]
    trained = policy.state_dict()
    assert len(layers) == 4 * init.cfg.n_layers and all(trained[f"{n}.lora_B"].abs().sum() > 0 for n in layers)
    assert all(torch.equal(trained[n], t) for n, t in init.state_dict().items())  # the base did not move
    state = ckpt.load_train_state(ckpt.checkpoint_dirs(tmp_path / "a")[-1])
    assert state["objective"]["reference"] == {"role": "reference", "path": str(base / "base"),
                                               "checksum": weights_checksum(init)}

    cfg = _cfg(base, tmp_path / "b", "dpo", lora=lora, optim=optim, max_steps=6, plot=False, ckpt_every=100)
    _interrupted_at(3, cfg, monkeypatch)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "b")] == ["step_000003"]
    assert _losses(PT.posttrain(cfg)) == losses
    with pytest.raises(ConfigError, match=r"was trained with LoRA adapter .*wq = \[4, 2.0\] \(\[r, scale\]\) but "
                                          r"the model has \[4, 1.0\]; use the run's LoRA settings"):
        PT.posttrain(_cfg(base, tmp_path / "b", "dpo", lora={**lora, "alpha": 4.0}, optim=optim, max_steps=6,
                          plot=False))  # same shapes, another scale: it would resume a different function


def test_full_fine_tuning_from_a_lora_run_trains_every_weight_and_says_what_it_does(base, tmp_path, monkeypatch,
                                                                                   capsys):
    """An init holding LoRA adapters (a LoRA run's checkpoint) without [lora]: the adapters are merged and every
    weight trains (unmerged, the adapted layers' base weights stayed frozen); a [lora] run says how much trains
    and what its reference is; a template other than the one the init was tuned with is pointed out."""
    lora = {"r": 2, "alpha": 4.0, "targets": ["wq", "wv"]}
    PT.posttrain(_cfg(base, tmp_path / "lora", "dpo", lora=lora, max_steps=2, plot=False))
    out = capsys.readouterr().out
    assert "lora: trainable" in out and "reference: the init model as the policy with its adapters off" in out
    monkeypatch.setattr(ckpt, "recorded_chat_template", lambda path: "chatml")
    PT.posttrain(_cfg(base, tmp_path / "full", "sft", init=str(tmp_path / "lora"), max_steps=2, plot=False))
    out = capsys.readouterr().out
    assert "merged into its weights; every weight trains" in out
    assert "was fine-tuned with chat template 'chatml', this run uses 'plain'" in out
    before, _ = ckpt.load_model(tmp_path / "lora")
    from lmforge.adapt.lora import merge_lora

    merge_lora(before)
    after, _ = ckpt.load_model(tmp_path / "full")
    moved = {n for n, t in after.state_dict().items() if not torch.equal(t, before.state_dict()[n])}
    assert "blocks.0.attn.wq.weight" in moved and len(moved) == len(after.state_dict())  # all trained


def test_a_reference_with_another_tokenizer_of_the_same_size_is_refused(base, tmp_path):
    """The vocabulary sizes agree (257), but the reference's tokenizer merges bytes the run's does not: its
    ids mean other tokens, which no size check sees (DPO trained on, with rewards off from the first step)."""
    from lmforge.errors import ConfigError
    from lmforge.tokenizer.train import train_bpe

    other = train_bpe(iter([PROBE * 20]), 257, special_tokens=[], progress=False, workers=1)  # 256 bytes + 1 merge
    model, _ = ckpt.load_model(base / "base")
    path = ckpt.save_checkpoint(tmp_path / "other", 1, model, tokenizer=other)
    with pytest.raises(ConfigError, match="the reference .* has a tokenizer other than this run's"):
        PT.posttrain(_cfg(base, tmp_path / "run", "dpo", reference=str(path), max_steps=1, plot=False))
    assert not (tmp_path / "run").exists()  # a run refused at its start leaves no directory behind
    PT.posttrain(_cfg(base, tmp_path / "same", "dpo", reference=str(base / "base"), max_steps=1, plot=False))
