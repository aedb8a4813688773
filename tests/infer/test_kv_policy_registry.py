"""register_policy: a KV policy written outside lmforge gets a name policy_from_spec (the command line's
--kv-policy NAME:key=value,...) builds it by, as register_model adds a model class."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lmforge.errors import ConfigError
from lmforge.infer.kv import policy as P


@dataclass(frozen=True, kw_only=True)
class KeepFirst(P.KVPolicy):
    keep: int

    def plan(self, seq, state):
        return list(range(self.keep)) if seq.num_slots > self.keep else None


def test_a_registered_policy_is_built_from_its_spec():
    try:
        assert P.register_policy("keep_first", KeepFirst, example="keep_first:keep=8") is KeepFirst
        assert P.register_policy("keep_first", KeepFirst) is KeepFirst  # the same class again: a no-op
        assert P.policy_from_spec("keep_first:keep=8") == KeepFirst(keep=8)
        with pytest.raises(ConfigError, match=r"missing 1 required keyword-only argument: 'keep' \(e.g. keep_first"):
            P.policy_from_spec("keep_first:")  # (a registered policy's example, where the spec leaves a field out)
        with pytest.raises(ConfigError, match="choose one of streaming, h2o, snapkv, keep_first"):
            P.policy_from_spec("lru:size=3")
    finally:
        P.POLICIES.pop("keep_first", None)
        P.EXAMPLES.pop("keep_first", None)


def test_a_policy_registered_without_an_example_still_answers_a_missing_field_in_one_line():
    try:
        P.register_policy("keep_first", KeepFirst)
        with pytest.raises(ConfigError, match=r"'keep'.*\(e.g. keep_first:keep=VALUE\)") as e:
            P.policy_from_spec("keep_first")
        assert "\n" not in str(e.value)
    finally:
        P.POLICIES.pop("keep_first", None)


@pytest.mark.parametrize("name,cls,message", [
    ("h2o", KeepFirst, "'h2o' is already"),
    ("Keep", KeepFirst, "lower-case"),
    ("keep:first", KeepFirst, "lower-case"),
    ("", KeepFirst, "lower-case"),
    ("keep_first", dict, "a KVPolicy dataclass"),
    ("keep_first", P.KVPolicy, "a KVPolicy dataclass"),
])
def test_bad_registrations_are_refused_in_one_line(name, cls, message):
    with pytest.raises(ConfigError, match=message) as e:
        P.register_policy(name, cls)
    assert "\n" not in str(e.value) and "keep_first" not in P.POLICIES and P.POLICIES["h2o"] is P.H2O


@dataclass(frozen=True, kw_only=True)
class KeepFraction(P.KVPolicy):
    ratio: float = 0.5
    keep: int = 4

    def plan(self, seq, state):
        return None


def test_a_spec_gives_a_registered_policy_floats_and_refuses_a_key_given_twice():
    """A spec's values were ints, bools or strings: a registered policy's float field got the string '0.25' and
    failed later, inside an engine step; 'window=256,window=128' kept the last silently."""
    try:
        P.register_policy("keep_fraction", KeepFraction)
        assert P.policy_from_spec("keep_fraction:ratio=0.25,keep=3") == KeepFraction(ratio=0.25, keep=3)
        assert P.policy_from_spec("keep_fraction:ratio=1e-1").ratio == 0.1
        with pytest.raises(ConfigError, match="keep is given twice"):
            P.policy_from_spec("keep_fraction:keep=2,keep=3")
    finally:
        P.POLICIES.pop("keep_fraction", None)
    assert P.policy_from_spec("streaming:window=256,positions=cache").window == 256


@dataclass(frozen=True, kw_only=True)
class Tagged(P.KVPolicy):
    tag: str = "x"
    on: bool = False

    def plan(self, seq, state):
        return None


def test_a_spec_reads_each_value_for_its_fields_type():
    """Values were typed by how they looked: a str field given 'tag=2024' or 'tag=true' was refused ('expected a
    string'); now a text field takes the text as written, the others read numbers and booleans."""
    try:
        P.register_policy("tagged", Tagged)
        assert P.policy_from_spec("tagged:tag=2024,on=true") == Tagged(tag="2024", on=True)
        assert P.policy_from_spec("tagged:tag=true").tag == "true"
    finally:
        P.POLICIES.pop("tagged", None)
