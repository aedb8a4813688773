"""tyro's parse errors (an unknown flag, a flag without its value, a missing required argument, a value left over, a
choice not offered) through `lmforge`: each one line naming the flag and the fix, not tyro's box."""

import dataclasses
import subprocess
import sys

import pytest

from lmforge.cli import main
from lmforge.errors import ConfigError

DEBUG = "(run with --debug for a traceback)"


def said(argv: list[str], capsys) -> list[str]:
    assert main(argv) == 2
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("argv, line", [
    (["sample", "--checkpoint", "x", "--temprature", "0.5"],
     "unknown option --temprature; did you mean --temperature?"),
    (["sample", "--checkpoint", "x", "--top_kk=5"], "unknown option --top_kk; did you mean --top-k?"),
    (["train", "--model.n-layer", "2"], "unknown option --model.n-layer; did you mean --model.n-layers?"),
    (["train", "--confg", "run.toml"], "unknown option --confg; did you mean --config?"),
    (["train", "--model.moe.n-expert", "8"],
     "unknown option --model.moe.n-expert; did you mean --model.moe.n-experts or --model.moe.d-expert?"),
    (["train", "--lr", "0.1"], "unknown option --lr; did you mean --optim.lr or --optim.adam-lr or --optim.head-lr?"),
    (["sample", "--checkpoint", "x", "-t", "0.5"], "unknown option -t"),
    (["sample", "--checkpoint", "x", "--frobnicate", "1"], "unknown option --frobnicate"),
])
def test_an_unknown_flag_is_one_line_with_tyros_suggestion(argv, line, capsys):
    """`--temprature 0.5` was tyro's 11-line box ('Unrecognized options: --temprature, 0.5', 'Perhaps you meant:
    --temperature FLOAT' and its help): one line, tyro's suggestion kept, the flag's value not called unknown too."""
    prog = f"lmforge {argv[0]}"
    assert said(argv, capsys) == [f"{prog}: error: {line} ({prog} --help lists the options)", DEBUG]


@pytest.mark.parametrize("argv, line", [
    (["sample", "--checkpoint", "x", "--temperature"], "--temperature needs a value: --temperature FLOAT"),
    (["sample", "--checkpoint", "x", "--temperature", "--top-p", "0.5"],
     "--temperature needs a value: --temperature FLOAT"),
    (["sample", "--checkpoint"], "--checkpoint needs a value: --checkpoint STR"),
])
def test_a_flag_without_its_value_is_one_line(argv, line, capsys):
    """'Missing value for argument '--temperature'. Expected 1 values.' in a box: one line showing the flag's form."""
    assert said(argv, capsys) == [f"lmforge sample: error: {line} (lmforge sample --help lists the options)", DEBUG]


@pytest.mark.parametrize("argv, line", [
    (["sample"], "missing --checkpoint: lmforge sample --checkpoint STR [options]"),
    (["export", "runs/demo"], "missing OUT: lmforge export CKPT OUT [options]"),
    (["export"], "missing CKPT and OUT: lmforge export CKPT OUT [options]"),
    (["data", "run"], "missing PIPELINE.toml: lmforge data run PIPELINE.toml [options]"),
    (["data", "train-classifier"], "missing --positive, --negative and --out: lmforge data train-classifier "
                                   "--positive [STR [STR ...]] --negative [STR [STR ...]] --out STR [options]"),
    (["sample", "--chekpoint", "x"], "unknown option --chekpoint; did you mean --checkpoint?; and missing "
                                     "--checkpoint: lmforge sample --checkpoint STR [options]"),
])
def test_a_missing_required_argument_is_one_line_with_the_usage(argv, line, capsys):
    """tyro's 'Required options' box ('Missing from lmforge export: CKPT ... OUT ...'): one line naming what is
    missing and the usage that gives it; beside an unknown flag (the typo of the required one), both."""
    prog = " ".join(["lmforge", *argv[:2]]) if argv[0] == "data" else f"lmforge {argv[0]}"
    assert said(argv, capsys) == [f"lmforge {argv[0]}: error: {line} ({prog} --help lists the options)", DEBUG]


@pytest.mark.parametrize("argv, line", [
    (["sample", "--checkpoint", "x", "--temperature", "1", "2"],
     "unexpected value '2' after --temperature 1: --temperature takes one value"),
    (["sample", "--checkpoint", "x", "--prompt", "Once", "upon", "a", "--seed", "1"],
     "unexpected values 'upon', 'a' after --prompt Once: --prompt takes one value (quote a value with spaces)"),
    (["sample", "--checkpoint", "x", "--ignore-eos", "maybe"], "--ignore-eos takes true or false, got 'maybe'"),
    (["sample", "--checkpoint=x", "y"], "unexpected value 'y' after --checkpoint=x: --checkpoint takes one value"),
    (["sample", "--checkpoint", "x", "--logprobs-mode", "rawx"],
     "--logprobs-mode: invalid choice 'rawx'; choose one of processed, raw"),
    (["sample", "--checkpoint", "x", "--max-tokens", "abc"], "--max-tokens: expected {None}|INT, got 'abc'"),
    (["sample", "--checkpoint", "x", "--ignore-eos=maybe"], "--ignore-eos: invalid choice 'maybe'; choose one of "
                                                            "False, True"),
])
def test_a_value_left_over_or_not_offered_is_one_line(argv, line, capsys):
    """A value past a flag's one ('Unrecognized options: 2'), a bool's word tyro does not take, a choice not offered
    ('Invalid choice' box) and an optional int given text (five lines: 'no type matching ... Got errors: ...')."""
    assert said(argv, capsys) == [f"lmforge sample: error: {line} (lmforge sample --help lists the options)", DEBUG]


def test_the_installed_command_prints_no_box():
    r = subprocess.run([sys.executable, "-m", "lmforge", "export", "runs/demo", "--adaptr"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == ["lmforge export: error: unknown option --adaptr; did you mean --adapter?; and "
                                     "missing OUT: lmforge export CKPT OUT [options] (lmforge export --help lists the "
                                     "options)", DEBUG]


@dataclasses.dataclass(frozen=True)
class Adam:
    lr: float = 1e-3


@dataclasses.dataclass(frozen=True)
class Sgd:
    momentum: float = 0.9


@dataclasses.dataclass(frozen=True)
class _Choosing:
    optim: Adam | Sgd


def test_a_missing_subcommand_is_one_line_naming_the_choices():
    """No lmforge command has a tyro subcommand today (a section is one dataclass); a config that had one answers
    through the same hook."""
    from lmforge.cli.common import parse_config

    with pytest.raises(ConfigError, match=r"^a subcommand is needed: one of optim:adam, optim:sgd "):
        parse_config(_Choosing, [], prog="lmforge x", description="", config_file=False)


def test_the_options_suggested_are_the_ones_tyro_makes(monkeypatch, capsys):
    """The suggestions come from common._options, a walk of the config: it lists exactly the flags tyro builds for
    every command (optional sections opened; sampling's without their prefix)."""
    import importlib

    import tyro

    from lmforge.cli import COMMANDS
    from lmforge.cli.common import _options

    from ..test_cli import _option_parsers

    classes = {}
    real = tyro.cli

    def capture(cls, **kw):
        classes[kw["prog"]] = cls
        return real(cls, **kw)

    monkeypatch.setattr(tyro, "cli", capture)
    for name, (module, _) in COMMANDS.items():
        groups = getattr(importlib.import_module(module), "COMMANDS", None)
        for argv in ([[name, sub] for sub in groups] if groups else [[name]]):
            try:
                main([*argv, "--help"])
            except SystemExit:
                pass
    monkeypatch.undo()
    parsers = _option_parsers(monkeypatch)
    capsys.readouterr()
    assert set(parsers) == set(classes) and len(classes) > 15
    for prog, parser in parsers.items():
        tyros = {s for a in parser._actions for s in a.option_strings} - {"-h", "--help"}
        assert set(_options(classes[prog])) == tyros, prog


@pytest.mark.parametrize("argv, line", [
    (["tokenizer", "encod"], "lmforge tokenizer: error: unknown subcommand 'encod' (did you mean 'encode'?); choose "
                             "one of: train, encode, stats"),
    (["trian"], "lmforge: error: unknown command 'trian' (did you mean 'train'?); choose one of: "),
    (["frobnicate"], "lmforge: error: unknown command 'frobnicate'; choose one of: "),
])
def test_an_unknown_command_or_subcommand_suggests_the_one_meant(argv, line, capsys):
    """The command and subcommand names are lmforge's, not tyro's: one line already, without the suggestion an
    unknown flag gets (the same rule, parse_errors.near)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(line)


def test_an_event_this_cannot_read_keeps_tyros_message_not_a_crash(monkeypatch, capsys):
    """tyro's events are its internals (tyro<2 is required): one whose fields moved falls back to tyro's own message
    instead of an AttributeError from the hook."""
    from lmforge.cli import parse_errors

    def moved(*args, **kwargs):
        raise AttributeError("'UnrecognizedArgs' object has no attribute 'tokens'")

    monkeypatch.setattr(parse_errors, "_unrecognized", moved)
    with pytest.raises(SystemExit) as exit:  # (tyro's box exits by itself)
        main(["sample", "--checkpoint", "x", "--temprature", "0.5"])
    err = capsys.readouterr().err
    assert exit.value.code == 2
    assert "--temprature" in err and "AttributeError" not in err
