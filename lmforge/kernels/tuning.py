"""Kernel block shapes as an explicit object, tuned per GPU model and cached on disk.

Block shapes (rows per program, tile width, warps, K splits, attention slices) move a batch-1 decode step
by 10-30%, and the best ones differ between an H100 and an H200. `KernelConfigs` holds one set for one
(GPU name, model shape); kernels take their config as an argument (no module state), and whoever builds
a decode step owns the object. `coordinate_descent` tunes a set by timing a caller-supplied function
(lmforge.infer.kernel_step times the whole captured step: timing kernels alone is noisy and blind to how
neighbours overlap). Sets are saved as JSON, one file per GPU and model shape, under
$LMFORGE_KERNEL_CACHE (default ~/.cache/lmforge/kernels/); sets tuned by the project's own benchmarks ship
with the package (lmforge/kernels/configs/, e.g. the 1.1B Llama shape on an H200) and serve where the cache
has no file for that GPU and shape:

    {"gpu": "NVIDIA H200", "model": "llama-d2048-l22-h32-kv4-hd64-ff5632-v32000-bfloat16",
     "configs": {"('add', 2048, 2048, 'torch.bfloat16')": [4, 512, 4, 4], ...}}

Keys are repr() of the kernels' shape keys (lmforge.kernels.decode.*_key); a shape missing from a set
runs with its default configuration.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from lmforge.errors import ConfigError, warn_caller
from lmforge.utils import write_json_atomic

CACHE_ENV = "LMFORGE_KERNEL_CACHE"
JSON_KEYS = ("gpu", "model", "configs")
"""the keys of a saved set (KernelConfigs.to_json)"""
SHIPPED_DIR = Path(__file__).parent / "configs"
"""sets tuned on the project's benchmark GPUs, one file per GPU and model shape (cache_path's names)"""


@dataclasses.dataclass(frozen=True, kw_only=True)
class KernelConfigs:
    gpu: str = ""
    """the device name these configs were tuned on (torch.cuda.get_device_name()); "" = untuned defaults"""
    model: str = ""
    """the model shape they were tuned for (model_signature())"""
    table: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    """repr(shape key) -> block configuration"""

    def __post_init__(self):
        for name in ("gpu", "model"):  # (they name the cache file a tune saves to)
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"KernelConfigs.{name} = {getattr(self, name)!r}: expected a string")
        for k, v in self.table.items():
            if (not isinstance(k, str) or not isinstance(v, tuple) or not v
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v) or v[0] == 0):
                # (0 is a flag's value in some positions: paged attention's (slices, tile, warps, per head 0/1, ...))
                raise ConfigError(f"KernelConfigs.table[{k!r}] = {v!r}: expected a tuple of non-negative ints, the "
                                  "first positive")

    def get(self, key: tuple) -> tuple[int, ...] | None:
        return self.table.get(repr(key))

    def with_config(self, key: tuple, config: tuple[int, ...]) -> "KernelConfigs":
        """A copy with one shape's configuration set."""
        return dataclasses.replace(self, table={**self.table, repr(key): tuple(config)})

    def to_json(self) -> dict:
        return {"gpu": self.gpu, "model": self.model, "configs": {k: list(v) for k, v in self.table.items()}}

    @classmethod
    def from_json(cls, d: dict, source: str = "kernel config set") -> "KernelConfigs":
        """The set to_json wrote. A dict without "configs", or with keys beside gpu/model/configs (the first
        tuner's flat {shape key: config} files), is refused: read leniently it loaded as an empty set, and the
        step ran on default block shapes without a word. `source` names the file in the error."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} is not a KernelConfigs set: expected a JSON object with keys "
                              f"{', '.join(JSON_KEYS)}, got a JSON {type(d).__name__}")
        extra = sorted(set(d) - set(JSON_KEYS))
        if "configs" not in d or extra:
            why = [] if "configs" in d else ["no 'configs'"]
            if extra:
                why.append("unknown keys " + ", ".join(extra[:3]) + (f" and {len(extra) - 3} more" if len(extra) > 3
                                                                     else ""))
            if len(why) == 2:
                why.append("a flat file of shape keys (the first tuner's) does not convert")
            raise ConfigError(f"{source} is not a KernelConfigs set (keys {', '.join(JSON_KEYS)}): {'; '.join(why)}; "
                              "delete it to tune again (on first use, or with bench/decode.py --tune-step)")
        if not isinstance(d["configs"], dict):
            raise ConfigError(f"{source}: 'configs' must map shape keys to configurations, got a JSON "
                              f"{type(d['configs']).__name__}")
        return cls(gpu=d.get("gpu", ""), model=d.get("model", ""), table={k: tuple(v) for k, v in d["configs"].items()})

    def save(self, path: Path | None = None) -> Path:
        """Write to `path` (default: this GPU and model's file in the cache directory), atomically."""
        path = Path(path) if path is not None else cache_path(self.gpu, self.model)
        write_json_atomic(path, self.to_json())  # a unique temporary name: two processes tuning at once do not mix
        return path

    @classmethod
    def load(cls, path: Path) -> "KernelConfigs":
        source = f"kernel config file {path}"
        try:
            return cls.from_json(json.loads(Path(path).read_text()), source=source)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            if isinstance(e, ConfigError) and str(e).startswith(source):  # from_json's own: names the file
                raise
            raise ConfigError(f"{source} is unreadable ({e}); delete it to tune again") from e

    @classmethod
    def cached(cls, gpu: str, model: str, *, strict: bool = True) -> "KernelConfigs | None":
        """The set saved in the cache for this GPU and model shape, else the one shipped with lmforge for
        them, else None. A cache file that does not load (cut short by a crash, edited, another format) raises
        a ConfigError naming it; strict=False (an engine starting: lmforge.infer.kernel_step) warns in one
        line naming it and goes on as if it were not there: the shipped set or None, so the caller tunes again
        where it tunes, and save() then replaces the file atomically."""
        path = cache_path(gpu, model)
        if path.exists():
            try:
                return cls.load(path)
            except ConfigError as e:
                if strict:
                    raise
                shipped = (SHIPPED_DIR / path.name).exists()
                warn_caller(f"{e} (ignored: {'the set shipped with lmforge' if shipped else 'default block shapes'} "
                            "serve until a tune rewrites it)")
        path = SHIPPED_DIR / path.name
        return cls.load(path) if path.exists() else None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lmforge" / "kernels")


def cache_path(gpu: str, model: str) -> Path:
    slug = lambda s: re.sub(r"[^A-Za-z0-9.-]+", "_", s).strip("_") or "none"  # noqa: E731
    return cache_dir() / f"{slug(gpu)}__{slug(model)}.json"


def gpu_name(device: torch.device | str) -> str:
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def coordinate_descent(configs: KernelConfigs, space: Mapping[tuple, Iterable[tuple[int, ...]]],
                       seconds: Callable[[KernelConfigs], float], rounds: int = 1
                       ) -> tuple[KernelConfigs, dict[str, float]]:
    """Tune one shape key at a time over its candidates with the others fixed, keeping the fastest
    (`seconds(configs)` times a whole step with them; inf for a candidate that cannot run), for `rounds`
    passes over the keys. Returns the tuned set and {repr(key): best seconds}."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for key, cands in space.items():
            times = {tuple(c): seconds(configs.with_config(key, c)) for c in cands}
            pick = min(times, key=times.get)
            if times[pick] == float("inf"):  # no candidate ran: keep what the set had
                continue
            configs = configs.with_config(key, pick)
            best[repr(key)] = times[pick]
    return configs, best
