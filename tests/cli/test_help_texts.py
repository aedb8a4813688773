"""What `lmforge CMD --help` says is true: positional arguments are explained, and defaults stated in words are the
ones the code takes."""

import re

from ..test_cli import _option_parsers


def test_every_positional_argument_says_what_it_is(monkeypatch, capsys):
    """`lmforge data run --help` explained PIPELINE.toml as "pipeline (required)": tyro writes the field's name where
    it has no docstring (test_every_option_of_every_command_has_help reads that as help)."""
    parsers = _option_parsers(monkeypatch)
    capsys.readouterr()
    helps = {f"{prog} {a.metavar}": re.sub(r"\s*\(required\)$", "", a.help or "") for prog, p in parsers.items()
             for a in p._actions if not a.option_strings}
    assert {"lmforge data run PIPELINE.toml", "lmforge export CKPT", "lmforge export OUT"} <= set(helps)
    assert {name: h for name, h in helps.items() if len(h.split()) < 3} == {}
    assert "`lmforge data stages` lists them" in helps["lmforge data run PIPELINE.toml"]


def test_export_help_names_every_template_it_falls_back_to(monkeypatch, capsys):
    """--template's default was "the one the checkpoint records", but export.chat_template falls back to a HF
    checkpoint's own chat template (its tokenizer_config.json Jinja) after it, as `lmforge chat --help` says."""
    parsers = _option_parsers(monkeypatch)
    capsys.readouterr()
    said = next(a.help for a in parsers["lmforge export"]._actions if "--template" in a.option_strings)
    assert "the one the checkpoint records, else a HF checkpoint's own Jinja" in " ".join(said.split())
