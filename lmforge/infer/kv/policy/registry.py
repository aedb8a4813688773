"""KV policies by name: the registry `policy_from_spec` builds from (the command line's --kv-policy
NAME:key=value,...), the shipped policies under their names, and `register_policy` for one written elsewhere."""

from __future__ import annotations

import re
import typing
from typing import Any

from lmforge.config import _hints, claim
from lmforge.errors import ConfigError
from lmforge.infer.kv.policy.base import KVPolicy
from lmforge.infer.kv.policy.scored import H2O, SnapKV
from lmforge.infer.kv.policy.streaming import StreamingLLM


POLICIES = {"streaming": StreamingLLM, "h2o": H2O, "snapkv": SnapKV}
"""names of the policies `policy_from_spec` builds (the command line's --kv-policy): the shipped ones, and those
register_policy adds"""
EXAMPLES = {"streaming": "streaming:window=256", "h2o": "h2o:heavy=64,recent=64", "snapkv": "snapkv:budget=128"}


def register_policy(name: str, cls: type, example: str | None = None) -> type:
    """Let policy_from_spec (the command line's --kv-policy NAME:key=value,...) build `cls`, a KVPolicy dataclass
    written outside lmforge, by `name`, as register_model adds a model class; `example` is a spec errors show. A
    name taken by another class is refused; registering the same class again does nothing. Returns cls."""
    import dataclasses

    if not isinstance(name, str) or not name or name != name.strip().lower() or any(c in name for c in ":,="):
        raise ConfigError(f"a KV policy registers under a lower-case name without ':', ',' or '=' (it opens a "
                          f"spec 'NAME:key=value,...'), got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, KVPolicy) and dataclasses.is_dataclass(cls)):
        raise ConfigError(f"register_policy({name!r}, ...) takes a KVPolicy dataclass (its fields are the spec's "
                          f"keys), got {getattr(cls, '__qualname__', cls)!r}")
    claim(POLICIES, name, cls, "KV policy")
    if example is not None:
        EXAMPLES[name] = example
    return cls


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _spec_value(text: str, hint: Any) -> int | float | bool | str:
    """A spec value as the command line writes it, read for its field's declared type (`hint`): a field that takes
    text (str, a Literal of strings) gets the text as written ('tag=2024' stays '2024'); otherwise '256' an int,
    '0.25' or '1e-3' a float (it stayed the string '0.25'), 'true'/'false' a bool, anything else its text (which
    the dataclass's coercion then names)."""
    args = typing.get_args(hint)
    if hint is str or str in args or (typing.get_origin(hint) is typing.Literal and all(isinstance(a, str)
                                                                                       for a in args)):
        return text
    if text.lstrip("+-").isdigit():
        return int(text)
    if _NUMBER.fullmatch(text):
        return float(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def policy_from_spec(spec: str) -> KVPolicy:
    """'NAME:key=value,...' -> that policy, e.g. 'streaming:window=256,positions=cache', 'h2o:heavy=64,recent=64',
    'snapkv:budget=128' (NAME one of POLICIES; keys its fields; values as the dataclass coerces them)."""
    import dataclasses

    name, _, rest = spec.partition(":")
    kind = POLICIES.get(name.strip().lower())
    if kind is None:
        raise ConfigError(f"unknown KV policy {name!r} in {spec!r}; choose one of {', '.join(POLICIES)} "
                          f"(e.g. {', '.join(EXAMPLES.values())})")
    name = name.strip().lower()
    known = {f.name for f in dataclasses.fields(kind)}
    fields = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in known:
            raise ConfigError(f"KV policy {name}: {item!r} is not key=value with a key among "
                              f"{', '.join(sorted(known))}")
        if key in fields:
            raise ConfigError(f"KV policy {name}: {key} is given twice in {spec!r}; give it once")
        fields[key] = _spec_value(value.strip(), _hints(kind).get(key))
    try:
        return kind(**fields)
    except TypeError as e:  # a required field left out
        example = EXAMPLES.get(name) or f"{name}:" + ",".join(f"{f.name}=VALUE" for f in dataclasses.fields(kind)
                                                             if f.default is f.default_factory is dataclasses.MISSING)
        raise ConfigError(f"KV policy {spec!r}: {e} (e.g. {example})") from None
