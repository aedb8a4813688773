"""`lmforge scaling ...`: scaling-law sweeps and fits.

    lmforge scaling sweep [--budgets 3e10 1e11 3e11 --depths 1 2 3 4 --out runs/scaling_sweep]
    lmforge scaling fit   [--table runs/scaling_sweep/runs.csv --predict 1e12 1e13]
    lmforge scaling flops --depth 12 --tokens 1e9      (6ND with N = all parameters, the active ones for an MoE,
                                                         and the exact count for from_depth's model, or the
                                                         sweep's with --width 16 --vocab-size 257 --seq-len 64;
                                                         --model PRESET, run.toml, a checkpoint or a HF model
                                                         directory for others)
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.cli.common import parse_config, run_group
from lmforge.config import check
from lmforge.errors import ConfigError
from lmforge.scaling.flops import depth_model


def _sweep(argv: list[str]) -> int:
    from lmforge.scaling.sweep import SweepConfig, main_sweep

    main_sweep(parse_config(SweepConfig, argv, prog="lmforge scaling sweep",
                            description="Train a grid of from_depth models over FLOP budgets; write runs.csv."))
    return 0


def _fit(argv: list[str]) -> int:
    from lmforge.errors import LmforgeError, require
    from lmforge.scaling.report import FitConfig, run_fits, write_report

    cfg = parse_config(FitConfig, argv, prog="lmforge scaling fit",
                       description="Kaplan and Chinchilla (approaches 1-3) fits, predictions, CIs and plots.")
    require("scipy", "scaling")  # the fits' optimisers; checked before any work
    if cfg.plots:  # checked before the fits too: their minutes (bootstrap) would be lost with no fit.json written
        try:
            require("matplotlib", "plot")
        except LmforgeError as e:
            raise LmforgeError(f"{e}, or pass --plots False") from e
    report = run_fits(cfg)
    path = write_report(cfg, report)
    print(json.dumps({k: v for k, v in report.items() if k != "approach1"}, indent=1, default=float))
    print(f"wrote {path}", file=sys.stderr)  # stdout holds the JSON alone (`lmforge scaling fit | jq .kaplan`)
    # the reasons are in the JSON above too, but a screen of numbers above hides them
    for name, why in report.get("skipped", {}).items():
        print(f"lmforge scaling fit: skipped {name}: {why}", file=sys.stderr)
    if not report["predictions"]:
        print("lmforge scaling fit: no approach fitted the compute-optimal frontier, so nothing is predicted; "
              "train more model sizes and budgets (reasons above)", file=sys.stderr)
    return 0


@dataclass(frozen=True, kw_only=True)
class FlopsArgs:
    depth: int = 12
    """ModelConfig.from_depth(depth) (nanochat's dial: 64 channels per layer of depth, 128-wide heads), with
    --vocab-size and max_seq_len 1024, unless --model is given"""
    width: int = 0
    """channels per layer of --depth for the scaling sweep's models instead (flops.depth_model: d_model =
    width·depth, heads of width): `--width 16 --vocab-size 257 --seq-len 64` counts `lmforge scaling sweep`'s model
    of that depth (at its default seq_len 64, also the model's max_seq_len); 0 = from_depth's"""
    model: str = ""
    """a ModelConfig preset name (llama-small, gpt2-small, ...), an lmforge checkpoint or run directory, a HF model
    directory, or a TOML/JSON file: a run config's [model] section, a run directory's config.json, a checkpoint's or
    a HF model's config.json or a model's keys at top level; replaces --depth, --width and --vocab-size"""
    tokens: float = 1e9
    """training tokens D"""
    seq_len: int = 0
    """context of the attention term (0 = the rows a run config trains on: its [data] seq_len, or data.seq_len's
    default; else (a preset, a checkpoint's config.json) the model's max_seq_len)"""
    vocab_size: int = 50304
    """vocabulary of the --depth model"""

    def __post_init__(self) -> None:
        # checked before the count: a negative context was counted as it stood, NaN tokens printed "nan FLOPs"
        check(math.isfinite(self.tokens) and self.tokens > 0, f"--tokens must be a positive number, got {self.tokens}")
        check(self.seq_len >= 0, f"--seq-len must be >= 0 (0 = the model's or run's own), got {self.seq_len}")
        check(self.width == 0 or (self.width >= 2 and self.width % 2 == 0),
              f"--width must be even and >= 2 (or 0: from_depth's model), got {self.width}")


def _flops_model(a: FlopsArgs):
    """The ModelConfig `lmforge scaling flops` counts (see FlopsArgs.model) and the context it is counted at:
    --seq-len, else the rows a run config trains on (its [data] seq_len, or DataConfig's default when it gives
    none), else the model's max_seq_len."""
    from lmforge.config import from_dict
    from lmforge.model.config import PRESETS, ModelConfig

    if not a.model:
        if a.width:
            cfg = depth_model(a.depth, width=a.width, vocab_size=a.vocab_size, max_seq_len=a.seq_len or 1024)
        else:
            cfg = ModelConfig.from_depth(a.depth, vocab_size=a.vocab_size, max_seq_len=a.seq_len or 1024)
        return cfg, a.seq_len or cfg.max_seq_len
    if a.model in PRESETS:
        cfg = ModelConfig.preset(a.model)
        return cfg, a.seq_len or cfg.max_seq_len
    path = Path(a.model)
    if path.is_dir() and (path / "config.json").is_file():  # a checkpoint, run or HF model directory: its config.json
        path = path / "config.json"
    elif not a.model.endswith((".toml", ".json")):
        raise ConfigError(f"--model {a.model!r} is neither a preset ({', '.join(sorted(PRESETS))}), a checkpoint, "
                          "run or HF model directory (with a config.json) nor a .toml / .json file")
    model, seq_len = _model_record(path)
    cfg = model if isinstance(model, ModelConfig) else from_dict(ModelConfig, model, where="model")
    return cfg, a.seq_len or seq_len or cfg.max_seq_len


def _is_checkpoint_config(path: Path, raw: dict) -> bool:
    """Whether `raw`, read from `path`, is an lmforge checkpoint's config.json. The signal is the checkpoint's seal:
    the manifest.json its writer puts beside it last, listing it (lmforge.checkpoint._seal; every checkpoint has
    one, and a run config never sits in a checkpoint directory). A config.json copied out of its folder has no
    seal; it is known by the step it was saved at, a key every checkpoint writer has put there and no run config
    can hold (TrainConfig and PostTrainConfig have no such field, and refuse keys they do not know)."""
    try:
        files = json.loads((path.parent / "manifest.json").read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        files = {}
    return path.name in files or "step" in raw


def _model_record(path: Path):
    """The model keys of a TOML/JSON file `--model` names (or its ModelConfig) and the rows it trains on (None: not
    known, so the model's max_seq_len). The file is one of:
    - a HF model's config.json (model_type / architectures): its ModelConfig, as the HF loader reads it;
    - an lmforge checkpoint's config.json (_is_checkpoint_config): the model it saved, its [model] table;
    - a run directory's config.json, the resolved config the Trainer keeps ({"config": run config, "seed", ...});
    - a run config (a [model] table beside [data], [optim], ...): trained at its [data] seq_len or the default;
    - a bare model config (the keys of ModelConfig at top level)."""
    from lmforge.config import read_config_file

    raw = read_config_file(path)
    if "model_type" in raw or "architectures" in raw:  # keys of HF's config.json that no lmforge config has
        from lmforge.model.hf import config_from_hf

        return config_from_hf(raw), None
    if _is_checkpoint_config(path, raw):
        if not isinstance(raw.get("model"), dict):
            raise ConfigError(f"{path}: this checkpoint holds a {raw.get('model_class', 'model')} and records no "
                              "ModelConfig to count; give the run config it was trained from")
        return raw["model"], None
    if isinstance(raw.get("config"), dict) and "lmforge_version" in raw:  # a run directory's record: its config
        raw = raw["config"]
    if not isinstance(raw.get("model"), dict):
        return raw, None
    from lmforge.train.config import DataConfig

    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    seq_len = data.get("seq_len", DataConfig().seq_len)
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ConfigError(f"{path}: data.seq_len must be a positive integer, got {seq_len!r}")
    return raw["model"], seq_len


def _flops(argv: list[str]) -> int:
    from lmforge.scaling.flops import build_meta_model, flops_6nd, model_active_params

    a = parse_config(FlopsArgs, argv, prog="lmforge scaling flops", description="FLOPs of a model.",
                     config_file=False)
    cfg, seq_len = _flops_model(a)
    model = build_meta_model(cfg)  # (once: num_params, active_params and flops_per_token each built one)
    n, active = model.num_params(), model_active_params(model)
    print(f"N = {n:,} ({model.num_params(exclude_embeddings=True):,} without embeddings)")
    if active != n:  # an MoE: 6ND counts the parameters a token runs (lmforge.scaling.flops, module docstring)
        print(f"N active = {active:,} per token (top_k of each MoE layer's routed experts)")
    print(f"D = {a.tokens:.4g} training tokens (--tokens)")  # the FLOPs below are for D, not the run's own tokens
    what = f"all {n:,} parameters" if active == n else f"the {active:,} active parameters, not all {n:,}"
    print(f"6ND         = {flops_6nd(active, a.tokens):.4g} FLOPs (N = {what})")
    print(f"exact count = {model.flops_per_token(seq_len, training=True) * a.tokens:.4g} FLOPs (seq_len {seq_len})")
    return 0


COMMANDS = {
    "sweep": (_sweep, "train a grid of models over FLOP budgets and record final losses"),
    "fit": (_fit, "fit scaling laws to a run table; predict compute-optimal N, D; plots"),
    "flops": (_flops, "6ND (N = all parameters; an MoE's active ones) and the exact FLOP count of a model"),
}


def main(argv: list[str]) -> int:
    return run_group("scaling", argv, COMMANDS)
