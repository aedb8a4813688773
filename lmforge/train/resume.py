"""A Trainer's checkpoints and resuming from them (moved out of lmforge.train.trainer, whose `save` and
constructor call `save_trainer` and `resume_or_start`). A checkpoint holds everything a bit-exact resume needs:
the weights (gathered onto rank 0 under a ParallelRunner; only the adapters over a recorded base for an
adapter-only run), the optimizer state with its parameters' names and the optimizer's name, each data source's
and the objective's state, the RNG state, and the step, token and time counters. A resume refuses another
model, other LoRA adapters, another base, another optimizer or a per-rank data state it cannot deal to this
many processes, keeps this run's optimizer settings (lmforge.train.param_groups), and says which settings
changed since the run's last start."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from lmforge import checkpoint as ckpt
from lmforge.config import to_dict, with_defaults
from lmforge.errors import ConfigError
from lmforge.train import distributed as ddp
from lmforge.train.interrupts import rng_state, set_rng_state
from lmforge.train.param_groups import keep_group_settings, optimizer_name

if TYPE_CHECKING:
    from lmforge.train.trainer import Trainer


def resume_or_start(trainer: Trainer) -> None:
    """When the Trainer is built: resume from the run_dir's newest checkpoint (resume=True; none there: start
    fresh), or refuse a run_dir that holds another run's checkpoints."""
    if trainer.cfg.resume:
        _maybe_resume(trainer)
    elif ckpt.checkpoint_dirs(trainer.run_dir):
        # a fresh run must not mix its metrics and checkpoints with an older run's
        raise ConfigError(f"run_dir {trainer.run_dir} already holds checkpoints of another run and resume=False; "
                          "use a new run_dir, set resume=true to continue it, or delete it")


def _maybe_resume(trainer: Trainer) -> None:
    for p in (ckpt.clean_partial(trainer.run_dir) if trainer.rank == 0 else []):
        tqdm.write(f"removed {p} (a checkpoint a killed run did not finish writing)")
    found = ckpt.checkpoint_dirs(trainer.run_dir)
    if not found:
        return
    path = found[-1]
    meta = ckpt._verify(path)
    if "model" in meta and hasattr(trainer.model, "cfg"):
        ckpt.check_same_model(meta["model"], trainer.model.cfg)
    if "model" in meta:  # LoRA runs: the same adapters (an alpha change keeps the shapes, not the function)
        saved = meta.get("lora", {})
        now = {k: list(v) for k, v in _lora_now(trainer.model).items()}  # (not model_meta: no meta-model build)
        if saved != now:
            k = next(iter(sorted(set(saved) ^ set(now)) or [n for n in saved if saved[n] != now.get(n)]))
            raise ConfigError(f"{path} was trained with LoRA adapter {k} = {saved.get(k)} ([r, scale]) but the "
                              f"model has {now.get(k)}; use the run's LoRA settings or a new run_dir")
    _check_base(trainer, meta.get("base"), path)
    state = ckpt.load_train_state(path)
    _load_weights_and_optimizer(trainer, state, path, partial=bool(meta.get("base")))
    trainer.data.load_state_dict(_data_state(trainer, state, path))
    trainer.objective.load_state_dict(state.get("objective", {}))
    set_rng_state(state)
    trainer.step, trainer.tokens, trainer.elapsed = state["step"], state["tokens"], state["elapsed"]
    trainer.evaluated_step = state.get("evaluated_step", trainer.step)  # older checkpoints: taken as evaluated
    trainer.metrics.truncate_after(trainer.step)
    trainer.last_checkpoint = path
    if trainer.rank == 0:
        tqdm.write(f"resumed from {path} at step {trainer.step}")
        changed = changed_settings(trainer.run_dir / "config.json", to_dict(trainer.cfg), type(trainer.cfg))
        if changed:
            notes = ["the learning-rate schedule follows the new max_steps"] if "max_steps " in changed else []
            if changed.startswith("seed ") or ", seed " in changed:
                notes.append("the data order and random state continue from the checkpoint, not from the new "
                             "seed; a post-training data source shuffles its later epochs with it")
            why = f" ({'; '.join(notes)})" if notes else ""
            tqdm.write(f"settings changed since the run's last start: {changed}{why}")
        if trainer.step >= trainer.cfg.max_steps:
            tqdm.write(f"the run is already at step {trainer.step} >= max_steps={trainer.cfg.max_steps}: nothing to "
                       "train; raise max_steps to continue it")


def _check_base(trainer: Trainer, saved: dict[str, Any] | None, path: Path) -> None:
    """An adapter-only checkpoint resumes onto a model built on the base it records (the same weights,
    the same merge; the path may have moved); a full one onto any model."""
    if not saved:
        return
    if trainer.base is None:
        raise ConfigError(f"{path} is adapter-only (its base {saved['path']} is not in it) but this run saves "
                          "full checkpoints; resume as it started ([lora] save = 'adapters', Trainer(base=...)) "
                          "or use a new run_dir")
    now = {k: trainer.base.get(k) for k in ("sha256", "merge_lora")}
    if now != {k: saved.get(k) for k in now}:
        raise ConfigError(f"{path} trained adapters over the base {saved['path']} (sha256 {saved['sha256']}, "
                          f"merge_lora {saved.get('merge_lora')}), but this run starts from {trainer.base['path']} "
                          f"(sha256 {trainer.base['sha256']}, merge_lora {trainer.base.get('merge_lora')}); resume "
                          "from that base (init) or use a new run_dir")


def _load_weights_and_optimizer(trainer: Trainer, state: dict[str, Any], path: Path, partial: bool) -> None:
    """partial: an adapter-only checkpoint, whose frozen parameters are the model's own (its base)."""
    # checkpoints written before the names were stored: the optimizer's own order (every layout but pp)
    names = state.get("optimizer_params") or ddp.param_names(trainer.model, trainer.optimizer)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in trainer.optimizer.param_groups]
    if trainer.runner is None:
        ckpt.load_weights(trainer.model, path, set(trainer.model.state_dict()) - ckpt.frozen_names(trainer.model)
                          if partial else None)
        if names != ddp.param_names(trainer.model, trainer.optimizer) and not trainer.cfg.reset_optimizer:
            raise ConfigError(f"{path}: the optimizer state lists its parameters in another order than this "
                              "optimizer; use the same optim settings, or set reset_optimizer=true")
        _load_optimizer(trainer, state, path)
    else:
        from safetensors.torch import load_file

        reset = trainer.cfg.reset_optimizer
        _load_optimizer(trainer, state, path, check_only=True)
        ddp.load_states(trainer.model, trainer.optimizer, load_file(str(path / "model.safetensors")),
                        None if reset else state["optimizer"], names, partial=partial)
    keep_group_settings(trainer.optimizer, settings)


def _load_optimizer(trainer: Trainer, state: dict[str, Any], path: Path, check_only: bool = False) -> None:
    saved, now = state.get("optimizer_name"), optimizer_name(trainer.optimizer, trainer.cfg)
    if trainer.cfg.reset_optimizer:
        tqdm.write(f"reset_optimizer: {now} starts with fresh state (checkpoint had {saved or 'unknown'})")
        return
    if saved is not None and saved != now:
        raise ConfigError(f"{path} was trained with optimizer {saved} but the config says {now}; resume with "
                          f"the same optim.name, or set reset_optimizer=true to start {now} fresh")
    if check_only:
        return
    try:
        trainer.optimizer.load_state_dict(state["optimizer"])
    except (KeyError, ValueError) as e:
        raise ConfigError(f"{path}: the optimizer state does not fit this optimizer ({e!r}); use the same "
                          "optim settings, or set reset_optimizer=true to start it fresh") from e


def _data_state(trainer: Trainer, state: dict[str, Any], path: Path) -> dict[str, Any]:
    """This rank's data-source state in a checkpoint: its own where each rank's was saved."""
    ranks = state.get("data_ranks")
    if ranks is None:
        return state["data"] if "data" in state else state["sampler"]
    if len(ranks) != trainer.world:
        raise ConfigError(f"{path} holds the data-source state of each of its {len(ranks)} processes (a "
                          f"per_rank_state source, e.g. rollouts between their PPO epochs), which cannot be dealt "
                          f"to {trainer.world}; resume on {len(ranks)} processes, or from a checkpoint written at a "
                          "rollout boundary")
    return ranks[trainer.rank]


def save_trainer(trainer: Trainer) -> Path:
    """Trainer.save: a checkpoint of the current step (every rank takes part, rank 0 writes it); its path."""
    if trainer.runner is not None:  # full weights and optimizer state gathered on rank 0: an ordinary checkpoint
        weights, opt_state, names = ddp.gather_states(trainer.runner, trainer.optimizer)
        model = ddp.Gathered(trainer.model, weights)
    else:
        model, opt_state = trainer.model, trainer.optimizer.state_dict()
        names = ddp.param_names(trainer.model, trainer.optimizer)
    data_ranks = _rank_data_states(trainer)  # every rank takes part
    if trainer.rank == 0:
        trainer.last_checkpoint = ckpt.save_checkpoint(
            trainer.run_dir, trainer.step, model, train_state=_train_state(trainer, opt_state, names, data_ranks),
            tokenizer=trainer.tokenizer, keep_last=trainer.cfg.keep_last,
            extra={"tokens": trainer.tokens, **trainer.extra_meta}, base=trainer.base)
    if trainer.world > 1:
        torch.distributed.barrier()  # no rank reads it (or moves on to resume) before it is written
        trainer.last_checkpoint = ddp.checkpoint_path(trainer.run_dir, trainer.step)
    trainer._call("on_save", trainer.last_checkpoint)
    return trainer.last_checkpoint


def _train_state(trainer: Trainer, optimizer_state: dict[str, Any], names: list[str],
                 data_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"step": trainer.step, "tokens": trainer.tokens, "elapsed": trainer.elapsed,
            "evaluated_step": trainer.evaluated_step,
            "optimizer": optimizer_state, "optimizer_name": optimizer_name(trainer.optimizer, trainer.cfg),
            "optimizer_params": names,  # parameter names in id order: any layout maps the state back
            "data": trainer.data.state_dict(), "objective": trainer.objective.state_dict(), **rng_state(),
            **({"data_ranks": data_ranks} if data_ranks is not None else {})}


def _rank_data_states(trainer: Trainer) -> list[dict[str, Any]] | None:
    """Every rank's data-source state (one all-gather), for a source whose state differs per rank
    (`per_rank_state = True`: an RL source holding its rank's share of a rollout between the PPO
    epochs over it); None for the others, whose rank 0 state every rank resumes from."""
    if trainer.world == 1 or not getattr(trainer.data, "per_rank_state", False):
        return None
    states: list[Any] = [None] * trainer.world
    torch.distributed.all_gather_object(states, trainer.data.state_dict())
    return states


def changed_settings(saved_config: Path, now: dict[str, Any], cls: type | None = None, most: int = 6) -> str:
    """'key old -> new, ...' for the settings that differ from a run directory's config.json ('' when it is
    missing or nothing differs; run_dir, resume and progress are not settings of the run). With the config's
    class, a setting the run's lmforge did not have yet reads as its default (not as 'None -> 0.0')."""
    import json

    try:
        before = json.loads(saved_config.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if cls is not None and isinstance(before, dict):
        before = with_defaults(cls, before)

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}

    a, b = flat(before), flat(json.loads(json.dumps(now, default=str)))  # as config.json holds it
    skip = {"run_dir", "resume", "progress"}
    diff = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in skip and a.get(k) != b.get(k)]
    return ", ".join(diff[:most]) + (f" and {len(diff) - most} more" if len(diff) > most else "")


def _lora_now(model) -> dict:
    """The model's unmerged adapters as a checkpoint records them (checkpoint.model_meta's "lora"; a head on a
    backbone: the backbone's)."""
    from lmforge.adapt.lora import lora_record

    if getattr(model, "head_record", None) is not None and hasattr(model, "backbone"):
        model = model.backbone
    return lora_record(model)
