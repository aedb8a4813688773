"""Helpers every CLI module uses: options generated from a config dataclass (tyro), an optional
`--config FILE.toml` whose values become the defaults, and sub-command groups."""

from __future__ import annotations

import dataclasses
import sys
from contextlib import contextmanager
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

    out = {}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            for i, a in enumerate(argv[:-1]):
                if a in (f"--{f.name}", f"--{f.name.replace('_', '-')}"):
                    out[f.name] = argv[i + 1]
    return out


def _field_type(tp) -> tuple[type, bool]:
    """(the type a field holds, whether it may be None): `MoEConfig | None` -> (MoEConfig, True)."""
    import typing

    tp = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _option_fields(cls: type, prefix: str = "") -> dict[str, tuple[type, dataclasses.Field]]:
    """Every option tyro makes of a config, spelled as `--help` shows it (`--model.n-layers`; a section marked
    tyro.conf.OmitArgPrefixes adds no prefix: sampling's `--temperature`) -> (the type it holds, its field).
    Positional arguments are left out, and so are lists of tables (`[[data.sources]]`) and of functions; the options
    of a section that defaults to None are in (a flag of one opens it: open_sections)."""
    import collections.abc
    import typing

    import tyro

    out: dict[str, tuple[type, dataclasses.Field]] = {}
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        marks = getattr(hints[f.name], "__metadata__", ())
        if tyro.conf.Positional in marks:
            continue
        tp, _ = _field_type(hints[f.name])
        name = f.name.replace("_", "-")
        if any(dataclasses.is_dataclass(a) or typing.get_origin(a) is collections.abc.Callable
               for a in typing.get_args(tp)):  # (a list of tables, TOML only, or of functions: tyro makes no flag)
            continue
        if dataclasses.is_dataclass(tp):
            out |= _option_fields(tp, prefix if tyro.conf.OmitArgPrefixes in marks else f"{prefix}{name}.")
        else:
            out[f"--{prefix}{name}"] = (tp, f)
    return out


def _options(cls: type) -> dict[str, type]:
    """Every option tyro makes of a config (`_option_fields`) -> the type it holds."""
    return {flag: tp for flag, (tp, _) in _option_fields(cls).items()}


def _bool_flags(cls: type) -> set[str]:
    """Names of the bool options of a config, nested ones as 'section.name' (and bare, for flattened ones)."""
    names = {flag[2:].replace("-", "_") for flag, tp in _options(cls).items() if tp is bool}
    return names | {name.rsplit(".", 1)[-1] for name in names}


def bare_bools(cls: type, argv: list[str]) -> list[str]:
    """`--restart` alone (before another flag, a positional argument or nothing) means `--restart True` (the
    options otherwise take an explicit True/False), and a bool's value may be written true/false/yes/no/1/0 in
    any case."""
    names = _bool_flags(cls)
    words = {"true": "True", "false": "False", "yes": "True", "no": "False", "1": "True", "0": "False"}

    def is_bool(arg: str) -> bool:
        return arg.startswith("--") and arg.split("=", 1)[0][2:].replace("-", "_") in names

    out = []
    for i, a in enumerate(argv):
        flag, eq, value = a.partition("=")
        if eq and is_bool(a) and value.lower() in words:
            a = f"{flag}={words[value.lower()]}"
        elif i > 0 and "=" not in argv[i - 1] and is_bool(argv[i - 1]) and a.lower() in words:
            a = words[a.lower()]
        out.append(a)
        nxt = argv[i + 1] if i + 1 < len(argv) else "--"
        if not eq and is_bool(a) and (nxt.startswith("--") or nxt.lower() not in words):
            out.append("True")
    return out


def _name_lists(cls: type) -> set[str]:
    """The options holding tuples of names (lmforge.config.names_field), at any depth, spelled as _options spells
    them (`--lora.targets`, `--model.layer-types`)."""
    from lmforge.config import NAMES

    return {flag for flag, (_, f) in _option_fields(cls).items() if f.metadata.get(NAMES)}


def split_names(cls: type, argv: list[str]) -> list[str]:
    """The values of an option holding names (lmforge.config.names_field: --lora.targets, --model.layer_types,
    --optimizers, ...) split at commas, so `--lora.targets wq,wv` (or `--lora.targets=wq,wv`) is `--lora.targets wq
    wv`; tyro read "wq,wv" as one module-name pattern, which matched no layer. A name never holds a comma; other
    lists (stop strings, prompts, paths) keep their values whole."""
    names = _name_lists(cls)
    out, inside = [], False
    for a in argv:
        if a.startswith("--"):
            flag, eq, value = a.partition("=")
            inside = flag.replace("_", "-") in names
            if inside and eq:
                out += [flag, *(p for p in value.split(",") if p)] if value.strip(",") else [a]
                inside = False
            else:
                out.append(a)
        elif inside and a.strip(","):
            out += [p for p in a.split(",") if p]
        else:
            out.append(a)
    return out


def _section_types(cls: type) -> dict[str, tuple[type, bool]]:
    """Top-level fields of `cls` that are config sections: name -> (dataclass, whether it defaults to None)."""
    import typing

    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        tp, optional = _field_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out[f.name] = (tp, optional and f.default is None)
    return out


def _optional_sections(cls: type, prefix: str = "") -> dict[str, type]:
    """Config sections at any depth that default to None (`lora`, `model.moe`): dotted name -> dataclass."""
    out = {}
    for name, (tp, optional) in _section_types(cls).items():
        if optional:
            out[prefix + name] = tp
        out |= _optional_sections(tp, f"{prefix}{name}.")
    return out


def open_sections(cls: type, argv: list[str], data: dict) -> bool:
    """A flag inside a section that defaults to None (`--model.moe.n_experts 8`: ModelConfig.moe is
    `MoEConfig | None`) opens that section in `data` with its defaults, as a `[model.moe]` table would:
    tyro offers no flags for a section whose value is None. True when a section was opened."""
    import typing

    opened = False
    for a in argv:
        if not a.startswith("--") or "." not in a:
            continue
        path = a[2:].split("=", 1)[0].replace("-", "_").split(".")
        tp, node = cls, data
        for name in path[:-1]:
            fields = {f.name: f for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else {}
            if name not in fields:
                break
            parent, (tp, optional) = fields[name], _field_type(typing.get_type_hints(tp)[name])
            if not dataclasses.is_dataclass(tp) or not isinstance(node, dict):
                break
            if optional and parent.default is None and node.get(name) is None:
                node[name], opened = {}, True
            node = node.setdefault(name, {})
    return opened


def refuse_flag_for_positional(argv: list[str], flags: tuple[str, ...], usage: str) -> None:
    """A command's positional argument given as a flag (`--checkpoint X`, which sample / generate / chat take;
    `--config FILE`, which train takes) is a one-line error showing the usage; tyro answered "Missing value for
    argument 'checkpoint'", the argument the user had just given."""
    flag = next((a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in flags), None)
    if flag is not None:
        raise ConfigError(f"this command takes {flag}'s value as a positional argument, without the flag: {usage}")


def refuse_bare_word(cls: type, argv: list[str], prog: str, given: dict) -> None:
    """A first argument that is no flag, to a command that takes no positional argument (`lmforge sample runs/demo`,
    as `lmforge export runs/demo OUT` takes it), is a one-line error naming the flag its value wants; tyro called the
    path an unrecognized option beside a missing --checkpoint. `given`: the values a --config file set."""
    import typing

    import tyro

    if not argv or argv[0].startswith("-") or "-h" in argv or "--help" in argv:
        return
    hints = typing.get_type_hints(cls, include_extras=True)
    if any(tyro.conf.Positional in getattr(tp, "__metadata__", ()) for tp in hints.values()):
        return
    missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING and f.name not in {**given, **_required_flags(cls, argv)}]
    if len(missing) == 1:
        flag = f"--{missing[0].replace('_', '-')}"
        raise ConfigError(f"the {missing[0]} is given with {flag}, not as a positional argument: {prog} {flag} "
                          f"{argv[0]} [options]")
    raise ConfigError(f"no positional argument is taken, got {argv[0]!r}: options are flags (--name value; {prog} "
                      "--help lists them)")


def _help_registry():
    """tyro's rules with one change: an option whose default is an empty list, tuple or dict (`--data.val`,
    `--stop-token-ids`) says "(default: none)" in its help; tyro printed "(default: )"."""

    from tyro.constructors import ConstructorRegistry, PrimitiveConstructorSpec

    registry, inside = ConstructorRegistry(), []

    @registry.primitive_rule
    def empty_default_says_none(info):
        if inside:  # the lookup below asks the rules again (and again for a tuple's items): tyro's own answer
            return None
        inside.append(True)
        try:
            spec = ConstructorRegistry.get_primitive_spec(info)
        finally:
            inside.pop()
        if not isinstance(spec, PrimitiveConstructorSpec):
            return None
        as_strings = spec.str_from_instance
        return dataclasses.replace(spec, str_from_instance=lambda value: as_strings(value) or ["none"])

    return registry


@contextmanager
def _joined_field_help():
    """A field docstring's lines read as one paragraph in --help (blank lines, "- " / "* " items and lines opening with
    a flag, "--nproc N: ...", still break).
    tyro joins a docstring's lines only where the next starts with a letter, and looks before dedenting, so every
    line of an indented field docstring kept its break: at 80 columns each help wrapped at its source lines too,
    leaving ragged half-empty rows. (tyro's module-level helper, read through its module at each call.)"""
    import inspect
    import re

    from tyro import _strings

    original = getattr(_strings, "remove_single_line_breaks", None)
    if original is None:  # (another tyro: its own layout)
        yield
        return

    def joined(text: str) -> str:
        return re.sub(r"(?<=\S)\n(?![ \t]*(?:\n|--\w|[-*] ))[ \t]*", " ", inspect.cleandoc(text))

    _strings.remove_single_line_breaks = joined
    try:
        yield
    finally:
        _strings.remove_single_line_breaks = original


def parse_config(cls: type[T], argv: list[str], *, prog: str, description: str,
                 default: T | None = None, config_file: bool = True) -> T:
    """Parse argv into `cls`. With `config_file`, `--config FILE` (TOML/JSON) supplies the defaults and
    the remaining `--section.key value` flags override them."""

    import tyro

    from lmforge.cli.parse_errors import parse_errors_in_one_line
    from lmforge.config import from_dict, read_config_file

    path, data = None, {}
    if config_file:
        path, argv = _split_config_flag(argv)
        if path is None and argv and not argv[0].startswith("-") and argv[0].endswith((".toml", ".json")):
            raise ConfigError(f"a config file is given with --config: {prog} --config {argv[0]} [--section.key value]")
        if path is not None:
            data = read_config_file(path)
        description += "\n\n--config FILE.toml loads defaults from a TOML file; flags override it."
    refuse_bare_word(cls, argv, prog, given=data)
    optional = _optional_sections(cls)
    if optional:  # their flags are hidden while they are None (tyro lists a section only once it is set)
        flag = {n: "--" + n.replace("_", "-") for n in optional}  # (tyro's spelling: --model.rope-scaling.kind)
        description += "\n\n" + "\n".join(
            f"{flag[n]}.FIELD flags (or a [{n}] table) turn the {n} section on: "
            + ", ".join(f"{flag[n]}.{f.name.replace('_', '-')}" for f in dataclasses.fields(tp)) + "."
            for n, tp in optional.items())
    if open_sections(cls, argv, data) or path is not None:
        default = from_dict(cls, {**_required_flags(cls, argv), **data}, base=default)
    argv = split_names(cls, argv)
    with _help_registry(), _joined_field_help(), parse_errors_in_one_line(
            cls, argv, prog, extra=("--config",) * config_file):
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
        from lmforge.cli.parse_errors import did_you_mean

        print(f"lmforge {group}: error: unknown subcommand {sub!r}{did_you_mean(sub, list(commands))}; choose one "
              f"of: {', '.join(commands)}", file=sys.stderr)
        return 2
    return int(commands[sub][0](rest) or 0)


def load_llm(cfg, **kwargs):
    """`LLM.load` for a command's config (fields checkpoint, base, tokenizer, device, optionally kv_policy and
    max_model_len): a run, checkpoint or HF-format model directory; the device and the policy are checked first so
    a bad one is a one-line error; the engine lists as many top log-probs as the command's sampling asks for, past
    EngineConfig.max_logprobs' default (a server's cap). kwargs: LLM's other options (max_batch_size, ...)."""
    from lmforge.infer.config import EngineConfig
    from lmforge.infer.llm import LLM
    from lmforge.utils import pick_device

    device = pick_device(cfg.device)
    if getattr(cfg, "kv_policy", None):
        from lmforge.infer.kv.policy import policy_from_spec

        kwargs["kv_policy"] = policy_from_spec(cfg.kv_policy)
    if getattr(cfg, "max_model_len", None) is not None:
        kwargs["max_model_len"] = cfg.max_model_len
    sampling = getattr(cfg, "sampling", None)  # (the command's one user is the only requester: what it asks, it gets)
    asked = max((getattr(sampling, k, None) or 0 for k in ("logprobs", "prompt_logprobs")), default=0)
    if asked > EngineConfig.max_logprobs:
        kwargs["max_logprobs"] = asked
    return LLM.load(cfg.checkpoint, device=device, tokenizer=cfg.tokenizer, base=cfg.base, **kwargs)
