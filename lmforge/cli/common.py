"""Helpers every CLI module uses: options generated from a config dataclass (tyro), an optional
`--config FILE.toml` whose values become the defaults, and sub-command groups."""

from __future__ import annotations

import sys
from typing import Callable, TypeVar

from lmforge.errors import ConfigError

T = TypeVar("T")


def _split_config_flag(argv: list[str], flag: str = "--config", what: str = "a file path"
                       ) -> tuple[str | None, list[str]]:
    """(value of `flag` or None, the other arguments)."""
    rest, path, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a == flag:
            if i + 1 >= len(argv):
                raise ConfigError(f"{flag} needs {what}")
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith(f"{flag}="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
        i += 1
    return path, rest


def _required_flags(cls: type, argv: list[str]) -> dict[str, str]:
    """Required string fields (such as --checkpoint) given as flags, so a --config file may leave them out."""
    import dataclasses

    out = {}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            for i, a in enumerate(argv[:-1]):
                if a in (f"--{f.name}", f"--{f.name.replace('_', '-')}"):
                    out[f.name] = argv[i + 1]
    return out


def _bool_flags(cls: type, prefix: str = "") -> set[str]:
    """Names of the bool options of a config, nested ones as 'section.name' (and bare, for flattened ones)."""
    import dataclasses
    import typing

    out: set[str] = set()
    for name, tp in typing.get_type_hints(cls).items():
        tp = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
        if tp is bool:
            out |= {prefix + name, name}
        elif dataclasses.is_dataclass(tp):
            out |= _bool_flags(tp, f"{prefix}{name}.")
    return out


def bare_bools(cls: type, argv: list[str]) -> list[str]:
    """`--restart` alone means `--restart True` (the options otherwise take an explicit True/False)."""
    names = _bool_flags(cls)
    out = []
    for i, a in enumerate(argv):
        out.append(a)
        nxt = argv[i + 1] if i + 1 < len(argv) else "--"
        if a.startswith("--") and "=" not in a and a[2:].replace("-", "_") in names and nxt.startswith("--"):
            out.append("True")
    return out


def parse_config(cls: type[T], argv: list[str], *, prog: str, description: str,
                 default: T | None = None, config_file: bool = True) -> T:
    """Parse argv into `cls`. With `config_file`, `--config FILE` (TOML/JSON) supplies the defaults and
    the remaining `--section.key value` flags override them."""
    import tyro

    from lmforge.config import from_dict, read_config_file

    if config_file:
        path, argv = _split_config_flag(argv)
        if path is not None:
            data = read_config_file(path)
            default = from_dict(cls, {**_required_flags(cls, argv), **data})
        description += "\n\n--config FILE.toml loads defaults from a TOML file; flags override it."
    return tyro.cli(cls, args=bare_bools(cls, argv), prog=prog, description=description, default=default,
                    config=(tyro.conf.FlagConversionOff, tyro.conf.AvoidSubcommands,
                            # a comment above a group of fields is a section label, not a field's help
                            tyro.conf.HelptextFromCommentsOff))


def run_group(group: str, argv: list[str], commands: dict[str, tuple[Callable[[list[str]], int | None], str]]) -> int:
    """Dispatch `lmforge GROUP SUB ...` to commands[SUB][0](rest)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: lmforge {group} SUBCOMMAND [options]\n\nsubcommands:")
        for name, (_, help_) in commands.items():
            print(f"  {name:<16} {help_}")
        return 0
    sub, rest = argv[0], argv[1:]
    if sub not in commands:
        print(f"lmforge {group}: error: unknown subcommand {sub!r}; choose one of: {', '.join(commands)}",
              file=sys.stderr)
        return 2
    return int(commands[sub][0](rest) or 0)


def load_llm(cfg, **kwargs):
    """`LLM.load` for a command's config (fields checkpoint, tokenizer, device): a run, checkpoint or
    HF-format model directory; the device is checked first so a bad one is a one-line error."""
    from lmforge.infer.llm import LLM
    from lmforge.utils import pick_device

    return LLM.load(cfg.checkpoint, device=pick_device(cfg.device), tokenizer=cfg.tokenizer, **kwargs)
