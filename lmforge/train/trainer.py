"""The one training loop: `Trainer(model, optimizer, data, objective, config=..., hooks=...)`.

Pretraining, SFT, reward models, DPO and its family, distillation and RL differ only in their DataSource
and Objective (lmforge.train.objective); `Trainer(cfg)` with a TrainConfig builds pretraining's pieces
(lmforge.train.pretrain), and `train(cfg)` is `lmforge train`. By hand, e.g. SFT:

    src, val, report = build_sources(PostDataConfig(train=("chat.jsonl",)), tok, "sft", seed=0)  # align.data
    Trainer(model, build_optimizer(model, OptimConfig(lr=1e-4)), src, SFTObjective(),
            config=LoopConfig(run_dir="runs/sft", max_steps=500)).fit()

One optimizer step = grad_accum micro-batches, mean loss backward, global-norm clipping, the scheduled
learning rate, optimizer step. Every eval_every steps the evaluator runs (validation loss / perplexity /
bits-per-byte for pretraining). Checkpoints hold everything needed to resume bit-exactly: weights,
optimizer (refused if it was another optimizer), data-source, objective and RNG state.

N processes (torchrun, `lmforge train --nproc N`): a lmforge.parallel.runner.ParallelRunner is the step
strategy (`Trainer(..., runner=runner)`; pretraining builds it from [parallel]). Each micro-batch is this
rank's share through the runner (objective_step; a pipeline runs the LM loss through its schedule and
refuses other objectives), clipping is the runner's global norm over DTensor shards and stages, logged
metrics are its global mean, and checkpoints gather the full weights and optimizer state onto rank 0 as an
ordinary checkpoint that resumes on any layout (lmforge.train.distributed). Only rank 0 writes metrics,
plots and checkpoints.

Interrupts (lmforge.train.interrupts, an object the Trainer owns): SIGINT/SIGTERM only set a flag; the
loop stops at the next step boundary (agreed over the ranks), writes a checkpoint of that state and raises
KeyboardInterrupt, so resuming is bit-exact; a KeyboardInterrupt inside a step rolls it back to its start
(or forward to its end). A hook ends the run early with `request_stop`, a finite data source by raising
StopIteration (lmforge.train.objective.DataSource). A NaN/inf loss stops the run and leaves the last good
checkpoint in place.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from lmforge import checkpoint as ckpt
from lmforge.config import to_dict, with_defaults
from lmforge.errors import ConfigError, DataError, TrainingDiverged
from lmforge.model.layers.moe import MoE, load_uncounted, update_expert_biases
from lmforge.optim import lr_multiplier
from lmforge.train import distributed as ddp
from lmforge.train.config import LoopConfig, TrainConfig, uses_bf16
from lmforge.train.interrupts import Interrupts, rng_state, set_rng_state
from lmforge.train.metrics import MetricsLog, peak_flops, plot_losses, read_metrics
from lmforge.train.objective import (Batch, DataSource, Objective, checked_loss, checked_metrics, combined_metrics,
                                     metric_terms)
from lmforge.utils import check_output_path, run_metadata, write_json_atomic

if TYPE_CHECKING:
    from lmforge.parallel.runner import ParallelRunner


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_val_loss: float | None
    final_val_bpb: float | None
    wall_time: float
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)
    final_eval: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None
    """why fit ended before max_steps: a hook called Trainer.request_stop, or the data source ended (it raised
    StopIteration); None = it ran to max_steps"""


class DataEnded(Exception):
    """The data source's next_batch raised StopIteration (a finite source at its end) inside a step."""

    def __init__(self, drawn: int):
        super().__init__(drawn)
        self.drawn = drawn  # micro-batches of the unfinished step drawn before it


def sdpa_context(backend: str):
    """A context that restricts scaled_dot_product_attention to one kernel ('auto': no restriction)."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([names[backend]])


def batch_tokens(batch: Batch) -> int:
    """Tokens a batch feeds the model: every `*input_ids` tensor (both sides of a preference pair)."""
    return sum(v.numel() for k, v in batch.items() if k.endswith("input_ids"))


def loss_label(objective: Objective) -> str:
    """What loss.png's y axis shows: pretraining's next-token cross-entropy, else the objective's own loss (a DPO,
    KTO or reward-model loss is no cross-entropy per token)."""
    from lmforge.train.loss import LMObjective

    return "cross-entropy (nats/token)" if isinstance(objective, LMObjective) else f"loss ({type(objective).__name__})"


def batch_rows(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def optimizer_name(optimizer: torch.optim.Optimizer, cfg: LoopConfig) -> str:
    return f"{cfg.optim.name}/{type(optimizer).__name__}"


def _check_optimizer_params(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every parameter the optimizer updates must be the model's: checkpoints save the model's parameters
    (and name the optimizer state by them), so one held elsewhere would be trained, then lost or refused. And
    every trainable parameter of the model must be the optimizer's: one it lacks (an optimizer built before
    apply_lora or before a head was added) would get gradients that nothing applies."""
    mine = {id(p) for p in model.parameters()}
    held = set()
    for g in optimizer.param_groups:
        for p in g["params"]:
            if id(p) not in mine:
                raise ConfigError(f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not in the "
                                  f"model, so checkpoints would not save it; make the module that owns it (a value "
                                  f"head, a reward head...) a submodule of the trained model")
            held.add(id(p))
    lacking = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if lacking:
        names = ", ".join(lacking[:3]) + (", ..." if len(lacking) > 3 else "")
        raise ConfigError(f"the optimizer lacks {len(lacking)} of the model's trainable parameters ({names}), which "
                          "would never be updated; build the optimizer after apply_lora / freezing / adding heads "
                          "(from the model as it trains), or set requires_grad=False on those meant to stay fixed")


GROUP_COUNTERS = ("step",)
"""Keys of an optimizer's param_groups that count what the optimizer has done (a per-group step count, where an
optimizer keeps one there): a resume keeps them from the checkpoint, also one saved before GROUP_START was."""
GROUP_START = "start_settings"
"""The key under which each param_group keeps its other keys as they were when the run's Trainer was built (its
settings, and the counters an optimizer keeps in its groups at their initial values): saved with the group, so
a resume can tell the keys that the run moved (counters such as schedule-free's k and weight_sum or Prodigy's
d, which those optimizers also list among their constructor defaults) from the settings."""
GROUP_SCHEDULED = ("lr",)
"""Keys the Trainer itself sets at every step (lr from base_lr and the schedule): settings, never counters."""


def _group_start(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in group.items()
            if k not in ("params", GROUP_START)}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and a.equal(b)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def _keep_group_settings(optimizer: torch.optim.Optimizer, settings: list[dict[str, Any]]) -> None:
    """After optimizer.load_state_dict (which also restores the saved param_groups' lr, base_lr, weight_decay,
    betas...): each group's settings back to those this run's optimizer was built with, so a resume with a new
    optim.lr or weight_decay trains with them, as its 'settings changed' line says. Groups are matched by
    position: loading maps the checkpoint's groups onto this optimizer's own, in its order (by the parameters'
    names under a ParallelRunner). The per-parameter state and keys only the checkpoint's groups hold (ones an
    optimizer adds as it steps) stay as loaded, and so do the group's counters: GROUP_COUNTERS, and every key the
    checkpoint's run moved away from its start (GROUP_START) that this run starts at the same value (a key whose
    start the config changed takes the config's value; lr is the Trainer's own, GROUP_SCHEDULED)."""
    for group, mine in zip(optimizer.param_groups, settings, strict=True):
        start = group.get(GROUP_START)  # the checkpoint's run's; None in a checkpoint saved before it was kept

        def counter(k: str) -> bool:
            if k not in group:
                return False
            if k in GROUP_COUNTERS:
                return True
            return (isinstance(start, dict) and k in start and k not in GROUP_SCHEDULED and k != GROUP_START
                    and _same(mine[k], start[k]) and not _same(group[k], start[k]))

        group.update({k: v for k, v in mine.items() if not counter(k)})


def check_run_dir(run_dir: str | Path) -> None:
    """Refuses a run_dir that is empty, or is or lies under an existing file (its metrics log and checkpoints
    could not be written), before anything is built."""
    check_output_path(run_dir, "run_dir", flag="--run-dir")


class RunDirLock:
    """An exclusive, non-blocking lock on RUN_DIR/.lock (flock), so a second process training into the same
    run_dir is refused instead of interleaving its metrics and checkpoints with the first one's. The kernel
    drops it when the process dies (a SIGKILL leaves no stale lock); the file holds the holder's PID."""

    _held: dict[Path, "RunDirLock"] = {}  # the run_dirs this process holds (a conflict there may be garbage)

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): no protection
            return
        if self._file is not None:
            return
        key = self.path.resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                if key not in RunDirLock._held:
                    raise
                # held in this process: by a Trainer nothing refers to any more (a notebook cell run again), whose
                # reference cycle only the collector frees - collect it, and its lock with it, then try once more
                import gc

                gc.collect()
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            mine = " (another Trainer of this process: call its close() or let its fit end)" if key in \
                RunDirLock._held else ""
            raise ConfigError(f"run_dir {str(self.path.parent)!r} is in use by another training process (PID "
                              f"{holder}){mine}; wait for it to end or stop it, or use another run_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f
        RunDirLock._held[key] = self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None
            key = self.path.resolve()
            if RunDirLock._held.get(key) is self:
                del RunDirLock._held[key]


class Trainer:
    """hooks: objects with any of on_step_end(trainer, stats), on_log(trainer, row), on_eval(trainer,
    metrics), on_save(trainer, path). evaluator: model -> dict of floats (run under no_grad and eval
    mode; the model is on the trainer's device, so its inputs go there). extra_meta: JSON-able facts stored in
    every checkpoint's config.json (e.g. the chat template).
    base: lmforge.checkpoint.base_record of the checkpoint the model's frozen weights were loaded from: the
    checkpoints are then adapter-only (the frozen parameters left out, the base recorded; a LoRA run's), and
    a resume checks that the model was built on the same base."""

    def __init__(self, model: torch.nn.Module | TrainConfig, optimizer: torch.optim.Optimizer | None = None,
                 data: DataSource | None = None, objective: Objective | None = None, *,
                 config: LoopConfig | None = None, hooks: Iterable[Any] = (),
                 evaluator: Callable[[torch.nn.Module], dict[str, float]] | None = None, tokenizer=None,
                 extra_meta: dict[str, Any] | None = None, runner: ParallelRunner | None = None,
                 base: dict[str, Any] | None = None):
        if isinstance(model, TrainConfig):  # Trainer(cfg): pretraining built from its config
            from lmforge.train.pretrain import pretraining_parts

            check_run_dir(model.run_dir)  # before the model and the data are built
            model, optimizer, data, objective, config, evaluator, tokenizer, runner = pretraining_parts(model)
        if optimizer is None or data is None or objective is None or config is None:
            raise ConfigError("Trainer needs model, optimizer, data, objective and config (or one TrainConfig)")
        self.cfg = cfg = config
        check_run_dir(cfg.run_dir)
        self._live = False  # a live progress bar: set by fit
        self.device = ddp.train_device(cfg.device)
        self.rank, self.world = ddp.rank_and_world()  # only rank 0 writes metrics, plots and checkpoints
        self._logged_stats: tuple[int, dict[str, float]] | None = None  # a log row's stats, flushed, not yet written
        self._lock = RunDirLock(Path(cfg.run_dir))
        self.runner = runner
        ddp.check_runner(runner, self.world, objective)
        if runner is not None and runner.pp_mesh is not None and cfg.grad_accum > 1:
            from lmforge.parallel.pp import schedule_scales_grads

            if not schedule_scales_grads():
                raise ConfigError("parallel.pp with grad_accum > 1 needs torch >= 2.6 (its pipeline schedules divide "
                                  "the accumulated gradients again each step otherwise); raise "
                                  "parallel.n_microbatches instead of grad_accum")
        self.run_dir = Path(cfg.run_dir)
        self.model = model.to(self.device)
        # MoE layers with aux-loss-free balancing: their bias moves after each update (not walked for others).
        # Decided by the config where there is one, so every rank takes part in the update's collectives (a
        # pipeline stage may hold no MoE layer)
        mcfg = getattr(self.model, "cfg", None)
        self._moves_expert_bias = (getattr(mcfg, "mlp", None) == "moe" and mcfg.moe_cfg.bias_update_rate > 0) or any(
            isinstance(m, MoE) and m.m.bias_update_rate > 0 for m in self.model.modules())
        self.optimizer, self.data, self.objective = optimizer, data, objective
        self.hooks, self.evaluator, self.tokenizer = list(hooks), evaluator, tokenizer
        self.extra_meta = dict(extra_meta or {})
        self.base = base
        _check_optimizer_params(self.model, self.optimizer)
        for g in self.optimizer.param_groups:
            g.setdefault("base_lr", g["lr"])
            g.setdefault(GROUP_START, _group_start(g))  # a resume tells the counters the run moves by it
        self.step, self.tokens, self.elapsed = 0, 0, 0.0
        self.evaluated_step = -1  # the last step whose evaluation metrics.jsonl holds (a checkpoint keeps it)
        use_bf16 = uses_bf16(cfg, self.device)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16
                         else contextlib.nullcontext())
        # model + loss compiled as one graph, so the fp32 logits never round-trip through memory
        options = {k: True for k, on in (("coordinate_descent_tuning", cfg.compile_tune),
                                         ("triton.cudagraphs", cfg.compile_cudagraphs)) if on}
        self.loss_fn = checked_loss(torch.compile(objective.loss, options=options or None) if cfg.compile
                                    else objective.loss, type(objective).__name__)
        self._pending: list[tuple[int, dict[str, torch.Tensor]]] = []
        self._empty_steps: set[int] = set()  # steps with nothing to train (no update; their loss is undefined)
        self._told_empty = False
        self.flops_per_token: float | None = None  # known at the first batch (it depends on seq_len)
        self.peak = peak_flops(self.device, "bf16" if use_bf16 else "fp32")
        self.metrics = (MetricsLog(self.run_dir, tensorboard=cfg.tensorboard, wandb=cfg.wandb, config=to_dict(cfg))
                        if self.rank == 0 else ddp.NullLog())
        self.last_checkpoint: Path | None = None
        self._in_flight: tuple[int, dict[str, torch.Tensor]] = (0, {})  # the step's tokens and metrics
        self._begin_s = 0.0  # seconds in begin_step hooks since the last log row (not training time)
        self._paused_s = 0.0  # seconds evaluating and checkpointing since the last log row (not training either)
        self.qk_clip = self._qk_clip()
        # signals, stop requests, the step's phase (its update ends after the bias move and the QK-clip)
        self.interrupts = Interrupts(optimizer, post_update=self._moves_expert_bias or self.qk_clip is not None)
        if self.rank == 0:  # held from before the resume reads the run_dir until fit ends (or close())
            self._lock.acquire()
        try:
            self._resume_or_start()
        except BaseException:
            self._lock.release()
            raise

    def _resume_or_start(self) -> None:
        if self.cfg.resume:
            self._maybe_resume()
        elif ckpt.checkpoint_dirs(self.run_dir):
            # a fresh run must not mix its metrics and checkpoints with an older run's
            raise ConfigError(f"run_dir {self.run_dir} already holds checkpoints of another run and resume=False; "
                              "use a new run_dir, set resume=true to continue it, or delete it")

    def close(self) -> None:
        """Release the run_dir for another process (fit does this when it ends; a later fit takes it again)."""
        self._lock.release()

    def __del__(self):
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()

    # state ---------------------------------------------------------------------------------------
    def _train_state(self, optimizer_state: dict[str, Any], names: list[str],
                     data_ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
                "evaluated_step": self.evaluated_step,
                "optimizer": optimizer_state, "optimizer_name": optimizer_name(self.optimizer, self.cfg),
                "optimizer_params": names,  # parameter names in id order: any layout maps the state back
                "data": self.data.state_dict(), "objective": self.objective.state_dict(), **rng_state(),
                **({"data_ranks": data_ranks} if data_ranks is not None else {})}

    def _rank_data_states(self) -> list[dict[str, Any]] | None:
        """Every rank's data-source state (one all-gather), for a source whose state differs per rank
        (`per_rank_state = True`: an RL source holding its rank's share of a rollout between the PPO
        epochs over it); None for the others, whose rank 0 state every rank resumes from."""
        if self.world == 1 or not getattr(self.data, "per_rank_state", False):
            return None
        states: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(states, self.data.state_dict())
        return states

    def _data_state(self, state: dict[str, Any], path: Path) -> dict[str, Any]:
        """This rank's data-source state in a checkpoint: its own where each rank's was saved."""
        ranks = state.get("data_ranks")
        if ranks is None:
            return state["data"] if "data" in state else state["sampler"]
        if len(ranks) != self.world:
            raise ConfigError(f"{path} holds the data-source state of each of its {len(ranks)} processes (a "
                              f"per_rank_state source, e.g. rollouts between their PPO epochs), which cannot be dealt "
                              f"to {self.world}; resume on {len(ranks)} processes, or from a checkpoint written at a "
                              "rollout boundary")
        return ranks[self.rank]

    def save(self) -> Path:
        if self.runner is not None:  # full weights and optimizer state gathered on rank 0: an ordinary checkpoint
            weights, opt_state, names = ddp.gather_states(self.runner, self.optimizer)
            model = ddp.Gathered(self.model, weights)
        else:
            model, opt_state = self.model, self.optimizer.state_dict()
            names = ddp.param_names(self.model, self.optimizer)
        data_ranks = self._rank_data_states()  # every rank takes part
        if self.rank == 0:
            self.last_checkpoint = ckpt.save_checkpoint(
                self.run_dir, self.step, model, train_state=self._train_state(opt_state, names, data_ranks),
                tokenizer=self.tokenizer, keep_last=self.cfg.keep_last,
                extra={"tokens": self.tokens, **self.extra_meta}, base=self.base)
        if self.world > 1:
            torch.distributed.barrier()  # no rank reads it (or moves on to resume) before it is written
            self.last_checkpoint = ddp.checkpoint_path(self.run_dir, self.step)
        self._call("on_save", self.last_checkpoint)
        return self.last_checkpoint

    def _load_weights_and_optimizer(self, state: dict[str, Any], path: Path, partial: bool) -> None:
        """partial: an adapter-only checkpoint, whose frozen parameters are the model's own (its base)."""
        # checkpoints written before the names were stored: the optimizer's own order (every layout but pp)
        names = state.get("optimizer_params") or ddp.param_names(self.model, self.optimizer)
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if self.runner is None:
            ckpt.load_weights(self.model, path, set(self.model.state_dict()) - ckpt.frozen_names(self.model)
                              if partial else None)
            if names != ddp.param_names(self.model, self.optimizer) and not self.cfg.reset_optimizer:
                raise ConfigError(f"{path}: the optimizer state lists its parameters in another order than this "
                                  "optimizer; use the same optim settings, or set reset_optimizer=true")
            self._load_optimizer(state, path)
        else:
            from safetensors.torch import load_file

            reset = self.cfg.reset_optimizer
            self._load_optimizer(state, path, check_only=True)
            ddp.load_states(self.model, self.optimizer, load_file(str(path / "model.safetensors")),
                            None if reset else state["optimizer"], names, partial=partial)
        _keep_group_settings(self.optimizer, settings)

    def _load_optimizer(self, state: dict[str, Any], path: Path, check_only: bool = False) -> None:
        saved, now = state.get("optimizer_name"), optimizer_name(self.optimizer, self.cfg)
        if self.cfg.reset_optimizer:
            tqdm.write(f"reset_optimizer: {now} starts with fresh state (checkpoint had {saved or 'unknown'})")
            return
        if saved is not None and saved != now:
            raise ConfigError(f"{path} was trained with optimizer {saved} but the config says {now}; resume with "
                              f"the same optim.name, or set reset_optimizer=true to start {now} fresh")
        if check_only:
            return
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{path}: the optimizer state does not fit this optimizer ({e!r}); use the same "
                              "optim settings, or set reset_optimizer=true to start it fresh") from e

    def _maybe_resume(self) -> None:
        for p in (ckpt.clean_partial(self.run_dir) if self.rank == 0 else []):
            tqdm.write(f"removed {p} (a checkpoint a killed run did not finish writing)")
        found = ckpt.checkpoint_dirs(self.run_dir)
        if not found:
            return
        path = found[-1]
        meta = ckpt._verify(path)
        if "model" in meta and hasattr(self.model, "cfg"):
            ckpt.check_same_model(meta["model"], self.model.cfg)
        if "model" in meta:  # LoRA runs: the same adapters (an alpha change keeps the shapes, not the function)
            saved = meta.get("lora", {})
            now = {k: list(v) for k, v in _lora_now(self.model).items()}  # (not model_meta: no meta-model build)
            if saved != now:
                k = next(iter(sorted(set(saved) ^ set(now)) or [n for n in saved if saved[n] != now.get(n)]))
                raise ConfigError(f"{path} was trained with LoRA adapter {k} = {saved.get(k)} ([r, scale]) but the "
                                  f"model has {now.get(k)}; use the run's LoRA settings or a new run_dir")
        self._check_base(meta.get("base"), path)
        state = ckpt.load_train_state(path)
        self._load_weights_and_optimizer(state, path, partial=bool(meta.get("base")))
        self.data.load_state_dict(self._data_state(state, path))
        self.objective.load_state_dict(state.get("objective", {}))
        set_rng_state(state)
        self.step, self.tokens, self.elapsed = state["step"], state["tokens"], state["elapsed"]
        self.evaluated_step = state.get("evaluated_step", self.step)  # older checkpoints: taken as evaluated
        self.metrics.truncate_after(self.step)
        self.last_checkpoint = path
        if self.rank == 0:
            tqdm.write(f"resumed from {path} at step {self.step}")
            changed = changed_settings(self.run_dir / "config.json", to_dict(self.cfg), type(self.cfg))
            if changed:
                notes = ["the learning-rate schedule follows the new max_steps"] if "max_steps " in changed else []
                if changed.startswith("seed ") or ", seed " in changed:
                    notes.append("the data order and random state continue from the checkpoint, not from the new "
                                 "seed; a post-training data source shuffles its later epochs with it")
                why = f" ({'; '.join(notes)})" if notes else ""
                tqdm.write(f"settings changed since the run's last start: {changed}{why}")
            if self.step >= self.cfg.max_steps:
                tqdm.write(f"the run is already at step {self.step} >= max_steps={self.cfg.max_steps}: nothing to "
                           "train; raise max_steps to continue it")

    def _check_base(self, saved: dict[str, Any] | None, path: Path) -> None:
        """An adapter-only checkpoint resumes onto a model built on the base it records (the same weights,
        the same merge; the path may have moved); a full one onto any model."""
        if not saved:
            return
        if self.base is None:
            raise ConfigError(f"{path} is adapter-only (its base {saved['path']} is not in it) but this run saves "
                              "full checkpoints; resume as it started ([lora] save = 'adapters', Trainer(base=...)) "
                              "or use a new run_dir")
        now = {k: self.base.get(k) for k in ("sha256", "merge_lora")}
        if now != {k: saved.get(k) for k in now}:
            raise ConfigError(f"{path} trained adapters over the base {saved['path']} (sha256 {saved['sha256']}, "
                              f"merge_lora {saved.get('merge_lora')}), but this run starts from {self.base['path']} "
                              f"(sha256 {self.base['sha256']}, merge_lora {self.base.get('merge_lora')}); resume "
                              "from that base (init) or use a new run_dir")

    # steps ---------------------------------------------------------------------------------------
    def _call(self, name: str, *args) -> None:
        for h in self.hooks:
            fn = getattr(h, name, None)
            if fn is not None:
                fn(self, *args)

    def _to_device(self, batch: Batch) -> Batch:
        if self.flops_per_token is None and hasattr(self.model, "flops_per_token") and "input_ids" in batch:
            self.flops_per_token = self.model.flops_per_token(batch["input_ids"].shape[-1])
        if self.device.type == "cuda":  # host rows pinned for an asynchronous copy; device tensors (e.g.
            # rollouts sampled on the GPU) are used where they are
            move = lambda v: v.pin_memory().to(self.device, non_blocking=True) if v.device.type == "cpu" \
                else v.to(self.device)  # noqa: E731
        else:
            move = lambda v: v.to(self.device)  # noqa: E731
        # other values (RL metadata: the prompts' texts, a list of rewards) reach the objective as they are
        return {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _micro_batches(self) -> tuple[list[tuple[Batch, float | None]], int, bool]:
        """The step's grad_accum micro-batches on the device, each with its share of the step's loss:
        None = 1/grad_accum, or, for objectives with `batch_weight(batch)` (the items their loss averages
        over, e.g. SFT's trained tokens), the micro-batch's share of the step's items, so accumulated
        micro-batches give the loss of one big batch (as HF/TRL normalise); a micro-batch of weight 0 (nothing
        to train) gets share 0 and adds nothing to the step. Weights are read on the host
        before the transfer, so no device sync (a batch a data source made on the device, e.g. GPU rollouts,
        costs one per micro-batch). On N ranks the total is the ranks' mean (one host all-reduce):
        the ranks' gradients are averaged, so each share is then its part of the global batch's items x N
        (rows for objectives without batch_weight). Also returns the step's tokens over every data-parallel
        rank (the same all-reduce; a rank's Repeated rows are not the step's), and whether the whole step has
        nothing to train (every weight 0, on every rank). Raises DataEnded when the data source's next_batch
        raised StopIteration (on any rank: the flag travels in the same all-reduce)."""
        raw = []
        try:
            for _ in range(self.cfg.grad_accum):
                raw.append(self.data.next_batch())
        except StopIteration:
            ended = True
        else:
            ended = False
        if ended and self.runner is None:
            raise DataEnded(len(raw))
        raw_ok = [] if ended else raw
        n_tokens = sum(batch_tokens(b) for b in raw_ok if not isinstance(b, ddp.Repeated))
        weigh = getattr(self.objective, "batch_weight", None)
        if weigh is None and self.runner is not None:  # ranks' shares of a short batch differ: weigh by rows
            weigh = batch_rows
        weights = [0.0 if isinstance(b, ddp.Repeated) else float(weigh(b)) for b in raw_ok] if weigh is not None \
            else []
        total = sum(weights)
        if self.runner is not None:  # (weigh is set): ranks outside data parallelism (tp, pp, cp) hold the same
            # rows as their replica's, so each global sum counts world / dp_size times
            sums = ddp.sum_over_ranks(torch.tensor([total, n_tokens, ended], dtype=torch.float64), self.runner)
            total, n_tokens = float(sums[0]) / self.world, round(float(sums[1]) * self.runner.dp_size / self.world)
            if sums[2] > 0:
                raise DataEnded(len(raw))
        empty = weigh is not None and total == 0  # (batch_weight 0 everywhere: shares 0, the update is skipped)
        shares = [w / total for w in weights] if total > 0 else [0.0 if empty else None] * len(raw)
        # a rank's repeated rows (a batch shorter than the ranks: RankRows) join the step at no weight; they stay
        # Repeated on the device, so train_step leaves their tokens out of the MoE load too
        shares = [0.0 if isinstance(b, ddp.Repeated) else s for b, s in zip(raw, shares)]
        moved = [self._to_device(b) for b in raw]
        return [(ddp.Repeated(m) if isinstance(b, ddp.Repeated) else m, share)
                for b, m, share in zip(raw, moved, shares)], n_tokens, empty

    def train_step(self) -> dict[str, Any]:
        """One optimizer step. Metrics and grad norm stay on the device (no host sync); `flush()` reads
        them in one go at log time and stops the run on a NaN/inf loss."""
        cfg = self.cfg
        self.interrupts.begin_step(self.data, self.objective)
        mult = lr_multiplier(cfg.optim, self.step, cfg.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * mult
        sums: tuple[torch.Tensor, ...] = ()
        if self.qk_clip is not None:
            self.qk_clip.reset()  # the max logits of this step's forward passes only (not of evaluations)
        hooks = [h for h in (getattr(self.data, "begin_step", None), getattr(self.objective, "begin_step", None)) if h]
        if hooks:  # e.g. an RL source samples this step's rollouts here: timed apart from the training throughput
            _sync(self.device)  # (the last step's queued work is not the hooks')
            t0 = time.perf_counter()
            for begin in hooks:
                begin(self)
            _sync(self.device)
            self._begin_s += time.perf_counter() - t0
        micro, n_tokens, empty_step = self._micro_batches()
        keys: list[str] = []
        subsets = getattr(self.objective, "subset_means", None)  # (KTO's per-label means: from sums and counts)
        for i, (batch, share) in enumerate(micro):
            # repeated rows are not the step's tokens: they must not move the aux-loss-free MoE bias, nor count;
            # neither do the rows of a micro-batch with nothing to train (batch_weight 0)
            repeated = isinstance(batch, ddp.Repeated)
            uncounted = load_uncounted(self.model) if share == 0.0 else contextlib.nullcontext()
            with self.forward_context(), uncounted:
                loss, metrics = self._forward_backward(batch, 1 / cfg.grad_accum if share is None else share,
                                                       sync=i == len(micro) - 1, empty=share == 0.0 and not repeated)
            metrics = {"loss": loss, **metrics}
            if keys and list(metrics) != keys:
                raise ConfigError(f"the objective's metrics changed between micro-batches: {keys} then "
                                  f"{list(metrics)}; return the same metrics for every batch")
            keys = list(metrics)
            # counts (num_*) add up over the micro-batches, means are weighted by their shares; a share-0 micro-batch
            # (one with nothing to train; a Repeated batch, whose counts are the rank's that trains on its rows)
            # adds nothing to the means, and no metric adds what a micro-batch cannot define (NaN: KTO's mean over a
            # label it lacks); an objective's subset means (KTO's per-label ones) are weighed by their subset's count
            terms = metric_terms(metrics, 1 / cfg.grad_accum if share is None else share, counted=not repeated,
                                 subsets=subsets)
            sums = terms if not sums else (sums[0] + terms[0], sums[1] + terms[1])
        totals, weights = sums
        if self.runner is None:
            params = [p for p in self.model.parameters() if p.grad is not None]
            if not params:  # no micro-batch had anything to train
                gnorm = torch.zeros((), device=self.device)
            elif cfg.optim.grad_clip > 0:
                gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            else:
                gnorm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        else:  # the norm over every shard, stage and replica; the ranks' sums (means over ranks of equal shares)
            gnorm = self.runner.clip_grad_norm_(cfg.optim.grad_clip)
            both = self.runner.global_loss(torch.cat([totals, weights]))
            totals, weights = both[:len(keys)], both[len(keys):]
            if self.runner.pp_mesh is not None:  # every stage holds the weights, only the last the totals
                weights = weights / self.runner.cfg.pp
            totals = torch.stack([t * self.runner.dp_size if k.startswith("num_") else t
                                  for k, t in zip(keys, totals.unbind())])
        stats: dict[str, torch.Tensor] = combined_metrics(keys, totals, weights, subsets)
        stats["grad_norm"] = gnorm
        self._in_flight = (n_tokens, stats)
        self.interrupts.begin_update()
        if empty_step:  # nothing to train in any micro-batch: no update (weights and optimizer state unchanged)
            self._empty_steps.add(self.step + 1)
            if not self._told_empty and self.rank == 0:
                tqdm.write(f"step {self.step + 1}: every micro-batch has batch_weight 0 (nothing to train), so the "
                           "step makes no update; it counts as a step and logs loss null (said once per run)")
            self._told_empty = True
            if self.qk_clip is not None:
                stats.update({"qk/max_logit": torch.full((), float("nan"), device=self.device),
                              "qk/clipped_heads": torch.zeros((), device=self.device)})
        else:
            self.optimizer.step()  # a torch optimizer's step hooks also mark the update's start and end
            if self._moves_expert_bias:  # aux-loss-free MoE balancing, once per step
                update_expert_biases(self.model, world=self.runner is not None)
            if self.qk_clip is not None:
                stats.update(self._clip_qk())
        self.interrupts.end_update()
        self._finish_step()
        stats = {**stats, "lr": self.optimizer.param_groups[0]["lr"]}
        self._call("on_step_end", stats)
        return stats

    def _qk_clip(self):
        """MuonClip's QK-clip (optim.qk_clip_tau > 0): a MaxLogitRecorder of every attention layer's per-head
        max logit over the step's forward passes (lmforge.parallel.qk_logits); after each update the heads
        above tau get W_q, W_k shrunk. One process, DDP or FSDP (the max is all-reduced over the ranks)."""
        tau = getattr(self.optimizer, "qk_clip_tau", 0.0)
        if not tau:
            return None
        from lmforge.parallel.qk_logits import MaxLogitRecorder

        if self.runner is not None and (self.runner.cfg.tp > 1 or self.runner.cfg.pp > 1 or self.runner.cfg.cp > 1):
            raise ConfigError("optim.qk_clip_tau runs on one process, dp_replicate or dp_shard; set parallel.tp, pp "
                              "and cp to 1 (each would see only part of a head's logits)")
        recorder = MaxLogitRecorder(self.model)  # (refuses a model without lmforge MHA/GQA attention)
        recorder.layers()  # refuses fused q/k/v weights now, not after the first update
        return recorder

    def _clip_qk(self) -> dict[str, torch.Tensor]:
        """Clip after the update; the step's largest logit and the number of heads clipped, as metrics."""
        from lmforge.parallel.qk_logits import clip_qk_

        if self.runner is not None:
            self.qk_clip.all_reduce_()
        layers = self.qk_clip.layers()
        gammas = clip_qk_(layers, self.optimizer.qk_clip_tau)
        return {"qk/max_logit": torch.stack([m.max() for _, _, m, _ in layers]).max(),
                "qk/clipped_heads": sum((g < 1).sum() for g in gammas).float()}

    @contextlib.contextmanager
    def forward_context(self):
        """The precision and attention backend the Trainer runs the model's forwards in (autocast to bf16 where
        configured, the SDPA backend): a data source or objective recomputing log-probs without gradients (old
        log-probs of rollouts) uses it, so they equal the training forward's."""
        with self.autocast, sdpa_context(self.cfg.sdpa_backend):
            yield

    def _forward_backward(self, batch: Batch, scale: float, sync: bool, empty: bool = False
                          ) -> tuple[torch.Tensor, dict]:
        """One micro-batch's forward and backward, its gradients scaled by `scale`: in this process, or this
        rank's share through the ParallelRunner (a pipeline runs the LM loss through its schedule; sync=False
        lets FSDP skip the reduce-scatter until the step's last micro-batch). empty: a micro-batch with nothing
        to train (batch_weight 0, whose loss may well be NaN, a mean over nothing): its loss and metrics without
        a backward in one process; under a runner (whose ranks all join the backward's collectives) with the
        gradient reaching the model's outputs zeroed, so it adds exactly nothing (a pipeline's LM loss sums over
        the trained tokens at scale 0, which adds nothing as well: ParallelRunner._pipeline_loss)."""
        runner = self.runner
        if runner is None:
            if empty:
                with torch.no_grad():
                    return self.loss_fn(self.model, batch)
            loss, metrics = self._loss_to_train(self.model, batch)
            (loss * scale).backward()
            return loss, metrics
        if runner.pp_mesh is not None:
            return runner.forward_backward(batch["input_ids"], batch["targets"], scale, sync), {}
        return runner.objective_step(batch, self._empty_loss if empty else self._loss_to_train, scale, sync,
                                     weight=getattr(self.objective, "batch_weight", None))

    def _loss_to_train(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        loss, metrics = self.loss_fn(model, batch)
        if not loss.requires_grad:
            raise ConfigError(f"{type(self.objective).__name__}.loss returned a loss that does not depend on the "
                              "trained parameters (no grad_fn), so there is nothing to backpropagate; to skip a batch "
                              "with nothing to train, return 0 from the objective's batch_weight(batch) (the Trainer "
                              "then leaves it out of the step)")
        return loss, metrics

    def _empty_loss(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        """The objective's loss with the gradient that reaches the model's outputs replaced by zeros."""
        from torch.utils._pytree import tree_leaves

        def zero_grads(module, args, out):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(torch.zeros_like)

        handle = model.register_forward_hook(zero_grads)
        try:
            loss, metrics = self.loss_fn(model, batch)
        finally:
            handle.remove()
        if not loss.requires_grad:  # (one process runs no backward for it; here every rank must)
            raise ConfigError(f"{type(self.objective).__name__}.loss returned a constant for a batch with nothing to "
                              "train (batch_weight 0); under [parallel] every rank joins the step's forward and "
                              "backward collectives, so compute it from the model's forward as for any batch (a NaN "
                              "mean over nothing is fine: the Trainer zeroes its gradient)")
        return loss, metrics

    def _finish_step(self) -> None:
        n_tokens, stats = self._in_flight
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += n_tokens
        self._pending.append((self.step, stats))
        self.interrupts.phase = None

    def flush(self) -> dict[str, float]:
        """Read the pending per-step metrics (one host sync); raise TrainingDiverged on the first bad loss."""
        if not self._pending:
            return {}
        keys = list(self._pending[-1][1])
        for step, m in self._pending:
            if set(m) != set(keys):
                raise ConfigError(f"the objective's metrics changed between steps: step {step} logged {sorted(m)}, "
                                  f"step {self._pending[-1][0]} {sorted(keys)}; return the same metrics every step")
        steps = [s for s, _ in self._pending]
        values = torch.stack([torch.stack([m[k].float().to(self.device) for k in keys])
                              for _, m in self._pending]).tolist()
        self._pending.clear()
        # a finite loss can still come with a non-finite gradient, which the optimizer step has already applied
        for step, row in zip(steps, values):
            for name in ("grad_norm",) if step in self._empty_steps else ("loss", "grad_norm"):  # (no loss to take)
                if name in keys and not math.isfinite(row[keys.index(name)]):
                    where = self.last_checkpoint or "none was written"
                    raise TrainingDiverged(f"{name} became {row[keys.index(name)]} at step {step}; stopped. Last good "
                                           f"checkpoint: {where}. Lower optim.lr or raise optim.warmup_steps")
        self._empty_steps.difference_update(steps)
        return dict(zip(keys, values[-1]))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The evaluator's metrics (validation loss, perplexity, bits-per-byte for pretraining)."""
        if self.evaluator is None:
            return {}
        self.model.eval()
        try:
            with self.forward_context():
                out = self.evaluator(self.model)
        finally:
            self.model.train()
        return checked_metrics(out, "the evaluator")

    # loop ----------------------------------------------------------------------------------------
    def _log_eval(self, bar, record: bool = True) -> dict[str, float]:
        """Evaluate, show and hand to the hooks; record=False leaves metrics.jsonl alone (a finished run's
        evaluation, recorded when it got there)."""
        t0 = time.perf_counter()
        ev = self.evaluate()
        self._paused_s += time.perf_counter() - t0  # left out of the next row's tok/s and MFU (it halved them)
        if ev:
            if record:
                self.metrics.log({"step": self.step, "tokens": self.tokens, **ev})
                self.evaluated_step = self.step
            if self.rank == 0:  # with the bar off too: a batch job's log keeps its evaluations
                line = f"step {self.step:>6} | " + " | ".join(f"{k} {v:.4f}" for k, v in ev.items())
                if self._live:
                    bar.write(line)
                else:
                    print(line, flush=True)
            self._call("on_eval", ev)
        return ev

    def _log_step(self, bar, t_start: float) -> None:
        """Build the step's whole row, write it, and only then mark it logged: an interrupt while the row is
        built (a second Ctrl-C in a data source's log_stats) leaves the flushed stats in `_logged_stats` and
        `_logged_step` behind, so `Interrupts.interrupted` writes the row before the checkpoint."""
        if self._logged_stats is None or self._logged_stats[0] != self.step:
            self._logged_stats = (self.step, {**self.flush(), "lr": self.optimizer.param_groups[0]["lr"]})
        stats = self._logged_stats[1]
        now = time.perf_counter()
        self.elapsed = now - t_start
        # begin_step hooks' time (RL rollouts) is not training: tok/s and MFU leave it out, begin_step_s shows it
        tps = (self.tokens - self._tok_last) / max(now - self._t_last - self._begin_s - self._paused_s, 1e-9)
        row = {"step": self.step, "tokens": self.tokens, **stats, "tok_per_s": tps, "elapsed": self.elapsed}
        if self._begin_s:
            row["begin_step_s"] = self._begin_s
        if self.flops_per_token and self.peak:
            row["mfu"] = tps * self.flops_per_token / (self.peak * self.world)
        data_stats = getattr(self.data, "log_stats", None)
        if callable(data_stats):
            row.update(data_stats())
        self.metrics.log(row)  # before the hooks: a KeyboardInterrupt raised in one must not lose the row
        self._t_last, self._tok_last, self._logged_step, self._begin_s = now, self.tokens, self.step, 0.0
        self._paused_s = 0.0
        self._logged_stats = None
        shown = dict(loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}", tok_s=f"{tps:,.0f}",
                     **({"mfu": f"{row['mfu']:.1%}"} if "mfu" in row else {}))
        if self._live:
            bar.set_postfix(**shown)
        elif self.rank == 0:  # no bar (a batch job, a log file): one plain line per log step
            print(f"step {self.step:>6}/{self.cfg.max_steps} | " + " | ".join(f"{k} {v}" for k, v in shown.items()),
                  flush=True)
        self._call("on_log", row)

    def _is_log_step(self) -> bool:
        return self.step % self.cfg.log_every == 0 or self.step == self.cfg.max_steps

    def request_stop(self, reason: str = "requested by a hook") -> None:
        """End `fit` at the end of the current step as if max_steps were reached there: evaluate, write a
        checkpoint, return (TrainResult.stop_reason says why). For hooks: early stopping, a time budget, a
        target metric. Under several ranks, one rank asking is enough (agreed at the step boundary)."""
        self.interrupts.reason = reason

    def has_current_checkpoint(self) -> bool:
        """Whether the last checkpoint written is of the current step."""
        return self.last_checkpoint is not None and self.last_checkpoint.name.endswith(f"{self.step:06d}")

    def _eval_owed(self) -> bool:
        """At the start of fit: step 0's evaluation, or a resumed evaluation step's that the interrupted run did
        not log (a second Ctrl-C during the step's log or evaluation checkpoints the step without it). The
        checkpoint carries evaluated_step, so every rank decides alike."""
        s, cfg = self.step, self.cfg
        due = s == 0 or s % cfg.eval_every == 0 or s == cfg.max_steps
        return due and self.evaluated_step != s

    def _save_at_boundary(self, t_start: float) -> None:
        self.flush()  # never checkpoint weights that a NaN step has already touched
        t0 = self.elapsed = time.perf_counter() - t_start
        self.save()
        self._paused_s += time.perf_counter() - t_start - t0  # not training, as evaluations are not

    def fit(self) -> TrainResult:
        cfg = self.cfg
        self.interrupts.reset(self)  # (refused after an interrupt inside an update)
        if self.rank == 0:
            self._lock.acquire()  # again after an earlier fit released it
            if self.step == 0:  # a fresh run starts a fresh log
                self.metrics.path.unlink(missing_ok=True)
            write_json_atomic(self.run_dir / "config.json",
                              {"config": to_dict(cfg), "seed": cfg.seed, **run_metadata()})
        self.model.train()
        # a live bar where someone watches; plain lines in a log file or a pipe (no carriage-return clutter)
        self._live = cfg.progress and sys.stderr.isatty()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self._live or self.rank > 0, dynamic_ncols=True,
                   desc="train", unit="step")
        ev: dict[str, float] = {}
        ev_step = -1
        self._t_last, self._tok_last, self._logged_step = time.perf_counter(), self.tokens, self.step
        self._logged_stats = None
        self._begin_s = self._paused_s = 0.0
        t_start = time.perf_counter() - self.elapsed
        try:
            with self.interrupts.deferred_signals():
                if self._eval_owed():
                    ev, ev_step = self._log_eval(bar), self.step
                    if self.evaluated_step == self.step and self.has_current_checkpoint():
                        # the resumed checkpoint said the evaluation was owed: rewrite it (atomically), or every
                        # later resume from it would log the evaluation again
                        self._save_at_boundary(t_start)
                asked = False
                while self.step < cfg.max_steps:
                    asked = self.interrupts.at_boundary(self.runner)  # one all-reduce; raises on a signal
                    if asked:
                        break
                    try:
                        self.train_step()
                    except DataEnded as end:  # a finite source at its end: the run ends at the last whole step
                        self.interrupts.to_boundary(self)  # (the unfinished step rolled back)
                        left = (f"; the {end.drawn} micro-batch(es) drawn for step {self.step + 1} are left untrained"
                                if end.drawn else "")
                        self.interrupts.reason = f"the data ended (its next_batch raised StopIteration{left})"
                        asked = True
                        break
                    bar.update(1)
                    if self._is_log_step():
                        self._log_step(bar, t_start)
                    if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                        self.flush()
                        ev, ev_step = self._log_eval(bar), self.step
                    if self.step % cfg.ckpt_every == 0 or self.step == cfg.max_steps:
                        self._save_at_boundary(t_start)
                if asked and self.step < cfg.max_steps:  # a hook's stop: end as a last step would
                    if self._logged_step != self.step:
                        self._log_step(bar, t_start)
                    if ev_step != self.step:
                        self.flush()
                        ev = self._log_eval(bar)
                    if self.step > 0 and not self.has_current_checkpoint():
                        self._save_at_boundary(t_start)
                    if self.rank == 0:
                        tqdm.write(f"stopped at step {self.step}: {self.interrupts.reason}")
                if not ev:  # resumed at (or past) the last step: report the finished model's evaluation
                    ev = self._log_eval(bar, record=False)
        except KeyboardInterrupt:
            self.interrupts.interrupted(self, bar, t_start)
            bar.close()
            raise
        finally:
            bar.close()
            self.metrics.close()
            self.close()
        if cfg.plot and self.rank == 0:
            plot_losses(self.run_dir, ylabel=loss_label(self.objective))
        return TrainResult(self.run_dir, self.step, ev.get("val_loss"), ev.get("val_bpb"), self.elapsed,
                           self.last_checkpoint, read_metrics(self.run_dir) if self.rank == 0 else [], ev,
                           self.interrupts.reason if self.step < cfg.max_steps else None)


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


def train(cfg: TrainConfig) -> TrainResult:
    """Train as `lmforge train` does: build model, data and optimizer from `cfg` and run to max_steps."""
    return Trainer(cfg).fit()


__all__ = ["Trainer", "TrainResult", "train", "DataError"]


def _sync(device) -> None:
    """Wait for the device's queued work (CUDA), so host time measures what ran between two calls."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _lora_now(model) -> dict:
    """The model's unmerged adapters as a checkpoint records them (checkpoint.model_meta's "lora"; a head on a
    backbone: the backbone's)."""
    from lmforge.adapt.lora import lora_record

    if getattr(model, "head_record", None) is not None and hasattr(model, "backbone"):
        model = model.backbone
    return lora_record(model)
