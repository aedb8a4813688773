"""List options of names (module-name patterns, registry keys: lmforge.config.names_field) take their values apart or
comma-separated on the command line (`--lora.targets wq,wv` = `--lora.targets wq wv`); lists of free text and paths
keep a value with a comma whole."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest
import tyro

from lmforge.align.config import OBJECTIVES, config_class
from lmforge.cli.common import parse_config
from lmforge.cli.data import TrainClassifierArgs
from lmforge.cli.generate import GenerateConfig
from lmforge.cli.tokenizer import EncodeArgs, StatsArgs, TrainArgs
from lmforge.config import NAMES, names_field
from lmforge.optim.benchmark import OptimBenchConfig
from lmforge.train.config import TrainConfig


def _parse(cls, *argv):
    return parse_config(cls, list(argv), prog="lmforge test", description="")


@pytest.mark.parametrize("given", [["--lora.targets", "wq,wv"], ["--lora.targets=wq,wv"],
                                   ["--lora.targets", "wq,", "wv"], ["--lora.targets", "wq", "wv"]])
def test_lora_targets_take_comma_separated_names(given):
    """`--lora.targets wq,wv` was one pattern 'wq,wv', which matched no layer."""
    cfg = _parse(config_class("sft"), "--init", "runs/x", *given, "--lora.trainable", "head,norm")
    assert cfg.lora.targets == ("wq", "wv") and cfg.lora.trainable == ("head", "norm")


def test_every_option_of_names_takes_comma_separated_values():
    assert _parse(OptimBenchConfig, "--optimizers", "adamw,lion").optimizers == ("adamw", "lion")
    cfg = _parse(TrainConfig, "--model.sliding_window", "8", "--model.layer_types", "full,sliding", "full,sliding")
    assert cfg.model.layer_types == ("full", "sliding", "full", "sliding")
    args = _parse(TrainArgs, "--input", "a.txt", "--vocab_size", "300", "--out", "tok", "--export", "hf,gpt2")
    assert args.export == ("hf", "gpt2") and args.input == ("a.txt",)


def test_lists_of_text_and_paths_keep_a_comma():
    cfg = _parse(config_class("sft"), "--init", "runs/x", "--data.train", "a,b.jsonl", "--lora.targets", "wq")
    assert cfg.data.train == ("a,b.jsonl",)
    gen = _parse(GenerateConfig, "--checkpoint", "c", "--prompts", "x, y", "--stop", "a,b")
    assert gen.prompts == ("x, y",) and gen.sampling.stop == ("a,b",)


FREE_TEXT = {"data.train", "data.val", "input", "special", "prompts", "stop", "positive", "negative"}
"""the list options of text or paths (a value may hold a comma), by field name: every other list of strings is
one of names (names_field)"""


def _string_lists(cls, prefix=""):
    """(dotted name, holds names) of every tuple-of-strings field of `cls`, at any depth."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
        for t in options:
            if dataclasses.is_dataclass(t):
                yield from _string_lists(t, f"{prefix}{f.name}.")
            elif typing.get_origin(t) is tuple and typing.get_args(t)[-1] is Ellipsis:
                item = typing.get_args(t)[0]
                if item is str or typing.get_origin(item) is typing.Literal:
                    yield prefix + f.name, bool(f.metadata.get(NAMES))


@pytest.mark.parametrize("cls", [*(config_class(o) for o in OBJECTIVES), TrainConfig, OptimBenchConfig, TrainArgs,
                                 EncodeArgs, StatsArgs, GenerateConfig, TrainClassifierArgs])
def test_every_list_of_strings_of_a_command_is_names_or_free_text(cls):
    """A list option added later is classified: names (comma-separated on the command line) or free text."""
    for name, names in _string_lists(cls):
        assert names != (name.split(".", 1)[-1] in FREE_TEXT or name in FREE_TEXT), name


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Flattened:
    kinds: tuple[str, ...] = names_field(("a",))
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class _WithFlattened:
    sampling: typing.Annotated[_Flattened, tyro.conf.OmitArgPrefixes] = dataclasses.field(default_factory=_Flattened)
    layers: tuple[str, ...] = names_field(())


def test_a_names_option_of_a_section_without_a_prefix_is_split():
    """The fields to split were found by a second walk of the config beside common._options, which ignored
    tyro.conf.OmitArgPrefixes: a names field inside Sampling (flag --kinds, looked up as sampling.kinds) was never
    split (found 2026-12-07, latent). The names come from _options' one walk, so flag spelling has one source."""
    cfg = _parse(_WithFlattened, "--kinds", "x,y", "--stop", "p,q", "--layers=u,v")
    assert cfg.sampling.kinds == ("x", "y") and cfg.sampling.stop == ("p,q",) and cfg.layers == ("u", "v")
