"""Frozen-dataclass configs <-> dicts and TOML files, with errors that name the offending key.

Configs in lmforge are frozen, keyword-only dataclasses that validate themselves in `__post_init__`.
This module turns nested dicts (from TOML or JSON) into them, refusing unknown keys, and back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import sys
import types
import typing
from pathlib import Path, PurePath
from typing import Any, TypeVar

from lmforge.errors import ConfigError
from lmforge.utils import read_utf8

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")
V = TypeVar("V")

SHORT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""the short dtype names options take (--dtype bf16, ref_dtype='bf16') -> torch's (lmforge.model.hf.float_dtype)"""

NAMES = "names"
"""dataclass field metadata key of a field holding a tuple of names (names_field)"""


def names_field(default: tuple[str, ...] | None) -> Any:
    """A config field holding a tuple of names (module-name patterns, registry keys), none of which holds a comma:
    on the command line its values are given apart or comma-separated (`--lora.targets wq wv` or `--lora.targets
    wq,wv`: lmforge.cli.common.split_names). Free text and paths (stop strings, prompts, data files) are plain
    tuple fields, whose values may hold commas."""
    return dataclasses.field(default=default, metadata={NAMES: True})


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    """How an annotation reads in an error message: 'an integer', 'a list of strings', ..."""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if _is_dataclass_type(tp):
        return f"a table of {tp.__name__} settings"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        inner = args[0] if args else Any
        return f"a list of {_type_name(inner).split(' ', 1)[-1]}s" if inner in names else "a list"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    return getattr(tp, "__name__", str(tp))


def is_int(value: Any) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _bad(where: str, tp: Any, value: Any) -> ConfigError:
    return ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}")


def _coerce_scalar(tp: Any, value: Any, where: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise _bad(where, tp, value)
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not is_int(value):  # numpy's ints too
            raise _bad(where, tp, value)
        return value if type(value) is int else int(value)
    if tp is float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise _bad(where, tp, value)
        return float(value)
    if tp is str:
        if isinstance(value, PurePath):
            return str(value)
        if not isinstance(value, str):
            raise _bad(where, tp, value)
    return value


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert a TOML/JSON/Python value to the annotated field type, or raise a ConfigError naming the
    key and the expected type. Only the type changes, never the meaning: a table becomes its nested
    dataclass, a list a tuple, one path string a 1-tuple of paths, 6 a float, 6.0 an int."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _bad(where, tp, value)
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            if isinstance(value, dict) and _is_dataclass_type(a):  # its table: the nested key's own error
                return _coerce(a, value, where)
            try:
                return _coerce(a, value, where)
            except ConfigError:
                continue
        raise _bad(where, tp, value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is tuple:
        if isinstance(value, (str, PurePath)) and args and args[0] is str:
            value = [value]  # one path where a list of paths is expected
        if not isinstance(value, (list, tuple)):
            raise _bad(where, tp, value)
        if len(args) == 2 and args[1] is Ellipsis or not args:
            inner = args[0] if args else Any
            return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} = {value!r}: expected {len(args)} values")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin in (dict, list) and not isinstance(value, origin):
        raise _bad(where, tp, value)
    return _coerce_scalar(tp, value, where)


def _default(f: dataclasses.Field, base: Any) -> Any:
    if base is not None:
        return getattr(base, f.name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _section_keys(tp: Any) -> set[str]:
    """The keys of the table a field of type `tp` is (a dataclass, one or None, or a tuple of them: an array of
    tables), else none."""
    tables = [t for t in (tp, *typing.get_args(tp)) if _is_dataclass_type(t)]
    return {f.name for t in tables for f in dataclasses.fields(t) if f.init}


def from_dict(cls: type[T], data: dict[str, Any], where: str = "", base: T | None = None) -> T:
    """Build dataclass `cls` from a nested dict; unknown keys and values of the wrong type raise a
    ConfigError naming the key. Missing keys keep the defaults, of `base` when given; a partial table for
    a nested config fills in that field's default (TrainConfig's [model] starts from its default model,
    as `--model.x` flags do)."""
    if not isinstance(data, dict):
        raise _bad(where or cls.__name__, cls, data)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix, key = f"{where}." if where else "", unknown[0]
        section = next((name for name in sorted(fields) if key in _section_keys(hints[name])), None)
        many = section is not None and typing.get_origin(hints[section]) in (tuple, list)  # ([[data.sources]])
        table = f"[[{prefix}{section}]]" if many else f"[{prefix}{section}]"
        raise ConfigError(
            f"unknown config key '{prefix}{key}'; valid keys here: {', '.join(sorted(fields))}"
            + (f"; '{key}' is a key of {table}" if section else "")
        )
    kwargs = {name: getattr(base, name) for name in fields} if base is not None else {}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and n not in data and n not in kwargs]
    if required:
        prefix, key = f"{where}." if where else "", required[0]
        form = f"a [{prefix}{key}] table" if dataclasses.is_dataclass(hints[key]) else f"{key} = ..."
        raise ConfigError(f"missing config key '{prefix}{key}' ({form}); it has no default")
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        default = _default(fields[name], base) if isinstance(value, dict) else None
        if dataclasses.is_dataclass(default) and not isinstance(default, type):
            kwargs[name] = from_dict(type(default), value, path, base=default)
        else:
            kwargs[name] = _coerce(hints[name], value, path)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def coerce_fields(cfg: Any, where: str = "") -> None:
    """For `__post_init__`: accept what a user would naturally pass in Python (a dict for a nested
    config, a path string for a list of paths, a list for a tuple) and refuse wrong types with the key
    and expected type. Values keep their meaning; only their type is normalised (frozen-safe).
    A value that already has its field's type skips _coerce (_field_plan): SamplingParams is built per
    request, and coercing all 28 of its fields cost ~0.3 ms (2 CPU cores, 2026-12-06)."""
    for name, tp, unchanged in _field_plan(type(cfg)):
        value = getattr(cfg, name)
        if unchanged(value):
            continue
        new = _coerce(tp, value, f"{where}.{name}" if where else name)
        if new is not value:
            object.__setattr__(cfg, name, new)


def check_finite(cfg: Any, section: str) -> None:
    """For `__post_init__`, after coerce_fields: every float field of `cfg`, and every float of a tuple field
    (optim.betas), is a finite number. An infinite rate or beta passes `> 0` and a NaN passes `< 0` checks, and
    either shows only as a NaN loss once the run has started. Not part of coerce_fields, which SamplingParams runs
    per request."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, tuple) else (value,)
        if not all(math.isfinite(v) for v in values if isinstance(v, float)):
            raise ConfigError(f"{section}.{f.name} must be a finite number, got {value}")


_SCALARS = (int, float, bool, str)


@functools.lru_cache(maxsize=None)
def _field_plan(cls: type) -> tuple[tuple[str, Any, Any], ...]:
    """Per dataclass, computed once: each init field's (name, annotation, test of values _coerce returns as
    they are)."""
    hints = _hints(cls)
    return tuple((f.name, hints[f.name], _unchanged_test(hints[f.name])) for f in dataclasses.fields(cls) if f.init)


def _unchanged_test(tp: Any):
    """A cheap test passing only values that _coerce(tp, value) returns unchanged (the others go through it;
    tests/test_config.py checks the two agree)."""
    if tp in _SCALARS:
        return lambda v: type(v) is tp
    if _is_dataclass_type(tp):
        return lambda v: isinstance(v, tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        # only the first member's own type: an earlier member converts what a later one would keep (float | int)
        first = next((a for a in args if a is not type(None)), None)
        ok = ((type(None),) if type(None) in args else ()) + ((first,) if first in _SCALARS else ())
        return lambda v: type(v) in ok
    if origin is typing.Literal:
        return lambda v: v in args
    if origin is dict:
        return lambda v: type(v) is dict
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        inner = args[0]
        if inner in _SCALARS:
            return lambda v: type(v) is tuple and all(type(x) is inner for x in v)
        return lambda v: type(v) is tuple and not v
    return lambda v: False


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists) suitable for JSON/TOML."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def with_defaults(cls: type, saved: dict[str, Any], where: str = "") -> dict[str, Any]:
    """A config dict an older lmforge saved (a checkpoint's model, a run's config.json), read through `cls` as it is
    now: the fields it did not have yet take their defaults, as loading it builds them, so it compares with a current
    config field by field. As saved where it does not read (a key `cls` no longer has)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its settings' notices were said when it ran
            return to_dict(from_dict(cls, saved, where))
    except (ValueError, TypeError):  # ConfigError is a ValueError: a saved value no longer reads (a removed name)
        return _fill_defaults(cls, saved)


def _fill_defaults(cls: type, saved: dict[str, Any]) -> dict[str, Any]:
    """`saved` with the fields it lacks as their defaults, nested tables alike, its own values as they are."""
    out = dict(saved)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = _default(f, None)
        nested = dataclasses.is_dataclass(default) and not isinstance(default, type)
        if f.name not in out:
            out[f.name] = to_dict(default)
        elif nested and isinstance(out[f.name], dict):
            out[f.name] = _fill_defaults(type(default), out[f.name])
    return out


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(_config_text(path))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML or JSON config file as a plain dict."""
    path = Path(path)
    if path.suffix != ".json":
        return load_toml(path)
    try:
        data = json.loads(_config_text(path))
    except json.JSONDecodeError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must hold a JSON object of settings")
    return data


def _config_text(path: Path) -> str:
    """A config file's text; one that is missing, cannot be read or is not UTF-8 (TOML and JSON files are) is a
    ConfigError."""
    return read_utf8(path, "config file", want="a TOML or JSON file")


def load_config(cls: type[T], path: str | Path) -> T:
    """Load a TOML or JSON file into `cls`."""
    return from_dict(cls, read_config_file(path))


def check(cond: bool, message: str) -> None:
    """Validation helper for __post_init__: raise ConfigError(message) unless cond."""
    if not cond:
        raise ConfigError(message)


def claim(table: dict, name: str, value: V, what: str) -> V:
    """table[name] = value for the register_* functions (register_model, register_objective, register_data_kind,
    register_policy, register_base_layer), each of which checks its own names first: a name another value holds
    is refused in one line; the same value again (the same class, an equal spec) does nothing. Returns value."""
    held = table.get(name, value)
    if held is not value and held != value:
        shown = getattr(held, "__qualname__", None) or getattr(held, "path", None) or getattr(held, "encode", None)
        raise ConfigError(f"{what} {name!r} is already registered ({shown or repr(held)}); choose another name")
    table[name] = value
    return value
