"""Post-training runs on the one Trainer: `lmforge sft | dpo | rm | distill --config FILE.toml`.

    init = "runs/demo"                 # checkpoint, run or HF model directory to start from
    max_steps = 200                    # every LoopConfig key (lr schedule, eval, checkpoints, resume)
    [data]                             # PostDataConfig: JSONL files, chat template, packing, seq_len
    train = ["chat.jsonl"]
    [optim]
    lr = 1e-4
    [sft]                              # the objective's own options: a section named after the command
    neftune_alpha = 5.0                # (its class's `Config`, e.g. [dpo] beta = 0.1)

Objectives resolve by name through OBJECTIVES (lmforge.align.config, with PostTrainConfig: importable without
torch), lazily imported "module:Class" paths, so an objective plugs in by adding one line, or from outside lmforge
with register_objective(name, ObjectiveSpec("my_module:MyObjective", "preference")). An objective class is
built as Class(Class.Config(...)) plus, when its constructor takes them, reference=/reference_path= (DPO, KTO: a
frozen copy of `reference`, by default the init model) or teacher=/teacher_path= (distillation). The records an
objective trains on are a data kind of DATA_KINDS (ObjectiveSpec.data: sft, preference, kto, or one added with
register_data_kind(name, DataKindSpec("my_module:encode", "my_module:collate", keys=(...)))), read by
lmforge.align.data.build_sources.

A [lora] section (LoRAConfig) puts fresh adapters on the policy after loading it, and only they train
(plus LoRAConfig.trainable modules). The reference then defaults to the policy with its adapters disabled
(lmforge.align.frozen.BaseReference): the init model without loading it a second time. The checkpoints
record the adapters (lmforge.adapt.lora.lora_record), so they resume and LLM.load opens them. They are
adapter-only (LoRAConfig.save = "adapters", the default): the trained tensors and the init's path and
checksum as their base (lmforge.checkpoint.base_record), which load_model loads them onto; an init that
held adapters of its own is recorded as merged, as start_model trains it. save = "full" writes every weight.

Left open, data.template is the init's recorded chat template, else chatml or plain as the tokenizer allows
(run_template, by `lmforge chat`'s rule: lmforge.infer.chat_template.choose_template), and disable_dropout the
objective's ObjectiveSpec.disable_dropout, TRL's default (drop_dropout: off for dpo, kto, orpo, rm, distill; kept
for sft).

The run directory holds metrics.jsonl, loss.png, metrics.png (reward margins, accuracies),
data_report.json and checkpoints that LLM.load and `lmforge chat` open (config.json records the chat
template).

`--nproc N` (or torchrun) trains data parallel as `lmforge train` does (lmforge.train.distributed):
[parallel] dp_shard (FSDP2, the default over N ranks) or dp_replicate (DDP); data.batch_size is the global
batch, split over the ranks; rank 0 writes the metrics and the gathered checkpoint; validation splits its
rows over the ranks. Frozen reference and teacher models are replicated whole on every rank. Tensor,
pipeline and context parallel are refused: the objectives call the model themselves on full logits.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import torch

from lmforge.adapt.lora import LoRAConfig
# the run's config and the objectives' registry live in a torch-free module (`lmforge sft --help` reads them there)
from lmforge.align.config import (OBJECTIVES, ObjectiveSpec, PostTrainConfig, config_class,  # noqa: F401
                                  data_kind, objective_spec, register_objective, resolve)
from lmforge.align.data import build_sources
from lmforge.errors import ConfigError, LmforgeError
from lmforge.train.config import check_seq_len
from lmforge.train.data import encode_alike
from lmforge.train.distributed import distribute, join, rank_and_world, train_device
from lmforge.utils import write_json_atomic


def not_a_language_model(model: torch.nn.Module, role: str, path: str) -> ConfigError:
    return ConfigError(f"{role} {path} is a reward model, classifier or critic ({type(model).__name__}: a head on a "
                       f"language model), which has no next-token logits; give {role} a language model checkpoint "
                       "(e.g. the one it was trained from)")


def continues_head(model: torch.nn.Module, cfg: PostTrainConfig) -> bool:
    """Whether the init model already is the model this objective trains (`lmforge rm --init` a reward model:
    its trained head goes on training rather than a fresh one being put on top). A language model: False (the
    objective wraps it as usual). Any other scoring head is refused (an SFT/DPO init that is a reward model, a
    classifier or critic under rm)."""
    from lmforge.infer.config import scores_text

    if not scores_text(model):
        return False
    wrap = objective_spec(cfg.objective).wrap
    if wrap is None or type(model) is not resolve(wrap) or model.head_record().get("out_dim") != 1:
        raise not_a_language_model(model, "init", cfg.init)
    if cfg.lora is not None and cfg.lora.save == "adapters":  # load_model puts adapters on a plain LM base
        raise ConfigError(f"[lora] adapters alone cannot be saved over the reward model {cfg.init} (their base "
                          "would itself be a reward model, which checkpoints do not rebuild); set lora.save = 'full'")
    return True


def _frozen_model(path: str, role: str, device: str, tok=None, dtype: str | None = None):
    from lmforge.align.frozen import frozen_dtype
    from lmforge.checkpoint import load_model
    from lmforge.infer.config import scores_text

    if not path:
        raise ConfigError(f"this objective needs a {role} model: set {role} = 'checkpoint or HF directory'")
    cast = frozen_dtype(dtype, f"{role}_dtype")
    # cast (teacher_dtype / reference_dtype) on the CPU, where load_model builds every model before moving it,
    # so `device` never holds the model in its saved dtype
    model, own = load_model(path, device=device if cast is None else "cpu")
    if scores_text(model):
        raise not_a_language_model(model, f"the {role}", path)
    if tok is not None and own is not None and not encode_alike(own, tok):
        raise ConfigError(f"the {role} {path} has a tokenizer other than this run's (they encode the same text "
                          f"differently), so its token ids mean other tokens; use a {role} trained with the same "
                          "tokenizer")
    return model if cast is None else model.to(device=device, dtype=cast)


def lora_under_head(lora: LoRAConfig | None, model: torch.nn.Module) -> LoRAConfig | None:
    """[lora] for a language model that the objective's head (`ObjectiveSpec.wrap`, a SequenceHead) is put on after
    the adapters: that head is new and trains in full, so a trainable pattern naming it alone (`trainable =
    ["head"]`, which apply_lora on a SequenceHead takes but no longer needs: a model's `task_heads` train under LoRA)
    is met, not refused as matching no module of the language model (`lmforge rm --lora.trainable head` was, found
    2026-12-07)."""
    import dataclasses

    from lmforge.model.surgery import matches

    if lora is None:
        return None
    names = [n for n, _ in model.named_modules() if n]
    kept = tuple(p for p in lora.trainable if not matches("head", (p,)) or any(matches(n, (p,)) for n in names))
    return dataclasses.replace(lora, trainable=kept)


def start_model(model: torch.nn.Module, lora: LoRAConfig | None, own_reference: bool) -> torch.nn.Module:
    """The policy this run trains. An init holding adapters (a LoRA run's checkpoint) has them merged: they
    are part of the model it starts from, and without [lora] every weight trains (unmerged, its base
    weights would stay frozen). With [lora], fresh adapters (apply_lora), and only they train."""
    from lmforge.adapt.lora import apply_lora, lora_layers, merge_lora, trainable_parameters, unmergeable

    say = print if rank_and_world()[0] == 0 else (lambda *a: None)
    kept = unmergeable(model)
    if kept:  # a QLoRA checkpoint: its adapters have no float weights to be merged into
        raise ConfigError(f"the init model's LoRA layer {kept[0]} is over a quantized base (QLoRA), which its adapters "
                          "cannot be merged into to start a new run from; to train them on, resume the run that wrote "
                          "them (run it again with its run_dir), or start from the float base they were trained over")
    if lora_layers(model):
        merge_lora(model)
        model.requires_grad_(True)
        say("the init model holds LoRA adapters: merged into its weights" + (" before [lora] adds new ones" if lora
                                                                              else "; every weight trains"))
    if lora is None:
        return model
    model = apply_lora(model, lora)
    say(f"lora: {trainable_parameters(model)}" + ("; reference: the init model as the policy with its adapters off"
                                                   if own_reference else ""))
    return model


def adapter_base(cfg: PostTrainConfig, merged: bool) -> dict[str, Any] | None:
    """The base record of a run whose checkpoints are adapter-only ([lora] with save = "adapters"): the init
    checkpoint, with its own adapters merged when it held some (`merged`: the model start_model trains on).
    None: the checkpoints hold every weight."""
    from lmforge.checkpoint import base_record

    if cfg.lora is None or cfg.lora.save != "adapters":
        return None
    return base_record(cfg.init, merge_lora=merged)


def check_run_objective(cfg: PostTrainConfig) -> None:
    """Refuse a run_dir whose checkpoints another objective wrote (their config.json's "objective"): resuming
    it would train that run on with this loss, its metrics and final checkpoint a mix of both. Checkpoints that
    record no objective are a pretraining run's (`lmforge train`, `lf.train`; a post-training command has recorded
    its objective since it existed): `run_dir = init` resumed the pretraining run as this one, past max_steps, and
    overwrote its config.json (found 2026-12-07)."""
    import json

    from lmforge.checkpoint import checkpoint_dirs

    done = checkpoint_dirs(cfg.run_dir)
    was = json.loads((done[-1] / "config.json").read_text()).get("objective", "pretraining") if done else None
    if was is not None and was != cfg.objective:
        what = "its checkpoints' objective" if was != "pretraining" else "its checkpoints record no objective"
        raise ConfigError(f"run_dir {cfg.run_dir!r} holds a {was} run ({what}), which "
                          f"`lmforge {cfg.objective}` would resume with another loss; set run_dir to a new directory, "
                          f"or start from that run with init = '{cfg.run_dir}'")


def frozen_roles(cfg: PostTrainConfig, params) -> set[str]:
    """The frozen models ('reference', 'teacher') the objective loads: those its class's constructor takes
    (`params`), but a SimPO DPOObjective's reference (it has none). The one rule build_objective loads by and
    check_unused_models refuses by."""
    simpo = getattr(getattr(cfg, cfg.objective, None), "loss_type", "") == "simpo"
    return {role for role in ("reference", "teacher") if role in params and not (role == "reference" and simpo)}


def check_unused_models(cfg: PostTrainConfig, params) -> None:
    """Refuse a reference or teacher the objective never loads (frozen_roles): `lmforge sft --teacher X` or
    `lmforge orpo --reference X` trained as if it were not set, a path that did not exist included (found
    2026-12-07)."""
    loads = frozen_roles(cfg, params)
    for role, path in (("reference", cfg.reference), ("teacher", cfg.teacher)):
        if path and role not in loads:
            user = f"{cfg.objective} with loss_type='simpo'" if role in params else cfg.objective
            raise ConfigError(f"{user} uses no {role} model, so {role} = {path!r} would be ignored; remove it")


def frozen_devices(cfg: PostTrainConfig) -> dict[str, torch.device | None]:
    """The objective's reference_device / teacher_device options, checked (lmforge.align.frozen.frozen_device):
    a device this machine lacks is a one-line error naming the option."""
    from lmforge.align.frozen import frozen_device

    options = getattr(cfg, cfg.objective, None)
    return {role: frozen_device(getattr(options, f"{role}_device", None), f"{cfg.objective}.{role}_device")
            for role in ("reference", "teacher")}


def build_objective(cfg: PostTrainConfig, init_path: str, device: str, policy: torch.nn.Module | None = None,
                    tok=None):
    """The objective with its frozen models: loaded from their paths, or, for the reference of a [lora]
    run without `reference`, BaseReference(policy) (the policy with its adapters disabled)."""
    from lmforge.align.frozen import BaseReference

    cls = resolve(objective_spec(cfg.objective).path)
    options = getattr(cfg, cfg.objective, None)
    params = inspect.signature(cls).parameters
    kwargs: dict[str, Any] = {}
    loads = frozen_roles(cfg, params)
    for role, path in (("reference", cfg.reference or init_path), ("teacher", cfg.teacher)):
        if role in loads:
            base = role == "reference" and not cfg.reference and cfg.lora is not None and policy is not None
            # loaded straight onto its own device (teacher_device / reference_device): a teacher built on the
            # run's GPU first would not fit exactly when the option is needed
            where = frozen_devices(cfg)[role] or device
            dtype = getattr(options, f"{role}_dtype", None)
            kwargs[role] = BaseReference(policy) if base else _frozen_model(path, role, where, tok, dtype)
            if f"{role}_path" in params:
                kwargs[f"{role}_path"] = path
    if "vocab_size" in params and getattr(tok, "vocab_size", None):  # frozen models may be padded beyond it
        kwargs["vocab_size"] = tok.vocab_size
    return cls(options, **kwargs) if options is not None else cls(**kwargs)


def check_posttrain(cfg: PostTrainConfig) -> None:
    """What a post-training run checks before it loads a model: init is set and holds a checkpoint, a teacher is
    named where the objective needs one, the run_dir holds no other objective's run, the frozen models' devices
    exist, the data files are there. `lmforge sft|dpo|... --nproc N` calls it before any process starts, so such
    a run answers in one line, not once per rank."""
    from lmforge.align.data import check_data_file
    from lmforge.checkpoint import resolve_checkpoint

    if not cfg.init:
        raise ConfigError("init is not set: give the checkpoint, run or HF directory to start from (init = 'runs/x')")
    spec = objective_spec(cfg.objective)
    kind = data_kind(spec.data)  # its functions imported now, not after the model loaded (a registered kind's typo)
    for what in ("encode", "collate", "check"):
        path = getattr(kind, what)
        if path is not None and not callable(resolve(path)):
            raise ConfigError(f"data kind {spec.data!r}: DataKindSpec.{what}={path!r} is no function")
    params = inspect.signature(resolve(spec.path)).parameters
    if "teacher" in params and not cfg.teacher:
        raise ConfigError(f"{cfg.objective} needs a teacher model: set teacher = 'checkpoint or HF directory'")
    frozen_devices(cfg)  # (the settings alone first, then the files they name)
    check_unused_models(cfg, params)
    resolve_checkpoint(cfg.init)
    check_run_objective(cfg)
    for path in (*cfg.data.train, *cfg.data.val):
        check_data_file(path)


def run_template(cfg: PostTrainConfig, tokenizer, init_template: str | None) -> str:
    """The name of the chat template the run renders its records with, by the rule of `lmforge chat`
    (lmforge.infer.chat_template.choose_template): data.template, else the one the run's checkpoints recorded (a
    resumed run goes on as it started, e.g. one begun when chatml was the default), else `init_template` (the one
    the init checkpoint recorded), else chatml where the tokenizer has its markers as special tokens, else plain (a
    pretrained model on the byte tokenizer: said on rank 0). run_dir's config.json keeps data.template as given
    (''), so a resume compares the same settings; each checkpoint's config.json records the template used."""
    from lmforge.checkpoint import recorded_chat_template
    from lmforge.infer.chat_template import choose_template

    resumed = recorded_chat_template(cfg.run_dir) if cfg.resume and not cfg.data.template else None
    template, notice = choose_template(tokenizer, cfg.data.template or None, resumed or init_template,
                                       plain="data.template='plain'")
    if notice and rank_and_world()[0] == 0:
        print(f"note: {notice}")
    return template.name


def drop_dropout(model: torch.nn.Module, cfg: PostTrainConfig) -> None:
    """disable_dropout (None: the objective's ObjectiveSpec.disable_dropout, TRL's default): every dropout of the
    policy set to 0, as TRL's disable_dropout_in_model (after the adapters: LoRA's too). Only the modules change:
    model.cfg, which the checkpoints save, keeps the init's dropout (lmforge.model.dropout.set_dropout)."""
    from lmforge.model.dropout import set_dropout

    off = cfg.disable_dropout if cfg.disable_dropout is not None else objective_spec(cfg.objective).disable_dropout
    if off and set_dropout(model, 0.0) and rank_and_world()[0] == 0:
        why = ("disable_dropout = true" if cfg.disable_dropout else
               f"{cfg.objective}'s default, as TRL's; disable_dropout = false keeps it")
        print(f"dropout: off while training ({why})")


def posttrain(cfg: PostTrainConfig):
    """Run one post-training objective as configured; returns the Trainer's TrainResult."""
    from lmforge.adapt.lora import lora_layers
    from lmforge.checkpoint import load_model, recorded_chat_template
    from lmforge.optim import build_optimizer
    from lmforge.tokenizer.load import load_tokenizer
    from lmforge.train.trainer import Trainer
    from lmforge.align.sft import ObjectiveEvaluator

    check_posttrain(cfg)  # before any model is loaded
    spec = objective_spec(cfg.objective)
    par = join(cfg.parallel, cfg.device)
    device = train_device(cfg.device)
    torch.manual_seed(cfg.seed)  # the same on every rank: identical heads and data order
    model, tok = load_model(cfg.init, device=device)
    merged = bool(lora_layers(model))  # start_model merges an init's adapters: a LoRA run's base is that model
    own_head = continues_head(model, cfg)
    mcfg = model.backbone.cfg if own_head else model.cfg
    check_seq_len(cfg.data.seq_len, mcfg, "the init model's max_seq_len", refusal=f" ({mcfg.pos_emb} positions); "
                  "lower data.seq_len", fix=f"lower data.seq_len to {mcfg.max_seq_len} to train on what it serves")
    tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else tok
    if tok is None:
        raise LmforgeError(f"{cfg.init} holds no tokenizer; set tokenizer = 'byte' or a tokenizer path")
    if getattr(tok, "vocab_size", 0) > mcfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the init model's vocab_size is "
                          f"{mcfg.vocab_size}: it was not made for this model; use the model's own tokenizer")
    recorded = recorded_chat_template(cfg.init)
    template = run_template(cfg, tok, recorded)
    if recorded and recorded != template and rank_and_world()[0] == 0:
        print(f"note: {cfg.init} was fine-tuned with chat template {recorded!r}, this run uses "
              f"{template!r} (data.template); its checkpoints record {template!r} for lmforge chat")
    refs = "reference" in inspect.signature(resolve(spec.path)).parameters
    # before the data: a LoRA target matching no layer stops the run at once
    lora = lora_under_head(cfg.lora, model) if spec.wrap and not own_head else cfg.lora
    model = start_model(model, lora, own_reference=refs and not cfg.reference)
    # the objective's options reach its data kind's batches (KTOConfig(kl=False) reads no mismatched rows: none built)
    data = dataclasses.replace(cfg.data, template=template)
    train_src, val_src, report = build_sources(data, tok, spec.data, cfg.seed, getattr(cfg, cfg.objective, None))
    run_dir = Path(cfg.run_dir)
    rank0 = rank_and_world()[0] == 0
    if rank0:
        print(f"data: {report.summary()}")
    objective = build_objective(cfg, cfg.init, device, model, tok)  # frozen models: whole on every rank
    if spec.wrap and not own_head:
        model = resolve(spec.wrap)(model)
    drop_dropout(model, cfg)
    model.train()
    model, train_src, runner = distribute(model, train_src, par, device=device, seq_len=cfg.data.seq_len,
                                          batch_size=cfg.data.batch_size)
    optimizer = build_optimizer(model, cfg.optim)
    evaluator = ObjectiveEvaluator(objective, val_src.batches()[:cfg.eval_batches], runner) if val_src else None
    trainer = Trainer(model, optimizer, train_src, objective, config=cfg, evaluator=evaluator, tokenizer=tok,
                      extra_meta={"objective": cfg.objective, "chat_template": template}, runner=runner,
                      base=adapter_base(cfg, merged))
    if rank0:  # once the run has started: a refused one leaves no directory (nor overwrites another run's report)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run_dir / "data_report.json", report.to_dict())
    result = trainer.fit()
    if cfg.plot and rank0:
        plot_metrics(run_dir)
    return result


PLOTTED = ("rewards/margins", "rewards/accuracies", "accuracy", "margin", "mean_token_accuracy",
           "val_rewards/margins", "val_rewards/accuracies", "val_accuracy", "val_mean_token_accuracy")


def plot_metrics(run_dir: str | Path, keys: tuple[str, ...] = PLOTTED) -> Path | None:
    """metrics.png: every logged metric of `keys` against step, one panel each (None without matplotlib
    or without such metrics)."""
    from lmforge.train.metrics import read_metrics

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no metrics.png (pip install matplotlib)")
        return None
    rows = read_metrics(run_dir)
    present = [k for k in keys if any(k in r for r in rows)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4 * len(present), 3.2), squeeze=False)
    for ax, k in zip(axes[0], present):
        ax.plot(*zip(*[(r["step"], r[k]) for r in rows if k in r]), "o-" if k.startswith("val_") else "-")
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(run_dir) / "metrics.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
